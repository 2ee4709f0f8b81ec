"""Pieces shared by the defense configs: extra-dataset fields, range checks, and the `SFTConfig` upgrade."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trl import SFTConfig


@dataclass
class AlignmentDataArguments:
    """Fields naming the alignment (safety) dataset: harmful prompt → refusal or safe answer."""

    alignment_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Alignment dataset (harmful prompt → refusal/safe answer): a Hub id or a local file/folder. Used "
            "when the trainer is not given `alignment_dataset=`."
        },
    )
    alignment_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of the alignment dataset."}
    )
    alignment_dataset_split: str = field(default="train", metadata={"help": "Split of the alignment dataset."})
    alignment_num_samples: int | None = field(
        default=None, metadata={"help": "Number of alignment samples to use (all when unset)."}
    )


@dataclass
class HarmfulDataArguments:
    """Fields naming the harmful dataset: harmful prompt → harmful answer (used to simulate an attacker)."""

    harmful_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Harmful dataset (harmful prompt → harmful answer): a Hub id or a local file/folder. Used when "
            "the trainer is not given `harmful_dataset=`."
        },
    )
    harmful_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of the harmful dataset."}
    )
    harmful_dataset_split: str = field(default="train", metadata={"help": "Split of the harmful dataset."})
    harmful_num_samples: int | None = field(
        default=None, metadata={"help": "Number of harmful samples to use (all when unset)."}
    )


def check_range(
    config,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise a `ValueError` naming the field when `config.<name>` is outside `[low, high]` or not finite."""
    value = getattr(config, name)
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value) and not (high is None and value == math.inf):
        raise ValueError(f"`{name}` must be a finite number, got {value}.")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"`{name}` must be in {interval}, got {value}.")


def defense_field_names(config_class: type) -> list[str]:
    """Fields a defense config adds on top of `SFTConfig` (its hyperparameters and data fields)."""
    base = {f.name for f in dataclasses.fields(SFTConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in base]


def upgrade_config(args, config_class: type, **overrides):
    """Turn a `SFTConfig`/`TrainingArguments` into `config_class`, keeping every field.

    `TrainingArguments.to_dict()` masks fields ending in `_token` (so `eos_token` would become `'<EOS_TOKEN>'`);
    reading the dataclass fields directly keeps them. Defense fields take their defaults unless overridden.
    """
    if isinstance(args, config_class) and not overrides:
        return args
    target_fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(args)
        if f.init and f.name in target_fields and hasattr(args, f.name)
    }
    # `__post_init__` of TrainingArguments rewrites a few fields; pass the user's originals back where kept
    if "gradient_checkpointing_kwargs" in values and values["gradient_checkpointing_kwargs"] is not None:
        values["gradient_checkpointing_kwargs"] = dict(values["gradient_checkpointing_kwargs"])
    values.update(overrides)
    return config_class(**values)
