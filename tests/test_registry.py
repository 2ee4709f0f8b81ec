"""The registry: a defense's identity is declared once, in its DefenseSpec (docs/design/architecture.md §4)."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
from trl import SFTConfig, SFTTrainer

from trl_safety import registry
from trl_safety.core.config import defense_field_names
from trl_safety.core.trainer import DefenseTrainerMixin
from trl_safety.docs_tables import COMMAND, builtin_defenses, stale_tables
from trl_safety.registry import DefenseSpec, get_defense, list_defenses, register_defense


@pytest.fixture
def isolated_registry(monkeypatch):
    """A copy of the registry (built-ins loaded) that the test may register into; restored afterwards."""
    list_defenses()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_trainer_identity_is_derived_from_the_spec():
    specs = list_defenses()
    assert len(specs) >= 11
    for spec in specs:
        assert spec.config_class.__dict__["defense_spec"] is spec, spec.name  # on the class itself, not inherited
        if spec.trainer_class is None:
            assert callable(spec.post_hoc), spec.name
            assert spec.tags == ("trl-safety", spec.name)
            continue
        trainer = spec.trainer_class
        assert trainer.__dict__["defense_spec"] is spec, spec.name
        assert trainer.defense_name == spec.name
        assert trainer.stage == spec.stage
        assert trainer.config_class is spec.config_class
        assert trainer._name == spec.title
        assert trainer._paper == spec.paper and trainer._paper is not spec.paper  # a copy: the spec stays intact
        assert trainer._tag_names == ["trl", "sft", "trl-safety", spec.name]
        assert trainer.licence_notes == list(spec.licence_notes)
        assert spec.paper["id"] and spec.paper["citation"].startswith("@"), spec.name


def test_neutral_overrides_are_fields_of_the_config():
    for spec in list_defenses():
        if spec.neutral_overrides is None:  # documented: no setting makes the defense plain SFT
            assert spec.name == "repnoise"
            continue
        assert spec.neutral_overrides, spec.name
        assert set(spec.neutral_overrides) <= set(defense_field_names(spec.config_class)), spec.name
        is_trainer_config = issubclass(spec.config_class, SFTConfig)
        base = {"output_dir": "unused", "bf16": False} if is_trainer_config else {}
        config = spec.config_class(**base, **spec.neutral_overrides)  # in range: the config accepts them
        for name, value in spec.neutral_overrides.items():
            assert getattr(config, name) == value


@dataclass
class _ToyConfig(SFTConfig):
    toy_strength: float = field(default=1.0, metadata={"help": "test-only strength"})


def _toy_classes(**trainer_body):
    config = dataclass(type("ToyConfig", (_ToyConfig,), {"__module__": __name__}))
    trainer = type("ToyTrainer", (DefenseTrainerMixin, SFTTrainer), {"__module__": __name__, **trainer_body})
    return config, trainer


def test_register_writes_identity_onto_new_classes(isolated_registry):
    config, trainer = _toy_classes(unsupported_backends={"zero3": "test-only."})
    spec = DefenseSpec(
        name="toy-registered",
        stage="fine-tuning",
        config_class=config,
        trainer_class=trainer,
        title="Toy",
        paper={"title": "A Toy", "id": "0000.00000", "citation": "@article{toy}"},
        licence_notes=["test-only data"],
        neutral_overrides={"toy_strength": 0.0},
    )
    assert spec.unsupported_backends == ("zero3", "fsdp")  # the trainer's refusal plus the mixin's FSDP rule
    assert register_defense(spec) is spec
    assert get_defense("toy-registered") is spec
    assert (trainer.defense_name, trainer.stage, trainer.config_class, trainer._name) == (
        "toy-registered",
        "fine-tuning",
        config,
        "Toy",
    )
    assert trainer._paper == {"title": "A Toy", "id": "0000.00000", "citation": "@article{toy}"}
    assert trainer._tag_names == ["trl", "sft", "trl-safety", "toy-registered"]
    assert trainer.licence_notes == ["test-only data"] and spec.licence_notes == ("test-only data",)
    assert config.defense_spec is spec
    assert register_defense(spec) is spec  # the same spec again: a no-op
    # the unregistered mixin keeps plain SFT's defaults
    assert (DefenseTrainerMixin.defense_spec, DefenseTrainerMixin._name) == (None, "SFT")
    assert DefenseTrainerMixin._tag_names == ["trl", "sft", "trl-safety"]

    with pytest.raises(ValueError, match="already registered as 'toy-registered'"):
        register_defense(dataclasses.replace(spec, title="Other"))
    with pytest.raises(ValueError, match="ToyTrainer already belongs to the defense 'toy-registered'"):
        register_defense(dataclasses.replace(spec, name="toy-again"))
    assert "toy-again" not in registry._REGISTRY


@pytest.mark.parametrize("attribute", ["_name", "_paper", "defense_name", "stage", "config_class", "_tag_names"])
def test_trainer_declaring_identity_itself_is_refused(isolated_registry, attribute):
    config, trainer = _toy_classes(**{attribute: "hand-written"})
    spec = DefenseSpec(name="toy-declares", stage="alignment", config_class=config, trainer_class=trainer)
    with pytest.raises(ValueError, match=rf"ToyTrainer declares {attribute} in its class body.*DefenseSpec"):
        register_defense(spec)
    assert "toy-declares" not in registry._REGISTRY
    assert "defense_spec" not in trainer.__dict__ and "defense_spec" not in config.__dict__  # nothing written


def test_config_declaring_identity_itself_is_refused(isolated_registry):
    @dataclass
    class PostHocConfig:
        strength: float = field(default=0.0, metadata={"help": "test-only"})
        _paper = {"id": "0000.00000"}  # the hand-written copy post-hoc configs used to carry

    spec = DefenseSpec("toy-post-hoc", "post-fine-tuning", PostHocConfig, post_hoc=lambda model, config, **kw: model)
    with pytest.raises(ValueError, match="PostHocConfig declares _paper in its class body"):
        register_defense(spec)
    assert "toy-post-hoc" not in registry._REGISTRY


def test_spec_defaults_and_tags():
    config, trainer = _toy_classes()
    spec = DefenseSpec("toy-defaults", "alignment", config, trainer)
    assert spec.title == "toy-defaults" and spec.paper == {} and spec.neutral_overrides is None
    assert spec.tags == ("trl", "sft", "trl-safety", "toy-defaults")
    post_hoc = DefenseSpec(
        "toy-repair",
        "post-fine-tuning",
        _ToyConfig,
        post_hoc=lambda model, config, **kw: model,
        unsupported_backends=["zero3"],
    )
    assert post_hoc.tags == ("trl-safety", "toy-repair") and post_hoc.unsupported_backends == ("zero3",)
    with pytest.raises(ValueError, match="declares its backends on the trainer"):
        DefenseSpec("toy-defaults", "alignment", config, trainer, unsupported_backends=("zero3",))


# ------------------------------------------------------------------------------------------ entry-point plugins
_PLUGIN = """
from dataclasses import dataclass, field

from trl_safety.registry import DefenseSpec, register_defense


@dataclass
class DemoConfig:
    strength: float = field(default=1.0, metadata={"help": "test-only strength"})


@dataclass
class CallableConfig:
    strength: float = field(default=1.0, metadata={"help": "test-only strength"})


def unchanged(model, config, **kwargs):
    return model


register_defense(
    DefenseSpec(
        name="demo-plugin",
        stage="post-fine-tuning",
        config_class=DemoConfig,
        post_hoc=unchanged,
        title="Demo plugin",
        description="A test plugin registered by importing its module.",
        neutral_overrides={"strength": 0.0},
    )
)


def make_spec():
    return DefenseSpec(
        name="demo-callable",
        stage="post-fine-tuning",
        config_class=CallableConfig,
        post_hoc=unchanged,
        description="A test plugin returned by an entry-point callable.",
    )
"""


def _install(site, distribution, module, source, entry_points):
    """A package and its `<dist>-0.1.dist-info` (what pip would write), found through PYTHONPATH."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{distribution.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[trl_safety.defenses]\n" + "".join(f"{e}\n" for e in entry_points))


def _listed(stdout: str) -> list[tuple[str, str]]:
    """`(stage, name)` per defense line of `trl-safety defenses` (a `stage:` heading, then indented lines)."""
    listed, stage = [], None
    for line in stdout.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            stage = line[:-1]
        elif line.strip():
            listed.append((stage, line.split()[0]))
    return listed


def _run(site, *args):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_entry_point_plugin_is_listed_and_found(tmp_path):
    _install(
        tmp_path,
        "trl-safety-demo",
        "demo_defense",
        _PLUGIN,
        ["demo = demo_defense", "demo-callable = demo_defense:make_spec"],
    )
    listing = _run(tmp_path, "-m", "trl_safety.cli.main", "defenses")
    assert listing.returncode == 0, listing.stderr
    listed = _listed(listing.stdout)
    names = [name for _, name in listed]
    assert {"demo-plugin", "demo-callable", "vaccine", "antidote"} <= set(names)
    # one listing, plugins and built-ins together: by stage in pipeline order, names sorted within a stage
    assert listed == sorted(listed, key=lambda pair: (registry.STAGES.index(pair[0]), pair[1]))
    assert "Could not load" not in listing.stderr

    found = _run(
        tmp_path,
        "-c",
        textwrap.dedent(
            """
            from trl_safety.registry import get_defense
            spec = get_defense("demo-plugin")
            print(spec.title, spec.stage, spec.config_class.__module__, spec.config_class.defense_spec is spec)
            print(get_defense("demo-callable").description)
            """
        ),
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines() == [
        "Demo plugin post-fine-tuning demo_defense True",
        "A test plugin returned by an entry-point callable.",
    ]


def test_broken_plugin_warns_and_built_ins_stay(tmp_path):
    _install(
        tmp_path,
        "trl-safety-broken",
        "broken_defense",
        "raise RuntimeError('boom at import')\n",
        ["broken = broken_defense"],
    )
    listing = _run(tmp_path, "-m", "trl_safety.cli.main", "defenses")
    assert listing.returncode == 0, listing.stderr
    assert "Could not load the defense plugin 'broken'" in listing.stderr
    assert "trl-safety-broken" in listing.stderr  # the distribution to uninstall or fix
    assert "RuntimeError: boom at import" in listing.stderr
    names = [name for _, name in _listed(listing.stdout)]
    expected = sorted(builtin_defenses(), key=lambda s: (registry.STAGES.index(s.stage), s.name))
    assert names == [spec.name for spec in expected]  # the built-ins, only


# ------------------------------------------------------------------------------------------------------- docs
def test_docs_tables_are_generated_from_the_registry():
    stale = stale_tables()
    assert not stale, f"docs tables out of date: {', '.join(stale)}; regenerate them with `{COMMAND}`"


def test_docs_check_notices_a_changed_spec(monkeypatch):
    spec = get_defense("antidote")
    monkeypatch.setitem(registry._REGISTRY, "antidote", dataclasses.replace(spec, title="Renamed"))
    assert stale_tables() == ["index.md (defenses-table)"]
