from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DecoderLayersArguments, DefenseConfigMixin, EffectiveIf, HarmfulDataArguments, Range


# η_λ and the EMA momentum only shape the adaptive λ
_ADAPTIVE = EffectiveIf("fixed_lambda=None (the adaptive λ)", lambda c: c.fixed_lambda is None, {"fixed_lambda": 1.0})


@dataclass
class AntibodyAlignConfig(DefenseConfigMixin, DecoderLayersArguments, HarmfulDataArguments, SFTConfig):
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

    > Parameters that locate the model's layers

    layers_path (`str` or `None`, *optional*, defaults to `None`):
        Dotted path from the model to its decoder-layer list (e.g. `"transformer.h"`), when it cannot be found
        structurally (the layers are needed to run the probe passes under reentrant checkpointing).
    """

    ranges: ClassVar[dict[str, Range]] = {
        "alpha": Range(0.0),
        "eta_lbd": Range(0.0),
        "ema_momentum": Range(0.0, 1.0),
        "lambda2": Range(0.0),
        "fixed_lambda": Range(0.0),
        "harmful_batch_size": Range(1),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {"eta_lbd": _ADAPTIVE, "ema_momentum": _ADAPTIVE}

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
