"""Configuration of the Lisa fine-tuning-stage defense."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import AlignmentDataArguments, DefenseConfigMixin, EffectiveIf, Range


@dataclass
class LisaConfig(DefenseConfigMixin, AlignmentDataArguments, SFTConfig):
    r"""
    Configuration class for the [`LisaTrainer`].

    Lisa (Lazy safety alignment) runs Bi-State Optimization during user fine-tuning: `alignment_steps` optimizer
    steps on alignment data, then `finetune_steps` on the user's data, cyclically, each state pulled by a proximal
    term ρ/2‖w − anchor‖² towards the weights at the end of the other state. All [`~trl.SFTConfig`] parameters are
    accepted as well. Drive Lisa with `max_steps`: alignment steps replace user steps, so an epoch of user data is
    not fully seen.

    Parameters:
        > Parameters that control the defense

        rho (`float`, *optional*, defaults to `1.0`):
            Proximal intensity ρ (Lisa paper and repository: 1; the Booster and Antibody re-implementations use 0.01).
            `0.0` gives BSO, the paper's ablation without the proximal term.
        alignment_steps (`int`, *optional*, defaults to `100`):
            K1, optimizer steps per alignment state. `0` never visits the alignment data (with `rho=0` the trainer is
            then exactly [`~trl.SFTTrainer`]).
        finetune_steps (`int`, *optional*, defaults to `900`):
            K2, optimizer steps per fine-tuning state. `0` trains on alignment data only.
        proximal_warmup_ratio (`float`, *optional*, defaults to `0.1`):
            The proximal term is off for optimizer steps `0 … ⌊ratio · max_steps⌋` (the official code's warm-up,
            which it says helps convergence on GSM8K). `0.0` applies it from the first step.

        > Parameters that control its data

        alignment_dataset_name (`str`, *optional*):
            Alignment data (harmful prompt → refusal or safe answer), a Hub id or a local file/folder, used when no
            `alignment_dataset=` is passed. The Lisa paper uses the first 10,000 BeaverTails `is_safe=True` rows; the
            Booster/Antibody re-implementations use refusals. Alignment batches have `per_device_train_batch_size`
            samples, as in the official code.
        alignment_dataset_config (`str`, *optional*):
            Configuration (subset) name of the alignment dataset.
        alignment_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the alignment dataset.
        alignment_num_samples (`int`, *optional*):
            Number of alignment samples to use (the first ones; all when unset). The paper's `guide_data_num` is 10,000.
    """

    # 0 steps is documented for both states (not both at once)
    ranges: ClassVar[dict[str, Range]] = {
        "rho": Range(0.0),
        "alignment_steps": Range(0),
        "finetune_steps": Range(0),
        "proximal_warmup_ratio": Range(0.0, 1.0),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "proximal_warmup_ratio": EffectiveIf("rho > 0 (the proximal term)", lambda c: c.rho != 0, {"rho": 0.0}),
    }

    rho: float = field(
        default=1.0,
        metadata={"help": "Proximal intensity rho of the Bi-State proximal term. 0 gives BSO (no proximal term)."},
    )
    alignment_steps: int = field(
        default=100,
        metadata={"help": "K1: optimizer steps per alignment state. 0 never visits the alignment data."},
    )
    finetune_steps: int = field(
        default=900,
        metadata={"help": "K2: optimizer steps per fine-tuning state. 0 trains on alignment data only."},
    )
    proximal_warmup_ratio: float = field(
        default=0.1,
        metadata={
            "help": "The proximal term is off for optimizer steps 0..floor(ratio * max_steps) (official warm-up). "
            "0 applies it from the first step."
        },
    )

    def __post_init__(self):
        if self.alignment_steps == 0 and self.finetune_steps == 0:
            raise ValueError("`alignment_steps` and `finetune_steps` cannot both be 0.")
        super().__post_init__()
