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
    if specs:
        assert [line.split()[0] for line in lines] == [spec.name for spec in specs]
    else:
        assert lines == ["No defense registered."]
