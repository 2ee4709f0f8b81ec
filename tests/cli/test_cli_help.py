"""`--help` of the training commands: the defenses of the command's stage, and a defense's own options with their help.

The expected text comes from the registry (names and descriptions) and from the config classes' field metadata,
read here independently of the CLI; whitespace is dropped before comparing because argparse wraps lines to the
terminal width (also inside hyphenated words).
"""

from __future__ import annotations

import dataclasses

import pytest
from trl import SFTConfig

from trl_safety.cli.main import main
from trl_safety.registry import get_defense, list_defenses


def help_text(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def collapsed(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("command, stage", [("align", "alignment"), ("sft", "fine-tuning")])
def test_help_lists_the_stages_defenses(capsys, command, stage):
    out = help_text(capsys, [command, "--help"])
    listing = out.split("options:")[0]
    for spec in list_defenses():
        if spec.stage == stage and spec.trainer_class is not None:  # post-hoc ones (LoX) run under `prune`
            assert collapsed(f"{spec.name} {spec.description}") in collapsed(listing), spec.name
        else:
            assert f"  {spec.name} " not in listing, f"{spec.name} ({spec.stage}) listed under `{command}`"
    assert "--defense" in out and "--model_name_or_path" in out
    assert out.startswith(f"usage: trl-safety {command} [--defense NAME] [--config FILE]")


@pytest.mark.parametrize("command, defense", [("sft", "lisa"), ("align", "vaccine"), ("align", "booster")])
def test_defense_help_shows_its_own_options_first(capsys, command, defense):
    config_class = get_defense(defense).config_class
    own = [
        f for f in dataclasses.fields(config_class) if f.name not in {g.name for g in dataclasses.fields(SFTConfig)}
    ]
    assert own, config_class
    out = help_text(capsys, [command, "--defense", defense, "--help"])
    heading = f"{defense} options ({config_class.__name__}):"
    assert heading in out
    section = out.split(heading, 1)[1].split("\noptions:", 1)[0]  # the defense's group, before TRL's options
    for f in own:
        assert f"--{f.name}" in section, f.name
        assert collapsed(f.metadata["help"]) in collapsed(section), f.name
    assert "--learning_rate" not in section


def test_prune_help_without_a_defense_names_the_options(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model_name_or_path" in out and "--config" in out and "antidote" in out
