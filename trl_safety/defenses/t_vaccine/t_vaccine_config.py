"""Configuration of the T-Vaccine (Targeted Vaccine) alignment-stage defense."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DefenseConfigMixin, HarmfulDataArguments, Range


@dataclass
class TVaccineConfig(DefenseConfigMixin, HarmfulDataArguments, SFTConfig):
    r"""
    Configuration class for the [`TVaccineTrainer`].

    T-Vaccine scores each decoder layer by the norm of the harmful-loss gradient at its attention output, samples
    `num_active_layers` layers in proportion to those scores, and runs Vaccine on those layers only: only their
    attention outputs are perturbed and only their attention parameters are trained, while the other layers run under
    activation checkpointing. All [`~trl.SFTConfig`] parameters are accepted as well.

    Parameters:
        > Parameters that control the defense

        rho (`float`, *optional*, defaults to `3.0`):
            Perturbation radius ρ, the joint norm over the active layers' attention outputs (the T-Vaccine README
            example uses 3). `0.0` turns the defense off (the trainer is then exactly [`~trl.SFTTrainer`]).
        num_active_layers (`int`, *optional*, defaults to `8`):
            Number S of layers perturbed and trained at a time. Must not exceed the number of decoder layers.
        resample_interval (`int`, *optional*, defaults to `20`):
            Optimizer steps between two draws of the active layers (J, `lisa_interval_steps` in the official code).
        rescore_interval (`int`, *optional*, defaults to `200`):
            Optimizer steps between two re-scorings of the layers on a harmful batch (K, `probability_steps`).
        harmful_batch_size (`int`, *optional*, defaults to `1`):
            Per-device batch size of the harmful batch used for scoring (1 in the official code).
        freeze_mlp (`bool`, *optional*, defaults to `False`):
            `False` reproduces the official code: only the trainable parameters of inactive layers' *attention*
            modules are frozen, so MLP (and norm) parameters train in every layer. `True` freezes every trainable
            parameter of inactive decoder layers.
        checkpoint_inactive_layers (`bool`, *optional*, defaults to `True`):
            Run inactive decoder layers under (non-reentrant) activation checkpointing so they store no activations.
            Active layers follow the `gradient_checkpointing` setting.
        attention_attr (`str`, *optional*, defaults to `"self_attn"`):
            Name of the attention submodule of a decoder layer.
        layers_path (`str`, *optional*, defaults to `None`):
            Dotted path from the model to its decoder-layer list, when it cannot be found structurally.

        > Parameters that control its data

        harmful_dataset_name (`str`, *optional*, defaults to `"anonymous4486/repnoise_beavertail"`):
            Harmful (prompt → harmful answer) data used only to score layers, when `harmful_dataset=` is not given.
        harmful_num_samples (`int`, *optional*, defaults to `200`):
            Number of harmful samples used for scoring (`prompt_data_size` in the official scripts).

    Under DDP the config sets `ddp_find_unused_parameters=True` (unless set explicitly), because frozen layers produce
    no gradient.
    """

    ranges: ClassVar[dict[str, Range]] = {
        "rho": Range(0.0),
        "num_active_layers": Range(1),
        "resample_interval": Range(1),
        "rescore_interval": Range(1),
        "harmful_batch_size": Range(1),
    }

    rho: float = field(
        default=3.0,
        metadata={
            "help": "Perturbation radius rho over the active layers' attention outputs. 0 disables the defense."
        },
    )
    num_active_layers: int = field(
        default=8, metadata={"help": "Number of decoder layers perturbed and trained at a time."}
    )
    resample_interval: int = field(
        default=20, metadata={"help": "Optimizer steps between two draws of the active layers."}
    )
    rescore_interval: int = field(
        default=200, metadata={"help": "Optimizer steps between two re-scorings of the layers on a harmful batch."}
    )
    harmful_batch_size: int = field(
        default=1, metadata={"help": "Per-device batch size of the harmful batch used to score the layers."}
    )
    freeze_mlp: bool = field(
        default=False,
        metadata={
            "help": "Freeze all trainable parameters of inactive layers, not only their attention parameters (the "
            "official code freezes attention only)."
        },
    )
    checkpoint_inactive_layers: bool = field(
        default=True, metadata={"help": "Run inactive layers under activation checkpointing."}
    )
    attention_attr: str = field(
        default="self_attn", metadata={"help": "Name of the attention submodule of a decoder layer."}
    )
    layers_path: str | None = field(
        default=None,
        metadata={"help": "Dotted path to the decoder-layer list, when it cannot be found structurally."},
    )
    harmful_dataset_name: str | None = field(
        default="anonymous4486/repnoise_beavertail",
        metadata={
            "help": "Harmful dataset used to score layers (a Hub id or a local file/folder), when the trainer is not "
            "given `harmful_dataset=`."
        },
    )
    harmful_num_samples: int | None = field(
        default=200, metadata={"help": "Number of harmful samples used to score layers (all when unset)."}
    )

    def __post_init__(self):
        # Frozen layers produce no gradient: DDP must look for unused parameters (TrainingArguments' default is
        # False whenever gradient checkpointing is on, which TRL turns on by default)
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        super().__post_init__()
