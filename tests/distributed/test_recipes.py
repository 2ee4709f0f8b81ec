"""Every recipe in `recipes/` parses against the config classes its launch command uses (fast, no training).

A recipe starts with comment lines holding its exact `trl-safety ...` command; the test reads that command, picks the
defense's config class like the CLI does, and parses the YAML with TRL's `TrlParser` (`--config`), so a misspelt field
or an out-of-range value fails here rather than on a GPU node.
"""

from __future__ import annotations

import os
import re

import pytest
import yaml
from testing_utils import RECIPES
from testing_utils import REPO_ROOT as ROOT


def test_recipes_exist():
    assert len(RECIPES) >= 10
    stages = {re.split(r"[_.]", os.path.basename(p))[1] for p in RECIPES}
    assert {"align", "finetune", "prune"} <= stages


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
    constrained = load("token_constrained/gsm8k_finetune_full.yaml")
    assert (constrained["beta"], constrained["bias_factor"], constrained["bias_length"]) == (0.1, 20.0, 5)


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
