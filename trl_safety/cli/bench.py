"""`trl-safety bench`: align → poisoned fine-tuning → repair → evaluate, for every registered defense.

```bash
trl-safety bench                                  # the toy world on CPU, every defense, p=0.1, 3 seeds (minutes)
trl-safety bench --defenses vaccine lisa --sweep 0 0.05 0.1 0.2 --output_dir bench-out
# the papers' protocol (docs/design/algorithms.md §6.5) on a GPU: Llama-2-7B, RepNoise refusals, BeaverTails, SST2, beaver-dam
trl-safety bench --model_name_or_path meta-llama/Llama-2-7b-hf --task sst2 --judge beaver-dam --output_dir bench-llama2
# the toy world's data through a real pretrained model (its chat template, LoRA), CPU scale (benchmarks/README.md)
trl-safety bench --model_name_or_path smollm2 --defenses vaccine lisa antidote --output_dir bench-smollm2
```

Every row runs with `--num_seeds` seeds (default 3) and reports mean ± std. Writes `results.json`, `tradeoff.png`
and `curves.png` into `--output_dir` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings

from trl_safety.cli.checks import OneLineArgumentParser, UsageError, check_dataset, check_judge, check_model
from trl_safety.cli.recipe import parse_args_with_config


# One listed spelling per option, TRL's underscores (`--model_name_or_path`, as `sft`/`align`/`prune`/`merge`).
# Flags whose name differs from the BenchConfig field (each field's help is in its metadata):
PRIMARY = {"model": "model_name_or_path"}
# Old spellings still accepted, not listed in --help, because documented commands use them: every field's dashed form
# (`--output-dir`), `--model`, `--steps` / `--lr`, `--no-progress`
ALIASES = {"steps": "finetune_steps", "lr": "finetune_lr"}
# The real-model mode's dataset flags; with `--data toy` (the toy world's rows through a real model) they are refused
PAPER_DATA_FIELDS = (
    "alignment_dataset", "alignment_dataset_config", "harmful_dataset", "harmful_dataset_config", "eval_dataset",
    "task", "task_dataset", "template",
)  # fmt: skip


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "0") else int(value)


def make_parser(prog: str = "trl-safety bench") -> argparse.ArgumentParser:
    from trl_safety.bench import BenchConfig

    parser = OneLineArgumentParser(
        prog=prog,
        description="Align, attack with poisoned fine-tuning, defend and evaluate every registered defense. "
        "Runs the embedded toy world on CPU by default; --model_name_or_path switches to a real model. Every option "
        "is also a key of a YAML --config file (`model_name_or_path: ...`); flags override the file.",
    )
    parser.add_argument("--config", default=None, help="YAML file of options (keys: the option names below).")
    reverse_alias = {v: k for k, v in ALIASES.items()}
    for f in dataclasses.fields(BenchConfig):
        if f.name == "progress":
            continue
        primary = f"--{PRIMARY.get(f.name, f.name)}"
        names = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
        if f.name in reverse_alias:
            names |= {f"--{reverse_alias[f.name]}"}
        kwargs = dict(default=argparse.SUPPRESS, dest=f.name, help=f.metadata.get("help", ""))
        kind = str(f.type)
        if f.name in ("defenses", "lora_target_modules"):
            kwargs.update(nargs="+")
        elif f.name in ("sweep", "calibration_ratios"):
            kwargs.update(nargs="+", type=float)
        elif f.name == "seeds":
            kwargs.update(nargs="+", type=int)
        elif "bool" in kind:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif f.name in ("align_steps", "finetune_steps", "base_pretrain_steps", "num_threads"):
            kwargs.update(type=_optional_int)
        elif "int" in kind:
            kwargs.update(type=int)
        elif "float" in kind:
            kwargs.update(type=float)
        if f.name == "lora_mode":
            kwargs.update(choices=["double", "single"])
        if f.name == "data":
            kwargs.update(choices=["toy", "papers"])
        default = f.default if f.default is not dataclasses.MISSING else None
        if kwargs["help"] is not None and default is not None:
            kwargs["help"] = (kwargs["help"] + f" (toy default: {default})").strip()
        parser.add_argument(primary, **kwargs)
        hidden = sorted(names - {primary})
        if hidden:
            parser.add_argument(*hidden, **{**kwargs, "help": argparse.SUPPRESS})
    parser.add_argument("--no_progress", dest="progress", action="store_false", default=True, help="No progress bar.")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="Show INFO logs of the pipeline and the defenses.")
    return parser


def config_from_args(args: argparse.Namespace):
    from trl_safety.bench import BenchConfig, real_defaults
    from trl_safety.bench.config import REAL_MODEL_TOY_DATA, resolve_data

    given = {k: v for k, v in vars(args).items() if k not in ("verbose", "config")}
    if given.get("defenses"):
        given["defenses"] = [d for item in given["defenses"] for d in item.split(",") if d]
    if given.get("lora_target_modules") and len(given["lora_target_modules"]) == 1:
        given["lora_target_modules"] = given["lora_target_modules"][0]
    values = {}
    if given.get("model"):
        # toy data through a real model: the CPU scale (the toy world's training settings otherwise)
        toy_data = resolve_data(given["model"], given.get("data")) == "toy"
        values = dict(REAL_MODEL_TOY_DATA) if toy_data else real_defaults()
    values.update(given)
    return BenchConfig(**values)


def check_bench_config(config) -> None:
    """Defenses, judge, model and datasets can be found, before the pipeline starts (a toy run takes minutes)."""
    if config.defenses is not None:
        from trl_safety.registry import list_defenses

        known = {s.name for s in list_defenses()} | {"sft", "no-alignment"}
        unknown = sorted(set(config.defenses) - known)
        if unknown:
            raise UsageError(f"unknown defenses {unknown}; registered: {', '.join(sorted(known))}.")
    if config.toy and config.data == "papers":
        raise UsageError("--data papers needs a real model: give --model_name_or_path (e.g. smollm2 or a Hub id).")
    if not config.toy and config.toy_data:
        given = [f"--{name}" for name in PAPER_DATA_FIELDS if getattr(config, name) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} select the papers' data, but this run uses the toy world's (--data toy, the "
                "default for smollm2): drop them, or pass --data papers."
            )
        if config.base_pretrain_steps is not None:
            raise UsageError("--base_pretrain_steps sets the toy base model's recipe; a real model is not pretrained.")
    if not config.toy and not config.toy_data:
        check_model(config.model, "--model_name_or_path")
        for name in ("alignment_dataset", "harmful_dataset", "eval_dataset", "task_dataset"):
            check_dataset(getattr(config, name), f"--{name}")
    check_judge(config.judge)


def run(argv: list[str], prog: str = "trl-safety bench", command: str | None = "bench") -> int:
    parser = make_parser(prog)
    args = parse_args_with_config(parser, argv)
    level = logging.INFO if args.verbose else logging.WARNING
    for name in ("HF_HUB_DISABLE_TELEMETRY", "TOKENIZERS_PARALLELISM"):
        os.environ.setdefault(name, "1" if name.startswith("HF") else "false")
    config = config_from_args(args)
    check_bench_config(config)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")

    from trl_safety.bench import format_table, run_bench

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' checkpointing-flag rename, per config
    if config.toy:
        from trl_safety.bench import toy_recipe
        from trl_safety.toy.model import WORLD_FILE, base_model_path

        path = base_model_path(config.cache_dir, config.world_seed, toy_recipe(config))
        if not os.path.exists(os.path.join(path, WORLD_FILE)):
            print(f"Pretraining the toy base model once (about a minute); it is cached in {path}.", file=sys.stderr)
    results = run_bench(config)
    print(format_table(results))
    print(f"\nWrote {os.path.join(config.output_dir, 'results.json')}")
    if results.get("plot"):
        print(f"Wrote {results['plot']}")
        if results.get("curves_plot"):
            print(f"Wrote {results['curves_plot']}")
    else:
        print("tradeoff.png not written: matplotlib is missing (pip install 'trl-safety[plot]').")
    if results["errors"]:
        print("\nFailed rows:\n" + json.dumps(results["errors"], indent=2), file=sys.stderr)
        return 1
    return 0
