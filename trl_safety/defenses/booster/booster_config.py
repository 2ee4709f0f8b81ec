from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import AttentionModulesArguments, DefenseConfigMixin, EffectiveIf, HarmfulDataArguments, Range


_PERTURB_AWARE = EffectiveIf("perturb_aware=True", lambda c: c.perturb_aware, {"perturb_aware": False})
_HARMFUL_STEP = EffectiveIf("lamb > 0 (lamb=0 skips the harmful passes)", lambda c: c.lamb != 0, {"lamb": 0.0})


@dataclass
class BoosterConfig(DefenseConfigMixin, AttentionModulesArguments, HarmfulDataArguments, SFTConfig):
    r"""
    Configuration class for the [`BoosterTrainer`].

    Booster (alignment stage) minimises `f(w) + λ·[h(w) − h(w − α·∇h(w)/‖∇h(w)‖)]`: the alignment loss plus the drop
    of the harmful loss after one simulated, normalised harmful fine-tuning step. Only the parameters specific to
    Booster are listed here; see [`~trl.SFTConfig`] for the rest.

    > Parameters that control the defense

    lamb (`float`, *optional*, defaults to `5.0`):
        Regulariser intensity λ. `0` skips the harmful passes and trains exactly like [`~trl.SFTTrainer`].
    alpha (`float`, *optional*, defaults to `0.1`):
        Step size α of the simulated (normalised) harmful step.
    perturb_aware (`bool`, *optional*, defaults to `False`):
        "Booster + Vaccine": compute the alignment gradient ∇f with Vaccine's perturbation of radius `rho` on every
        attention output (5 passes per step instead of 3).
    rho (`float`, *optional*, defaults to `2.0`):
        Vaccine radius used when `perturb_aware=True`.
    all_reduce_harmful_grad (`bool`, *optional*, defaults to `False`):
        Under DDP, average the two harmful gradients over processes before normalising and subtracting them, so every
        rank takes the same simulated step (global semantics). When `False`, each rank uses its own harmful batch
        and norm (per-rank semantics, as the single-GPU original); DDP still averages the resulting gradients.

    > Parameters that control its data

    harmful_batch_size (`int`, *optional*, defaults to `10`):
        Per-device batch size of the harmful batches (hard-coded to 10 in the official code).
    harmful_dataset_name (`str` or `None`, *optional*, defaults to `None`):
        Harmful dataset (harmful prompt → harmful answer) used when the trainer is not given `harmful_dataset=`.

    > Parameters that locate the model's layers

    layers_path (`str` or `None`, *optional*, defaults to `None`):
        Dotted path from the model to its decoder-layer list (e.g. `"transformer.h"`), when it cannot be found
        structurally (the layers are needed for `perturb_aware` and to run the probe passes under reentrant
        checkpointing).
    attention_attr (`str`, *optional*, defaults to `"self_attn"`):
        Name of the attention submodule of a decoder layer (perturbed when `perturb_aware=True`).
    """

    ranges: ClassVar[dict[str, Range]] = {
        "lamb": Range(0.0),
        "alpha": Range(0.0),
        "rho": Range(0.0),
        "harmful_batch_size": Range(1),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "rho": _PERTURB_AWARE,
        "attention_attr": _PERTURB_AWARE,
        "alpha": _HARMFUL_STEP,
        "all_reduce_harmful_grad": _HARMFUL_STEP,
        "harmful_batch_size": _HARMFUL_STEP,
    }

    lamb: float = field(
        default=5.0,
        metadata={"help": "Regulariser intensity λ. 0 skips the harmful passes (plain SFT)."},
    )
    alpha: float = field(default=0.1, metadata={"help": "Step size α of the simulated, normalised harmful step."})
    perturb_aware: bool = field(
        default=False,
        metadata={
            "help": "Booster + Vaccine: compute the alignment gradient under a Vaccine perturbation of radius rho."
        },
    )
    rho: float = field(default=2.0, metadata={"help": "Vaccine radius used when perturb_aware=True."})
    all_reduce_harmful_grad: bool = field(
        default=False,
        metadata={
            "help": "Under DDP, average the harmful gradients over processes (global step) instead of using each "
            "rank's own harmful batch (per-rank step)."
        },
    )
    harmful_batch_size: int = field(default=10, metadata={"help": "Per-device batch size of the harmful batches."})
