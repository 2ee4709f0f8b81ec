"""Configuration of the Vaccine alignment-stage defense."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DefenseConfigMixin, EffectiveIf, Range


@dataclass
class VaccineConfig(DefenseConfigMixin, SFTConfig):
    r"""
    Configuration class for the [`VaccineTrainer`].

    Vaccine (perturbation-aware alignment) trains on alignment data, i.e. the `train_dataset`, while every hooked
    module's output is pushed by the worst-case bounded perturbation ε_l = ρ · ∇_{e_l}L / ‖(∇_{e_1}L, …, ∇_{e_L}L)‖.
    All [`~trl.SFTConfig`] parameters are accepted as well.

    Parameters:
        > Parameters that control the defense

        rho (`float`, *optional*, defaults to `2.0`):
            Perturbation radius ρ: the joint L2 norm of the perturbation over all hooked modules, tokens and samples of
            a micro-batch. `0.0` turns the defense off (the trainer is then exactly [`~trl.SFTTrainer`]).
        perturbation (`str`, *optional*, defaults to `"gradient"`):
            `"gradient"` is Vaccine (two forward passes per step). `"random"` is the paper's Random-Vaccine ablation:
            one pass with Gaussian noise of variance ρ added to each hooked output.
        target_modules (`list[str]` or `str`, *optional*, defaults to `None`):
            Modules whose outputs are perturbed, PEFT-style: a list of name suffixes (e.g. `["mlp"]`) or, from Python,
            a regex string matched against the full module name. `None` hooks the attention module of every decoder
            layer (the official choice: the attention output after `o_proj`, before the residual add).
        attention_attr (`str`, *optional*, defaults to `"self_attn"`):
            Name of the attention submodule of a decoder layer, for architectures that call it differently.
        layers_path (`str`, *optional*, defaults to `None`):
            Dotted path from the model to its decoder-layer list (e.g. `"transformer.h"`), for models whose layers
            cannot be found structurally.
    """

    ranges: ClassVar[dict[str, Range]] = {"rho": Range(0.0)}
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "attention_attr": EffectiveIf(
            "target_modules=None (the attention modules)",
            lambda c: c.target_modules is None,
            {"target_modules": ["mlp"]},
        ),
    }

    rho: float = field(
        default=2.0,
        metadata={
            "help": "Perturbation radius rho (joint L2 norm over all hooked modules, tokens and samples). 0 disables "
            "the defense."
        },
    )
    perturbation: str = field(
        default="gradient",
        metadata={
            "help": "`gradient` (Vaccine) or `random` (Random-Vaccine ablation: Gaussian noise of variance rho).",
            "choices": ["gradient", "random"],
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules whose outputs are perturbed (name suffixes, or a regex string from Python). Default: the "
            "attention module of every decoder layer."
        },
    )
    attention_attr: str = field(
        default="self_attn", metadata={"help": "Name of the attention submodule of a decoder layer."}
    )
    layers_path: str | None = field(
        default=None,
        metadata={"help": "Dotted path to the decoder-layer list, when it cannot be found structurally."},
    )

    def __post_init__(self):
        if self.perturbation not in ("gradient", "random"):
            raise ValueError(f"`perturbation` must be 'gradient' or 'random', got {self.perturbation!r}.")
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError("`target_modules` must name at least one module, or be None for the attention modules.")
        super().__post_init__()
