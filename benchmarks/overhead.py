"""What each defense costs compared with plain `SFTTrainer`: step time and peak memory ratios.

```bash
python benchmarks/overhead.py --output overhead.json --markdown overhead.md            # CPU, a few minutes
python benchmarks/overhead.py --device cuda --hidden 1024 --layers 16 --output gpu.json  # on a GPU
python benchmarks/overhead.py --arch smollm2 --layers 4 --output smollm2.json           # SmolLM2-135M's shapes
```

Every (defense, mode) configuration runs in its own subprocess on the same model (a Llama built from a config), the
same data and the same batch, with plain SFT measured in the same run; the order of configurations alternates across
repeats to cancel drift. Step time is the median time between `on_step_begin` and `on_step_end` (one optimizer
step: the defense's passes, backward, optimizer step) after warm-up, on one of two clocks (`--clock`):

- `cpu` (the default on CPU): the CPU time of the worker process with one compute thread, less the memory sampler's
  own CPU time. Other jobs on the machine delay a step but do not add to its CPU time, so the ratios hold on a
  shared machine (wall ratios on 2 shared cores moved by up to 2× between repeats). It counts computation, not
  waiting: what a CPU user pays per step.
- `wall` (required on CUDA, where the work runs on the device): wall time with the device synchronised.

 Peak memory is, on CUDA, the allocator's peak
during training; on CPU, the peak resident set size sampled every millisecond during training minus the resident size
just before training (what training adds: activations, gradients, optimizer state, the defense's extra tensors).
Gradient checkpointing is off and training is in fp32 on CPU (bf16 on CUDA), so ratios reflect the algorithms.

Each ratio is the median over repeats of the configuration against SFT's median in the same run, reported with its
repeat-to-repeat spread: the min–max of the per-repeat ratios (repeat r of the defense against repeat r of SFT). On
a tiny model a step is dominated by fixed per-step costs and the spread is wide; `--arch smollm2` measures on the
shapes of a real model (SmolLM2-135M: hidden 576, 9 query / 3 key-value heads, MLP 1536, vocabulary 49152, tied
embeddings; randomly initialised, `--layers` of its 30), where compute dominates.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


# Defense-specific settings for the benchmark: paper defaults except what a few-step run on a small model needs
BENCH_OVERRIDES = {
    # both phases must occur within the measured steps
    "lisa": {"alignment_steps": 2, "finetune_steps": 8, "proximal_warmup_ratio": 0.0},
    # "few active layers" on a model with >= 8 layers; re-score and re-sample inside the run
    "t-vaccine": {"num_active_layers": 2, "resample_interval": 5, "rescore_interval": 10},
}
# Defenses with their own harmful batch size (Booster's paper code hard-codes 10 with a training batch of 10): the
# benchmark gives the harmful passes the training batch size, so "k passes" cost k training-batch passes
HARMFUL_BATCH_SIZE_FIELD = "harmful_batch_size"
# The LoRA modules of `--modes lora` (training runs and the adapters the repairs read)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# Architectures of real models (`--arch`): they replace the shape flags; `--layers` stays free (fewer on a CPU)
ARCHITECTURES = {
    "smollm2": {  # SmolLM2-135M(-Instruct)'s config
        "hidden": 576,
        "intermediate": 1536,
        "heads": 9,
        "kv_heads": 3,
        "vocab_size": 49152,
        "tie_embeddings": True,
        "rope_theta": 100000.0,
    },
}


# ---------------------------------------------------------------------------------------------------- worker side
def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _dataset(n: int, seq_len: int, vocab_size: int, seed: int):
    from datasets import Dataset

    rng = random.Random(seed)
    half = seq_len // 2 - 1
    rows = {"prompt": [], "completion": []}
    for _ in range(n):
        rows["prompt"].append(" ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(half)))
        rows["completion"].append(" " + " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(half)))
    return Dataset.from_dict(rows)


class _RssSampler:
    """Peak resident set size (bytes) of this process, sampled in a background thread."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self.cpu_seconds = 0.0  # this thread's own CPU time, which the `cpu` clock leaves out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.cpu_seconds = time.thread_time()
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _build_model(args, tokenizer):
    """The benchmark's Llama (from the shape flags), initialised from the current torch seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.seq_len * 2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=args.tie_embeddings,
        rope_theta=args.rope_theta,
    )
    return LlamaForCausalLM(config)


def _set_up_worker(args):
    """Seed, thread count and tokenizer of a worker process."""
    import torch

    torch.manual_seed(args.seed)
    if args.clock == "cpu":
        torch.set_num_threads(1)  # CPU time of one compute thread: no spin-waiting of idle threads in it
    return _build_tokenizer(args.vocab_size)


def _clocks(sampler, cuda: bool) -> dict[str, float]:
    """Both clocks now: wall (device synchronised on CUDA) and this process's CPU time less the sampler's."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    return {"wall": time.perf_counter(), "cpu": time.process_time() - sampler.cpu_seconds}


def run_worker(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = _set_up_worker(args)
    model = _build_model(args, tokenizer)
    cuda = args.device == "cuda"
    if cuda:
        model = model.to("cuda")

    n_steps = args.warmup + args.steps
    common = {
        "output_dir": tempfile.mkdtemp(prefix="overhead-"),
        "per_device_train_batch_size": args.batch_size,
        "max_steps": n_steps,
        "learning_rate": 1e-4,
        "max_length": args.seq_len,
        "gradient_checkpointing": False,
        "bf16": cuda,
        "use_cpu": not cuda,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10**6,
        "disable_tqdm": True,
        "seed": args.seed,
        "dataloader_drop_last": True,
    }
    train = _dataset(args.batch_size * n_steps, args.seq_len, args.vocab_size, args.seed)
    # One extra row per train row: RepNoise pairs train row i with harmful row i
    extra = _dataset(len(train), args.seq_len, args.vocab_size, args.seed + 1)
    kwargs = {}
    if args.defense == "sft":
        trainer_class, config_class = SFTTrainer, SFTConfig
    else:
        from trl_safety.registry import get_defense

        spec = get_defense(args.defense)
        trainer_class, config_class = spec.trainer_class, spec.config_class
        common.update(BENCH_OVERRIDES.get(args.defense, {}))
        if HARMFUL_BATCH_SIZE_FIELD in {f.name for f in dataclasses.fields(config_class)}:
            common.setdefault(HARMFUL_BATCH_SIZE_FIELD, args.batch_size)
        for role in trainer_class.extra_datasets:
            kwargs[f"{role}_dataset"] = extra
        for role in getattr(trainer_class, "extra_models", ()):  # AsFT's base: built like the model, another seed
            with torch.random.fork_rng(devices=[]):  # the trained model's stream of draws stays SFT's
                torch.manual_seed(args.seed + 1)
                kwargs[f"{role}_model"] = _build_model(args, tokenizer)
    peft_config = None
    if args.mode == "lora":
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)

    trainer = trainer_class(
        model,
        config_class(**common),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        **kwargs,
    )

    sampler = _RssSampler()
    times: dict[str, list[float]] = {"wall": [], "cpu": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = _clocks(sampler, cuda)

        def on_step_end(self, *_, **__):
            for clock, now in _clocks(sampler, cuda).items():
                times[clock].append(now - self.start[clock])

    trainer.add_callback(StepTimer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _RssSampler.rss()
        with sampler:
            trainer.train()
        peak = sampler.peak - base
    measured = {clock: values[args.warmup :] for clock, values in times.items()}
    return {
        "defense": args.defense,
        "mode": args.mode,
        "repeat": args.repeat,
        "clock": args.clock,
        "step_seconds": statistics.median(measured[args.clock]),
        "step_seconds_all": measured[args.clock],
        "step_wall_seconds": statistics.median(measured["wall"]),
        "step_cpu_seconds": statistics.median(measured["cpu"]),
        "peak_memory_bytes": peak,
    }


def _perturbed(model, seed: int, scale: float):
    """A copy of `model` with Gaussian noise of relative size `scale` on every matrix (a stand-in fine-tuning or
    alignment update, so that every delta a repair reads is non-zero)."""
    import torch

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            if param.dim() == 2:
                noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                param.add_(scale * float(param.abs().mean()) * noise)
    return other


def run_post_hoc_worker(args) -> dict:
    """One run of a training-free defense's repair (`DefenseSpec.post_hoc`) on the benchmark's model: the model is
    the aligned one, the base model an older version of it, the input to repair a perturbed copy (`full`) or a LoRA
    adapter with random factors (`lora`); calibration data are `batch_size × steps` rows. A repair that refuses the
    mode (SafeLoRA and SafeMERGE take LoRA only) is recorded as refused with its message."""
    import inspect

    import torch
    from peft import LoraConfig, get_peft_model

    from trl_safety.bench.runner import build_stage_config
    from trl_safety.registry import get_defense

    spec = get_defense(args.defense)
    tokenizer = _set_up_worker(args)
    cuda = args.device == "cuda"
    aligned = _build_model(args, tokenizer).to(args.device)
    base = _perturbed(aligned, args.seed + 1, 0.05)
    if args.mode == "lora":
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False)  # B ≠ 0
        model = get_peft_model(copy.deepcopy(aligned), lora)
    else:
        model = _perturbed(aligned, args.seed + 2, 0.05)
    data = _dataset(args.batch_size * args.steps, args.seq_len, args.vocab_size, args.seed + 3)
    output_dir = tempfile.mkdtemp(prefix="overhead-post-")
    config = build_stage_config(
        spec.config_class,
        {"output_dir": output_dir, "max_length": args.seq_len},
        BENCH_OVERRIDES.get(args.defense, {}),
    )
    kwargs = dict(
        harmful_dataset=data, processing_class=tokenizer, base_model=base, aligned_model=aligned, output_dir=output_dir
    )
    if "alignment_dataset" in inspect.signature(spec.post_hoc).parameters:
        kwargs["alignment_dataset"] = data
    record = {"defense": args.defense, "mode": args.mode, "repeat": args.repeat, "clock": args.clock}
    sampler = _RssSampler()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
    else:
        start_memory = _RssSampler.rss()
    try:
        with sampler:
            start = _clocks(sampler, cuda)
            spec.post_hoc(model, config, **kwargs)
            end = _clocks(sampler, cuda)
    except (ValueError, NotImplementedError) as error:
        return {**record, "refused": " ".join(str(error).split())}
    peak = (torch.cuda.max_memory_allocated() if cuda else sampler.peak) - start_memory
    seconds = {clock: end[clock] - start[clock] for clock in end}
    return {
        **record,
        "repair_seconds": seconds[args.clock],
        "repair_wall_seconds": seconds["wall"],
        "repair_cpu_seconds": seconds["cpu"],
        "peak_memory_bytes": peak,
    }


# ---------------------------------------------------------------------------------------------------- driver side
def _registered(trainers: bool) -> list[str]:
    """Registered defenses with a trainer (`trainers=True`) or with a training-free repair."""
    from trl_safety.registry import list_defenses

    return [spec.name for spec in list_defenses() if (spec.trainer_class is not None) == trainers]


def _run_config(args, defense: str, mode: str, repeat: int = 0) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--defense",
        defense,
        "--mode",
        mode,
        "--result-file",
        result_file,
    ]
    names = ("hidden", "intermediate", "layers", "heads", "kv_heads", "seq_len", "batch_size", "vocab_size")
    for name in (*names, "rope_theta", "steps", "warmup", "seed"):
        if getattr(args, name) is not None:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--device", args.device, "--clock", args.clock, "--repeat", str(repeat)]
    if args.tie_embeddings:
        command.append("--tie-embeddings")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{defense}/{mode} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(Path(result_file).read_text())
    os.unlink(result_file)
    return result


def _per_repeat(runs: list[dict]) -> dict[int, dict]:
    """Runs by repeat index (`repeat`, else their order)."""
    return {run.get("repeat", index): run for index, run in enumerate(runs)}


def _spread(runs: list[dict], sft: list[dict], key: str, sft_key: str | None = None) -> tuple[float, float] | None:
    """min–max over repeats of (this repeat's `key` / SFT's `sft_key` (default: the same key) in the same repeat)."""
    ours, theirs = _per_repeat(runs), _per_repeat(sft)
    sft_key = sft_key or key
    ratios = [ours[r][key] / theirs[r][sft_key] for r in ours if r in theirs and theirs[r][sft_key] > 0]
    return (round(min(ratios), 3), round(max(ratios), 3)) if ratios else None


def _sft_baseline(results: list[dict], mode: str) -> tuple[list[dict], float, float]:
    """SFT's runs in `mode`, with their median step time and median peak memory."""
    sft = [r for r in results if r["defense"] == "sft" and r["mode"] == mode]
    return (
        sft,
        statistics.median(r["step_seconds"] for r in sft),
        statistics.median(r["peak_memory_bytes"] for r in sft),
    )


def summarise(results: list[dict], defenses: list[str], modes: list[str]) -> list[dict]:
    """Median over repeats of each configuration, as ratios to SFT's medians in the same run, with the min–max of
    the per-repeat ratios (repeat r against SFT's repeat r) as the spread."""
    rows = []
    for mode in modes:
        sft, sft_time, sft_memory = _sft_baseline(results, mode)
        for defense in defenses:
            runs = [r for r in results if r["defense"] == defense and r["mode"] == mode]
            step = statistics.median(r["step_seconds"] for r in runs)
            memory = statistics.median(r["peak_memory_bytes"] for r in runs)
            rows.append(
                {
                    "defense": defense,
                    "mode": mode,
                    "time_ratio": round(step / sft_time, 3),
                    "time_ratio_spread": _spread(runs, sft, "step_seconds"),
                    "memory_ratio": round(memory / sft_memory, 3) if sft_memory > 0 else None,
                    "memory_ratio_spread": _spread(runs, sft, "peak_memory_bytes") if sft_memory > 0 else None,
                    "step_ms": round(step * 1000, 2),
                    "sft_step_ms": round(sft_time * 1000, 2),
                    "peak_memory_mb": round(memory / 2**20, 1),
                    "sft_peak_memory_mb": round(sft_memory / 2**20, 1),
                    "repeats": len(runs),
                }
            )
    return rows


def summarise_post_hoc(results: list[dict], defenses: list[str], modes: list[str]) -> list[dict]:
    """Per repair and mode: the median repair time over repeats and its cost in SFT steps of the same run (median
    repair / SFT's median step, min–max over repeats paired by index), the peak memory against SFT training's."""
    rows = []
    for mode in modes:
        sft, sft_time, sft_memory = _sft_baseline(results, mode)
        for defense in defenses:
            runs = [r for r in results if r["defense"] == defense and r["mode"] == mode]
            refused = [r["refused"] for r in runs if "refused" in r]
            if refused:
                rows.append({"defense": defense, "mode": mode, "refused": refused[0], "repeats": len(runs)})
                continue
            seconds = statistics.median(r["repair_seconds"] for r in runs)
            memory = statistics.median(r["peak_memory_bytes"] for r in runs)
            rows.append(
                {
                    "defense": defense,
                    "mode": mode,
                    "repair_s": round(seconds, 3),
                    "sft_steps": round(seconds / sft_time, 2),
                    "sft_steps_spread": _spread(runs, sft, "repair_seconds", "step_seconds"),
                    "memory_ratio": round(memory / sft_memory, 3) if sft_memory > 0 else None,
                    "peak_memory_mb": round(memory / 2**20, 1),
                    "sft_step_ms": round(sft_time * 1000, 2),
                    "sft_peak_memory_mb": round(sft_memory / 2**20, 1),
                    "repeats": len(runs),
                }
            )
    return rows


def _ratio_cell(ratio, spread, unit: str = "×") -> str:
    if ratio is None:
        return "n/a"
    cell = f"{ratio:.2f}{unit}"
    return f"{cell} ({spread[0]:.2f}–{spread[1]:.2f})" if spread else cell


def markdown_table(rows: list[dict], clock: str = "cpu") -> str:
    lines = [
        f"| defense | mode | time ratio (min–max) | memory ratio (min–max) | step (ms, {clock}) | SFT step (ms, {clock}) "
        "| peak mem (MB) | SFT peak mem (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        time_cell = _ratio_cell(r["time_ratio"], r.get("time_ratio_spread"))
        memory_cell = _ratio_cell(r["memory_ratio"], r.get("memory_ratio_spread"))
        lines.append(
            f"| {r['defense']} | {r['mode']} | {time_cell} | {memory_cell} | {r['step_ms']} | "
            f"{r['sft_step_ms']} | {r['peak_memory_mb']} | {r['sft_peak_memory_mb']} |"
        )
    return "\n".join(lines)


def markdown_post_hoc_table(rows: list[dict], clock: str = "cpu") -> str:
    lines = [
        f"| defense | mode | repair (s, {clock}) | in SFT steps (min–max) | peak mem (MB) | vs SFT training peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            reason = r["refused"].split(". ")[0]
            lines.append(f"| {r['defense']} | {r['mode']} | refused: {reason} | | | |")
            continue
        memory = f"{r['memory_ratio']:.2f}×" if r["memory_ratio"] is not None else "n/a"
        lines.append(
            f"| {r['defense']} | {r['mode']} | {r['repair_s']} | {_ratio_cell(r['sft_steps'], r['sft_steps_spread'], '')} "
            f"| {r['peak_memory_mb']} | {memory} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="overhead.json", help="JSON report path.")
    parser.add_argument("--markdown", default=None, help="Also write the table as markdown here.")
    parser.add_argument(
        "--defenses",
        nargs="*",
        default=None,
        help="Registry names (default: every registered defense; training-free repairs get their own table).",
    )
    parser.add_argument("--modes", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--repeats", type=int, default=2, help="Subprocess runs per configuration.")
    parser.add_argument("--steps", type=int, default=12, help="Measured optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=3, help="Unmeasured steps before measuring.")
    parser.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), default=None, help="A real model's shapes (replace the flags below)."
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2 × hidden).")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="Key-value heads (default: --heads).")
    parser.add_argument("--tie-embeddings", action="store_true", help="Tie the LM head to the embeddings.")
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="Step clock: CPU time of one compute thread (default on CPU) or wall time (CUDA's only clock).",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--defense", default="sft", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in ARCHITECTURES.get(args.arch, {}).items():
        setattr(args, name, value)
    if args.clock is None:
        args.clock = "wall" if args.device == "cuda" else "cpu"
    if args.device == "cuda" and args.clock == "cpu":
        parser.error(
            "--clock cpu measures host threads; on --device cuda the step runs on the device: use --clock wall."
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker = (
            run_worker if args.defense == "sft" or args.defense in _registered(trainers=True) else run_post_hoc_worker
        )
        Path(args.result_file).write_text(json.dumps(worker(args)))
        return {}
    trainers, repairs = _registered(trainers=True), _registered(trainers=False)
    if args.defenses is not None:
        unknown = sorted(set(args.defenses) - set(trainers) - set(repairs))
        if unknown:
            raise SystemExit(f"unknown defense(s) {unknown}; registered: {', '.join(trainers + repairs)}")
        trainers = [d for d in trainers if d in args.defenses]
        repairs = [d for d in repairs if d in args.defenses]
    defenses = trainers + repairs
    configs = [(d, m) for m in args.modes for d in ["sft", *defenses]]
    results = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        order = configs if repeat % 2 == 0 else configs[::-1]  # alternate to cancel drift
        for defense, mode in order:
            print(f"[repeat {repeat + 1}/{args.repeats}] {defense} ({mode})", flush=True)
            results.append(_run_config(args, defense, mode, repeat))
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "defense", "mode", "result_file", "repeat")}
    config["load_average"] = os.getloadavg()  # at the end: what else ran on the machine meanwhile
    report = {
        "config": config,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": summarise(results, trainers, args.modes),
        "post_hoc_rows": summarise_post_hoc(results, repairs, args.modes),
        "runs": results,
    }
    Path(args.output).write_text(json.dumps(report, indent=2))
    table = markdown_table(report["rows"], args.clock)
    if report["post_hoc_rows"]:
        table += "\n\n" + markdown_post_hoc_table(report["post_hoc_rows"], args.clock)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
