"""`trl-safety eval`: harmful score and fine-tune accuracy of a model or adapter, written to a JSON report.

```bash
# paper-parity harmful score (Booster protocol: 1000 unsafe BeaverTails 30k_test prompts, 512 tokens, beaver-dam)
trl-safety eval --model sft-run/ --protocol booster --judge beaver-dam --output report.json

# quick CPU check on a local prompt file with the keyword judge, plus SST2 accuracy from a local copy
trl-safety eval --model sft-run/ --prompts prompts.jsonl --judge keyword --num_prompts 100 \
    --task sst2 --task_data sst2_validation.jsonl --output report.json
```

`--model` may be a full model (folder or Hub id) or a PEFT adapter folder (it holds `adapter_config.json`), loaded on
its base model (recorded in the adapter config, or `--base_model`). `--adapter` (repeatable) stacks more adapters on
top, each merged before the next (double-LoRA: alignment adapter, then fine-tuning adapter).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from trl_safety.cli.checks import UsageError, check_adapter_base, check_dataset, check_judge, check_model


logger = logging.getLogger(__name__)


def build_parser(prog: str = "trl-safety eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Evaluate harmful score and fine-tune accuracy.")
    parser.add_argument("--model", required=True, help="Model folder / Hub id, or a PEFT adapter folder.")
    parser.add_argument("--base_model", default=None, help="Base model for an adapter (default: from its config).")
    parser.add_argument(
        "--adapter", action="append", default=[], help="Extra PEFT adapter folder(s), merged in order."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer path (default: the model or adapter folder).")
    parser.add_argument(
        "--protocol",
        default="booster",
        help="Paper protocol preset: vaccine, t_vaccine, lisa, booster (= canonical), antidote, antibody.",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        help="Harmful prompt set: a local file or Hub id. BeaverTails-schema data (prompt/response/is_safe) gets "
        "the protocol's selection; other data needs a `--prompt_column`. Default: the protocol's prompt set.",
    )
    parser.add_argument("--prompts_split", default=None, help="Split of a Hub prompt set (default: protocol's).")
    parser.add_argument("--prompt_column", default="prompt", help="Prompt column of a non-BeaverTails prompt set.")
    parser.add_argument("--num_prompts", type=int, default=None, help="Override the protocol's prompt count.")
    parser.add_argument("--no_harmful_score", action="store_true", help="Skip the harmful score.")
    parser.add_argument(
        "--judge", default=None, help="keyword, beaver-dam, or a classifier id/path (default: the protocol's)."
    )
    parser.add_argument("--threshold", type=float, default=None, help="Judge flagging threshold.")
    parser.add_argument("--task", default=None, choices=["sst2", "agnews", "gsm8k"], help="Fine-tune accuracy task.")
    parser.add_argument("--task_data", default=None, help="Task test data: local file or Hub id (default: Hub).")
    parser.add_argument("--task_split", default=None, help="Task split (default: the papers' test split).")
    parser.add_argument("--num_task_samples", type=int, default=None, help="Override the papers' test-set size.")
    parser.add_argument(
        "--template",
        default=None,
        choices=["alpaca", "alpaca_newline", "chat", "none"],
        help="Prompt template (default: the protocol's). Must match the training template.",
    )
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: the protocol's.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--judge_batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--output", default=None, help="Report path (default: <model>/eval_report.json if a folder).")
    parser.add_argument("--no_responses", action="store_true", help="Leave generated texts out of the report.")
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    return parser


def _dtype(name: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_adapter(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_model_and_tokenizer(
    model_path: str, base_model=None, adapters=(), tokenizer_path=None, dtype="auto", device=None
):
    """Load a full model or an adapter on its base, merge stacked adapters in order, and load the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_chain = list(adapters)
    if is_adapter(model_path):
        adapter_chain.insert(0, model_path)
        if base_model is None:
            with open(os.path.join(model_path, "adapter_config.json")) as f:
                base_model = json.load(f).get("base_model_name_or_path")
            if not base_model:
                raise ValueError(f"{model_path} is an adapter without a recorded base model; pass --base_model.")
    else:
        base_model = model_path
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=_dtype(dtype))
    if adapter_chain:
        from peft import PeftModel

        for index, adapter in enumerate(adapter_chain):
            model = PeftModel.from_pretrained(model, adapter)
            if index < len(adapter_chain) - 1:
                model = model.merge_and_unload()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer_source = tokenizer_path or next(
        (p for p in [model_path, *adapters] if os.path.isfile(os.path.join(p, "tokenizer_config.json"))), base_model
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    return model, tokenizer, {"base_model": base_model, "adapters": adapter_chain, "tokenizer": tokenizer_source}


def load_prompt_set(args, protocol):
    """(prompts, categories) from the protocol's set, a BeaverTails-schema source, or a plain prompt file."""
    from trl_safety.data import beavertails_eval_prompts, load_named_dataset

    if args.prompts is None:
        data = protocol.load_prompts(num_prompts=args.num_prompts)
        return data["prompt"], data["category"]
    raw = load_named_dataset(args.prompts, split=args.prompts_split or protocol.prompt_split)
    if {"prompt", "response", "is_safe"} <= set(raw.column_names):
        data = beavertails_eval_prompts(
            args.prompts_split or protocol.prompt_split,
            source=args.prompts,
            num_samples=args.num_prompts if args.num_prompts is not None else protocol.num_prompts,
            only_unsafe=protocol.only_unsafe,
        )
        return data["prompt"], data["category"]
    if args.prompt_column not in raw.column_names:
        raise ValueError(f"{args.prompts!r} has no {args.prompt_column!r} column ({raw.column_names}).")
    count = len(raw) if args.num_prompts is None else min(args.num_prompts, len(raw))
    raw = raw.select(range(count))
    categories = raw["category"] if "category" in raw.column_names else None
    return raw[args.prompt_column], categories


def check_eval_arguments(args) -> None:
    """Everything the evaluation names can be found (protocol, models, data, judge), before anything is loaded."""
    from trl_safety.eval import PROTOCOLS

    if args.protocol.lower().replace("-", "_") not in PROTOCOLS:
        raise UsageError(f"unknown protocol {args.protocol!r}; available: {', '.join(sorted(PROTOCOLS))}.")
    check_model(args.model, "--model")
    if is_adapter(args.model):
        check_adapter_base(args.model, args.base_model, "--base_model")
    check_model(args.base_model, "--base_model")
    for adapter in args.adapter:
        check_model(adapter, "--adapter")
    check_model(args.tokenizer, "--tokenizer")
    if not args.no_harmful_score:
        check_dataset(args.prompts, "--prompts")
    check_dataset(args.task_data, "--task_data")


def run(argv: list[str] | None = None, prog: str = "trl-safety eval", command: str = "eval") -> int:
    args = build_parser(prog).parse_args(argv)
    check_eval_arguments(args)
    from trl_safety.eval import get_protocol, load_judge

    protocol = get_protocol(args.protocol)
    judge = None
    if not args.no_harmful_score:
        # resolved before any answer is generated: an unknown name or missing checkpoint fails now, not after
        judge_name = args.judge or protocol.judge
        check_judge(judge_name)
        judge_kwargs = {} if judge_name.lower() == "keyword" else {"batch_size": args.judge_batch_size}
        judge = load_judge(judge_name, **judge_kwargs)  # classifier weights load lazily, at the first score
        if args.threshold is not None:
            judge.threshold = args.threshold

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from trl_safety.data import TASK_TEST_SPLITS, load_task_dataset
    from trl_safety.eval import TaskSet, evaluation

    template = args.template or protocol.template
    template = None if template == "none" else template
    max_new_tokens = args.max_new_tokens or protocol.max_new_tokens
    model, tokenizer, loaded = load_model_and_tokenizer(
        args.model, args.base_model, args.adapter, args.tokenizer, args.dtype, args.device
    )
    report: dict = {
        "model": args.model,
        **loaded,
        "protocol": protocol.to_dict(),
        "template": template,
        "max_new_tokens": max_new_tokens,
        "seconds": {},
    }

    # each part's time counts its data loading, as the report has always measured it
    loading = {}
    prompts = categories = task = None
    if not args.no_harmful_score:
        start = time.perf_counter()
        prompts, categories = load_prompt_set(args, protocol)
        loading["harmful_score"] = time.perf_counter() - start
    if args.task:
        start = time.perf_counter()
        split, size = TASK_TEST_SPLITS[args.task]
        kwargs = {"source": args.task_data} if args.task_data else {}
        dataset = load_task_dataset(args.task, args.task_split or split, template=template, **kwargs)
        # the papers take the first `size` rows ("first 1000" of SST2's 872 validation rows means all of them)
        count = args.num_task_samples if args.num_task_samples is not None else min(size, len(dataset))
        task = TaskSet.from_dataset(args.task, dataset.select(range(count)))  # prompts already templated
        loading["finetune_accuracy"] = time.perf_counter() - start

    result = evaluation.evaluate_model(
        model,
        tokenizer,
        harmful_prompts=prompts,
        judge=judge,
        categories=categories,
        task=task,
        max_new_tokens=max_new_tokens,
        batch_size=args.batch_size,
        prompt_format=template,
        progress=not args.no_progress,
    )
    if result.harmful is not None:
        data = result.harmful.to_dict()
        if args.no_responses:
            data.pop("responses")
        report["harmful_score"] = data
        print(
            f"harmful score: {result.harmful_score:.2f}% of {result.harmful.num_prompts} prompts "
            f"(judge: {result.harmful.judge})"
        )
    if result.task is not None:
        data = result.task.to_dict()
        if args.no_responses:
            data.pop("outputs")
        report["finetune_accuracy"] = data
        print(
            f"fine-tune accuracy ({args.task}): {result.finetune_accuracy:.2f}% of {len(result.task.correct)} samples"
        )
    for part, seconds in result.seconds.items():
        report["seconds"][part] = round(loading[part] + seconds, 3)

    output = args.output or (os.path.join(args.model, "eval_report.json") if os.path.isdir(args.model) else None)
    if output is None:
        output = "eval_report.json"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"report written to {output}")
    return 0


if __name__ == "__main__":
    from trl_safety.cli.main import run_command

    sys.exit(run_command(run, sys.argv[1:], prog="trl-safety eval", command="eval"))
