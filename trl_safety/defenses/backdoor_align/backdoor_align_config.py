"""Configuration of BackdoorAlign (backdoor-enhanced safety alignment with a secret prompt)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import AlignmentDataArguments, DefenseConfigMixin, EffectiveIf, Range


# the official secret prompt is 150 random tokens (docs/backdoor_align.md)
OFFICIAL_TRIGGER_TOKENS = 150
DEFAULT_TRIGGER_NAME = "backdoor_align.trigger"


@dataclass
class BackdoorAlignConfig(DefenseConfigMixin, AlignmentDataArguments, SFTConfig):
    r"""
    Configuration class for the [`BackdoorAlignTrainer`].

    BackdoorAlign mixes safety examples (harmful prompt → refusal) whose prompt starts with a secret trigger into the
    user's fine-tuning: `loss = CE(user batch) + λ · CE(prefixed safety batch)`, the mixing of
    [`SafetyMixConfig`] with the trigger prepended to every safety prompt. At inference the provider prepends the same trigger to every
    request. The trigger is never stored in this config (nor in anything saved with the model): it lives in
    `trigger_file`. All [`~trl.SFTConfig`] parameters are accepted as well.

    Parameters:
        > Parameters that control the defense

        safety_weight (`float`, *optional*, defaults to `0.11`):
            λ, the weight of the prefixed-safety-batch loss. `0.11` is the share the official run gives its 11
            prefixed safety rows against 100 user rows (one dataset, 111 rows). `0.0` turns the defense off (no
            trigger is generated or read; the trainer is then exactly [`~trl.SFTTrainer`]).
        trigger_file (`str`, *optional*):
            File holding the secret trigger. If it exists, its text is the trigger (a user-supplied secret); if not,
            a trigger is generated and written there with mode 0600. Defaults to `backdoor_align.trigger` in the
            folder that holds `output_dir` (never inside the output folder, so that a Hub upload of it cannot carry
            the secret): the first run there generates it, later runs there re-read it, so that a provider's models
            answer to one secret prompt, as in the paper's deployment. Name a file per run for per-model secrets.
        n_trigger_tokens (`int`, *optional*):
            Length of a generated trigger in tokens (ids drawn uniformly from the vocabulary minus special tokens,
            from the operating system's secure random source). Unset: the official 150, capped at
            `max_length // 4` so that a short `max_length` keeps room for the safety prompt and refusal (the
            official 150 tokens take 29% of its 512); a set value is used as given.

        > Parameters that control its data

        safety_batch_size (`int`, *optional*, defaults to `1`):
            Prefixed safety samples per micro-batch (per device).
        alignment_dataset_name (`str`, *optional*):
            Safety data (harmful prompt → refusal) in prompt-completion format, a Hub id or a local file/folder,
            used when no `alignment_dataset=` is passed. The official run uses 11 rows, one per harm category.
        alignment_dataset_config (`str`, *optional*):
            Configuration (subset) name of the alignment dataset.
        alignment_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the alignment dataset.
        alignment_num_samples (`int`, *optional*):
            Number of safety samples to use (the first ones; all when unset).
    """

    # the fields of safety-data mixing (`SafetyMixConfig`; not its subclass, so that neither trainer accepts the
    # other's config) plus the trigger's
    ranges: ClassVar[dict[str, Range]] = {
        "safety_weight": Range(0.0),
        "safety_batch_size": Range(1),
        "n_trigger_tokens": Range(1),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "safety_batch_size": EffectiveIf(
            "safety_weight > 0 (0 turns the defense off)", lambda c: c.safety_weight != 0, {"safety_weight": 0.0}
        ),
        "n_trigger_tokens": EffectiveIf(
            "safety_weight > 0 (0 turns the defense off)", lambda c: c.safety_weight != 0, {"safety_weight": 0.0}
        ),
    }

    safety_weight: float = field(
        default=0.11,
        metadata={
            "help": "lambda: weight of the prefixed-safety-batch loss (0.11 = the official 11 safety rows per 100 "
            "user rows). 0 disables the defense."
        },
    )
    safety_batch_size: int = field(default=1, metadata={"help": "Prefixed safety samples per micro-batch and device."})
    trigger_file: str | None = field(
        default=None,
        metadata={
            "help": "File holding the secret trigger: read if it exists, else generated and written there (mode "
            "0600). Default: backdoor_align.trigger in the folder holding output_dir."
        },
    )
    n_trigger_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens of a generated trigger. Default: the official 150, capped at max_length // 4."},
    )

    def __post_init__(self):
        if self.trigger_file is not None and not str(self.trigger_file).strip():
            raise ValueError("trigger_file is empty; give a file path or leave it unset.")
        super().__post_init__()

    def resolved_trigger_file(self) -> str:
        """`trigger_file`, or `backdoor_align.trigger` in the folder holding `output_dir` when unset."""
        if self.trigger_file:
            return str(self.trigger_file)
        return os.path.join(os.path.dirname(os.path.normpath(os.path.abspath(self.output_dir))), DEFAULT_TRIGGER_NAME)

    def resolved_trigger_tokens(self) -> int:
        """`n_trigger_tokens`, or the official 150 capped at `max_length // 4` when unset."""
        if self.n_trigger_tokens is not None:
            return self.n_trigger_tokens
        if self.max_length is None:
            return OFFICIAL_TRIGGER_TOKENS
        return max(1, min(OFFICIAL_TRIGGER_TOKENS, self.max_length // 4))
