"""`trl-safety prune`: repair a fine-tuned model or adapter with a post-fine-tuning defense.

```bash
# Antidote: prune the fine-tuning LoRA adapter on harmful calibration data
trl-safety prune --defense antidote --model_name_or_path sft-run/ --harmful_dataset_name data/harmful.jsonl \
    --prune_ratio 0.1 --output_dir sft-run-antidote

# the same from a recipe (every flag is a YAML key, `defense:` included); flags after it override the file
trl-safety prune --defense antidote --config recipes/antidote/gsm8k_prune.yaml

# SafeLoRA: project the adapter onto the alignment subspace (aligned = base + merged alignment adapter)
trl-safety prune --defense safelora --model_name_or_path sft-run/ --base_model meta-llama/Llama-2-7b-hf \
    --aligned_model vaccine-aligned/ --num_proj_layers 10 --output_dir sft-run-safelora

# LoX (before fine-tuning): extrapolate the alignment adapter (or a dense aligned model with --base_model)
trl-safety prune --defense lox --model_name_or_path vaccine-aligned/ --rank 6 --alpha 0.5 --output_dir aligned-lox

# SafeMERGE: merge the adapter with a safety adapter where it leaves the alignment subspace
trl-safety prune --defense safemerge --model_name_or_path sft-run/ --safety_adapter safety-adapter/ \
    --base_model meta-llama/Llama-2-7b-hf --aligned_model vaccine-aligned/ --output_dir sft-run-safemerge

# Safe Delta: keep the fine-tuning deltas within a safety budget (a dense model; an adapter input is merged)
trl-safety prune --defense safe-delta --model_name_or_path sft-run-full/ --aligned_model aligned/ \
    --alignment_dataset_name data/safe_answers.jsonl --scale 0.11 --output_dir sft-run-safe-delta
```

A `--model_name_or_path` folder holding `adapter_config.json` is a PEFT adapter: it is loaded on its base model (the one recorded
in the adapter config, or `--adapter_base_model`) and the repaired adapter is saved. Any other folder or Hub id is
loaded as a full model and saved whole (so is an adapter that the repair merges: Safe Delta). The output folder also gets `defense_config.json`, a model card, and the
defense's statistics (`antidote_mask_stats.json`, `safelora_stats.json`, `safe_delta_stats.json`). `--model` is an old spelling of
`--model_name_or_path`, still accepted (not listed in `--help`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field

from trl_safety.cli.checks import (
    UsageError,
    check_adapter_base,
    check_dataset_fields,
    check_defense,
    check_model,
    parse_or_usage,
)


@dataclass
class PruneArguments:
    """Script arguments of `trl-safety prune` (the defense's own config adds its hyperparameters)."""

    model_name_or_path: str = field(
        metadata={"help": "Fine-tuned model (folder or Hub id), or a PEFT adapter folder, loaded on its base model."}
    )
    output_dir: str = field(metadata={"help": "Where to save the repaired model or adapter."})
    adapter_base_model: str | None = field(
        default=None,
        metadata={"help": "Base model to load a PEFT adapter on (default: the one recorded in adapter_config.json)."},
    )
    base_model: str | None = field(
        default=None, metadata={"help": "SafeLoRA, LoX, SafeMERGE: the unaligned base model (folder or Hub id)."}
    )
    aligned_model: str | None = field(
        default=None,
        metadata={
            "help": "SafeLoRA, SafeMERGE: the aligned model (folder or Hub id), or an alignment-adapter folder, which is merged "
            "onto --base_model."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype to load with.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    device: str | None = field(
        default=None, metadata={"help": "Device for the repair (default: cuda when available, else cpu)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship custom code."})


# the flags naming a model: each takes a folder, a Hub id or an alias (`smollm2`)
MODEL_FLAGS = ("model_name_or_path", "adapter_base_model", "base_model", "aligned_model")


def _post_fine_tuning_names() -> list[str]:
    from trl_safety.registry import list_defenses

    # post-hoc repairs of every stage: LoX is a training-free edit of the aligned model (alignment stage)
    return [spec.name for spec in list_defenses() if spec.post_hoc is not None]


def _load_tokenizer(*sources: str | None):
    from transformers import AutoTokenizer

    for source in sources:
        if source is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    return None


def load_model_for_repair(args: PruneArguments):
    """Load `args.model_name_or_path` (full model, or adapter on its base). Returns `(model, tokenizer, is_adapter, base_name)`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    is_adapter = os.path.isfile(os.path.join(args.model_name_or_path, "adapter_config.json"))
    if is_adapter:
        from peft import PeftConfig, PeftModel

        base_name = (
            args.adapter_base_model or PeftConfig.from_pretrained(args.model_name_or_path).base_model_name_or_path
        )
        if base_name is None:
            raise SystemExit(f"{args.model_name_or_path} does not record its base model; pass --adapter_base_model.")
        base = AutoModelForCausalLM.from_pretrained(base_name, **kwargs)
        model = PeftModel.from_pretrained(base, args.model_name_or_path, is_trainable=False)
        tokenizer = _load_tokenizer(args.model_name_or_path, base_name)
    else:
        base_name = args.model_name_or_path
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
        tokenizer = _load_tokenizer(args.model_name_or_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer, is_adapter, base_name


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None), list, dict)) else str(value)


def save_repaired(model, tokenizer, spec, config, args: PruneArguments, is_adapter: bool, base_name: str) -> None:
    """Save the model or adapter with `defense_config.json` and a model card naming the defense."""
    from trl_safety.core.card import DEFENSE_CONFIG_NAME, build_model_card
    from trl_safety.models import recorded_base_model

    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    datasets = {}
    if getattr(config, "harmful_dataset_name", None):
        datasets["harmful dataset"] = config.harmful_dataset_name
    for role in ("base_model", "aligned_model"):
        if getattr(args, role):
            datasets[role.replace("_", " ")] = getattr(args, role)
    info = {
        "defense": spec.name,
        "title": spec.title,
        "stage": spec.stage,
        "trainer": f"trl-safety prune --defense {spec.name}",
        "hyperparameters": {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)},
        "datasets": datasets,
        "paper": dict(spec.paper),
        "base_model": recorded_base_model(base_name),
        "is_adapter": is_adapter,
        "repaired_model": args.model_name_or_path,
        "licence_notes": list(spec.licence_notes),
    }
    with open(os.path.join(args.output_dir, DEFENSE_CONFIG_NAME), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
    card = build_model_card(info, model_name=os.path.basename(os.path.normpath(args.output_dir)))
    card.save(os.path.join(args.output_dir, "README.md"))


def check_prune_arguments(args: PruneArguments, config) -> None:
    """The models and datasets the repair names can be found, before anything is loaded."""
    check_model(args.model_name_or_path, "--model_name_or_path")
    check_adapter_base(args.model_name_or_path, args.adapter_base_model, "--adapter_base_model")
    for flag in MODEL_FLAGS[1:]:
        check_model(getattr(args, flag), f"--{flag}")
    for f in dataclasses.fields(config):  # an adapter folder the defense reads (SafeMERGE's --safety_adapter)
        value = getattr(config, f.name)
        if f.name.endswith("_adapter") and isinstance(value, str):
            if not os.path.isfile(os.path.join(value, "adapter_config.json")):
                raise UsageError(f"--{f.name} {value!r}: not a PEFT adapter folder (no adapter_config.json there).")
    check_dataset_fields(config)


def _old_spellings(argv: list[str]) -> list[str]:
    """`--model` (the old spelling, still in some commands) read as `--model_name_or_path`."""
    renamed = []
    for arg in argv:
        if arg == "--model" or arg.startswith("--model="):
            arg = "--model_name_or_path" + arg[len("--model") :]
        renamed.append(arg)
    return renamed


def run(argv: list[str], prog: str = "trl-safety prune", command: str | None = "prune") -> int:
    from trl_safety.cli.recipe import (
        apply_config,
        check_flags,
        load_config_file,
        pop_config_path,
        reject_unknown_flags,
        trl_parser,
    )
    from trl_safety.cli.train import _pop_defense
    from trl_safety.core.layers import is_peft_model
    from trl_safety.models import resolve_model_fields
    from trl_safety.registry import get_defense

    defense, rest = _pop_defense(_old_spellings(argv))
    config_path, rest = pop_config_path(rest)
    file_config = load_config_file(config_path)
    defense = defense or file_config.pop("defense", None)  # the command line wins, as for every other key
    file_config.pop("defense", None)
    names = _post_fine_tuning_names()
    if defense is None:
        usage = (
            f"usage: {prog} --defense {{{','.join(names)}}} --model_name_or_path PATH --output_dir OUT "
            "[--config FILE] [defense options]"
        )
        if "-h" in rest or "--help" in rest:
            print(f"{usage}\n\nRun `{prog} --defense NAME --help` for the options of a defense.")
            return 0
        raise UsageError(f"choose a post-fine-tuning defense with --defense ({', '.join(names)}).")
    check_defense(defense, ("post-fine-tuning",), command or "prune")
    spec = get_defense(defense)
    if spec.post_hoc is None:
        right = "align" if spec.stage == "alignment" else "sft"
        raise UsageError(
            f"defense {defense!r} runs at the {spec.stage} stage; use `trl-safety {right}`. "
            f"`{prog}` runs: {', '.join(names)}."
        )

    parser = trl_parser((PruneArguments, spec.config_class), prog=f"{prog} --defense {defense}")
    if config_path is not None:
        apply_config(parser, file_config, config_path, also_valid=("defense",))
    check_flags(rest, parser)
    args, config, remaining = parse_or_usage(parser.parse_args_into_dataclasses, rest, return_remaining_strings=True)
    reject_unknown_flags(remaining, parser)
    check_prune_arguments(args, config)
    resolve_model_fields(args, MODEL_FLAGS)
    model, tokenizer, is_adapter, base_name = load_model_for_repair(args)

    kwargs = {"processing_class": tokenizer, "base_model": args.base_model, "aligned_model": args.aligned_model}
    if "output_dir" in inspect.signature(spec.post_hoc).parameters:
        kwargs["output_dir"] = args.output_dir
    try:
        model = spec.post_hoc(model, config, **kwargs)
    except ValueError as error:  # a repair's ValueError names the input or flag that fixes it: a user mistake
        raise UsageError(f"{spec.name}: {error}") from error
    # a repair that merges an adapter (Safe Delta: the selection breaks the low-rank structure) returns a dense model
    is_adapter = is_adapter and is_peft_model(model)
    save_repaired(model, tokenizer, spec, config, args, is_adapter, base_name)
    print(f"{spec.name}: repaired {'adapter' if is_adapter else 'model'} saved to {args.output_dir}.")
    return 0
