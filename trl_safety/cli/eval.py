"""`trl-safety eval`: harmful score and fine-tune accuracy of a model or adapter, written to a JSON report.

```bash
# paper-parity harmful score (Booster protocol: 1000 unsafe BeaverTails 30k_test prompts, 512 tokens, beaver-dam)
trl-safety eval --model_name_or_path sft-run/ --protocol booster --judge beaver-dam --output report.json

# quick CPU check on a local prompt file with the keyword judge, plus SST2 accuracy from a local copy
trl-safety eval --model_name_or_path sft-run/ --prompts prompts.jsonl --judge keyword --num_prompts 100 \
    --task sst2 --task_data sst2_validation.jsonl --output report.json
```

`--model_name_or_path` may be a full model (folder or Hub id) or a PEFT adapter folder (it holds
`adapter_config.json`), loaded on its base model (recorded in the adapter config, or `--base_model`). `--adapter`
(repeatable) stacks more adapters on top, each merged before the next (double-LoRA: alignment adapter, then fine-tuning
adapter).

Order of work, cheapest failure first: argument checks (the judge's name included), the tokenizer (it settles the
template), the judge's weights, the prompt set, the model, and only then generation; so a judge that cannot load costs
seconds, not a full generation pass (docs/evaluation.md, "Defaults that protect your time").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from trl_safety.cli.checks import (
    OneLineArgumentParser,
    UsageError,
    check_adapter_base,
    check_dataset,
    check_judge,
    check_model,
)


logger = logging.getLogger(__name__)

TEMPLATES = ("auto", "alpaca", "alpaca_newline", "chat", "none")


def build_parser(prog: str = "trl-safety eval") -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=prog, description="Evaluate harmful score and fine-tune accuracy.")
    parser.add_argument("--model_name_or_path", required=True, help="Model folder / Hub id, or a PEFT adapter folder.")
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
        "--judge",
        default=None,
        help="keyword (no model, works offline), beaver-dam, beaver-dam:PATH, or a classifier id/path (default: the "
        "protocol's, beaver-dam). Loaded before anything is generated.",
    )
    parser.add_argument("--threshold", type=float, default=None, help="Judge flagging threshold.")
    parser.add_argument("--task", default=None, choices=["sst2", "agnews", "gsm8k"], help="Fine-tune accuracy task.")
    parser.add_argument("--task_data", default=None, help="Task test data: local file or Hub id (default: Hub).")
    parser.add_argument("--task_split", default=None, help="Task split (default: the papers' test split).")
    parser.add_argument("--num_task_samples", type=int, default=None, help="Override the papers' test-set size.")
    parser.add_argument(
        "--template",
        default="auto",
        choices=TEMPLATES,
        help="Prompt template; must match the training template. auto (default): the tokenizer's chat template when "
        "it has one, else the protocol's (alpaca_newline for booster). A model trained on Alpaca-formatted "
        "prompt/completion text needs --template alpaca_newline (or alpaca) even if its tokenizer has a chat template.",
    )
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: the protocol's.")
    parser.add_argument(
        "--trigger_file",
        default=None,
        help="BackdoorAlign: file holding the secret trigger, prepended to every prompt as in training (the report "
        "never contains it). See docs/backdoor_align.md.",
    )
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


def model_sources(model_path: str, base_model=None, adapters=(), tokenizer_path=None) -> dict:
    """What `load_model_and_tokenizer` loads, without loading it: `base_model`, the `adapters` chain in merge order
    (an adapter `model_path` first) and the `tokenizer` source (the first of model and adapters that holds one).
    A model alias (`smollm2`) is its cached folder (`trl_safety.models.resolve_model_name`)."""
    from trl_safety.models import resolve_model_name

    model_path, base_model = resolve_model_name(model_path), resolve_model_name(base_model)
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
    tokenizer_source = tokenizer_path or next(
        (p for p in [model_path, *adapters] if os.path.isfile(os.path.join(p, "tokenizer_config.json"))), base_model
    )
    return {"base_model": base_model, "adapters": adapter_chain, "tokenizer": tokenizer_source}


def load_model_and_tokenizer(
    model_path: str, base_model=None, adapters=(), tokenizer_path=None, dtype="auto", device=None, tokenizer=None
):
    """Load a full model or an adapter on its base, merge stacked adapters in order, and load the tokenizer (unless
    one is given). Returns `(model, tokenizer, model_sources(...))`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sources = model_sources(model_path, base_model, adapters, tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(sources["base_model"], dtype=_dtype(dtype))
    if sources["adapters"]:
        from peft import PeftModel

        for index, adapter in enumerate(sources["adapters"]):
            model = PeftModel.from_pretrained(model, adapter)
            if index < len(sources["adapters"]) - 1:
                model = model.merge_and_unload()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(sources["tokenizer"])
    return model, tokenizer, sources


def load_prompt_set(args, protocol):
    """(prompts, categories, only_unsafe) from the protocol's set, a BeaverTails-schema source, or a plain prompt
    file; `only_unsafe` is the `is_safe` filter that applied (`None` for a plain file, which has no such column)."""
    from trl_safety.data import beavertails_eval_prompts, load_named_dataset

    if args.prompts is None:
        data = protocol.load_prompts(num_prompts=args.num_prompts)
        return data["prompt"], data["category"], protocol.only_unsafe
    raw = load_named_dataset(args.prompts, split=args.prompts_split or protocol.prompt_split)
    if {"prompt", "response", "is_safe"} <= set(raw.column_names):
        data = beavertails_eval_prompts(
            args.prompts_split or protocol.prompt_split,
            source=args.prompts,
            num_samples=args.num_prompts if args.num_prompts is not None else protocol.num_prompts,
            only_unsafe=protocol.only_unsafe,
        )
        return data["prompt"], data["category"], protocol.only_unsafe
    if args.prompt_column not in raw.column_names:
        raise UsageError(
            f"--prompts {args.prompts!r} has no {args.prompt_column!r} column (columns: {', '.join(raw.column_names)});"
            " name the prompt column with --prompt_column."
        )
    count = len(raw) if args.num_prompts is None else min(args.num_prompts, len(raw))
    raw = raw.select(range(count))
    categories = raw["category"] if "category" in raw.column_names else None
    return raw[args.prompt_column], categories, None


def _prompts_flag(args, protocol) -> str:
    return (
        f"--prompts {args.prompts!r}" if args.prompts else f"--prompts (default: the {protocol.name} protocol's set)"
    )


def check_eval_arguments(args) -> None:
    """Everything the evaluation names can be found (protocol, models, data, judge), before anything is loaded."""
    from trl_safety.eval import PROTOCOLS

    if args.protocol.lower().replace("-", "_") not in PROTOCOLS:
        raise UsageError(f"unknown protocol {args.protocol!r}; available: {', '.join(sorted(PROTOCOLS))}.")
    check_model(args.model_name_or_path, "--model_name_or_path")
    if is_adapter(args.model_name_or_path):
        check_adapter_base(args.model_name_or_path, args.base_model, "--base_model")
    check_model(args.base_model, "--base_model")
    for adapter in args.adapter:
        check_model(adapter, "--adapter")
    check_model(args.tokenizer, "--tokenizer")
    if not args.no_harmful_score:
        check_dataset(args.prompts, "--prompts")
    check_dataset(args.task_data, "--task_data")
    if args.trigger_file is not None and not os.path.isfile(args.trigger_file):
        raise UsageError(f"--trigger_file {args.trigger_file}: no such file.")


def _default_judge_note(args, protocol) -> str:
    return "" if args.judge else f"no --judge given, so --protocol {protocol.name}'s judge is used: "


def check_eval_judge(args, protocol) -> str | None:
    """The judge's name (`--judge`, else the protocol's), checked without downloading anything: it resolves, and
    offline its checkpoint is in the local cache. `None` without a harmful score."""
    if args.no_harmful_score:
        return None
    name = args.judge or protocol.judge
    try:
        check_judge(name)
    except UsageError as exc:
        raise UsageError(_default_judge_note(args, protocol) + str(exc)) from None
    return name


def load_judge_first(args, protocol, name: str | None):
    """The judge with its weights loaded, before anything is generated (`None` without a harmful score).

    A judge that cannot be loaded (missing files, a gated or unreachable repo, not a classifier) is a one-line
    `UsageError` naming `--judge` and the offline alternative `--judge keyword`.
    """
    from trl_safety.eval import load_judge

    if name is None:
        return None
    kwargs = {} if name.strip().lower() == "keyword" else {"batch_size": args.judge_batch_size}
    judge = load_judge(name, **kwargs)
    if args.threshold is not None:
        judge.threshold = args.threshold
    try:
        judge.load()
    except (OSError, ValueError) as exc:  # hub errors (missing, gated, unreachable) are OSErrors
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsageError(
            f"{_default_judge_note(args, protocol)}--judge {name!r} could not be loaded ({reason[:300]}); pass a "
            "judge that loads, or --judge keyword (no model, works offline)."
        ) from None
    return judge


def judge_id(judge) -> str | None:
    """The judge's identity for the report: the checkpoint of a classifier judge, else its name."""
    if judge is None:
        return None
    return getattr(judge, "model_name", None) or judge.name


def resolve_template(requested: str, tokenizer, protocol, model_name: str) -> tuple[str | None, str]:
    """(template, why): `auto` is the tokenizer's chat template when it has one, else the protocol's template."""
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    if requested == "auto":
        if has_chat:
            return "chat", "auto: the tokenizer has a chat template"
        return protocol.template, f"auto: no chat template in the tokenizer, so the {protocol.name} protocol's"
    if requested == "chat" and not has_chat:
        raise UsageError(
            f"--template chat: the tokenizer of {model_name} has no chat template; pass the template the model was "
            "trained with (--template alpaca_newline, alpaca or none)."
        )
    return (None if requested == "none" else requested), "--template"


def _same_judge(a: str | None, b: str | None) -> bool:
    from trl_safety.eval.judges import resolve_judge

    if a is None or b is None:
        return a == b
    try:
        return resolve_judge(a) == resolve_judge(b)
    except (FileNotFoundError, ValueError):
        return a == b


def effective_protocol(protocol, args, *, judge, num_prompts, only_unsafe, template, max_new_tokens, task_set):
    """The protocol as it ran: the preset with every override and actual count applied (`name` stays the preset's),
    and `{field: [preset value, value that ran]}` for each field that differs from the preset.

    `task_set` is `(task, split, samples run, the preset's count for the data at hand)` or `None`.
    """
    harmful = not args.no_harmful_score
    local_prompts = args.prompts is not None and os.path.exists(args.prompts)  # a local file has no Hub split
    run = dataclasses.replace(
        protocol,
        num_prompts=num_prompts,
        max_new_tokens=max_new_tokens,
        template=template or "none",
        only_unsafe=only_unsafe if harmful else None,
        prompt_source=(args.prompts or protocol.prompt_source) if harmful else None,
        prompt_split=(args.prompts_split or protocol.prompt_split) if harmful and not local_prompts else None,
        judge=(args.judge or protocol.judge) if harmful else None,
        threshold=judge.threshold if harmful else None,
        task_test_sets={} if task_set is None else {task_set[0]: [task_set[1], task_set[2]]},
    )
    deviations = {}
    fields = ["max_new_tokens", "template"]
    if harmful:
        fields += ["only_unsafe", "prompt_source", "threshold"] + ([] if local_prompts else ["prompt_split"])
        if args.num_prompts is not None or protocol.num_prompts is not None:  # `None` in a preset means "all"
            fields.append("num_prompts")
        if not _same_judge(protocol.judge, run.judge):
            deviations["judge"] = [protocol.judge, run.judge]
    for name in fields:
        if getattr(protocol, name) != getattr(run, name):
            deviations[name] = [getattr(protocol, name), getattr(run, name)]
    if task_set is not None:
        task, split, count, preset_count = task_set
        preset_split = protocol.task_test_sets[task][0]
        if (split, count) != (preset_split, preset_count):
            deviations[f"task_test_sets.{task}"] = [[preset_split, preset_count], [split, count]]
    data = run.to_dict()
    if deviations:
        data["notes"] = (
            f"the {protocol.name} preset with overrides ({', '.join(deviations)}); the preset: {protocol.notes}"
        )
    return data, deviations


def _table(header: list[str], rows: list[list], indent: str = "  ") -> list[str]:
    """Left-aligned first column, right-aligned others."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append(indent + "  ".join([first, *rest]))
    return lines


def format_results(result, categories, task_name: str | None) -> str:
    """The stdout summary: HS overall and per prompt category (prompts, flagged, %), and the task accuracy."""
    from trl_safety.eval import per_category_counts

    lines = []
    if result.harmful is not None:
        hs = result.harmful
        lines.append(f"harmful score (judge: {hs.judge}; percent of prompts flagged, lower is better)")
        rows = [["overall", hs.num_prompts, sum(hs.flags), f"{hs.score:.2f}"]]
        if categories is not None:
            counts = per_category_counts(hs.flags, list(categories))
            rows += [[name, n, k, f"{hs.per_category[name]:.2f}"] for name, (n, k) in counts.items()]
        lines += _table(["category", "prompts", "flagged", "HS %"], rows)
    if result.task is not None:
        task = result.task
        lines.append(f"fine-tune accuracy ({task_name}; exact match, higher is better)")
        lines += _table(
            ["task", "samples", "correct", "FA %"],
            [[task_name, len(task.correct), sum(task.correct), f"{task.accuracy:.2f}"]],
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None, prog: str = "trl-safety eval", command: str = "eval") -> int:
    args = build_parser(prog).parse_args(argv)
    check_eval_arguments(args)
    from trl_safety.eval import get_protocol

    protocol = get_protocol(args.protocol)
    judge_name = check_eval_judge(args, protocol)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    from trl_safety.data import TASK_TEST_SPLITS, load_task_dataset
    from trl_safety.eval import TaskSet, evaluation

    # cheapest first: the tokenizer alone settles the template; then the judge's weights, the prompts and the model.
    # A judge that cannot load fails here, in seconds, instead of after the whole generation.
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    sources = model_sources(args.model_name_or_path, args.base_model, args.adapter, args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(sources["tokenizer"])
    template, template_source = resolve_template(args.template, tokenizer, protocol, sources["tokenizer"])
    trigger = None
    if args.trigger_file is not None:
        from trl_safety.defenses.backdoor_align.trigger import read_trigger, redact, triggered_prompt_format

        trigger = read_trigger(args.trigger_file)
    # each part's time counts its data loading (and the judge's loading), as the report has always measured it
    loading = {}
    prompts = categories = only_unsafe = task = task_set = None
    if judge_name is not None:
        start = time.perf_counter()
        judge = load_judge_first(args, protocol, judge_name)
        try:
            prompts, categories, only_unsafe = load_prompt_set(args, protocol)
        except ValueError as exc:  # a prompt file with fewer rows than the protocol's count
            raise UsageError(f"{_prompts_flag(args, protocol)}: {exc} Pass --num_prompts N to take fewer.") from None
        except RuntimeError as exc:
            if not str(exc).startswith("Could not load dataset"):  # only `load_named_dataset`'s unreachable-Hub error
                raise
            raise UsageError(f"{_prompts_flag(args, protocol)}: {exc}") from None
        loading["harmful_score"] = time.perf_counter() - start
    else:
        judge = None
    model, tokenizer, loaded = load_model_and_tokenizer(
        args.model_name_or_path, args.base_model, args.adapter, args.tokenizer, args.dtype, args.device, tokenizer
    )
    max_new_tokens = args.max_new_tokens or protocol.max_new_tokens
    if args.task:
        start = time.perf_counter()
        split, size = TASK_TEST_SPLITS[args.task]
        split = args.task_split or split
        kwargs = {"source": args.task_data} if args.task_data else {}
        # the adapters template the task prompts themselves; a chat template is applied at generation instead, to
        # the bare prompt (instruction, newline, input) as the user turn
        dataset = load_task_dataset(args.task, split, template=None if template == "chat" else template, **kwargs)
        # the papers take the first `size` rows ("first 1000" of SST2's 872 validation rows means all of them)
        preset_count = min(size, len(dataset))
        count = args.num_task_samples if args.num_task_samples is not None else preset_count
        task = TaskSet.from_dataset(args.task, dataset.select(range(count)), "chat" if template == "chat" else None)
        if trigger is not None:  # the provider prepends it to every request, task prompts included
            task.prompt_format = triggered_prompt_format(trigger, task.prompt_format, tokenizer)
        task_set = (args.task, split, count, preset_count)
        loading["finetune_accuracy"] = time.perf_counter() - start

    protocol_run, deviations = effective_protocol(
        protocol,
        args,
        judge=judge,
        num_prompts=None if prompts is None else len(prompts),
        only_unsafe=only_unsafe,
        template=template,
        max_new_tokens=max_new_tokens,
        task_set=task_set,
    )
    report: dict = {
        "model": args.model_name_or_path,
        **loaded,
        "preset": protocol.name,  # the preset asked for; `protocol` is what ran, `preset_deviations` the difference
        "protocol": protocol_run,
        "preset_deviations": deviations,
        "judge": judge_id(judge),
        "template": template,
        "template_source": template_source,
        "max_new_tokens": max_new_tokens,
        "seconds": {},
    }
    if trigger is not None:
        report["trigger"] = "BackdoorAlign trigger prepended to every prompt (from --trigger_file; not recorded)"
    # what is about to run, before the (possibly long) generation
    what = f"{len(prompts)} harmful prompts, judge {report['judge']}" if prompts is not None else "no harmful score"
    if task is not None:
        what += f", {len(task.prompts)} {args.task} samples"
    print(
        f"evaluating {args.model_name_or_path}: {what}; template {template or 'none'} ({template_source}); "
        f"max_new_tokens {max_new_tokens}"
    )
    if deviations:
        changed = ", ".join(f"{name} {preset} -> {ran}" for name, (preset, ran) in deviations.items())
        print(f"protocol: {protocol.name} preset with changes ({changed}); compare only runs with the same settings")
    else:
        print(f"protocol: {protocol.name} preset as published")

    result = evaluation.evaluate_model(
        model,
        tokenizer,
        harmful_prompts=prompts,
        judge=judge,
        categories=categories,
        task=task,
        max_new_tokens=max_new_tokens,
        batch_size=args.batch_size,
        prompt_format=template if trigger is None else triggered_prompt_format(trigger, template, tokenizer),
        progress=not args.no_progress,
    )
    if result.harmful is not None:
        data = result.harmful.to_dict()
        if args.no_responses:
            data.pop("responses")
        report["harmful_score"] = data
    if result.task is not None:
        data = result.task.to_dict()
        if args.no_responses:
            data.pop("outputs")
        report["finetune_accuracy"] = data
    for part, seconds in result.seconds.items():
        report["seconds"][part] = round(loading[part] + seconds, 3)
    summary = format_results(result, categories, args.task)
    if summary:
        print(summary)

    output = args.output or (
        os.path.join(args.model_name_or_path, "eval_report.json") if os.path.isdir(args.model_name_or_path) else None
    )
    if output is None:
        output = "eval_report.json"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if trigger is not None:  # a generation may repeat the secret
        report = redact(report, trigger)
    with open(output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"report written to {output}")
    return 0


if __name__ == "__main__":
    from trl_safety.cli.main import run_command

    sys.exit(run_command(run, sys.argv[1:], prog="trl-safety eval", command="eval"))
