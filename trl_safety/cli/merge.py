"""`trl-safety merge`: merge a PEFT (LoRA) adapter into its base model and save the full model (safetensors).

The step between the stages of the Double-LoRA pipeline: the alignment adapter is merged, and the fine-tuning stage
trains a fresh adapter on the merged model.

```bash
trl-safety align --defense vaccine --model_name_or_path meta-llama/Llama-2-7b-hf --dataset_name refusals.jsonl \
    --use_peft --lora_r 8 --output_dir vaccine-aligned
trl-safety merge --model_name_or_path vaccine-aligned --output_dir vaccine-aligned-merged
trl-safety sft --defense lisa --model_name_or_path vaccine-aligned-merged ...
```

The base model is the one recorded in the adapter's `adapter_config.json` (or `--adapter_base_model`, the flag of
`trl-safety prune`). The tokenizer saved beside the adapter (else the base's) is saved with the merged model, so the
output folder loads with `AutoModelForCausalLM` / `AutoTokenizer` as any model does. Weights are written as
safetensors only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl_safety.cli.checks import UsageError, check_adapter_base, check_model, parse_or_usage


@dataclass
class MergeArguments:
    """Arguments of `trl-safety merge`."""

    model_name_or_path: str = field(metadata={"help": "PEFT adapter folder (holding adapter_config.json) to merge."})
    output_dir: str = field(metadata={"help": "Where to save the merged model and its tokenizer."})
    adapter_base_model: str | None = field(
        default=None,
        metadata={"help": "Base model to merge the adapter into (default: the one recorded in adapter_config.json)."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weight dtype to load and save with (`auto`: the base model's).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship custom code."})


def check_merge_arguments(args: MergeArguments) -> None:
    """The adapter folder and its base can be found, before any weight loads."""
    check_model(args.model_name_or_path, "--model_name_or_path")
    if not os.path.isfile(os.path.join(args.model_name_or_path, "adapter_config.json")):
        raise UsageError(
            f"--model_name_or_path {args.model_name_or_path!r} holds no adapter_config.json: it is not a PEFT "
            "adapter folder (a full model needs no merge)."
        )
    check_adapter_base(args.model_name_or_path, args.adapter_base_model, "--adapter_base_model")
    check_model(args.adapter_base_model, "--adapter_base_model")


def merge_adapter(args: MergeArguments) -> None:
    """Load the base, apply the adapter, `merge_and_unload`, save model (safetensors) and tokenizer."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_name = args.adapter_base_model or PeftConfig.from_pretrained(args.model_name_or_path).base_model_name_or_path
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype, trust_remote_code=args.trust_remote_code)
    merged = PeftModel.from_pretrained(base, args.model_name_or_path, is_trainable=False).merge_and_unload()
    merged.save_pretrained(args.output_dir, safe_serialization=True)
    for source in (args.model_name_or_path, base_name):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError):  # no tokenizer saved there: try the next source
            continue
        tokenizer.save_pretrained(args.output_dir)
        break


def run(argv: list[str], prog: str = "trl-safety merge", command: str | None = "merge") -> int:
    from trl_safety.cli.recipe import (
        apply_config,
        check_flags,
        load_config_file,
        pop_config_path,
        reject_unknown_flags,
        trl_parser,
    )
    from trl_safety.models import resolve_model_fields

    parser = trl_parser(MergeArguments, prog=prog, description=__doc__.split("\n\n")[0])
    config_path, rest = pop_config_path(argv)
    if config_path is not None:
        apply_config(parser, load_config_file(config_path), config_path)
    check_flags(rest, parser)
    args, remaining = parse_or_usage(parser.parse_args_into_dataclasses, rest, return_remaining_strings=True)
    reject_unknown_flags(remaining, parser)
    check_merge_arguments(args)
    resolve_model_fields(args, ("adapter_base_model",))
    merge_adapter(args)
    print(f"Merged {args.model_name_or_path} into its base model; saved to {args.output_dir}.")
    return 0
