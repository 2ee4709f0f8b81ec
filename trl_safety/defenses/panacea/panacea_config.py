from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DecoderLayersArguments, DefenseConfigMixin, EffectiveIf, HarmfulDataArguments, Range


@dataclass
class PanaceaConfig(DefenseConfigMixin, DecoderLayersArguments, HarmfulDataArguments, SFTConfig):
    r"""
    Configuration class for the [`PanaceaTrainer`].

    Panacea trains on the user's data while learning an adversarial weight perturbation `ε = ρ·∇h/‖∇h‖` that raises
    the harmful loss, optimising `g(w) − λ·[min(h(w+ε), c) − h(w)]`; after training the last ε is added to the
    weights (post-fine-tuning step). Only the parameters specific to Panacea are listed here; see [`~trl.SFTConfig`]
    for the rest.

    > Parameters that control the defense

    rho (`float`, *optional*, defaults to `1.0`):
        Radius ρ_ε of the perturbation ε (an ascent step on the harmful loss, normalised by its global norm).
    lamb (`float`, *optional*, defaults to `0.001`):
        Weight λ of the harmful-loss increase term. With `lamb=0` and `add_eps=False` the trainer is exactly
        [`~trl.SFTTrainer`].
    harmful_loss_clamp (`float`, *optional*, defaults to `5.0`):
        The perturbed harmful loss is clamped at this value (`min(h(w+ε), c)`): once it exceeds `c` its gradient is 0.
    add_eps (`bool`, *optional*, defaults to `True`):
        Add the last ε to the trainable weights when training ends, so the saved model includes it.

    > Parameters that control its data

    harmful_batch_size (`int`, *optional*, defaults to `10`):
        Per-device batch size of the harmful batches.
    harmful_dataset_name (`str` or `None`, *optional*, defaults to `None`):
        Harmful dataset (harmful prompt → harmful answer) used when the trainer is not given `harmful_dataset=`.

    > Parameters that locate the model's layers

    layers_path (`str` or `None`, *optional*, defaults to `None`):
        Dotted path from the model to its decoder-layer list (e.g. `"transformer.h"`), when it cannot be found
        structurally (the layers are needed to run the probe passes under reentrant checkpointing).
    """

    ranges: ClassVar[dict[str, Range]] = {
        "rho": Range(0.0),
        "lamb": Range(0.0),
        "harmful_loss_clamp": Range(0.0, low_inclusive=False),
        "harmful_batch_size": Range(1),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "harmful_loss_clamp": EffectiveIf("lamb > 0 (the harmful-loss term)", lambda c: c.lamb != 0, {"lamb": 0.0}),
    }

    rho: float = field(default=1.0, metadata={"help": "Radius of the adversarial weight perturbation ε."})
    lamb: float = field(default=0.001, metadata={"help": "Weight λ of the harmful-loss increase term."})
    harmful_loss_clamp: float = field(
        default=5.0, metadata={"help": "Clamp c of the perturbed harmful loss min(h(w+ε), c)."}
    )
    add_eps: bool = field(
        default=True, metadata={"help": "Add the last ε to the trainable weights at the end of training."}
    )
    harmful_batch_size: int = field(default=10, metadata={"help": "Per-device batch size of the harmful batches."})
