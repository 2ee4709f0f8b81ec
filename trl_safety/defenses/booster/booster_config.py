from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ...core.config import HarmfulDataArguments, check_range


@dataclass
class BoosterConfig(HarmfulDataArguments, SFTConfig):
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
    """

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

    def __post_init__(self):
        check_range(self, "lamb", 0.0)
        check_range(self, "alpha", 0.0)
        check_range(self, "rho", 0.0)
        check_range(self, "harmful_batch_size", 1)
        super().__post_init__()
