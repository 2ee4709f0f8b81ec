from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ...core.config import HarmfulDataArguments, check_range


@dataclass
class AntibodyAlignConfig(HarmfulDataArguments, SFTConfig):
    r"""
    Configuration class for the [`AntibodyAlignTrainer`] (Antibody, alignment stage).

    Antibody minimises `L_align(θ) + λ_t·[L_harm(θ) − L_harm(θ')] + λ2·L_refusal(θ')` with
    `θ' = θ − α·∇L_harm/‖∇L_harm‖` and an adaptive `λ_t` (official code: an EMA of
    `max(0, eta_lbd − cos(∇L_align, ∇L_harm(θ) − ∇L_harm(θ')))`). Only the parameters specific to Antibody are listed
    here; see [`~trl.SFTConfig`] for the rest.

    > Parameters that control the defense

    alpha (`float`, *optional*, defaults to `0.1`):
        Radius α of the sharpness ball: size of the simulated, normalised harmful descent step.
    eta_lbd (`float`, *optional*, defaults to `5.0`):
        Offset η_λ of the adaptive weight: `λ_raw = max(0, eta_lbd − cos(∇L_align, ∇L_sharp))`.
    ema_momentum (`float`, *optional*, defaults to `0.99`):
        Momentum m of the EMA `λ_t = m·λ_{t−1} + (1−m)·λ_raw`, initialised to the first `λ_raw` (one update per
        micro-batch). The official script uses 0.99 (its argparse default is 0.9).
    lambda2 (`float`, *optional*, defaults to `0.05`):
        Weight λ2 of the refusal-view loss evaluated at the perturbed weights θ'.
    fixed_lambda (`float` or `None`, *optional*, defaults to `None`):
        Use this constant instead of the adaptive λ_t (Antibody with a constant λ is Booster plus the refusal term).
        `fixed_lambda=0` with `lambda2=0` skips every extra pass and trains exactly like [`~trl.SFTTrainer`]; note
        that `eta_lbd=0` alone does not switch the flatness term off, since `max(0, −cos)` can be positive.

    > Parameters that control its data

    harmful_batch_size (`int` or `None`, *optional*, defaults to `None`):
        Per-device batch size of the harmful batches (each with its refusal view); `None` uses
        `per_device_train_batch_size`, as the official code does.
    harmful_dataset_name (`str` or `None`, *optional*, defaults to `None`):
        Harmful dataset (harmful prompt → harmful answer, with a prompt: `prompt`/`completion` or `messages`). Its
        refusal view pairs each prompt with a generic refusal from the shipped pool, assigned round-robin.
    """

    alpha: float = field(default=0.1, metadata={"help": "Radius α of the simulated, normalised harmful step."})
    eta_lbd: float = field(default=5.0, metadata={"help": "Offset η_λ of the adaptive λ: max(0, eta_lbd − cos)."})
    ema_momentum: float = field(default=0.99, metadata={"help": "EMA momentum of the adaptive λ."})
    lambda2: float = field(
        default=0.05, metadata={"help": "Weight of the refusal-view loss at the perturbed weights."}
    )
    fixed_lambda: float | None = field(
        default=None,
        metadata={"help": "Constant λ instead of the adaptive one (0 with lambda2=0 gives plain SFT)."},
    )
    harmful_batch_size: int | None = field(
        default=None,
        metadata={"help": "Per-device batch size of the harmful batches (default: per_device_train_batch_size)."},
    )

    def __post_init__(self):
        check_range(self, "alpha", 0.0)
        check_range(self, "eta_lbd", 0.0)
        check_range(self, "ema_momentum", 0.0, 1.0)
        check_range(self, "lambda2", 0.0)
        check_range(self, "fixed_lambda", 0.0)
        check_range(self, "harmful_batch_size", 1)
        super().__post_init__()
