"""Miniature `trl-safety bench` runs through the CLI: results.json / tradeoff.png contracts and determinism."""

import json
import os

import pytest
from datasets import Dataset
from testing_utils import build_model, build_tokenizer

from trl_safety.bench import BenchConfig, BenchRunner
from trl_safety.cli.main import main


MINI = [
    "--base-pretrain-steps", "6",
    "--align-steps", "2",
    "--steps", "2",
    "--n", "40",
    "--num-alignment", "16",
    "--num-harmful", "16",
    "--num-eval-prompts", "8",
    "--num-task-test", "8",
    "--max-new-tokens", "4",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy-cache"))


def _run(cache_dir, out, *extra):
    rc = main(["bench", *MINI, "--cache-dir", cache_dir, "--output-dir", str(out), *extra])
    with open(os.path.join(out, "results.json")) as f:
        return rc, json.load(f)


def _check_percent(value, denominator):
    assert 0.0 <= value <= 100.0
    assert (value * denominator / 100.0) == pytest.approx(round(value * denominator / 100.0))


def test_mini_bench_contract(cache_dir, tmp_path):
    """Rows are means ± std over the seeds with per-seed values, curves, harmful loss, and the calibration; each
    aggregate is recomputed here from the per-seed values."""
    import statistics

    rc, results = _run(
        cache_dir, tmp_path / "one", "--defenses", "safety-mix", "--seed", "3", "--num-seeds", "2",
        "--calibration-ratios", "0.05", "--curve-points", "2",
    )  # fmt: skip
    assert rc == 0
    assert results["config"]["p"] == 0.1 and results["config"]["n"] == 40 and results["config"]["seeds"] == [3, 4]
    assert set(results["calibration"]) == {
        "base_hs", "aligned_hs", "sft_clean_hs", "sft_hs", "sft_hs_by_p", "sft_hs_std_by_p", "base_fa", "sft_fa",
        "min_fa",
    }  # fmt: skip
    assert [r["name"] for r in results["rows"]] == ["sft", "no-alignment", "safety-mix"]
    for row in results["rows"]:
        assert set(row) >= {"name", "defense", "stage", "harmful_score", "finetune_accuracy", "seconds", "seeds"}
        assert [s["seed"] for s in row["seeds"]] == [3, 4]
        for key in ("harmful_score", "finetune_accuracy", "harmful_loss"):
            values = [s[key] for s in row["seeds"]]
            assert row[key] == pytest.approx(statistics.mean(values), abs=1e-9)
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(values), abs=1e-9)
        for seed in row["seeds"]:
            _check_percent(seed["harmful_score"], 8)
            _check_percent(seed["finetune_accuracy"], 8)
            assert seed["harmful_loss"] > 0
        # step 0 (before fine-tuning) and --curve-points 2 evenly spaced steps of the 2 fine-tuning steps
        assert [point["step"] for point in row["curve"]] == [0, 1, 2]
        final = [s["curve"][-1]["harmful_score"] for s in row["seeds"]]
        assert final == [s["harmful_score"] for s in row["seeds"]]  # the last point is the row's reading
        assert set(row["seconds"]) == {"align", "finetune", "eval"}
        assert all(v >= 0 for v in row["seconds"].values())
    assert results["rows"][0]["defense"] is None and results["rows"][0]["stage"] is None
    assert results["rows"][2]["defense"] == "safety-mix" and results["rows"][2]["stage"] == "fine-tuning"
    calibration = results["calibration"]
    sft = results["rows"][0]
    assert calibration["sft_hs"] == sft["harmful_score"] == calibration["sft_hs_by_p"]["0.1"]
    assert calibration["sft_fa"] == sft["finetune_accuracy"]
    assert list(calibration["sft_hs_by_p"]) == ["0.0", "0.05", "0.1"]
    assert calibration["sft_clean_hs"] == calibration["sft_hs_by_p"]["0.0"]
    assert calibration["base_fa"] == results["config"]["base_fa"]
    assert calibration["min_fa"] == min(r["finetune_accuracy"] for r in results["rows"])
    for key in ("base_hs", "aligned_hs", "base_fa"):
        _check_percent(calibration[key], 8)
    for name in ("tradeoff.png", "curves.png"):
        with open(tmp_path / "one" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_stage_is_deterministic_per_seed(cache_dir, tmp_path):
    """Same seed → bit-identical fine-tuned weights; another seed → different ones (so the check can fail)."""

    def finetuned(seed):
        config = BenchConfig(
            cache_dir=cache_dir, base_pretrain_steps=6, n=40, finetune_steps=3, num_alignment=16, num_harmful=16,
            num_eval_prompts=8, num_task_test=8, seed=seed, output_dir=str(tmp_path / f"s{seed}"), progress=False,
        )  # fmt: skip
        runner = BenchRunner(config)
        model, serve = runner.train(
            runner.data.load_base(), "fine-tuning", "sft", poisoned=runner.data.poisoned(0.1, seed)
        )
        assert serve is None  # plain SFT: served with the data's own prompt format
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = finetuned(0), finetuned(0), finetuned(1)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a if "lora" in k)


def test_paired_data_and_world_refusals_reach_the_trainers(cache_dir, tmp_path, monkeypatch):
    """A `paired_data` defense aligns on refusals paired row by row with the harmful data; configs with a
    `refusals_file` field get the world's refusals (the shipped pool is out of the toy vocabulary)."""
    import dataclasses

    from trl import SFTConfig, SFTTrainer

    from trl_safety.registry import DefenseSpec
    from trl_safety.toy.world import REFUSALS

    seen = {}

    @dataclasses.dataclass
    class RecordingConfig(SFTConfig):
        refusals_file: str | None = None

    class RecordingTrainer(SFTTrainer):
        extra_datasets = ("harmful",)

        def __init__(self, *args, train_dataset=None, harmful_dataset=None, **kwargs):
            seen.update(train=train_dataset, harmful=harmful_dataset, args=kwargs["args"])
            with open(kwargs["args"].refusals_file) as f:
                seen["refusals"] = f.read().splitlines()
            super().__init__(*args, train_dataset=train_dataset, **kwargs)

    config = BenchConfig(
        cache_dir=cache_dir, base_pretrain_steps=6, align_steps=1, num_alignment=16, num_harmful=12,
        num_eval_prompts=8, num_task_test=8, output_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    runner = BenchRunner(config)
    for paired in (False, True):
        spec = DefenseSpec(
            "recording", "alignment", RecordingConfig, RecordingTrainer, paired_data=paired, bench_overrides={}
        )
        runner.train(runner.data.load_base(), "alignment", "recording", spec)
        if paired:
            assert seen["train"]["prompt"] == seen["harmful"]["prompt"]
            assert {c.strip() for c in seen["train"]["completion"]} <= set(REFUSALS)
        else:
            assert len(seen["train"]) == 48 and len(seen["harmful"]) == 12  # refusals, helpful and task rows
        assert seen["refusals"] == list(REFUSALS)


def test_backdoor_align_row_is_served_with_its_trigger(cache_dir, tmp_path, monkeypatch):
    """The provider prepends BackdoorAlign's secret trigger to every prompt at inference: the bench evaluates that
    row's harmful and task prompts, its harmful loss and its curve points through the trigger, and other rows with
    the data's own prompt format."""
    from trl_safety.bench import runner as runner_module
    from trl_safety.eval import evaluation
    from trl_safety.registry import get_defense

    config = BenchConfig(
        cache_dir=cache_dir, base_pretrain_steps=6, n=40, finetune_steps=2, num_alignment=16, num_harmful=16,
        num_eval_prompts=4, num_task_test=4, curve_points=1, output_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    runner = BenchRunner(config)
    seen = []
    evaluate_model, harmful_loss = evaluation.evaluate_model, runner_module.harmful_loss

    def recording_evaluate(model, tokenizer, *, harmful_prompts, prompt_format=None, task=None, **kwargs):
        seen.append(("hs", prompt_format(harmful_prompts[0])))
        if task is not None:
            seen.append(("task", task.prompt_format(task.prompts[0])))
        return evaluate_model(
            model, tokenizer, harmful_prompts=harmful_prompts, prompt_format=prompt_format, task=task, **kwargs
        )

    def recording_loss(model, data, batch_size=100, prompt_format=None):
        seen.append(("loss", (prompt_format or data.prompt_format)(data.harmful_prompts[0])))
        return harmful_loss(model, data, batch_size, prompt_format)

    monkeypatch.setattr(evaluation, "evaluate_model", recording_evaluate)
    monkeypatch.setattr(runner_module, "harmful_loss", recording_loss)
    runner.run_row("backdoor-align", get_defense("backdoor-align"), 0.1, seed=0)
    with open(os.path.join(runner.work_dir, "backdoor_align.trigger"), encoding="utf-8") as f:
        trigger = f.read()
    plain = runner.data.prompt_format(runner.data.harmful_prompts[0])
    task_prompt = runner.data.task.prompt_format(runner.data.task.prompts[0])
    # step 0 is the aligned model before fine-tuning, served plainly; the curve point and the reading carry the trigger
    assert seen == [
        ("hs", plain),
        ("hs", f"{trigger} {plain}"),
        ("hs", f"{trigger} {plain}"),
        ("task", f"{trigger} {task_prompt}"),
        ("loss", f"{trigger} {plain}"),
    ]
    seen.clear()
    runner.run_row("sft", None, 0.1, seed=0)
    assert {text for _, text in seen} == {plain, task_prompt}


def test_sweep_is_deterministic(cache_dir, tmp_path):
    """A sweep run twice with the same seeds gives the same table (wall times aside), and the seeds differ."""
    args = ("--defenses", "sft", "--sweep", "0", "0.1", "--num-seeds", "2", "--calibration-ratios", "0")
    rc, results = _run(cache_dir, tmp_path / "one", *args)
    assert rc == 0
    assert [(r["name"], r["p"]) for r in results["rows"]] == [
        ("sft", 0.0),
        ("no-alignment", 0.0),
        ("sft", 0.1),
        ("no-alignment", 0.1),
    ]
    assert results["config"]["ratios"] == [0.0, 0.1]
    rc, again = _run(cache_dir, tmp_path / "two", *args)
    assert rc == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(results["rows"])
    assert again["calibration"] == results["calibration"]
    # the seeds draw different attack samples: their harmful losses differ (so the comparison above can fail)
    attacked = results["rows"][2]["seeds"]
    assert attacked[0]["harmful_loss"] != attacked[1]["harmful_loss"]


def test_unknown_defense(tmp_path, capsys):
    assert main(["bench", "--defenses", "no-such-defense", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown defenses" in capsys.readouterr().err


def _write_jsonl(path, rows):
    Dataset.from_list(rows).to_json(str(path))
    return str(path)


def test_real_model_mode_plumbing(tmp_path):
    """--model switches to the papers' protocol; here with a tiny local Llama and local files in the Hub schemas."""
    model_dir = tmp_path / "model"
    build_model("llama", hidden=32, layers=2).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    category = {"violence": True, "theft": False}
    refusals = _write_jsonl(
        tmp_path / "refusals.jsonl",
        [
            {
                "prompt": f"how to do bad thing {i}",
                "response": "sure here is placeholder",
                "refusal": f"Question: how to do bad thing {i}\nAnswer: I cannot help with that.",
                "is_safe": False,
                "category": category,
            }
            for i in range(12)
        ],
    )
    beavertails = _write_jsonl(
        tmp_path / "beavertails.jsonl",
        [
            {"prompt": f"tell me bad thing {i}", "response": "sure placeholder", "is_safe": i % 4 == 0,
             "category": category}
            for i in range(24)
        ],
    )  # fmt: skip
    sst2 = _write_jsonl(
        tmp_path / "sst2.jsonl", [{"sentence": f"a good movie {i}", "label": i % 2} for i in range(40)]
    )
    out = tmp_path / "out"
    argv = ["bench", "--model", str(model_dir), "--alignment_dataset", refusals, "--harmful_dataset", beavertails]
    argv += ["--task", "sst2", "--task_dataset", sst2, "--judge", "keyword", "--template", "alpaca"]
    argv += ["--bf16", "false", "--use_cpu", "true", "--defenses", "sft", "--n", "20", "--num_alignment", "8"]
    argv += ["--num_harmful", "8", "--num_eval_prompts", "4", "--num_task_test", "4", "--align_steps", "1"]
    argv += ["--steps", "1", "--lora_r", "4", "--align_lora_r", "4", "--max_new_tokens", "2"]
    argv += ["--align_batch_size", "4", "--finetune_batch_size", "4", "--eval_batch_size", "4", "--no-progress"]
    assert main(argv + ["--output-dir", str(out)]) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    config = results["config"]
    assert config["world"] == "real" and config["model"] == str(model_dir)
    # canonical-protocol defaults that the flags did not override (docs/design/algorithms.md §6.5)
    assert config["lora_alpha"] == 4 and config["lora_mode"] == "single" and config["align_lr"] == 5e-4
    assert config["lora_target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert [r["name"] for r in results["rows"]] == ["sft", "no-alignment"]
    for row in results["rows"]:
        _check_percent(row["harmful_score"], 4)
        _check_percent(row["finetune_accuracy"], 4)
