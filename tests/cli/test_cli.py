import pytest
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset

from trl_safety.cli.main import main
from trl_safety.cli.train import _subtract_subsequence, resolve_accelerate_config


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "align" in out and "sft" in out and "defenses" in out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_sft_command_trains_and_saves(tmp_path):
    model_dir = tmp_path / "model"
    build_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    prompt_completion_dataset(8).to_json(str(data))
    out = tmp_path / "out"
    argv = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out)]
    argv += ["--max_steps", "1", "--bf16", "false", "--use_cpu", "true", "--report_to", "none", "--max_length", "32"]
    argv += ["--gradient_checkpointing", "false", "--per_device_train_batch_size", "4", "--save_strategy", "no"]
    assert main(argv) == 0
    assert (out / "model.safetensors").exists()


def test_align_requires_an_alignment_defense(capsys):
    assert main(["align", "--output_dir", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-safety align: error: choose an alignment-stage defense with --defense (")
    assert "vaccine" in err and len(err.splitlines()) == 1


def test_accelerate_argument_plumbing():
    assert _subtract_subsequence(["--a", "2", "--num_processes", "2", "--b"], ["--num_processes", "2"]) == [
        "--a",
        "2",
        "--b",
    ]
    # TRL's bundled profiles are found too
    assert resolve_accelerate_config("zero2").endswith("zero2.yaml")
    with pytest.raises(ValueError, match="neither a file nor a bundled profile"):
        resolve_accelerate_config("no-such-profile")


def test_defenses_command_lists_registry(capsys):
    from trl_safety.registry import list_defenses

    assert main(["defenses"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    specs = list_defenses()
    if not specs:
        assert lines == ["No defense registered."]
        return
    # grouped by stage in pipeline order (a heading per stage present, a blank line between groups), names sorted
    stages = ("alignment", "fine-tuning", "post-fine-tuning")
    expected = []
    for stage in stages:
        names = sorted(spec.name for spec in specs if spec.stage == stage)
        if names:
            expected += ([""] if expected else []) + [f"{stage}:"] + [f"  {name}" for name in names]
    assert [line if not line.startswith("  ") else "  " + line.split()[0] for line in lines] == expected
    # each defense line carries its unsupported backends and description
    for spec in specs:
        (line,) = [line for line in lines if line.split() and line.split()[0] == spec.name]
        assert line.rstrip().endswith(spec.description)
        assert "unsupported: " + (", ".join(spec.unsupported_backends) or "-") in line

    assert main(["defenses", "--stage", "post-fine-tuning"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "post-fine-tuning:"
    assert [line.split()[0] for line in lines[1:]] == sorted(s.name for s in specs if s.stage == "post-fine-tuning")
