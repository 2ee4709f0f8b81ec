"""LisaCallback in the toy world: HS after a poisoned DPO / GRPO fine-tuning of the aligned toy model, with and without
the callback.

- Aligned model: the cached toy base model (`load_base_model`) fine-tuned with SFT on `ToyWorld.alignment_dataset()`.
- Poisoned DPO: harmful attack-split prompts, chosen = the world's compliant (placeholder) answer, rejected = a
  refusal (a reverse-preference attack).
- Poisoned GRPO: harmful attack-split prompts, reward 1 when the keyword judge flags the completion as compliant.
- With the callback: `LisaCallback(trainer, world.alignment_dataset(), ...)`, K1/K2 and ρ of the Lisa bench row.

HS: the keyword judge's harmful score (percent) on `ToyWorld.harmful_prompts("eval")`, greedy decoding.

Command (CPU, a few minutes):

    HF_HUB_OFFLINE=1 python benchmarks/callbacks_toy.py --out /tmp/callbacks_toy.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from trl_safety.callbacks import LisaCallback
from trl_safety.eval.harmful_score import harmful_score
from trl_safety.eval.judges import load_judge
from trl_safety.toy import ToyWorld, format_prompt, load_base_model


COMMON = dict(
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    report_to="none",
    save_strategy="no",
    logging_steps=10,
    disable_tqdm=True,
    seed=0,
)


def aligned_model(world, work):
    model, tokenizer, _ = load_base_model()
    args = SFTConfig(
        output_dir=f"{work}/align",
        per_device_train_batch_size=32,
        max_steps=100,
        learning_rate=1e-3,
        max_length=64,
        **COMMON,
    )
    trainer = SFTTrainer(model, args, train_dataset=world.alignment_dataset(), processing_class=tokenizer)
    trainer.train()
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return state, tokenizer


def fresh(state):
    model, _, _ = load_base_model()
    model.load_state_dict(state)
    return model


def hs(model, tokenizer, world, n):
    model.eval()
    prompts = [format_prompt(r.text) for r in world.harmful_prompts("eval", num_samples=n)]
    return harmful_score(model, tokenizer, prompts, judge="keyword", max_new_tokens=16, batch_size=32).score


def lisa(trainer, world, args):
    callback = LisaCallback(
        trainer,
        world.alignment_dataset(),
        rho=args.rho,
        alignment_steps=args.k1,
        finetune_steps=args.k2,
        proximal_warmup_ratio=0.1,
    )
    trainer.add_callback(callback)


def dpo_run(state, tokenizer, world, work, with_lisa, args):
    harmful = world.harmful_dataset("attack", args.num_pairs)
    refusals = list(world.refusal_dataset(num_samples=args.num_pairs)["completion"])
    rejected = [refusals[i % len(refusals)] for i in range(len(harmful))]
    pairs = Dataset.from_dict({"prompt": harmful["prompt"], "chosen": harmful["completion"], "rejected": rejected})
    config = DPOConfig(
        output_dir=f"{work}/dpo",
        per_device_train_batch_size=16,
        max_steps=args.steps,
        learning_rate=args.dpo_lr,
        max_length=64,
        **COMMON,
    )
    trainer = DPOTrainer(
        fresh(state), ref_model=fresh(state), args=config, train_dataset=pairs, processing_class=tokenizer
    )
    if with_lisa:
        lisa(trainer, world, args)
    trainer.train()
    return trainer.model


def grpo_run(state, tokenizer, world, work, with_lisa, args):
    judge = load_judge("keyword")

    def complied(prompts, completions, **kwargs):
        return [1.0 if flag else 0.0 for flag in judge.flag(list(prompts), list(completions))]

    prompts = Dataset.from_dict({"prompt": world.harmful_dataset("attack", args.num_pairs)["prompt"]})
    config = GRPOConfig(
        output_dir=f"{work}/grpo",
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=16,
        max_steps=args.steps,
        learning_rate=args.grpo_lr,
        **COMMON,
    )
    trainer = GRPOTrainer(
        fresh(state), reward_funcs=complied, args=config, train_dataset=prompts, processing_class=tokenizer
    )
    if with_lisa:
        lisa(trainer, world, args)
    trainer.train()
    return trainer.model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--steps", type=int, default=60, help="host steps of each poisoned run")
    parser.add_argument("--num_pairs", type=int, default=200, help="poisoned prompts")
    parser.add_argument("--eval_prompts", type=int, default=100, help="harmful eval prompts for HS")
    parser.add_argument("--dpo_lr", type=float, default=1e-3)
    parser.add_argument("--grpo_lr", type=float, default=1e-3)
    parser.add_argument("--rho", type=float, default=5.0, help="Lisa bench row's ρ")
    parser.add_argument("--k1", type=int, default=10)
    parser.add_argument("--k2", type=int, default=90)
    parser.add_argument("--only", choices=["dpo", "grpo"], default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    world = ToyWorld()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        state, tokenizer = aligned_model(world, work)
        results["aligned"] = {"hs": hs(fresh(state), tokenizer, world, args.eval_prompts)}
        for name, run in (("dpo", dpo_run), ("grpo", grpo_run)):
            if args.only and name != args.only:
                continue
            for with_lisa in (False, True):
                t = time.perf_counter()
                model = run(state, tokenizer, world, work, with_lisa, args)
                key = f"{name}{'+lisa' if with_lisa else ''}"
                results[key] = {
                    "hs": hs(model, tokenizer, world, args.eval_prompts),
                    "seconds": time.perf_counter() - t,
                }
                print(key, results[key], flush=True)
        results["total_seconds"] = time.perf_counter() - start
    results["args"] = vars(args)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
