"""One-command GPU verification: gradients in bf16 vs fp32 CPU, rank agreement, memory and step time on a real shape.

```bash
python benchmarks/gpu_check.py                       # on a machine with one or more GPUs, ≤ 10 minutes
python benchmarks/gpu_check.py --device cpu          # dry mode with tiny shapes (what CI runs)
```

Prints one table and a summary; the exit code is 0 when every check passed, 1 otherwise. Nothing comes from the Hub:
models are Llama configs built locally, the tokenizer a local word-level one, the data random words.

1. **gradient** — per defense (every registered trainer, plus plain SFT): three SGD steps (lr 1, no clipping, so the
   update is minus the sum of the gradients) on the device with `bf16=True` (autocast, fp32 master weights), against
   the same steps on CPU in fp32 from the same initial weights and batches. Passes when the relative L2 error of the
   update, ‖Δ_dev − Δ_ref‖ / ‖Δ_ref‖, is ≤ `--grad-tolerance` (default 0.05). Why 5e-2: bf16 keeps 8 significant
   bits (round-to-nearest unit 2^-9 ≈ 2e-3); every matmul input of forward and backward is rounded, and through a
   few layers and a softmax the error of a whole update is a few 1e-3 (plain SFT: 3.9e-3 in the dry mode, every
   defense ≤ 5.5e-3 except Booster and Antibody-align, 0.28: docs/distributed.md); 5e-2 is > 10× that, while a
   defense term of the wrong scale (a norm over a shard instead of the whole tensor, a missing all-reduce, a ×2)
   moves the update by more. Device randomness (RepNoise's MMD noise) is off here
   and T-Vaccine trains every layer, so both runs compute the same function; Lisa's third step carries its proximal
   term. Shapes: SmolLM2's width (hidden 576, 9 heads / 3 KV heads, MLP 1536), 4 layers, vocab 4096.
2. **ranks** — with more than one GPU: `tests/distributed/run_defense.py` under the bundled `ddp`, `zero2`, `zero3`
   and `fsdp2` profiles (fp32, every GPU, full fine-tuning) for every defense the backend supports; passes when every
   rank ends with the same parameters (SHA-256 over all parameters, shards gathered). Skipped with one device.
3. **memory / time** — per defense, full fine-tuning on SmolLM2's shapes (30 layers, vocab 49152, built from a
   config), bf16, batch 8 × 256 tokens: peak allocator memory and median step time as ratios to plain SFT in the
   same process, and whether T-Vaccine's peak is below Vaccine's (the paper's memory claim, docs/t_vaccine.md).
   Informational (not a pass/fail check), except that every run must finish. On CPU there is no allocator peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Settings for the gradient check: the defense's term active within 3 steps, no device-dependent randomness
GRAD_OVERRIDES = {
    "repnoise": {"beta": 0.0},  # its MMD noise is drawn on the device: CPU and GPU draws differ
    "lisa": {"alignment_steps": 1, "finetune_steps": 2, "proximal_warmup_ratio": 0.0},  # step 3: proximal term ≠ 0
    "antibody-align": {"fixed_lambda": 5.0},
}
# T-Vaccine trains every layer in the gradient check (a bf16 score tie may pick another layer than fp32 does)
ALL_LAYERS_FIELD = {"t-vaccine": "num_active_layers"}
PERF_OVERRIDES = {
    "lisa": {"alignment_steps": 2, "finetune_steps": 8, "proximal_warmup_ratio": 0.0},
    "t-vaccine": {"num_active_layers": 2, "resample_interval": 5, "rescore_interval": 10},
}
HARMFUL_BATCH_SIZE_FIELD = "harmful_batch_size"
BACKEND_PROFILES = {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp2"}


@dataclasses.dataclass
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    vocab: int
    seq_len: int
    batch: int


# SmolLM2-135M's shapes (hidden 576, 9 heads, 3 KV heads, MLP 1536, 30 layers, vocab 49152), built from a config
REAL = Shape(576, 9, 3, 1536, 30, 49152, 256, 8)
GRAD = Shape(576, 9, 3, 1536, 4, 4096, 64, 4)
TINY = Shape(32, 4, 2, 64, 2, 512, 32, 2)


def _overhead():
    spec = importlib.util.spec_from_file_location("trl_safety_overhead", HERE / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_defenses() -> list[str]:
    from trl_safety.registry import list_defenses

    return [spec.name for spec in list_defenses() if spec.trainer_class is not None]


def build_model(shape: Shape, tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq_len * 2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def build_trainer(defense: str, model, tokenizer, shape: Shape, device: str, steps: int, overrides: dict, **extra):
    """The defense's trainer (or SFT's) on random-word data; `device` is `cuda` or `cpu`, `extra` more config."""
    from trl import SFTConfig, SFTTrainer

    overhead = _overhead()
    common = {
        "output_dir": tempfile.mkdtemp(prefix="gpu-check-"),
        "per_device_train_batch_size": shape.batch,
        "max_steps": steps,
        "max_length": shape.seq_len,
        "gradient_checkpointing": False,
        "use_cpu": device == "cpu",
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10**6,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_drop_last": True,
        **extra,
    }
    train = overhead._dataset(shape.batch * steps, shape.seq_len, shape.vocab, 0)
    kwargs = {}
    if defense == "sft":
        trainer_class, config_class = SFTTrainer, SFTConfig
    else:
        from trl_safety.registry import get_defense

        spec = get_defense(defense)
        trainer_class, config_class = spec.trainer_class, spec.config_class
        fields = {f.name for f in dataclasses.fields(config_class)}
        common.update({k: v for k, v in overrides.get(defense, {}).items() if k in fields})
        if HARMFUL_BATCH_SIZE_FIELD in fields:
            common.setdefault(HARMFUL_BATCH_SIZE_FIELD, shape.batch)
        extra_data = overhead._dataset(len(train), shape.seq_len, shape.vocab, 1)  # RepNoise pairs row i with row i
        for role in trainer_class.extra_datasets:
            kwargs[f"{role}_dataset"] = extra_data
    return trainer_class(model, config_class(**common), train_dataset=train, processing_class=tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------------- 1. gradients
def relative_error(update, reference) -> float:
    """‖Δ − Δ_ref‖ / ‖Δ_ref‖ over all parameters (dicts of name → tensor, compared on CPU in fp64)."""
    missing = set(reference) ^ set(update)
    if missing:
        raise ValueError(f"parameter sets differ: {sorted(missing)[:5]}")
    num = sum(float((update[n].double() - reference[n].double()).pow(2).sum()) for n in reference)
    den = sum(float(reference[n].double().pow(2).sum()) for n in reference)
    if den == 0:
        raise ValueError("the reference update is zero: the check cannot tell anything")
    return (num / den) ** 0.5


def _update(defense: str, shape: Shape, device: str, bf16: bool, tokenizer) -> dict:
    import torch

    model = build_model(shape, tokenizer)
    initial = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    overrides = dict(GRAD_OVERRIDES)
    if defense in ALL_LAYERS_FIELD:
        overrides[defense] = {**overrides.get(defense, {}), ALL_LAYERS_FIELD[defense]: shape.layers}
    # SGD, lr 1, no clipping or decay: the update is exactly minus the sum of the step gradients
    trainer = build_trainer(
        defense,
        model,
        tokenizer,
        shape,
        device,
        steps=3,
        overrides=overrides,
        bf16=bf16,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    torch.manual_seed(0)
    trainer.train()
    final = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters()}
    del trainer, model
    gc.collect()
    return {n: final[n] - initial[n] for n in initial}


def check_gradients(defenses: list[str], shape: Shape, device: str, tolerance: float, tokenizer) -> list[dict]:
    rows = []
    for defense in ["sft", *defenses]:
        start = time.time()
        try:
            reference = _update(defense, shape, "cpu", False, tokenizer)
            ran = _update(defense, shape, device, True, tokenizer)
            error = relative_error(ran, reference)
            rows.append(
                {
                    "check": "gradient",
                    "defense": defense,
                    "value": f"rel. error {error:.2e}",
                    "passed": error <= tolerance,
                    "limit": f"≤ {tolerance:g}",
                    "seconds": time.time() - start,
                }
            )
        except Exception as exc:  # a crash is a failed check; the table says why
            rows.append(
                {
                    "check": "gradient",
                    "defense": defense,
                    "value": f"{type(exc).__name__}: {exc}"[:120],
                    "passed": False,
                    "limit": f"≤ {tolerance:g}",
                    "seconds": time.time() - start,
                }
            )
        print(f"[gradient] {rows[-1]['defense']}: {rows[-1]['value']}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- 2. ranks
def check_ranks(defenses: list[str], num_gpus: int, workdir: str) -> list[dict]:
    import yaml

    from trl_safety.cli.train import resolve_accelerate_config
    from trl_safety.registry import get_defense

    rows = []
    driver = ROOT / "tests" / "distributed" / "run_defense.py"
    for backend, profile in BACKEND_PROFILES.items():
        names = ["sft"] + [d for d in defenses if backend not in get_defense(d).trainer_class.refused_backends()]
        with open(resolve_accelerate_config(profile)) as f:
            config = yaml.safe_load(f)
        config.update(num_processes=num_gpus, mixed_precision="no")  # fp32: rank agreement, not bf16 noise
        config_path = os.path.join(workdir, f"{profile}.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f)
        out = os.path.join(workdir, backend)
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            config_path,
            str(driver),
            "--defense",
            ",".join(names),
            "--output_dir",
            out,
            "--modes",
            "full",  # sharding concerns the full parameters; LoRA would double the time of the ≤ 10-minute budget
            "--dump_traceback_after",
            "140",
        ]
        start = time.time()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(command, "timeout (150 s)", "", "")
        path = os.path.join(out, "result.json")
        if not os.path.exists(path):
            rows.append(
                {
                    "check": "ranks",
                    "defense": f"(all) {backend}",
                    "passed": False,
                    "limit": "equal",
                    "value": f"launch failed (exit {proc.returncode}): {proc.stderr[-200:]}",
                    "seconds": time.time() - start,
                }
            )
            continue
        with open(path) as f:
            results = json.load(f)["results"]
        for result in results:
            if "exception" in result:
                value, passed = result["exception"].strip().splitlines()[-1][:120], False
            else:
                passed = len(set(result["rank_hashes"])) == 1 and result["num_processes"] == num_gpus
                value = f"{len(set(result['rank_hashes']))} distinct of {len(result['rank_hashes'])} ranks"
            rows.append(
                {
                    "check": "ranks",
                    "defense": f"{result['defense']} {backend} {result['mode']}",
                    "value": value,
                    "passed": passed,
                    "limit": "1 distinct",
                    "seconds": time.time() - start,
                }
            )
        print(f"[ranks] {backend}: {sum(r['passed'] for r in rows[-len(results) :])}/{len(results)}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- 3. memory / time
def measure(defenses: list[str], shape: Shape, device: str, steps: int, warmup: int, tokenizer) -> list[dict]:
    import torch
    from transformers import TrainerCallback

    cuda = device == "cuda"
    runs = {}

    class StepTimer(TrainerCallback):
        def __init__(self, times: list[float]):
            self.times = times

        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    for defense in ["sft", *defenses]:
        times: list[float] = []
        try:
            model = build_model(shape, tokenizer)
            if cuda:
                model = model.to("cuda")
            trainer = build_trainer(
                defense, model, tokenizer, shape, device, steps + warmup, PERF_OVERRIDES, bf16=cuda, learning_rate=1e-4
            )
            trainer.add_callback(StepTimer(times))
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            trainer.train()
            peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
            runs[defense] = {"step": statistics.median(times[warmup:]), "peak": peak}
            del trainer, model
        except Exception as exc:
            runs[defense] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"[memory/time] {defense}: {runs[defense]}", flush=True)
    rows = []
    sft = runs["sft"]
    for defense, run in runs.items():
        if "error" in run or "error" in sft:
            rows.append(
                {
                    "check": "memory/time",
                    "defense": defense,
                    "passed": False,
                    "limit": "runs",
                    "value": run.get("error") or "SFT failed",
                }
            )
            continue
        memory = f"{run['peak'] / sft['peak']:.2f}× ({run['peak'] / 2**30:.2f} GiB)" if cuda else "memory n/a (cpu)"
        rows.append(
            {
                "check": "memory/time",
                "defense": defense,
                "passed": True,
                "limit": "runs",
                "value": f"time {run['step'] / sft['step']:.2f}× ({run['step'] * 1000:.0f} ms), mem {memory}",
            }
        )
    if cuda and all("peak" in runs.get(d, {}) for d in ("vaccine", "t-vaccine")):
        ratio = runs["t-vaccine"]["peak"] / runs["vaccine"]["peak"]
        rows.append(
            {
                "check": "t-vaccine saving",
                "defense": "t-vaccine / vaccine",
                "limit": "< 1 (informational)",
                "value": f"peak {ratio:.2f}× ({'shows' if ratio < 0.95 else 'does not show'})",
                "passed": True,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------- driver
def table(rows: list[dict]) -> str:
    lines = ["| check | defense | value | limit | result |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['check']} | {r['defense']} | {r['value']} | {r['limit']} | {'ok' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="`cpu`: dry mode, tiny shapes.")
    parser.add_argument("--defenses", nargs="*", default=None, help="Registry names (default: every trainer).")
    parser.add_argument("--grad-tolerance", type=float, default=0.05, help="Relative L2 error of the bf16 update.")
    parser.add_argument("--perf-steps", type=int, default=5, help="Measured steps per memory/time run.")
    parser.add_argument("--skip", nargs="*", default=[], choices=["gradient", "ranks", "memory"])
    parser.add_argument("--output", default=None, help="Also write the rows as JSON here.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --device cpu for the dry mode", file=sys.stderr)
        return 2
    defenses = args.defenses if args.defenses is not None else trainer_defenses()
    dry = args.device == "cpu"
    tokenizer = _overhead()._build_tokenizer((TINY if dry else REAL).vocab)
    start, rows = time.time(), []
    if "gradient" not in args.skip:
        rows += check_gradients(defenses, TINY if dry else GRAD, args.device, args.grad_tolerance, tokenizer)
    num_gpus = torch.cuda.device_count() if not dry else 0
    if "ranks" not in args.skip:
        if num_gpus > 1:
            workdir = tempfile.mkdtemp(prefix="gpu-check-ranks-")
            rows += check_ranks(defenses, num_gpus, workdir)
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            rows.append(
                {
                    "check": "ranks",
                    "defense": "(all)",
                    "value": f"skipped: {num_gpus} GPU(s)",
                    "limit": "> 1 GPU",
                    "passed": True,
                }
            )
    if "memory" not in args.skip:
        rows += measure(defenses, TINY if dry else REAL, args.device, args.perf_steps, 2, tokenizer)
    print(table(rows))
    failed = [r for r in rows if not r["passed"]]
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} checks passed in {time.time() - start:.0f} s "
        f"({'dry mode, cpu' if dry else f'{num_gpus} GPU(s): {torch.cuda.get_device_name(0)}'})"
    )
    for r in failed:
        print(f"FAILED: {r['check']} {r['defense']}: {r['value']}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
