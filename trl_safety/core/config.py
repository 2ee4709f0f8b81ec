"""Pieces shared by the defense configs: the input rules every defense config obeys, extra-dataset fields, range
checks, and the `SFTConfig` upgrade.

Every defense config (trainer or post-hoc) subclasses [`DefenseConfigMixin`], which validates all the fields the
defense adds on top of `SFTConfig` in one `__post_init__`:

- each numeric field (int or float, not bool) declares its range in the class's `ranges` (merged over the bases, so
  the data-argument mixins declare their own `*_num_samples`); a numeric field without a declared range is refused,
  so a new defense cannot forget one. Values must be finite (`inf` only where a range says `allow_inf=True`) and,
  for integer fields, integers; `None` is accepted where the field's type allows it (meaning "unset");
- each field whose effect depends on another field declares it in `effective_if`; setting it to a non-default value
  where it has no effect logs a warning naming both fields.

The ranges live in a `ClassVar` rather than in each field's `metadata` because `HfArgumentParser` (and `TrlParser`)
forwards every metadata key to `argparse.add_argument`, which rejects unknown keywords.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import SFTConfig


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric defense field: `[low, high]` (each end optional, open or closed).

    Values must be finite unless `allow_inf=True` (a documented use of `+inf`, e.g. Antibody's `temperature=inf`).
    `None` is accepted when the field's type allows it (`int | None`): it means "unset".
    """

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    allow_inf: bool = False

    def interval(self) -> str:
        left = "[" if self.low_inclusive and self.low is not None else "("
        right = (
            "]" if (self.high is not None and self.high_inclusive) or (self.high is None and self.allow_inf) else ")"
        )
        low = "-inf" if self.low is None else f"{self.low}"
        high = "inf" if self.high is None else f"{self.high}"
        return f"{left}{low}, {high}{right}"

    def check(self, name: str, value, integer: bool = False) -> None:
        """Raise a `ValueError` naming the field when `value` is not a (finite) number inside the range."""
        kind = "an integer" if integer else ("a number" if self.allow_inf else "a finite number")
        expected = f"`{name}` must be {kind} in {self.interval()}, got {value!r}."
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(expected)
        if integer and not isinstance(value, numbers.Integral):
            raise ValueError(expected)
        if math.isnan(value) or (math.isinf(value) and not (self.allow_inf and value > 0)):
            raise ValueError(expected)
        low, high = self.low, self.high
        too_low = low is not None and (value < low if self.low_inclusive else value <= low)
        too_high = high is not None and (value > high if self.high_inclusive else value >= high)
        if too_low or too_high:
            raise ValueError(expected)


@dataclass(frozen=True)
class EffectiveIf:
    """A field has an effect only when `condition(config)` holds (e.g. Booster's `rho` only with `perturb_aware`).

    Attributes:
        description: the condition in words, shown in the warning (`"perturb_aware=True"`).
        condition: `config -> bool`.
        counterexample: field values under which the condition fails (`{"perturb_aware": False}`), so the rule can
            be tested for every defense without a hand-kept list.
    """

    description: str
    condition: Callable[[Any], bool]
    counterexample: Mapping[str, Any]


def _declared(config_class: type, attribute: str) -> dict:
    """Merge a `ClassVar` dict over the MRO, subclasses winning (so mixins declare their own fields)."""
    merged: dict = {}
    for klass in reversed(config_class.__mro__):
        merged.update(vars(klass).get(attribute, {}) or {})
    return merged


_HINTS: dict[type, dict] = {}


_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "None": type(None)}


def _field_types(config_class: type) -> dict[str, tuple[type, ...]]:
    """The types a field's annotation allows (`int | None` → `(int, NoneType)`), resolved once per class."""
    if config_class not in _HINTS:
        try:
            hints = typing.get_type_hints(config_class)
        except Exception:  # an annotation that cannot be evaluated here: read the basic types from its text
            hints = None
        if hints is None:
            _HINTS[config_class] = {
                f.name: ()
                if "[" in str(f.type)  # a container (`list[float]`) is not a number
                else tuple(_TYPE_NAMES[t] for t in re.findall(r"\b(int|float|bool|None)\b", str(f.type)))
                for f in dataclasses.fields(config_class)
            }
            return _HINTS[config_class]
        resolved = {}
        for name, hint in hints.items():
            origin = typing.get_origin(hint)
            if origin is typing.Union or origin is types.UnionType:
                resolved[name] = typing.get_args(hint)
            else:
                resolved[name] = (hint,)
        _HINTS[config_class] = resolved
    return _HINTS[config_class]


def numeric_defense_fields(config_class: type) -> dict[str, dict]:
    """The numeric (int or float, not bool) fields a defense config adds on top of `SFTConfig`.

    Returns `{name: {"integer": bool, "optional": bool}}`.
    """
    types_of = _field_types(config_class)
    numeric = {}
    for name in defense_field_names(config_class):
        allowed = types_of.get(name, ())
        if bool in allowed:
            continue
        if int in allowed or float in allowed:
            numeric[name] = {"integer": float not in allowed, "optional": type(None) in allowed}
    return numeric


def declared_ranges(config_class: type) -> dict[str, Range]:
    """The `ranges` a config class declares, merged over its bases."""
    return _declared(config_class, "ranges")


def declared_dependencies(config_class: type) -> dict[str, tuple[EffectiveIf, ...]]:
    """The `effective_if` declarations of a config class, merged over its bases (each a tuple of conditions)."""
    return {
        name: (rules,) if isinstance(rules, EffectiveIf) else tuple(rules)
        for name, rules in _declared(config_class, "effective_if").items()
    }


def field_default(config_class: type, name: str):
    """The default of a dataclass field (calling its `default_factory`), or `dataclasses.MISSING`."""
    for f in dataclasses.fields(config_class):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return dataclasses.MISSING


_UNRULED: set[type] = set()


def check_defense_fields(config, warn_no_effect: bool = True) -> None:
    """Apply the input rules of [`DefenseConfigMixin`] to a config instance (also after it was mutated).

    Raises `ValueError` naming the field when a value is outside its range or not finite, and (with
    `warn_no_effect`) logs a warning for each field set to a non-default value where it has no effect. A [`DefenseConfigMixin`] config with a numeric
    defense field that declares no range raises `TypeError` (a defect of the config class). A config not built on
    the mixin (a custom defense's) gets the generic rule only: its numeric fields must be finite.
    """
    config_class = type(config)
    strict = isinstance(config, DefenseConfigMixin)
    ranges = declared_ranges(config_class)
    numeric = numeric_defense_fields(config_class)
    undeclared = sorted(set(numeric) - set(ranges))
    if undeclared and strict:
        raise TypeError(
            f"{config_class.__name__} has numeric defense field(s) {undeclared} without a declared range: add them "
            f"to `{config_class.__name__}.ranges` (e.g. `ranges = {{{undeclared[0]!r}: Range(0.0)}}`)."
        )
    if undeclared and config_class not in _UNRULED:
        _UNRULED.add(config_class)
        logger.warning(
            "%s is not built on `trl_safety.core.config.DefenseConfigMixin`, so its fields %s are only checked to be "
            "finite; declare their ranges there.",
            config_class.__name__,
            undeclared,
        )
    for name, info in numeric.items():
        value = getattr(config, name)
        if value is None and info["optional"]:
            continue
        ranges.get(name, Range()).check(name, value, integer=info["integer"])
    if not warn_no_effect:
        return
    for name, rules in declared_dependencies(config_class).items():
        value = getattr(config, name)
        default = field_default(config_class, name)
        if default is dataclasses.MISSING or _same(value, default):
            continue
        for rule in rules:
            if not rule.condition(config):
                now = ", ".join(f"{k}={getattr(config, k, None)!r}" for k in rule.counterexample)
                logger.warning(
                    "`%s`=%r has no effect: %s uses it only when %s (here %s).",
                    name,
                    value,
                    config_class.__name__,
                    rule.description,
                    now,
                )
                break


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. array-like values
        return a is b


class DefenseConfigMixin:
    """Base of every defense config: validates all defense fields in `__post_init__` (see the module docstring).

    Put it first in the bases (`class XConfig(DefenseConfigMixin, HarmfulDataArguments, SFTConfig)`) and declare:

    - `ranges: ClassVar[dict[str, Range]]`: one entry per numeric field the config adds (counts are usually
      `Range(1)`: at least 1, `None` = unset where the type allows it; `Range(0)` only where 0 is documented);
    - `effective_if: ClassVar[dict[str, EffectiveIf | tuple[EffectiveIf, ...]]]`: fields that only matter for some
      variant.

    A config's own `__post_init__` should call `super().__post_init__()`.
    """

    ranges: ClassVar[dict[str, Range]] = {}
    effective_if: ClassVar[dict[str, EffectiveIf | tuple[EffectiveIf, ...]]] = {}

    def __post_init__(self):
        check_defense_fields(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class AlignmentDataArguments:
    """Fields naming the alignment (safety) dataset: harmful prompt → refusal or safe answer.

    With a dataset object passed to the trainer (`alignment_dataset=`), `alignment_num_samples` selects its first
    rows as for a named dataset (when it differs from its default); `alignment_dataset_name`, `_config` and `_split`
    set to non-default values are refused, since they cannot apply to an object.
    """

    ranges: ClassVar[dict] = {"alignment_num_samples": Range(1)}

    alignment_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Alignment dataset (harmful prompt → refusal/safe answer): a Hub id or a local file/folder. Used "
            "when the trainer is not given `alignment_dataset=`."
        },
    )
    alignment_dataset_config: str | None = field(
        default=None,
        metadata={
            "help": "For a dataset with a registered adapter (BeaverTails, the RepNoise refusal file): its options as "
            "comma-separated key=value pairs, e.g. 'offset=5000,source=local.jsonl'. For any other Hub dataset: "
            "its configuration (subset) name. Unused for a local file."
        },
    )
    alignment_dataset_split: str = field(default="train", metadata={"help": "Split of the alignment dataset."})
    alignment_num_samples: int | None = field(
        default=None,
        metadata={
            "help": "Number of alignment samples to use: the first ones, of a named dataset or of a dataset object "
            "(all when unset)."
        },
    )


@dataclass
class HarmfulDataArguments:
    """Fields naming the harmful dataset: harmful prompt → harmful answer (used to simulate an attacker).

    With a dataset object passed to the trainer (`harmful_dataset=`), `harmful_num_samples` selects its first rows as
    for a named dataset (when it differs from its default); `harmful_dataset_name`, `_config` and `_split` set to
    non-default values are refused, since they cannot apply to an object.
    """

    ranges: ClassVar[dict] = {"harmful_num_samples": Range(1)}

    harmful_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Harmful dataset (harmful prompt → harmful answer): a Hub id or a local file/folder. Used when "
            "the trainer is not given `harmful_dataset=`."
        },
    )
    harmful_dataset_config: str | None = field(
        default=None,
        metadata={
            "help": "For a dataset with a registered adapter (BeaverTails, the RepNoise refusal file): its options as "
            "comma-separated key=value pairs, e.g. 'offset=5000,source=local.jsonl'. For any other Hub dataset: "
            "its configuration (subset) name. Unused for a local file."
        },
    )
    harmful_dataset_split: str = field(default="train", metadata={"help": "Split of the harmful dataset."})
    harmful_num_samples: int | None = field(
        default=None,
        metadata={
            "help": "Number of harmful samples to use: the first ones, of a named dataset or of a dataset object "
            "(all when unset)."
        },
    )


@dataclass
class DecoderLayersArguments:
    """`layers_path`: for defenses that locate the decoder layers (`DefenseTrainerMixin.locates_layers`)."""

    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path from the model to its decoder-layer list (e.g. 'transformer.h'), when it cannot be "
            "found structurally."
        },
    )


@dataclass
class AttentionModulesArguments(DecoderLayersArguments):
    """`attention_attr` (and `layers_path`): for defenses that hook each decoder layer's attention module."""

    attention_attr: str = field(
        default="self_attn", metadata={"help": "Name of the attention submodule of a decoder layer."}
    )


def check_range(
    config,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_inf: bool = False,
) -> None:
    """Raise a `ValueError` naming the field when `config.<name>` is outside the range or not finite (`None` passes).

    `inf` is refused unless `allow_inf=True`; NaN is always refused. Defense configs declare `ranges` instead (see
    [`DefenseConfigMixin`]); this stays for other dataclasses (callbacks).
    """
    value = getattr(config, name)
    if value is None:
        return
    Range(low, high, low_inclusive, high_inclusive, allow_inf).check(name, value)


def defense_field_names(config_class: type) -> list[str]:
    """Fields a defense config adds on top of `SFTConfig` (its hyperparameters and data fields).

    A post-hoc defense's config is a plain dataclass, not an `SFTConfig`: all its fields are its own (its
    `max_length` or `seed` are not SFTConfig's).
    """
    if not issubclass(config_class, SFTConfig):
        return [f.name for f in dataclasses.fields(config_class)]
    base = {f.name for f in dataclasses.fields(SFTConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in base]


# ------------------------------------------------------------------------------------------- extra-dataset fields
def select_num_samples(dataset, role: str, num_samples: int | None, source: str | None = None):
    """The first `num_samples` rows of a `<role>` dataset (all when `None`), refusing more rows than it has.

    The error names the field that fixes it: "`harmful_num_samples`=200 but the harmful dataset has 32 rows; ...".
    """
    if num_samples is None:
        return dataset
    name = f"{role}_num_samples"
    rows = len(dataset)
    if num_samples > rows:
        where = f" {source!r}" if source else ""
        raise ValueError(
            f"`{name}`={num_samples} but the {role} dataset{where} has {rows} rows; set `{name}` ≤ {rows} or leave "
            "it unset (None) to use every row."
        )
    return dataset.select(range(num_samples))


def object_dataset_num_samples(config, role: str, rows: int, who: str) -> int | None:
    """Check the `<role>_*` fields of `config` for a dataset passed as an object; return the `num_samples` to apply.

    `<role>_dataset_name`, `<role>_dataset_config` and `<role>_dataset_split` cannot apply to an object: set to a
    non-default value they are refused, naming the field. `<role>_num_samples` applies to the object (its first
    rows) when it differs from its default; a non-`None` default (T-Vaccine's 200, meant for its default Hub
    dataset) is not applied to an object, with a warning when it would have selected fewer rows.
    """
    config_class = type(config)
    for suffix in ("dataset_name", "dataset_config", "dataset_split"):
        name = f"{role}_{suffix}"
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        default = field_default(config_class, name)
        if default is not dataclasses.MISSING and not _same(value, default):
            raise ValueError(
                f"{who} got `{role}_dataset=` (a dataset object) and `{name}`={value!r}, which cannot apply to an "
                f"object. Leave `{name}` at its default ({default!r}), or drop `{role}_dataset=` to load the "
                f"{role} dataset by name."
            )
    name = f"{role}_num_samples"
    num_samples = getattr(config, name, None)
    if num_samples is None:
        return None
    default = field_default(config_class, name)
    if default is not dataclasses.MISSING and default is not None and _same(num_samples, default):
        if rows > num_samples:
            logger.warning(
                "%s uses all %d rows of the %s dataset object: `%s`=%d is its default, meant for "
                "`%s_dataset_name`. To use fewer rows, set `%s` to another value or pass "
                "`%s_dataset=dataset.select(range(%d))`.",
                who,
                rows,
                role,
                name,
                num_samples,
                role,
                name,
                role,
                num_samples,
            )
        return None
    return num_samples


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
