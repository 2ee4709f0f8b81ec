"""`trl-safety bench --data toy` with a real-model checkpoint: the toy world's rows rendered by the model's chat
template. Runs on the tiny GGUF fixture (byte-level BPE, ChatML with a default system prompt, as SmolLM2's), loaded
through `trl_safety.models` like `--model_name_or_path smollm2`."""

import importlib.util
import json
import os

import pytest

from trl_safety.cli.main import main


pytest.importorskip("gguf")


def _tiny_gguf_module():
    # the fixture lives beside the model tests (tests/models/tiny_gguf.py); loaded by path, not via sys.path
    path = os.path.join(os.path.dirname(__file__), "..", "models", "tiny_gguf.py")
    spec = importlib.util.spec_from_file_location("tiny_gguf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _tiny_gguf_module()
SYSTEM = "<|im_start|>system\nYou are a tiny test assistant<|im_end|>\n"  # TINY.CHAT_TEMPLATE's default system turn


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return TINY.write_tiny_gguf(str(tmp_path_factory.mktemp("gguf")))[0]


def _check_percent(value, denominator):
    assert 0.0 <= value <= 100.0
    assert (value * denominator / 100.0) == pytest.approx(round(value * denominator / 100.0))


def test_toy_world_through_a_real_model(gguf_file, tmp_path):
    """The mini real-model bench end to end: the CPU-scale defaults, one defense per stage, the output contract."""
    out = tmp_path / "out"
    argv = ["bench", "--model_name_or_path", gguf_file, "--data", "toy", "--defenses", "vaccine", "lisa", "antidote"]
    argv += ["--align_steps", "2", "--steps", "2", "--num_eval_prompts", "4", "--num_task_test", "4"]
    argv += ["--max_new_tokens", "3", "--no-progress", "--output_dir", str(out)]
    assert main(argv) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    config = results["config"]
    assert config["world"] == "toy" and config["model"] == gguf_file and config["template"] == "chat"
    # the CPU-scale defaults of --data toy (trl_safety.bench.config.REAL_MODEL_TOY_DATA), not the papers' protocol
    assert config["n"] == 32 and config["seeds"] == [0] and config["lora_mode"] == "double"
    assert config["lora_target_modules"] == "all-linear" and config["judge"] == "keyword"
    assert config["p"] == 0.1
    assert [r["name"] for r in results["rows"]] == ["sft", "no-alignment", "vaccine", "lisa", "antidote"]
    for row in results["rows"]:
        assert row.get("error") is None, row
        _check_percent(row["harmful_score"], 4)
        _check_percent(row["finetune_accuracy"], 4)
        assert row["harmful_loss"] > 0.0
        assert row["curve"][0]["step"] == 0 and row["curve"][-1]["step"] == 2
    calibration = results["calibration"]
    assert sorted(calibration["sft_hs_by_p"]) == ["0.0", "0.1"]
    for key in ("base_hs", "aligned_hs", "sft_hs"):
        _check_percent(calibration[key], 4)
    assert os.path.exists(out / "tradeoff.png") or not results.get("plot")


def test_toy_rows_are_rendered_by_the_chat_template(gguf_file):
    """Each toy row becomes the model's own chat rendering: the default system turn, the user turn, the generation
    prompt; the completion is the answer and its end-of-turn marker (strings written out here by hand)."""
    from trl_safety.bench import BenchConfig
    from trl_safety.bench.data import real_model_toy_data
    from trl_safety.toy.world import ToyWorld

    config = BenchConfig(model=gguf_file, data="toy", n=8, num_alignment=4, num_harmful=4, num_eval_prompts=2)
    data = real_model_toy_data(config)
    world = ToyWorld(0)
    raw = world.harmful_dataset("align", 4, seed=0)  # the toy format: "### Instruction : {p} ### Response :"
    prefix, suffix = "### Instruction : ", " ### Response :"
    for row, toy in zip(data.harmful, raw):
        request = toy["prompt"][len(prefix) : -len(suffix)]
        assert row["prompt"] == f"{SYSTEM}<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n"
        assert row["completion"] == f"{toy['completion'].strip()}<|im_end|>\n"
    assert data.prompt_format("hello") == f"{SYSTEM}<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    task_prompt = data.task.prompt_format(data.task.prompts[0])
    assert task_prompt == f"{SYSTEM}<|im_start|>user\n{data.task.prompts[0]}<|im_end|>\n<|im_start|>assistant\n"
    assert data.task.prompts[0].startswith("classify the sentiment of this review : ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_name_or_path", "smollm2", "--task", "sst2"], "--task select the papers' data"),
        (["--data", "papers"], "--data papers needs a real model"),
        (["--model_name_or_path", "smollm2", "--base_pretrain_steps", "3"], "--base_pretrain_steps"),
    ],
)
def test_refused_combinations(argv, message, tmp_path, capsys):
    assert main(["bench", *argv, "--output_dir", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
