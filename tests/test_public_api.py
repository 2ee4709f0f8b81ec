"""The public API contract (docs/design/architecture.md §3): names, base classes, help text on every config field, registry."""

import dataclasses

import pytest
from trl import SFTConfig, SFTTrainer

import trl_safety
from trl_safety.registry import list_defenses


PAIRS = [
    ("VaccineConfig", "VaccineTrainer"),
    ("TVaccineConfig", "TVaccineTrainer"),
    ("BoosterConfig", "BoosterTrainer"),
    ("RepNoiseConfig", "RepNoiseTrainer"),
    ("AntibodyAlignConfig", "AntibodyAlignTrainer"),
    ("LisaConfig", "LisaTrainer"),
    ("AntibodyConfig", "AntibodyTrainer"),
    ("PanaceaConfig", "PanaceaTrainer"),
    ("SafetyMixConfig", "SafetyMixTrainer"),
    ("TokenConstrainedConfig", "TokenConstrainedTrainer"),
    ("SafetyRecoveryConfig", "SafetyRecoveryTrainer"),
    ("SafeGradConfig", "SafeGradTrainer"),
    ("BackdoorAlignConfig", "BackdoorAlignTrainer"),
    ("AsFTConfig", "AsFTTrainer"),
]


@pytest.mark.parametrize(("config_name", "trainer_name"), PAIRS)
def test_trainer_config_pairs(config_name, trainer_name):
    config_class = getattr(trl_safety, config_name)
    trainer_class = getattr(trl_safety, trainer_name)
    assert issubclass(config_class, SFTConfig)
    assert issubclass(trainer_class, SFTTrainer)
    assert trainer_class.config_class is config_class
    assert trainer_class._paper.get("id") and trainer_class._paper.get("citation")
    assert "trl-safety" in trainer_class._tag_names


def test_post_hoc_api():
    assert callable(trl_safety.antidote_prune)
    assert trl_safety.AntidoteConfig is not None
    from transformers import TrainerCallback

    for name in ("AntidoteCallback", "ProximalCallback", "HarmfulScoreCallback", "EmbeddingDriftCallback"):
        assert issubclass(getattr(trl_safety, name), TrainerCallback), name


def test_every_defense_field_has_help():
    base = {f.name for f in dataclasses.fields(SFTConfig)}
    for spec in list_defenses():
        for f in dataclasses.fields(spec.config_class):
            if f.name not in base:
                assert f.metadata.get("help"), f"{spec.config_class.__name__}.{f.name} has no help"


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchTrainer'"):
        trl_safety.NoSuchTrainer  # noqa: B018


def test_trainer_defense_backends_are_declared_once_on_the_trainer():
    from trl_safety.registry import DefenseSpec, get_defense

    spec = get_defense("booster")
    assert "zero3" in spec.unsupported_backends and "fsdp" in spec.unsupported_backends  # the mixin's FSDP rule too
    with pytest.raises(ValueError, match="declares its backends on the trainer"):
        DefenseSpec("x", "alignment", spec.config_class, spec.trainer_class, unsupported_backends=("zero3",))
