"""Every recipe in `recipes/` parses against the config classes its launch command uses (fast, no training).

A recipe starts with comment lines holding its exact `trl-safety ...` command; the test reads that command, picks the
defense's config class like the CLI does, and parses the YAML with TRL's `TrlParser` (`--config`), so a misspelt field
or an out-of-range value fails here rather than on a GPU node.
"""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
import yaml


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))


def launch_command(path: str) -> list[str]:
    """The `trl-safety` command in the recipe's header (continuation lines joined)."""
    header = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            header.append(line[1:].strip())
    text = "\n".join(header).replace("\\\n", " ")
    commands = [line for line in text.splitlines() if line.startswith("trl-safety ")]
    assert len(commands) == 1, f"{path}: expected one `trl-safety` command in the header, found {commands}"
    return shlex.split(commands[0])


def test_recipes_exist():
    assert len(RECIPES) >= 10
    stages = {re.split(r"[_.]", os.path.basename(p))[1] for p in RECIPES}
    assert {"align", "finetune", "prune"} <= stages


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_recipe_parses(path):
    from trl_safety.cli.train import _config_class, make_parser, resolve_accelerate_config

    argv = launch_command(path)
    command, rest = argv[1], argv[2:]
    with open(path) as f:
        values = yaml.safe_load(f)
    options = dict(zip(rest[::2], rest[1::2]))
    defense = options.get("--defense")

    if command == "prune":
        from transformers import HfArgumentParser

        from trl_safety.cli.prune import PruneArguments
        from trl_safety.registry import get_defense

        parser = HfArgumentParser((PruneArguments, get_defense(defense).config_class))
        assert values.get("defense", defense) == defense, f"{path}: `defense:` vs the header's --defense"
        prune_args, config = parser.parse_dict({k: v for k, v in values.items() if k != "defense"})
        # The header's flags and the YAML agree
        for flag, value in options.items():
            key = flag.lstrip("-")
            if key not in ("defense", "config"):
                assert str(values[key]) == value, f"{path}: {flag} {value} vs YAML {values[key]}"
        parsed = {**vars(prune_args), **vars(config), "defense": defense}
    else:
        assert command in ("align", "sft"), command
        assert options.get("--config") == os.path.relpath(path, ROOT), f"{path}: the command names another file"
        if "--accelerate_config" in options:
            assert os.path.isfile(resolve_accelerate_config(options["--accelerate_config"]))
        config_class = _config_class(defense, command)  # refuses a defense of the wrong stage
        parser = make_parser(config_class)
        # bf16 cannot be validated on a CPU-only machine (TRL refuses it there); everything else is as written
        *parsed_args, remaining = parser.parse_args_and_config(
            ["--config", path, "--bf16", "false"], return_remaining_strings=True
        )
        assert remaining == [], f"{path}: unknown fields {remaining}"
        parsed = {}
        for dataclass_args in parsed_args:
            parsed.update(vars(dataclass_args))
    for key, value in values.items():
        if key in ("bf16", "report_to"):  # bf16: overridden above; report_to: normalised to a list
            continue
        assert key in parsed, f"{path}: {key} is not a field"
        got = parsed[key]
        if isinstance(value, float) or isinstance(got, float):
            assert float(got) == pytest.approx(float(value)), f"{path}: {key}"
        elif not (key == "lr_scheduler_type" or key == "save_strategy"):
            assert got == value or str(got) == str(value), f"{path}: {key} = {got!r}, YAML says {value!r}"


def test_recipe_values_follow_the_papers():
    """A few values docs/design/algorithms.md fixes, checked so a recipe edit cannot silently drift."""

    def load(name):
        with open(os.path.join(ROOT, "recipes", name)) as f:
            return yaml.safe_load(f)

    assert load("vaccine/sst2_align_lora.yaml")["rho"] == 2.0
    assert load("booster/sst2_align_lora.yaml")["lamb"] == 5.0 and load("booster/sst2_align_lora.yaml")["alpha"] == 0.1
    lisa = load("lisa/sst2_finetune_lora.yaml")
    assert (lisa["alignment_steps"], lisa["finetune_steps"], lisa["rho"]) == (100, 900, 1.0)
    assert load("antidote/gsm8k_prune.yaml")["prune_ratio"] == 0.05
    assert load("antibody/gsm8k_finetune_lora.yaml")["temperature"] == 1.0


def test_bundled_accelerate_configs_resolve(tmp_path, monkeypatch):
    """GPU profiles and CPU test profiles resolve by name from any directory, the ZeRO-3 JSON included."""
    import json

    from trl_safety.cli.train import resolve_accelerate_config

    monkeypatch.chdir(tmp_path)
    for name in ("ddp", "zero2", "zero3", "fsdp2", "cpu_ddp", "cpu_zero2", "cpu_zero3"):
        path = resolve_accelerate_config(name)
        with open(path) as f:
            config = yaml.safe_load(f)
        with open(os.path.join(ROOT, "trl_safety", "accelerate_configs", f"{name}.yaml")) as f:
            first = f.readline()
        assert first.startswith("#"), f"{name}.yaml must start with a comment saying how to launch it"
        if name.startswith("cpu_"):
            assert config["num_processes"] == 2 and config.get("mixed_precision", "no") == "no"
        else:
            assert config["mixed_precision"] == "bf16"
        ds_file = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file:
            assert os.path.isabs(ds_file)
            with open(ds_file) as f:
                assert json.load(f)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert resolve_accelerate_config("multi_gpu").endswith(os.path.join("trl", "accelerate_configs", "multi_gpu.yaml"))
    with pytest.raises(ValueError, match="Bundled: .*cpu_ddp"):
        resolve_accelerate_config("no_such_profile")
    assert re.search(r"zero3", resolve_accelerate_config("zero3"))
