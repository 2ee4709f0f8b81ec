"""What the multi-process test modules share: launching `run_defense.py` on 2 CPU processes, the single-process
reference run on the same micro-batches, and the comparison of the two (`test_distributed.py`, `test_fsdp2.py`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "run_defense.py")
LAUNCH_TIMEOUT = 600
PER_DEVICE_BATCH, GA = 2, 2
# Cases whose final weights follow per-rank semantics by design: the ranks must agree, but no single-process run on the
# same micro-batches computes the same thing
RANK_LOCAL = {
    "panacea+add_eps": "ε_last is the perturbation of the last harmful batch; every rank adds rank 0's, while a single "
    "process adds the one of its own last micro-batch (rank 1's position in the interleaved order).",
}


def with_variants(defenses: list[str]) -> list[str]:
    """`defenses` plus the second hyperparameter sets of `run_defense.py` (`defense+variant`) of those among them."""
    variants = {"panacea": "panacea+add_eps", "t-vaccine": "t-vaccine+rescore"}
    return defenses + [variants[d] for d in defenses if d in variants]


def load_driver():
    spec = importlib.util.spec_from_file_location("trl_safety_run_defense", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_driver(config_file: str, defenses: list[str], out: str, flags: list[str], env: dict | None = None) -> dict:
    """`accelerate launch` the driver on `defenses` with `config_file`; rank 0's summary, with `output_dir`."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config_file,
        "--main_process_port",
        str(_free_port()),  # other launches on the machine use the default port
        DRIVER,
        "--defense",
        ",".join(defenses),
        "--output_dir",
        out,
        "--per_device_train_batch_size",
        str(PER_DEVICE_BATCH),
        "--gradient_accumulation_steps",
        str(GA),
        "--dump_traceback_after",
        str(LAUNCH_TIMEOUT - 30),
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT)
    path = os.path.join(out, "result.json")
    # Judge the run by rank 0's marker and file; a non-zero exit code after the marker is the exit-time abort of a rank
    # that had finished (docs/design/integration.md §6)
    assert "TRL_SAFETY_DISTRIBUTED_DONE" in proc.stdout and os.path.exists(path), (
        f"launch did not finish (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    )
    with open(path) as f:
        summary = json.load(f)
    summary.update(output_dir=out, seconds=time.time() - start, returncode=proc.returncode)
    return summary


_REFERENCES: dict[str, str] = {}


def single_process_reference(defense: str, out: str) -> str:
    """Run `defense` in this process on the launches' micro-batches (batch b, accumulation 2·GA), once per folder;
    its folder."""
    if out in _REFERENCES:
        return out
    shutil.rmtree(out, ignore_errors=True)
    threads = torch.get_num_threads()
    load_driver().main(
        ["--defense", defense, "--output_dir", out, "--per_device_train_batch_size", str(PER_DEVICE_BATCH)]
        + ["--gradient_accumulation_steps", str(2 * GA), "--use_cpu", "true"]
    )
    torch.set_num_threads(threads)
    _REFERENCES[out] = defense
    return out


def assert_matches_single_process(defense: str, result: dict, output_dir: str, single: str) -> None:
    """The launch's update of `defense` (one `result` of its summary) equals the single-process run's in `single`."""
    mode = result["mode"]
    ran = torch.load(os.path.join(output_dir, f"{defense}-{mode}.pt"))
    ref = torch.load(os.path.join(single, f"{defense}-{mode}.pt"))
    with open(os.path.join(single, "result.json")) as f:
        ref_result = next(r for r in json.load(f)["results"] if r["mode"] == mode)
    assert ref_result["global_step"] == result["global_step"]
    assert sorted(ran["final"]) == sorted(ref["final"])
    update = max((ref["final"][n] - ref["initial"][n]).abs().max().item() for n in ref["final"])
    assert update > 1e-4, f"{defense} ({mode}): the single-process run barely moved ({update})"
    for name in ref["final"]:
        # same seed, same initialisation code: exact
        torch.testing.assert_close(ran["initial"][name], ref["initial"][name], rtol=0, atol=0)
        # Different reduction orders (all-reduce or reduce-scatter, batch vs micro-batch sums): rounding-level
        # differences only (docs/testing.md). 1e-5 of the largest update covers the gradient noise; rtol 5e-7 (≈ 4 fp32
        # eps) the last-ulp rounding of w − lr·u on weights of size ~1 (weights near 1 came out 1 ulp = 1.2e-7 apart
        # under lisa-zero3: a third of that run's atol, above the atol of any run whose update is < 2e-3). A wrong
        # gradient average is off by ≳ update/2; under FSDP2 a defense that read a shard as if it were the whole
        # parameter was off by 4e-2 to 1.5× the update (docs/distributed.md).
        torch.testing.assert_close(
            ran["final"][name],
            ref["final"][name],
            rtol=5e-7,
            atol=1e-5 * update + 1e-7,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    # logged per-step losses ≈6-12, averaged over ranks vs in one process: observed ≤ 1e-7 relative, > 1000× margin
    torch.testing.assert_close(result["losses"], ref_result["losses"], rtol=1e-4, atol=1e-5)
