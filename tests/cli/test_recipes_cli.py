"""Every recipe in `recipes/` runs with exactly the command in its header, through the real `trl-safety` entry point.

The command is read from the recipe's header and given to `trl_safety.cli.main.main` unchanged. Everything up to
training runs for real: the defense is picked (from `--defense` or the file's `defense:`), the YAML is applied, the
up-front checks look at the model folder and the datasets, and a recipe with `--accelerate_config` / `--num_processes`
goes through the launch path: `accelerate launch`'s parser builds its arguments, and the launched script's own parse
runs on what it would be given. Only the last steps are replaced: `accelerate.commands.launch.launch_command` (which
would start processes) and the training or repair function (which would load a 7B model), so the test sees the
configuration the CLI built and checks it against the YAML, key by key.

The recipes are GPU recipes (`bf16: true`); transformers refuses bf16 on a machine without a GPU while building the
config, so the test reports a bf16-capable GPU to that check (nothing runs on it).
"""

from __future__ import annotations

import enum
import json
import os

import pytest
import yaml
from testing_utils import RECIPES, REPO_ROOT, recipe_header_command

from trl_safety.cli.main import main


class Stop(Exception):
    """Raised where training or the repair would start, carrying what the CLI built."""

    def __init__(self, **built):
        self.built = built


@pytest.fixture
def recipe_world(tmp_path, monkeypatch):
    """A working directory where every model folder and local data file the recipes name exists (tiny stand-ins:
    the up-front checks look at existence and format, nothing loads), with `recipes/` reachable as in the repo."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(REPO_ROOT, "recipes"), tmp_path / "recipes")
    for path in RECIPES:
        with open(path) as f:
            values = yaml.safe_load(f)
        model = values["model_name_or_path"]
        os.makedirs(model, exist_ok=True)
        (tmp_path / model / "config.json").write_text("{}")
        for key, value in values.items():
            if key.endswith("_adapter"):  # an adapter folder a repair reads (SafeMERGE's safety adapter)
                os.makedirs(value, exist_ok=True)
                (tmp_path / value / "adapter_config.json").write_text("{}")
            if key.endswith("dataset_name") and value.startswith("data/"):
                os.makedirs("data", exist_ok=True)
                (tmp_path / value).write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    return tmp_path


def _capture_training(monkeypatch):
    import trl_safety.cli.train as cli_train

    def fake_main(script_args, training_args, model_args, dataset_args, defense=None):
        raise Stop(parsed=(script_args, training_args, model_args, dataset_args), defense=defense)

    monkeypatch.setattr(cli_train, "main", fake_main)
    launches = []

    def fake_launch(args):
        launches.append(args)

    import accelerate.commands.launch

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", fake_launch)
    return launches


def _normalise(value):
    if isinstance(value, enum.Enum):
        return value.value
    return value


def assert_matches_yaml(path: str, values: dict, defense: str | None, parsed: dict) -> None:
    """Every key of the YAML reached the built configuration with its value."""
    assert defense == values.get("defense"), f"{path}: the CLI ran defense {defense!r}"
    for key, value in values.items():
        if key == "defense":
            continue
        assert key in parsed, f"{path}: {key} is not an option of the command"
        got = _normalise(parsed[key])
        if key == "report_to":  # transformers turns the string into a list, "none" into []
            got = got if isinstance(got, str) else ",".join(got) or "none"
        if isinstance(value, float) or isinstance(got, float):
            assert float(got) == float(value), f"{path}: {key} = {got!r}, YAML says {value!r}"
        else:
            assert got == value, f"{path}: {key} = {got!r}, YAML says {value!r}"


def _flat(*dataclass_objects) -> dict:
    merged = {}
    for obj in dataclass_objects:
        merged.update(vars(obj))
    return merged


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, REPO_ROOT) for p in RECIPES])
def test_recipe_runs_with_its_header_command(path, recipe_world, monkeypatch):
    import trl_safety.cli.train as cli_train

    argv = recipe_header_command(path)
    with open(path) as f:
        values = yaml.safe_load(f)
    command = argv[1]
    assert values.get("defense") == (argv[argv.index("--defense") + 1] if "--defense" in argv else None), (
        f"{path}: the header's --defense and the file's `defense:` differ"
    )

    if command == "prune":
        import trl_safety.cli.prune as cli_prune

        real_checks = cli_prune.check_prune_arguments

        def checked_then_stop(args, config):
            real_checks(args, config)
            raise Stop(args=args, config=config)

        monkeypatch.setattr(cli_prune, "check_prune_arguments", checked_then_stop)
        with pytest.raises(Stop) as stop:
            main(argv[1:])
        built = stop.value.built
        assert_matches_yaml(path, values, argv[argv.index("--defense") + 1], _flat(built["args"], built["config"]))
        return

    assert command in ("align", "sft"), command
    launches = _capture_training(monkeypatch)
    if "--accelerate_config" in argv or "--num_processes" in argv:
        assert main(argv[1:]) == 0
        (launch,) = launches
        assert launch.training_script == cli_train.__file__
        if "--num_processes" in argv:
            assert launch.num_processes == int(argv[argv.index("--num_processes") + 1])
        if "--accelerate_config" in argv:
            profile = argv[argv.index("--accelerate_config") + 1]
            assert os.path.basename(launch.config_file).startswith(profile)
        # What each launched process parses
        with pytest.raises(Stop) as stop:
            cli_train._launched(launch.training_script_args, prog="trl-safety", command=None)
    else:
        with pytest.raises(Stop) as stop:
            main(argv[1:])
        assert launches == []
    built = stop.value.built
    assert_matches_yaml(path, values, built["defense"], _flat(*built["parsed"]))
    if built["defense"] is not None:
        from trl_safety.registry import get_defense

        assert type(built["parsed"][1]) is get_defense(built["defense"]).config_class


def test_bare_config_runs_the_files_defense(recipe_world, monkeypatch):
    """The issue's command: `trl-safety sft --config <lisa recipe>`, no --defense: the file's `defense:` decides."""
    _capture_training(monkeypatch)
    with pytest.raises(Stop) as stop:
        main(["sft", "--config", "recipes/lisa/sst2_finetune_lora.yaml"])
    assert stop.value.built["defense"] == "lisa"
    training_args = stop.value.built["parsed"][1]
    assert training_args.alignment_dataset_name == "PKU-Alignment/BeaverTails"
    assert (training_args.alignment_steps, training_args.finetune_steps) == (100, 900)


def test_command_line_overrides_the_file(recipe_world, monkeypatch):
    _capture_training(monkeypatch)
    argv = ["sft", "--config", "recipes/lisa/sst2_finetune_lora.yaml", "--rho", "0.5", "--max_steps", "7"]
    with pytest.raises(Stop) as stop:
        main(argv)
    training_args = stop.value.built["parsed"][1]
    assert (training_args.rho, training_args.max_steps, training_args.finetune_steps) == (0.5, 7, 900)


def test_accelerate_keys_in_the_file_go_to_accelerate(recipe_world, monkeypatch):
    """`num_processes:` / `accelerate_config:` in a YAML file launch like the flags do; the child ignores them."""
    import trl_safety.cli.train as cli_train

    with open("recipes/vaccine/sst2_align_lora.yaml") as f:
        values = yaml.safe_load(f)
    values.update(num_processes=2, accelerate_config="zero2")
    (recipe_world / "launch.yaml").write_text(yaml.safe_dump(values))
    launches = _capture_training(monkeypatch)
    assert main(["align", "--config", "launch.yaml"]) == 0
    (launch,) = launches
    assert launch.num_processes == 2 and os.path.basename(launch.config_file) == "zero2.yaml"
    assert launch.training_script_args[:4] == ["--defense", "vaccine", "--config", "launch.yaml"]
    with pytest.raises(Stop) as stop:
        cli_train._launched(launch.training_script_args, prog="trl-safety", command=None)
    assert stop.value.built["defense"] == "vaccine" and stop.value.built["parsed"][1].rho == 2.0
