"""Driver of the multi-process tests: train a defense (or plain SFT) for a few steps on a tiny local model.

Runs alone (one process) or under `accelerate launch` (see `tests/distributed/test_distributed.py` for the flags).
Everything is built locally (tokenizer, Llama with hidden 32 / 2 layers, prompt-completion data), so it needs no
network. Rank 0 writes, in `--output_dir`:

- `result.json`: per mode (`full`, `lora`), the backend seen by the trainer, the optimizer steps, the logged losses,
  every rank's SHA-256 of its parameters after training (ZeRO-3 shards are gathered first) and a final checksum;
- `<mode>.pt`: the trainable parameters before and after training (gathered), for the comparison with a
  single-process run.

With `--expect_unsupported`, each named defense's trainer is only constructed and the error it raises (or None) is
recorded in `result.json`. Rank 0 prints `TRL_SAFETY_DISTRIBUTED_DONE` last, so a test can tell a finished run from
one that died (a rank may still abort at interpreter exit, see docs/design/integration.md §6).

The hyperparameters below are chosen so that a 2-rank run with per-device batch b and accumulation GA performs
exactly the computation of one process with batch b and accumulation 2·GA (the per-rank semantics of every
micro-batch quantity; see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import sys
import traceback


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for testing_utils

from testing_utils import set_offline_env  # noqa: E402


set_offline_env()

if os.environ.get("TRL_SAFETY_TEST_FSDP_ON_CPU") == "1":  # FSDP2 on CPU/gloo (see tests/distributed/fsdp_cpu_shim.py)
    import fsdp_cpu_shim  # noqa: F401

if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (used only by inference kernels) into
    # ~/.cache/torch_extensions on its first `init_distributed`; a compile killed midway leaves a lock file that makes
    # every later launch wait forever. Training does not need the op: mark no op as compatible, which also skips the
    # slow compiler probing (deepspeed.ops caches this dict and reads it with `.get(name, False)`).
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


DONE_MARKER = "TRL_SAFETY_DISTRIBUTED_DONE"
NUM_SAMPLES = 32  # enough for max_steps 4 at a global batch of 8

# Per defense: config overrides and the extra datasets. Chosen so that the defense term is active in a 2-4 step run
# and so that per-rank semantics equal single-process accumulation (see the module docstring):
# - RepNoise: beta=0, because its MMD noise is seeded per (rank, step, micro-step) and cannot be reproduced by one
#   process; the alpha (harmful ascent) term stays on.
# - Antibody-align: a fixed λ, because the adaptive λ is an EMA over the micro-steps a rank sees (per-rank state).
# - T-Vaccine: identical harmful rows, because its layer scores are averaged over ranks (one harmful batch per rank)
#   where one process scores one batch; with identical rows both see the same scores.
# - Lisa: K1=K2=2 over 4 steps so that the proximal term is non-zero (it vanishes on the first step of a phase).
CASES = {
    "sft": dict(),
    "vaccine": dict(config=dict(rho=2.0)),
    # T-Vaccine scores layers at step 0 and redraws the active layer every step (freezing exercised); re-scoring on a
    # later step fails with LoRA on one process too (variant `t-vaccine+rescore`, a known defect)
    "t-vaccine": dict(
        config=dict(rho=2.0, num_active_layers=1, resample_interval=1, rescore_interval=100, harmful_batch_size=2),
        harmful="identical",
    ),
    "t-vaccine+rescore": dict(
        config=dict(rho=2.0, num_active_layers=1, resample_interval=1, rescore_interval=1, harmful_batch_size=2),
        harmful="identical",
    ),
    "booster": dict(config=dict(lamb=5.0, alpha=0.1, harmful_batch_size=2), harmful="distinct"),
    "antibody-align": dict(config=dict(fixed_lambda=5.0, alpha=0.1, harmful_batch_size=2), harmful="distinct"),
    # Panacea's final w += ε_last uses each rank's own ε: checked separately (variant `panacea+add_eps`)
    "panacea": dict(config=dict(rho=1.0, lamb=0.1, harmful_batch_size=2, add_eps=False), harmful="distinct"),
    "panacea+add_eps": dict(config=dict(rho=1.0, lamb=0.1, harmful_batch_size=2, add_eps=True), harmful="distinct"),
    "repnoise": dict(config=dict(alpha=0.1, beta=0.0), harmful="paired"),
    "lisa": dict(
        config=dict(rho=1.0, alignment_steps=2, finetune_steps=2, proximal_warmup_ratio=0.0),
        alignment="distinct",
        max_steps=4,
    ),
    "antibody": dict(config=dict(temperature=1.0)),
    "safety-mix": dict(config=dict(safety_weight=1.0, safety_batch_size=2), alignment="distinct"),
    # a fixed, provider-chosen trigger: a generated one would differ between the multi-process and reference runs
    "backdoor-align": dict(
        config=dict(safety_weight=1.0, safety_batch_size=2, trigger_file=os.path.join(HERE, "backdoor_align.trigger")),
        alignment="distinct",
    ),
    # SafeGrad's alignment batch is drawn once per optimizer step and averaged over ranks: identical rows make the
    # ranks' mean the single process's batch; 3 steps so that the KL (zero at the start weights) is active
    "safegrad": dict(config=dict(alignment_weight=1.0, alignment_batch_size=2), alignment="identical", max_steps=3),
    # per-token weights against the starting model (a frozen copy, or the adapter disabled): 3 steps so the weights
    # leave 1 (Δ = 0 on the first step)
    "token-constrained": dict(config=dict(beta=0.1), max_steps=3),
    # AsFT against a base that differs from the model by a low-rank update (`_base_model`): every rank computes the
    # same penalty of the same weights (DDP averages it unchanged); 3 steps so that the update leaves its start
    # (B = 0, W = W_start: R = 0 and ∂R = 0 on the first step)
    "asft": dict(config=dict(asft_lambda=1.0), max_steps=3),
    # Post-fine-tuning defenses, run as callbacks on plain SFT
    "antidote": dict(callback="antidote"),
    "safelora": dict(callback="safelora", modes=("lora",)),
    # LoX (alignment stage, training-free) applied at the end of the run by its callback: every rank computes the same
    # edit of the same weights (full: against the initial model as its base; LoRA: the adapter's own update)
    "lox": dict(callback="lox"),
    # SafeMERGE at the end of a LoRA run (DDP, ZeRO-2; ZeRO-3 is refused by its callback), every module merged
    # (threshold 1) with the zero safety adapter (the aligned model as partner); every rank merges the same factors
    "safemerge": dict(callback="safemerge", modes=("lora",)),
    # Safe Delta at the end of a full run (DDP, ZeRO-2; LoRA and ZeRO-3 are refused by its callback): every rank
    # computes the same Hessians and selection from the same safety rows and the same weights
    "safe-delta": dict(callback="safe-delta", modes=("full",)),
    # Vaccine and Antibody as callbacks on plain SFT (per-rank semantics as their trainers')
    "vaccine-callback": dict(callback="vaccine"),
    "antibody-weighting": dict(callback="antibody-weighting"),
    # Lisa as a callback on plain SFT: K1=K2=2 over 4 host steps (8 optimizer steps), proximal term active
    "lisa-callback": dict(callback="lisa", max_steps=4),
}


@functools.cache
def _prototype_model():
    """The tiny model, built once before any `TrainingArguments` exists: under ZeRO-3 a config registers DeepSpeed
    globally and `from_config` would then initialise (differently) inside `deepspeed.zero.Init`."""
    return build_model("llama", hidden=32, layers=2, seed=0)


def fresh_model():
    return copy.deepcopy(_prototype_model())


def _base_model():
    """The base of a model-role defense (AsFT): the tiny model minus a low-rank update of every linear weight."""
    base = fresh_model()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(4)
        for module in base.modules():
            if isinstance(module, torch.nn.Linear):
                out_f, in_f = module.weight.shape
                u = torch.randn(out_f, 2, generator=generator)
                module.weight.sub_(0.05 * u @ torch.randn(2, in_f, generator=generator))
    return base


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def _extra_dataset(kind: str | None, seed: int, train: Dataset) -> Dataset | None:
    if kind is None:
        return None
    if kind == "distinct":
        return prompt_completion_dataset(NUM_SAMPLES, seed=seed)
    if kind == "identical":
        row = prompt_completion_dataset(1, seed=seed)[0]
        return Dataset.from_dict({key: [value] * NUM_SAMPLES for key, value in row.items()})
    if kind == "paired":  # same prompts as the training data, other answers (RepNoise's pairing)
        answers = prompt_completion_dataset(NUM_SAMPLES, seed=seed)["completion"]
        return Dataset.from_dict({"prompt": train["prompt"], "completion": answers})
    raise ValueError(kind)


def _callbacks(name: str, case: dict, tokenizer) -> list:
    kind = case.get("callback")
    if kind == "antidote":
        from trl_safety import AntidoteCallback, AntidoteConfig

        harmful = prompt_completion_dataset(8, seed=5)
        return [AntidoteCallback(harmful, AntidoteConfig(prune_ratio=0.2, max_length=32), processing_class=tokenizer)]
    if kind == "safelora":
        from trl_safety import SafeLoRACallback, SafeLoRAConfig

        base = fresh_model()
        aligned = fresh_model()
        with torch.no_grad():  # a low-rank "alignment" update of q/v, so the projection is meaningful
            generator = torch.Generator().manual_seed(3)
            for module_name, module in aligned.named_modules():
                if module_name.endswith(("q_proj", "v_proj")):
                    out_f, in_f = module.weight.shape
                    u = torch.randn(out_f, 2, generator=generator)
                    v = torch.randn(2, in_f, generator=generator)
                    module.weight.add_(0.05 * u @ v)
        return [SafeLoRACallback(SafeLoRAConfig(num_proj_layers=2), base_model=base, aligned_model=aligned)]
    if kind == "safemerge":
        from trl_safety.callbacks import SafeMERGECallback
        from trl_safety.defenses.safemerge import SafeMERGEConfig

        base, aligned = fresh_model(), fresh_model()
        with torch.no_grad():  # a low-rank "alignment" update of q/v, as for SafeLoRA
            generator = torch.Generator().manual_seed(3)
            for module_name, module in aligned.named_modules():
                if module_name.endswith(("q_proj", "v_proj")):
                    out_f, in_f = module.weight.shape
                    u = torch.randn(out_f, 2, generator=generator)
                    module.weight.add_(0.05 * u @ torch.randn(2, in_f, generator=generator))
        return [SafeMERGECallback(SafeMERGEConfig(threshold=1.0), base_model=base, aligned_model=aligned)]
    if kind == "safe-delta":
        from trl_safety.callbacks import SafeDeltaCallback
        from trl_safety.defenses.safe_delta import SafeDeltaConfig

        # budget normalised to the tiny model's width, so that the selection keeps some deltas and not others
        config = SafeDeltaConfig(scale=1.0, budget_ref_dim=32, block_size=16, max_length=32)
        return [SafeDeltaCallback(prompt_completion_dataset(8, seed=5), config, processing_class=tokenizer)]
    if kind == "lox":
        from trl_safety.callbacks import LoXCallback
        from trl_safety.defenses.lox import LoXConfig

        return [LoXCallback(LoXConfig(rank=2, alpha=0.5), base_model=fresh_model())]
    if kind == "vaccine":
        from trl_safety.callbacks import VaccineCallback

        return [VaccineCallback(rho=2.0)]
    return []


def build_trainer(name: str, mode: str, args: argparse.Namespace, output_dir: str, **overrides):
    """The trainer for defense `name` in `mode` (`full` or `lora`), with the test hyperparameters."""
    from trl_safety.registry import get_defense

    case = CASES.get(name, {})
    defense = name.split("+")[0]  # `defense+variant` names a second set of hyperparameters
    tokenizer = build_tokenizer()
    train = prompt_completion_dataset(NUM_SAMPLES, seed=0)
    common = dict(
        output_dir=output_dir,
        bf16=False,
        use_cpu=args.use_cpu,
        ddp_backend=args.ddp_backend,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps or case.get("max_steps", 2),
        # SGD without clipping: the update is −lr × gradient, so a gradient difference is not amplified (Adam
        # would turn a rounding-level difference of a near-zero gradient into a full-size step)
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_length=32,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
    )
    common.update(overrides)
    if defense in ("sft", "antidote", "safelora") or case.get("callback"):
        trainer_class, config = SFTTrainer, SFTConfig(**common)
        extra = {}
    else:
        spec = get_defense(defense)
        trainer_class = spec.trainer_class
        config = spec.config_class(**common, **case.get("config", {}))
        extra = {}
        for role in trainer_class.extra_datasets:
            kind = case.get(role, "distinct")
            extra[f"{role}_dataset"] = _extra_dataset(kind, seed={"alignment": 1, "harmful": 2}[role], train=train)
        for role in getattr(trainer_class, "extra_models", ()):
            extra[f"{role}_model"] = _base_model()
    torch.manual_seed(0)  # same LoRA initialisation in every process
    trainer = trainer_class(
        model=fresh_model(),
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora_config() if mode == "lora" else None,
        callbacks=_callbacks(name, case, tokenizer),
        **extra,
    )
    if case.get("callback") == "antibody-weighting":  # built from the trainer, which it registers itself with
        from trl_safety.callbacks import AntibodyWeighting

        AntibodyWeighting(trainer, temperature=1.0)
    if case.get("callback") == "lisa":  # built from the trainer (its optimizer, accelerator and tokenizer)
        from trl_safety.callbacks import LisaCallback

        alignment = _extra_dataset("distinct", seed=1, train=train)
        lisa = LisaCallback(
            trainer, alignment, rho=1.0, alignment_steps=2, finetune_steps=2, proximal_warmup_ratio=0.0
        )
        trainer.add_callback(lisa)
    return trainer


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def gathered_state(model) -> dict[str, torch.Tensor]:
    """Full fp32 copies of all parameters (ZeRO-3 shards gathered on every rank)."""
    from trl_safety.core.distributed import gathered

    params = dict(model.named_parameters())
    with torch.no_grad(), gathered(list(params.values())):
        # FSDP2 parameters are DTensor shards: `full_tensor()` all-gathers them (a collective, every rank calls it)
        return {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone()
            for n, p in params.items()
        }


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n in sorted(state):
        h.update(n.encode())
        h.update(state[n].contiguous().numpy().tobytes())
    return h.hexdigest()


def _all_gather(obj, trainer) -> list:
    if trainer.accelerator.num_processes == 1:
        return [obj]
    out = [None] * trainer.accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def train_once(name: str, mode: str, args: argparse.Namespace) -> tuple[dict, object]:
    from trl_safety.core.distributed import backend_name

    output_dir = os.path.join(args.output_dir, f"{name}-{mode}")
    trainer = build_trainer(name, mode, args, output_dir)
    initial = {n: p.detach().float().cpu().clone() for n, p in _trainable(trainer.model).items()}
    trainer.train()
    state = gathered_state(trainer.model)
    hashes = _all_gather(digest(state), trainer)
    result = {
        "defense": name,
        "mode": mode,
        "backend": backend_name(trainer.accelerator),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "rank_hashes": hashes,
        # FSDP2 turns parameters into DTensor shards: the proof that a run was sharded, not silently DDP
        "sharded_params": sum(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
        "checksum": float(sum(t.double().sum() for t in state.values())),
    }
    if trainer.accelerator.is_main_process:
        final = {n: t for n, t in state.items() if n in initial}
        torch.save({"initial": initial, "final": final}, os.path.join(args.output_dir, f"{name}-{mode}.pt"))
    return result, trainer


def expect_unsupported(name: str, args: argparse.Namespace) -> dict:
    """Construct the trainer only; record the error it raises before training (or None)."""
    try:
        trainer = build_trainer(name, "lora", args, os.path.join(args.output_dir, f"{name}-unsupported"))
    except NotImplementedError as error:
        return {"defense": name, "error_type": type(error).__name__, "error": str(error)}
    from trl_safety.core.distributed import backend_name

    return {"defense": name, "error_type": None, "error": None, "backend": backend_name(trainer.accelerator)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", required=True, help="Comma-separated registry names, or `sft`.")
    parser.add_argument("--modes", default="full,lora", help="Comma-separated: full, lora.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=2)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=None, help="Default: the case's (2, or 4 for Lisa).")
    parser.add_argument("--use_cpu", default="false", help="`true` for DDP on CPU (see the accelerate configs).")
    parser.add_argument("--ddp_backend", default=None, help="`gloo` for DeepSpeed on CPU.")
    parser.add_argument("--expect_unsupported", action="store_true")
    parser.add_argument("--dump_traceback_after", type=float, default=0, help="Seconds; dump stacks and exit.")
    args = parser.parse_args(argv)
    args.use_cpu = str(args.use_cpu).lower() in ("1", "true", "yes")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dump_traceback_after:  # a hung rank shows where it waits
        import faulthandler

        faulthandler.dump_traceback_later(args.dump_traceback_after, exit=True)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(1)
    _prototype_model()
    results, errors, trainer = [], [], None
    for name in args.defense.split(","):
        if args.expect_unsupported:
            errors.append(expect_unsupported(name, args))
            continue
        modes = [m for m in args.modes.split(",") if m in CASES.get(name, {}).get("modes", ("full", "lora"))]
        for mode in modes:
            try:
                result, trainer = train_once(name, mode, args)
            except Exception:  # record it and go on with the next mode; the test reports the traceback
                result = {"defense": name, "mode": mode, "exception": traceback.format_exc()}
                print(result["exception"], file=sys.stderr, flush=True)
            results.append(result)
    summary = {"results": results, "unsupported": errors}
    from accelerate import PartialState

    if PartialState().is_main_process:
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(DONE_MARKER, flush=True)
    if trainer is not None:
        trainer.end()  # destroys the process group (transformers >= 5.18), as TRL's scripts do
    return summary


if __name__ == "__main__":
    main()
