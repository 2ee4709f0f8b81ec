"""Configuration of safety-recovery data augmentation (Qi et al., ICLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import AlignmentDataArguments, DefenseConfigMixin, EffectiveIf, HarmfulDataArguments, Range


@dataclass
class SafetyRecoveryConfig(DefenseConfigMixin, AlignmentDataArguments, HarmfulDataArguments, SFTConfig):
    r"""
    Configuration class for the [`SafetyRecoveryTrainer`].

    Safety-recovery data augmentation trains an aligned model to refuse even after the first tokens of a harmful
    answer: each (harmful prompt, harmful answer, refusal) row becomes, with probability `augment_prob`,
    `prompt ‖ harmful[:k] ‖ refusal` with the loss on the refusal only, `k ~ U{1, …, min(max_prefix_tokens, K)}` (K
    the harmful answer's length without its closing EOS), and otherwise `prompt → refusal`. Each micro-batch is
    concatenated with `anchor_batch_size` utility (anchor) samples into one forward, and the loss is one token mean
    over the refusal and anchor tokens of the optimizer step. All [`~trl.SFTConfig`] parameters are accepted as well;
    `packing` and `padding_free` are not supported (rows are rebuilt one by one).

    Parameters:
        > Parameters that control the defense

        augment_prob (`float`, *optional*, defaults to `0.5`):
            Probability that a row gets a harmful prefix (official `randint(0, 1)`, i.e. 1/2). `0.0` together with
            `anchor_batch_size=0` turns the defense off (the trainer is then exactly [`~trl.SFTTrainer`] on
            prompt → refusal).
        max_prefix_tokens (`int`, *optional*, defaults to `100`):
            Upper bound of k, the number of harmful-answer tokens put before the refusal (official 100).
        include_eos_in_prefix (`bool`, *optional*, defaults to `False`):
            Let k reach the full harmful answer including its closing EOS token, so the refusal follows an EOS, as the
            official code can. By default the EOS is excluded (`docs/safety_recovery.md`).

        > Parameters that control its data

        anchor_batch_size (`int`, *optional*, defaults to `16`):
            Utility (anchor) samples concatenated with every micro-batch, per device (official 16 anchor vs 4 safety
            samples per device). `0` trains on the safety rows only. The anchors are the alignment dataset
            (`alignment_dataset=` / `alignment_dataset_name`): the official code uses Alpaca instructions answered by
            the aligned model itself.
        alignment_dataset_name (`str`, *optional*):
            The utility anchor data (any TRL format), a Hub id or a local file/folder, used when no
            `alignment_dataset=` is passed.
        alignment_dataset_config (`str`, *optional*):
            Configuration (subset) name of the anchor dataset.
        alignment_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the anchor dataset.
        alignment_num_samples (`int`, *optional*):
            Number of anchor samples to use (the first ones; all when unset).
        harmful_dataset_name (`str`, *optional*):
            The harmful answers (prompt → harmful answer), row i paired with row i of `train_dataset` (prompt →
            refusal), used when no `harmful_dataset=` is passed.
        harmful_dataset_config (`str`, *optional*):
            Configuration (subset) name of the harmful dataset.
        harmful_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the harmful dataset.
        harmful_num_samples (`int`, *optional*):
            Number of harmful rows to use (the first ones; all when unset).
    """

    ranges: ClassVar[dict[str, Range]] = {
        "augment_prob": Range(0.0, 1.0),
        "max_prefix_tokens": Range(1),
        "anchor_batch_size": Range(0),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        name: EffectiveIf(
            "augment_prob > 0 (0 never adds a harmful prefix)", lambda c: c.augment_prob != 0, {"augment_prob": 0.0}
        )
        for name in ("max_prefix_tokens", "include_eos_in_prefix")
    }

    augment_prob: float = field(
        default=0.5,
        metadata={"help": "Probability that a row gets a harmful-answer prefix before its refusal (official 0.5)."},
    )
    max_prefix_tokens: int = field(
        default=100, metadata={"help": "Upper bound of k, the harmful-answer tokens put before the refusal."}
    )
    include_eos_in_prefix: bool = field(
        default=False,
        metadata={"help": "Let the harmful prefix include the harmful answer's closing EOS (the official quirk)."},
    )
    anchor_batch_size: int = field(
        default=16,
        metadata={"help": "Utility anchor samples added to every micro-batch per device (official 16). 0: none."},
    )
