import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(defense, mode, step, memory):
    return {"defense": defense, "mode": mode, "step_seconds": step, "peak_memory_bytes": memory}


def test_ratios_are_medians_against_sft_in_the_same_run(overhead):
    results = [
        _run("sft", "full", 1.0, 100),
        _run("sft", "full", 3.0, 300),
        _run("sft", "full", 2.0, 200),
        _run("vaccine", "full", 4.0, 210),
        _run("vaccine", "full", 3.6, 230),
        _run("vaccine", "full", 9.0, 220),
    ]
    (row,) = overhead.summarise(results, ["vaccine"], ["full"])
    assert row["defense"] == "vaccine" and row["mode"] == "full"
    assert row["time_ratio"] == pytest.approx(4.0 / 2.0)
    assert row["memory_ratio"] == pytest.approx(220 / 200)
    assert row["repeats"] == 3
    # spread: repeat r against SFT's repeat r (listed in repeat order here): 4/1, 3.6/3, 9/2 and 210/100, 230/300,
    # 220/200
    assert row["time_ratio_spread"] == pytest.approx((1.2, 4.5))
    assert row["memory_ratio_spread"] == pytest.approx((round(230 / 300, 3), 2.1))
    table = overhead.markdown_table([row])
    assert "| vaccine | full | 2.00× (1.20–4.50) | 1.10× (0.77–2.10) |" in table


def test_spread_pairs_runs_by_their_repeat_index(overhead):
    """The driver alternates the order across repeats: pairing is by `repeat`, not by position."""
    results = [
        {**_run("sft", "lora", 1.0, 100), "repeat": 0},
        {**_run("lisa", "lora", 1.5, 100), "repeat": 1},
        {**_run("lisa", "lora", 1.1, 100), "repeat": 0},
        {**_run("sft", "lora", 1.0, 100), "repeat": 1},
    ]
    (row,) = overhead.summarise(results, ["lisa"], ["lora"])
    assert row["time_ratio_spread"] == pytest.approx((1.1, 1.5))
    assert row["time_ratio"] == pytest.approx(1.3)  # median(1.1, 1.5) / median(1.0, 1.0)


def test_repairs_are_costed_in_sft_steps_of_the_same_run(overhead):
    results = [
        {**_run("sft", "full", 0.5, 100), "repeat": 0},
        {**_run("sft", "full", 1.0, 300), "repeat": 1},
        {"defense": "safe-delta", "mode": "full", "repeat": 0, "repair_seconds": 3.0, "peak_memory_bytes": 50},
        {"defense": "safe-delta", "mode": "full", "repeat": 1, "repair_seconds": 4.0, "peak_memory_bytes": 150},
        {"defense": "safemerge", "mode": "full", "repeat": 0, "refused": "SafeMERGE merges LoRA updates. Pass one."},
    ]
    delta, merge = overhead.summarise_post_hoc(results, ["safe-delta", "safemerge"], ["full"])
    # median repair 3.5 s against SFT's median step 0.75 s; per repeat 3/0.5 and 4/1.0
    assert delta["sft_steps"] == pytest.approx(round(3.5 / 0.75, 2)) and delta["sft_steps_spread"] == (4.0, 6.0)
    assert delta["memory_ratio"] == pytest.approx(100 / 200) and delta["repeats"] == 2
    assert merge == {"defense": "safemerge", "mode": "full", "refused": results[-1]["refused"], "repeats": 1}
    table = overhead.markdown_post_hoc_table([delta, merge])
    assert "| safe-delta | full | 3.5 | 4.67 (4.00–6.00) | 0.0 | 0.50× |" in table
    assert "| safemerge | full | refused: SafeMERGE merges LoRA updates | | | |" in table


def test_smollm2_architecture_sets_the_real_shapes(overhead):
    args = overhead.parse_args(["--arch", "smollm2", "--layers", "4"])
    shapes = (args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab_size, args.tie_embeddings)
    assert shapes == (576, 1536, 9, 3, 49152, True)
    assert args.layers == 4


def test_clock_defaults_follow_the_device(overhead):
    assert overhead.parse_args([]).clock == "cpu"
    assert overhead.parse_args(["--device", "cuda"]).clock == "wall"
    assert overhead.parse_args(["--clock", "wall"]).clock == "wall"
    with pytest.raises(SystemExit):  # host CPU time says nothing about a step that runs on the device
        overhead.parse_args(["--device", "cuda", "--clock", "cpu"])


def test_worker_writes_a_measurement(overhead, tmp_path):
    """One real (tiny) worker run in a subprocess: the JSON it returns has the contract's fields."""
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import subprocess

    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "overhead.py"),
            "--output",
            str(out),
            "--defenses",
            "--modes",
            "full",
            "--repeats",
            "1",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--vocab-size",
            "64",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--tie-embeddings",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["rows"] == []  # no defense asked for: only the SFT baseline ran
    (run,) = report["runs"]
    assert run["defense"] == "sft" and len(run["step_seconds_all"]) == 2
    assert run["step_seconds"] > 0 and run["peak_memory_bytes"] >= 0
    assert run["repeat"] == 0 and report["wall_seconds"] > 0
    # on CPU the default clock is the CPU time of one compute thread; the wall time is kept beside it
    assert report["config"]["clock"] == run["clock"] == "cpu"
    assert run["step_seconds"] == run["step_cpu_seconds"] and run["step_wall_seconds"] > 0
    assert report["config"]["kv_heads"] == 2 and report["config"]["tie_embeddings"] is True


def test_post_hoc_worker_times_the_repair_or_records_the_refusal(overhead, tmp_path):
    """Real (tiny) repair runs: Safe Delta's time and memory are measured; SafeMERGE refuses a dense model."""
    import subprocess

    out = tmp_path / "report.json"
    tiny = ["--layers", "1", "--hidden", "32", "--seq-len", "16", "--batch-size", "2", "--vocab-size", "64"]
    command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--output", str(out), "--modes", "full"]
    command += ["--defenses", "safe-delta", "safemerge", "--repeats", "1", "--steps", "2", "--warmup", "1", *tiny]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    report = json.loads(out.read_text())
    runs = {run["defense"]: run for run in report["runs"]}
    assert runs["safe-delta"]["repair_seconds"] == runs["safe-delta"]["repair_cpu_seconds"] > 0
    assert runs["safe-delta"]["peak_memory_bytes"] >= 0 and "refused" not in runs["safe-delta"]
    assert "LoRA" in runs["safemerge"]["refused"]
    assert [row["defense"] for row in report["post_hoc_rows"]] == ["safe-delta", "safemerge"]
    assert report["rows"] == []  # no trainer asked for
