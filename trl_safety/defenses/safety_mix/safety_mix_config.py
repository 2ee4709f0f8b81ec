"""Configuration of the safety-data mixing baseline (Vlguard / SafeInstr)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import AlignmentDataArguments, DefenseConfigMixin, EffectiveIf, Range


@dataclass
class SafetyMixConfig(DefenseConfigMixin, AlignmentDataArguments, SFTConfig):
    r"""
    Configuration class for the [`SafetyMixTrainer`].

    The safety-data mixing baseline (Vlguard / SafeInstr, as Booster's `VlguardTrainer` runs it) adds
    λ · CE(alignment batch) to the user loss of every micro-batch, so the model keeps seeing refusals while it learns
    the user's task. All [`~trl.SFTConfig`] parameters are accepted as well.

    Parameters:
        > Parameters that control the defense

        safety_weight (`float`, *optional*, defaults to `1.0`):
            λ, the weight of the alignment-batch loss. `1.0` weighs a safety batch like a user batch (the effect of
            appending safety samples to the user data, the Vaccine/Lisa version of the baseline); Booster's λ sweep
            script defaults to `0.1`. `0.0` turns the defense off (the trainer is then exactly
            [`~trl.SFTTrainer`]).

        > Parameters that control its data

        safety_batch_size (`int`, *optional*, defaults to `4`):
            Alignment samples per micro-batch (per device); Booster's `VlguardTrainer` hard-codes 4.
        alignment_dataset_name (`str`, *optional*):
            Alignment data (harmful prompt → refusal or safe answer), a Hub id or a local file/folder, used when no
            `alignment_dataset=` is passed. Booster uses the RepNoise refusal file, Lisa's Vlguard baseline 1,000
            BeaverTails safe samples.
        alignment_dataset_config (`str`, *optional*):
            Configuration (subset) name of the alignment dataset.
        alignment_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the alignment dataset.
        alignment_num_samples (`int`, *optional*):
            Number of alignment samples to use (the first ones; all when unset).
    """

    ranges: ClassVar[dict[str, Range]] = {"safety_weight": Range(0.0), "safety_batch_size": Range(1)}
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "safety_batch_size": EffectiveIf(
            "safety_weight > 0 (0 turns the defense off)", lambda c: c.safety_weight != 0, {"safety_weight": 0.0}
        ),
    }

    safety_weight: float = field(
        default=1.0,
        metadata={
            "help": "lambda: weight of the alignment-batch loss added to every user micro-batch. 0 disables it."
        },
    )
    safety_batch_size: int = field(
        default=4,
        metadata={"help": "Alignment samples per micro-batch and device (Booster's VlguardTrainer uses 4)."},
    )
