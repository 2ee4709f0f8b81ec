"""Input rules shared by every defense, checked for every registered one (`list_defenses()`).

Nothing here names a defense: the cases are derived from the registry, the config classes' fields and their
declarations (`ranges`, `effective_if`) and the trainer classes' attributes (`extra_datasets`, `locates_layers`,
`uses_attention_modules`), so a defense added later is checked without anyone remembering to add it.

Most checks fail at construction before `SFTTrainer.__init__`, so they cost a config and a tiny model; the ones that
need the prepared datasets build a 1-layer model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re

import pytest
import torch
from datasets import Dataset
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from trl import SFTConfig

from trl_safety.core.config import (
    DefenseConfigMixin,
    declared_dependencies,
    declared_ranges,
    defense_field_names,
    field_default,
    numeric_defense_fields,
)
from trl_safety.core.trainer import has_trainable_token
from trl_safety.data.adapters import select_indices
from trl_safety.data.loading import register_dataset_adapter
from trl_safety.registry import list_defenses


SPECS = list_defenses()
TRAINER_SPECS = [spec for spec in SPECS if spec.trainer_class is not None]
POST_HOC_SPECS = [spec for spec in SPECS if spec.trainer_class is None]


def _ids(specs):
    return [spec.name for spec in specs]


def _is_trainer_config(spec) -> bool:
    return issubclass(spec.config_class, SFTConfig)


def make_config(spec, tmp_path, small=True, **values):
    """A config of the spec's class; `small` puts batch sizes and layer counts at their minimum for the tiny model."""
    if _is_trainer_config(spec):
        return tiny_config(tmp_path, spec.config_class, **{**(small_values(spec) if small else {}), **values})
    return spec.config_class(**values)


def small_values(spec) -> dict:
    """Fields at their smallest valid value where the default would not fit the tiny model/datasets (generic: every
    integer field at the lower bound of its range, `*_num_samples` unset)."""
    values = {}
    ranges = declared_ranges(spec.config_class)
    for name, info in numeric_defense_fields(spec.config_class).items():
        if name.endswith("_num_samples"):
            values[name] = None
        elif info["integer"] and name.endswith(("_batch_size", "_layers")):
            values[name] = max(1, ranges[name].low or 1)
    return values


def tiny_model(layers: int = 1):
    return build_model("llama", hidden=32, layers=layers, seed=0)


def datasets_for(spec, n: int = 8, long_prompts: bool = False):
    """A train dataset and the extra datasets the trainer needs (paired by row when the spec says so)."""
    train = prompt_completion_dataset(n)
    if long_prompts:
        train = Dataset.from_dict({"prompt": [" ".join(["cat"] * 60)] * n, "completion": [" dog"] * n})
    answers = prompt_completion_dataset(n, seed=7)["completion"]
    extra = {}
    for role in spec.trainer_class.extra_datasets:
        if spec.paired_data:
            extra[role] = Dataset.from_dict({"prompt": train["prompt"], "completion": answers})
        else:
            extra[role] = prompt_completion_dataset(n, seed=1)
    return train, extra


def build_trainer(spec, tmp_path, args=None, model=None, train=None, **extra):
    default_train, datasets = datasets_for(spec)
    datasets.update(extra)
    return spec.trainer_class(
        model if model is not None else tiny_model(),
        args=args if args is not None else make_config(spec, tmp_path),
        train_dataset=train if train is not None else default_train,
        processing_class=build_tokenizer(),
        **{f"{role}_dataset": dataset for role, dataset in datasets.items()},
        # the same architecture as `tiny_model()`, other weights: the base of AsFT's alignment direction
        **{
            f"{role}_model": build_model("llama", hidden=32, layers=1, seed=1)
            for role in getattr(spec.trainer_class, "extra_models", ())
        },
    )


# ------------------------------------------------------------------------------------------------ rule 1: ranges
def _numeric_cases():
    for spec in SPECS:
        for name, info in numeric_defense_fields(spec.config_class).items():
            yield pytest.param(spec, name, info, id=f"{spec.name}.{name}")


NUMERIC_CASES = list(_numeric_cases())


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_config_declares_the_shared_rules(spec):
    """Every defense config is built on the shared base and declares a range for each numeric field it adds."""
    cls = spec.config_class
    assert issubclass(cls, DefenseConfigMixin), f"{cls.__name__} must subclass core.config.DefenseConfigMixin"
    numeric = set(numeric_defense_fields(cls))
    ranges = set(declared_ranges(cls))
    assert numeric <= ranges, f"numeric fields without a range: {sorted(numeric - ranges)}"
    assert ranges <= numeric, f"ranges declared for no numeric field: {sorted(ranges - numeric)}"
    fields = set(defense_field_names(cls))
    for name, rules in declared_dependencies(cls).items():
        assert name in fields, name
        for rule in rules:
            assert set(rule.counterexample) <= fields | {f.name for f in dataclasses.fields(cls)}, rule
    # the defaults themselves obey the rules
    spec.config_class(**({"output_dir": "unused", "bf16": False} if _is_trainer_config(spec) else {}))


def _bad_values(spec, name, info):
    rng = declared_ranges(spec.config_class)[name]
    bad = [math.nan, -math.inf]
    if not rng.allow_inf:
        bad.append(math.inf)
    if rng.low is not None:
        bad.append(rng.low - 1 if rng.low_inclusive else rng.low)
    if rng.high is not None:
        bad.append(rng.high + 1 if rng.high_inclusive else rng.high)
    if info["integer"]:
        bad.append((rng.low or 0) + 1.5)  # not an integer
    if not info["optional"]:
        bad.append(None)
    return bad


@pytest.mark.parametrize(("spec", "name", "info"), NUMERIC_CASES)
def test_out_of_range_and_non_finite_values_are_refused(tmp_path, spec, name, info):
    for value in _bad_values(spec, name, info):
        with pytest.raises(ValueError, match=rf"`{name}` must be (a finite number|a number|an integer) in "):
            make_config(spec, tmp_path, **{name: value})
    if declared_ranges(spec.config_class)[name].allow_inf:  # a documented use of inf
        assert getattr(make_config(spec, tmp_path, **{name: math.inf}), name) == math.inf


@pytest.mark.parametrize(("spec", "name", "info"), NUMERIC_CASES)
def test_counts_are_at_least_one_unless_zero_is_documented(tmp_path, spec, name, info):
    rng = declared_ranges(spec.config_class)[name]
    if info["integer"]:
        assert rng.low is not None and rng.low >= 0, f"integer field `{name}` needs a lower bound"
        if rng.low == 0:  # 0 allowed: the help must say what it means
            assert "0" in spec.config_class.__dataclass_fields__[name].metadata["help"], name
        else:
            assert rng.low >= 1
            with pytest.raises(ValueError, match=rf"`{name}` must be an integer in \[1, inf\), got 0"):
                make_config(spec, tmp_path, **{name: 0})
    if info["optional"]:
        assert getattr(make_config(spec, tmp_path, **{name: None}), name) is None  # unset


def test_message_names_the_field_and_the_interval(tmp_path):
    spec = next(s for s in SPECS if "rho" in declared_ranges(s.config_class))
    with pytest.raises(ValueError, match=r"^`rho` must be a finite number in \[0\.0, inf\), got inf\.$"):
        make_config(spec, tmp_path, rho=math.inf)


@pytest.mark.parametrize("spec", TRAINER_SPECS, ids=_ids(TRAINER_SPECS))
def test_trainer_revalidates_a_config_changed_after_it_was_built(tmp_path, spec):
    name = next(iter(numeric_defense_fields(spec.config_class)))
    args = make_config(spec, tmp_path)
    setattr(args, name, math.nan)
    with pytest.raises(ValueError, match=rf"`{name}` must be"):
        build_trainer(spec, tmp_path, args=args)


# --------------------------------------------------------------------------- rule 2: options that have no effect
def _other_value(spec, name, base: dict):
    """A valid non-default value of `name` (given the other values in `base`), found by trying candidates."""
    default = field_default(spec.config_class, name)
    metadata = spec.config_class.__dataclass_fields__[name].metadata
    if isinstance(default, bool):
        candidates = [not default]
    elif metadata.get("choices"):
        candidates = [c for c in metadata["choices"] if c != default]
    elif isinstance(default, (int, float)) or name in numeric_defense_fields(spec.config_class):
        default_number = default if isinstance(default, (int, float)) else 1
        candidates = [default_number * 2, default_number / 2, default_number + 1, 0.5, 1, 2]
    else:
        candidates = ["other_value", "other.jsonl"]
    for value in candidates:
        if value == default:
            continue
        try:
            make_config(spec, "unused", small=False, **{**base, name: value})
        except (ValueError, TypeError):
            continue
        return value
    raise AssertionError(f"no valid non-default value found for {spec.name}.{name}")


def _dependency_cases():
    for spec in SPECS:
        for name, rules in declared_dependencies(spec.config_class).items():
            for index, rule in enumerate(rules):
                yield pytest.param(spec, name, rule, id=f"{spec.name}.{name}.{index}")


@pytest.mark.parametrize(("spec", "name", "rule"), list(_dependency_cases()))
def test_a_field_set_where_it_has_no_effect_is_warned(tmp_path, spec, name, rule, caplog):
    base = dict(rule.counterexample)
    config = make_config(spec, tmp_path, small=False, **base)
    assert not rule.condition(config), "the declared counterexample must switch the field off"
    value = _other_value(spec, name, base)
    with caplog.at_level(logging.WARNING, logger="trl_safety"):
        make_config(spec, tmp_path, small=False, **base, **{name: value})
    assert any(f"`{name}`=" in r.getMessage() and "has no effect" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_safety"):
        make_config(spec, tmp_path, small=False, **base)  # left at its default: nothing to say
    assert not any(f"`{name}`=" in r.getMessage() for r in caplog.records)


def _role_cases(specs=TRAINER_SPECS):
    for spec in specs:
        for role in spec.trainer_class.extra_datasets:
            yield pytest.param(spec, role, id=f"{spec.name}-{role}")


ROLE_CASES = list(_role_cases())


@pytest.mark.parametrize(("spec", "role"), ROLE_CASES)
def test_name_config_split_cannot_apply_to_a_dataset_object(tmp_path, spec, role):
    for suffix, value in (("dataset_name", "other.jsonl"), ("dataset_config", "subset"), ("dataset_split", "test")):
        name = f"{role}_{suffix}"
        if value == field_default(spec.config_class, name):
            continue
        with pytest.raises(ValueError, match=rf"`{role}_dataset=` \(a dataset object\) and `{name}`="):
            build_trainer(spec, tmp_path, args=make_config(spec, tmp_path, **{name: value}))


@pytest.mark.parametrize(("spec", "role"), ROLE_CASES)
def test_num_samples_selects_the_first_rows_of_a_dataset_object(tmp_path, spec, role):
    name = f"{role}_num_samples"
    too_many = make_config(spec, tmp_path, **{name: 50})
    with pytest.raises(ValueError, match=rf"`{name}`=50 but the {role} dataset has 8 rows; set `{name}` ≤ 8"):
        build_trainer(spec, tmp_path, args=too_many)
    if spec.paired_data:  # the pairing needs every train row's partner
        return
    trainer = build_trainer(spec, tmp_path, args=make_config(spec, tmp_path, **{name: 3}))
    assert len(getattr(trainer, f"{role}_dataset")) == 3


POST_HOC_DATA_SPECS = [s for s in POST_HOC_SPECS if "harmful_num_samples" in defense_field_names(s.config_class)]


@pytest.mark.parametrize("spec", POST_HOC_DATA_SPECS, ids=_ids(POST_HOC_DATA_SPECS))
def test_post_hoc_num_samples_selects_the_first_rows_of_a_dataset_object(tmp_path, spec):
    harmful = prompt_completion_dataset(8, seed=1)
    run = dict(harmful_dataset=harmful, processing_class=build_tokenizer(), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"`harmful_num_samples`=50 but the harmful dataset has 8 rows"):
        spec.post_hoc(tiny_model(), make_config(spec, tmp_path, harmful_num_samples=50), **run)
    spec.post_hoc(tiny_model(), make_config(spec, tmp_path, harmful_num_samples=3), **run)
    # where the defense reports its calibration set (Antidote's mask statistics), it has the first 3 rows
    for path in tmp_path.glob("*.json"):
        calibration = json.loads(path.read_text()).get("calibration")
        if calibration is not None:
            assert calibration["samples"] == 3


# ------------------------------------------------------------------------------------ rule 3: another's config
@pytest.mark.parametrize("spec", TRAINER_SPECS, ids=_ids(TRAINER_SPECS))
def test_another_defense_config_is_refused_naming_both(tmp_path, spec):
    other = next(s for s in TRAINER_SPECS if s.config_class is not spec.config_class)
    trainer_name, other_name = spec.trainer_class.__name__, other.config_class.__name__
    with pytest.raises(TypeError, match=rf"{trainer_name} got a {other_name} \(defense '{other.name}'\); pass a "):
        build_trainer(spec, tmp_path, args=make_config(other, tmp_path))


# -------------------------------------------------------------------------------- rule 4: no trainable token
@pytest.mark.parametrize("spec", TRAINER_SPECS, ids=_ids(TRAINER_SPECS))
def test_train_dataset_without_trainable_token_is_refused(tmp_path, spec):
    train, extra = datasets_for(spec, long_prompts=True)  # prompts alone fill max_length=32
    with pytest.raises(ValueError, match=r"The train dataset has no token that contributes to the loss.*`max_length`"):
        build_trainer(spec, tmp_path, train=train, **extra)


@pytest.mark.parametrize(("spec", "role"), ROLE_CASES)
def test_extra_dataset_without_trainable_token_is_refused(tmp_path, spec, role):
    long_prompts = Dataset.from_dict({"prompt": [" ".join(["cat"] * 60)] * 8, "completion": [" dog"] * 8})
    with pytest.raises(
        ValueError, match=rf"The {role} dataset has no token that contributes to the loss.*`max_length`"
    ):
        build_trainer(spec, tmp_path, **{role: long_prompts})


def test_trainable_token_detection():
    assert has_trainable_token(Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]}))
    # the first label of a sequence is never a target (labels are shifted)
    assert not has_trainable_token(Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, -100]]}))
    assert not has_trainable_token(Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[-100] * 3]}))
    assert not has_trainable_token(Dataset.from_dict({"input_ids": [], "labels": []}))
    assert not has_trainable_token(Dataset.from_dict({"input_ids": [[5]]}))  # no labels: every token but the first
    assert has_trainable_token(Dataset.from_dict({"input_ids": [[5, 6]]}))
    # packed rows: each packed sequence's first token is masked by the collator
    packed = {"input_ids": [[1, 2, 3]], "labels": [[1, 2, -100]], "seq_lengths": [[1, 2]]}
    assert not has_trainable_token(Dataset.from_dict(packed))
    packed["labels"] = [[1, 2, 3]]
    assert has_trainable_token(Dataset.from_dict(packed))
    assert has_trainable_token(Dataset.from_dict({"text": ["raw"]})) is None  # a custom collator decides


def test_fully_masked_pretokenized_dataset_is_refused_without_max_length(tmp_path):
    spec = next(s for s in TRAINER_SPECS if not s.paired_data and "harmful" in s.trainer_class.extra_datasets)
    masked = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 8, "labels": [[-100] * 4] * 8})
    args = make_config(spec, tmp_path, max_length=None)
    with pytest.raises(ValueError, match=r"harmful dataset has no token.*all 8 rows are fully masked.*`labels`"):
        build_trainer(spec, tmp_path, args=args, harmful=masked)


# ---------------------------------------------------------------------------------- rule 5: unsupported models
def tiny_encoder_decoder():
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer()
    config = T5Config(
        vocab_size=448,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize("spec", TRAINER_SPECS, ids=_ids(TRAINER_SPECS))
def test_encoder_decoder_model_is_refused_at_construction(tmp_path, spec):
    with pytest.raises(ValueError, match=r"encoder-decoder model \(T5ForConditionalGeneration\); only decoder-only"):
        build_trainer(spec, tmp_path, model=tiny_encoder_decoder())


def hidden_layers_model():
    """A model whose decoder layers are not where the structural lookup looks (`model.blocks`, not `model.layers`)."""
    model = tiny_model()
    layers = model.model.layers
    del model.model.layers
    model.model.blocks = layers
    return model


LAYER_SPECS = [s for s in TRAINER_SPECS if s.trainer_class.locates_layers]


def test_layer_locating_defenses_are_declared():
    assert LAYER_SPECS, "no defense declares `locates_layers`"
    for spec in LAYER_SPECS:
        assert "layers_path" in defense_field_names(spec.config_class), spec.name


@pytest.mark.parametrize("spec", LAYER_SPECS, ids=_ids(LAYER_SPECS))
def test_layers_not_found_are_refused_at_construction_naming_the_override(tmp_path, spec):
    with pytest.raises(
        ValueError, match=r"cannot run on this model: Could not locate the decoder layers.*`layers_path`"
    ):
        build_trainer(spec, tmp_path, model=hidden_layers_model())
    # the override named in the error is accepted
    build_trainer(
        spec, tmp_path, args=make_config(spec, tmp_path, layers_path="model.blocks"), model=hidden_layers_model()
    )


ATTENTION_SPECS = [s for s in LAYER_SPECS if "attention_attr" in defense_field_names(s.config_class)]


@pytest.mark.parametrize("spec", ATTENTION_SPECS, ids=_ids(ATTENTION_SPECS))
def test_attention_not_found_is_refused_at_construction_naming_the_override(tmp_path, spec):
    # the configuration under which the attention modules are used: flip the boolean switches that declare them off
    values = {}
    for rule in declared_dependencies(spec.config_class).get("attention_attr", ()):
        values.update({k: not v for k, v in rule.counterexample.items() if isinstance(v, bool)})
    args = make_config(spec, tmp_path, attention_attr="no_such_attention", **values)
    with pytest.raises(ValueError, match=r"cannot run on this model: .*has no attention submodule.*`attention_attr`"):
        build_trainer(spec, tmp_path, args=args)


# ---------------------------------------------------------------------------- rule 6: the error names the field
@pytest.mark.parametrize(("spec", "role"), ROLE_CASES)
def test_num_samples_larger_than_a_named_dataset_names_the_field(tmp_path, spec, role):
    path = tmp_path / f"{role}.jsonl"
    prompt_completion_dataset(32, seed=3).to_json(str(path))
    name = f"{role}_num_samples"
    default = field_default(spec.config_class, name)
    asked = default if isinstance(default, int) and default > 32 else 200  # the default itself where it is too large
    args = make_config(spec, tmp_path, **{f"{role}_dataset_name": str(path), name: asked})
    train, extra = datasets_for(spec)
    extra.pop(role)
    with pytest.raises(
        ValueError,
        match=rf"^`{name}`={asked} but the {role} dataset '{re.escape(str(path))}' has 32 rows; set `{name}` ≤ 32 or "
        "leave it unset",
    ):
        spec.trainer_class(
            tiny_model(),
            args=args,
            train_dataset=train,
            processing_class=build_tokenizer(),
            **{f"{r}_dataset": d for r, d in extra.items()},
        )


FAKE_ADAPTER_ID = "trl-safety-testing/rules-adapter"


@register_dataset_adapter(FAKE_ADAPTER_ID)
def _fake_adapter(role, split="train", config=None, num_samples=None):
    """A Hub dataset with an adapter (which selects the rows itself, and refuses more than it has): 12 rows."""
    dataset = prompt_completion_dataset(12, seed=5)
    return dataset.select(select_indices(len(dataset), 0, num_samples))


@pytest.mark.parametrize(("spec", "role"), ROLE_CASES)
def test_num_samples_larger_than_an_adapted_hub_dataset_names_the_field(tmp_path, spec, role):
    name = f"{role}_num_samples"
    args = make_config(spec, tmp_path, **{f"{role}_dataset_name": FAKE_ADAPTER_ID, name: 50})
    train, extra = datasets_for(spec)
    extra.pop(role)
    with pytest.raises(ValueError, match=rf"^`{name}`=50 but the {role} dataset '{FAKE_ADAPTER_ID}' has 12 rows"):
        spec.trainer_class(
            tiny_model(),
            args=args,
            train_dataset=train,
            processing_class=build_tokenizer(),
            **{f"{r}_dataset": d for r, d in extra.items()},
        )
