"""Training script behind `trl-safety align` and `trl-safety sft`, shaped like TRL's `trl/scripts/sft.py`.

```bash
# alignment stage (model provider): Vaccine on a local refusal file, LoRA
trl-safety align --defense vaccine --model_name_or_path meta-llama/Llama-2-7b-hf \
    --dataset_name data/refusals.jsonl --use_peft --lora_r 8 --output_dir vaccine-aligned

# merge the alignment adapter, then the fine-tuning stage (service): Lisa on the customer's data, 2 GPUs, ZeRO-2
trl-safety merge --model_name_or_path vaccine-aligned --output_dir vaccine-aligned-merged
trl-safety sft --defense lisa --accelerate_config zero2 --model_name_or_path vaccine-aligned-merged \
    --dataset_name customer.jsonl --alignment_dataset_name data/refusals.jsonl --output_dir lisa-run

# the same from a recipe: every flag is a YAML key, `defense:` included; flags after it override the file
trl-safety sft --config recipes/lisa/sst2_finetune_lora.yaml --max_steps 10
```

The options of `accelerate launch` (e.g. `--num_processes 2`, also as YAML keys) go to accelerate; with any of them,
or with `--accelerate_config`, the script re-launches itself through accelerate, as `trl sft` does. Any other unknown
flag or YAML key is a one-line error naming the closest valid option.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from trl_safety.cli.checks import (
    UsageError,
    check_dataset,
    check_dataset_fields,
    check_defense,
    check_model,
    did_you_mean,
    parse_or_usage,
)
from trl_safety.cli.recipe import (
    apply_config,
    check_flags,
    load_config_file,
    parser_field_names,
    pop_config_path,
    trl_parser,
)


STAGE_OF_COMMAND = {"align": ("alignment",), "sft": ("fine-tuning",)}


@dataclass
class DefenseArguments:
    """`--defense` as a parsed option, so that `--help` shows it and a `--config` file may carry `defense:`."""

    defense: str | None = field(
        default=None,
        metadata={
            "help": "Registered defense to train with (`trl-safety defenses` lists them; the list above shows this "
            "command's). `sft` without it is plain TRL SFT. Also a `defense:` key of the --config file."
        },
    )


def _pop_defense(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--defense NAME` (or `--defense=NAME`) out of argv."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--defense", default=None)
    known, rest = parser.parse_known_args(argv)
    return known.defense, rest


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (the accelerate arguments), keeping everything else in order."""
    remaining = iter(subsequence)
    current = next(remaining, None)
    result = []
    for item in items:
        if current is not None and item == current:
            current = next(remaining, None)
        else:
            result.append(item)
    return result


def _find_accelerate_config(name: str) -> str | None:
    """The path of a config file, or of a profile bundled in `trl_safety/accelerate_configs` (then in TRL's)."""
    if Path(name).is_file():
        return name
    for package in ("trl_safety.accelerate_configs", "trl.accelerate_configs"):
        candidate = resources.files(package).joinpath(f"{name}.yaml")
        if candidate.is_file():
            return str(candidate)
    return None


def bundled_accelerate_profiles(package: str = "trl_safety.accelerate_configs") -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def resolve_accelerate_config(name: str) -> str:
    """A file path, or a profile name shipped in `trl_safety/accelerate_configs` (then in TRL's).

    A profile whose `deepspeed_config_file` is a relative path that does not exist from the current directory (such as
    the bundled `cpu_zero3.yaml` → `cpu_zero3.json`) is resolved against the profile's own folder: a copy of the profile
    with the absolute path is written to a temporary file, whose path is returned, so it launches from any directory.
    """
    path = _find_accelerate_config(name)
    if path is None:
        bundled = bundled_accelerate_profiles()
        raise ValueError(
            f"Accelerate config {name!r} is neither a file nor a bundled profile. Bundled: {', '.join(bundled) or 'none'}."
        )
    return _with_absolute_deepspeed_file(path)


def check_accelerate_config(name: str) -> str:
    """`resolve_accelerate_config` for the command line: an unknown profile or a broken file is a `UsageError`."""
    if _find_accelerate_config(name) is None:
        ours = bundled_accelerate_profiles()
        trl = [p for p in bundled_accelerate_profiles("trl.accelerate_configs") if p not in ours]
        hint = did_you_mean(name, [*ours, *trl])
        raise UsageError(
            f"unknown accelerate profile {name!r}{f'{hint} Available' if hint else '; available'}: {', '.join(ours)} "
            f"(TRL's: {', '.join(trl)}), or pass the path of an accelerate config file."
        )
    try:
        return resolve_accelerate_config(name)
    except ValueError as exc:  # the file names a DeepSpeed config that is not there
        raise UsageError(f"--accelerate_config {name!r}: {exc}") from None


def _with_absolute_deepspeed_file(path: str) -> str:
    import hashlib
    import tempfile

    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    deepspeed = config.get("deepspeed_config") or {}
    ds_file = deepspeed.get("deepspeed_config_file")
    if not ds_file or os.path.isabs(ds_file) or os.path.isfile(ds_file):
        return path
    beside = Path(path).resolve().parent / ds_file
    if not beside.is_file():
        raise ValueError(f"{path} names the DeepSpeed config {ds_file!r}, found neither from here nor beside it.")
    deepspeed["deepspeed_config_file"] = str(beside)
    text = yaml.safe_dump(config)
    # One file per distinct content (not one per call): the launched processes read it after this returns
    folder = Path(tempfile.gettempdir()) / "trl_safety_accelerate_configs"
    folder.mkdir(exist_ok=True)
    resolved = folder / f"{Path(path).stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not resolved.is_file():
        partial = resolved.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(resolved)  # atomic, so concurrent launches never read a half-written file
    return str(resolved)


def make_parser(config_class=None, prog: str | None = None, command: str | None = None, defense: str | None = None):
    """TRL's SFT parser with `config_class` in place of `SFTConfig` and a `--defense` option. Its `--help` lists the
    defenses of `command`'s stage and shows the defense's own options first, with their help, in their own group."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    config_class = config_class or SFTConfig
    parser = trl_parser(
        (ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig, DefenseArguments),
        prog=prog,
        # argparse's generated usage lists all ~250 flags: name the shape instead
        usage=f"{prog or '%(prog)s'} [--defense NAME] [--config FILE] [options] [accelerate launch options]",
        description=_stage_description(command, defense),
        formatter_class=_HelpFormatter,
    )
    if defense is not None:
        _group_defense_options(parser, config_class, defense)
    return parser


def _stage_description(command: str | None, defense: str | None) -> str | None:
    from trl_safety.registry import list_defenses

    stages = STAGE_OF_COMMAND.get(command)
    if stages is None:
        return None
    specs = [spec for spec in list_defenses() if spec.stage in stages and spec.trainer_class is not None]
    width = max((len(spec.name) for spec in specs), default=0)
    lines = [f"Defenses of `trl-safety {command}` (--defense NAME, or `defense: NAME` in the --config file):"]
    lines += [f"  {spec.name.ljust(width)}  {spec.description}" for spec in specs]
    if defense is None:
        lines.append(f"`trl-safety {command} --defense NAME --help` lists a defense's own options first.")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HfArgumentParser's formatter (defaults shown), keeping the description's line breaks (the defense list)."""


def _group_defense_options(parser, config_class, defense: str) -> None:
    """Move the options `config_class` adds to `SFTConfig` into their own help group, listed before TRL's."""
    import dataclasses

    from trl import SFTConfig

    own = {f.name for f in dataclasses.fields(config_class)} - {f.name for f in dataclasses.fields(SFTConfig)}
    group = parser.add_argument_group(f"{defense} options ({config_class.__name__})")
    for container in list(parser._action_groups):
        if container is group:
            continue
        for action in list(container._group_actions):
            if action.dest in own:
                container._group_actions.remove(action)
                group._group_actions.append(action)
    # argparse prints groups in creation order: put this one right after the positionals
    parser._action_groups.remove(group)
    parser._action_groups.insert(1, group)


def build_trainer(script_args, training_args, model_args, dataset_args, defense: str | None):
    """The trainer a TRL script would build, with the defense's trainer class swapped in."""
    from datasets import load_dataset
    from trl import SFTTrainer, get_dataset, get_peft_config, get_quantization_config

    from trl_safety.data.loading import load_named_dataset, looks_like_local_path
    from trl_safety.models import prepare_model
    from trl_safety.registry import get_defense

    trainer_class = SFTTrainer if defense is None else get_defense(defense).trainer_class
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    # `smollm2`, a `.gguf` file or `model_init_kwargs.gguf_file`: loaded here, for plain SFT too (TRL cannot)
    model, processing_class, consumed = prepare_model(model_args.model_name_or_path, model_init_kwargs)
    if consumed:
        training_args.model_init_kwargs = None

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        if os.path.exists(script_args.dataset_name) or looks_like_local_path(script_args.dataset_name):
            dataset = {script_args.dataset_train_split: load_named_dataset(script_args.dataset_name, split=None)}
        else:
            dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")
    if script_args.dataset_train_split not in dataset:
        raise ValueError(f"The training data has no split {script_args.dataset_train_split!r}: {list(dataset)}.")

    return trainer_class(
        model=model,
        args=training_args,
        processing_class=processing_class,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )


def main(script_args, training_args, model_args, dataset_args, defense: str | None = None) -> None:
    import transformers
    from packaging.version import Version

    trainer = build_trainer(script_args, training_args, model_args, dataset_args, defense)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def _config_class(defense: str | None, command: str | None):
    from trl import SFTConfig

    from trl_safety.registry import get_defense

    if defense is None:
        if command == "align":
            from trl_safety.registry import list_defenses

            names = ", ".join(spec.name for spec in list_defenses("alignment"))
            raise UsageError(f"choose an alignment-stage defense with --defense ({names}).")
        return SFTConfig
    check_defense(defense, STAGE_OF_COMMAND.get(command), command)
    spec = get_defense(defense)
    allowed = STAGE_OF_COMMAND.get(command)
    if spec.trainer_class is None:
        raise UsageError(f"defense {defense!r} is a post-hoc repair; run it with `trl-safety prune`.")
    if allowed is not None and spec.stage not in allowed:
        right = "align" if spec.stage == "alignment" else "sft"
        raise UsageError(f"defense {defense!r} runs at the {spec.stage} stage; use `trl-safety {right}`.")
    return spec.config_class


def check_training_arguments(script_args, training_args, model_args, dataset_args) -> None:
    """The model and every dataset the run names can be found, before anything is loaded or launched."""
    if model_args.model_name_or_path is None:
        raise UsageError("the following arguments are required: --model_name_or_path")
    check_model(model_args.model_name_or_path, "--model_name_or_path", revision=model_args.model_revision)
    if not dataset_args.datasets and not script_args.dataset_name:
        raise UsageError("the following arguments are required: --dataset_name (or `datasets` in the --config file)")
    check_dataset_fields(script_args, training_args)
    for name in ("base_model_name_or_path",):  # a defense's reference models (AsFT's base)
        if isinstance(getattr(training_args, name, None), str):
            check_model(getattr(training_args, name), f"--{name}")
    for index, dataset in enumerate(dataset_args.datasets or []):
        check_dataset(getattr(dataset, "path", None), f"datasets[{index}].path")


def _pop_accelerate_config(launch_args: list[str]) -> tuple[str | None, list[str]]:
    """Take `--accelerate_config NAME` (or `--accelerate_config=NAME`) out of the accelerate arguments."""
    for index, arg in enumerate(launch_args):
        if arg.startswith("--accelerate_config="):
            return arg.split("=", 1)[1], launch_args[:index] + launch_args[index + 1 :]
        if arg == "--accelerate_config":
            if index + 1 >= len(launch_args) or launch_args[index + 1].startswith("-"):
                raise UsageError("argument --accelerate_config: expected one argument (a profile name or a file)")
            return launch_args[index + 1], launch_args[:index] + launch_args[index + 2 :]
    return None, launch_args


def accelerate_launch_options() -> dict[str, object]:
    """`accelerate launch`'s options by name without dashes (`num_processes`, ...), plus `accelerate_config`."""
    from accelerate.commands.launch import launch_command_parser

    options = {"accelerate_config": None}
    for action in launch_command_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                options[option[2:]] = action
    options.pop("help", None)
    return options


def _config_launch_args(values: dict) -> list[str]:
    """YAML `accelerate launch` keys as flags: `num_processes: 8` → `--num_processes 8`, `multi_gpu: true` →
    `--multi_gpu` (a switch; `false` leaves it out), as `trl sft` forwards them."""
    options = accelerate_launch_options()
    flags = []
    for key, value in values.items():
        takes_value = options[key] is None or options[key].nargs != 0
        if takes_value:
            flags += [f"--{key}", str(value)]
        elif value:
            flags.append(f"--{key}")
    return flags


def parse_training_arguments(argv: list[str], command: str | None, prog: str | None = None, launched: bool = False):
    """`(defense, script_argv, parsed, launch_args)` from the command line and its `--config` file, checked: a
    mistake is a `UsageError` before anything loads. `parsed` is TRL's (script, training, model, dataset) arguments;
    `launch_args` are the `accelerate launch` flags (from the command line, then the file) and `script_argv` what the
    launched processes get. `launched`: this is such a process, the launch flags were spent by the launcher."""
    defense, rest = _pop_defense(argv)
    config_path, rest = pop_config_path(rest)
    config = load_config_file(config_path)
    file_defense = config.pop("defense", None)
    defense = defense or file_defense  # the command line wins, as for every other key
    if defense is None and command == "align" and ("-h" in rest or "--help" in rest):
        config_class = None  # `trl-safety align --help`: TRL's options and the list of alignment defenses
    else:
        config_class = _config_class(defense, command)
    parser = make_parser(config_class, prog=prog, command=command, defense=defense)
    launch_keys = accelerate_launch_options()
    fields = set(parser_field_names(parser))  # a name both know (`debug`) is the training option, as on the CLI
    file_launch = {key: config.pop(key) for key in list(config) if key in launch_keys and key not in fields}
    if config_path is not None:
        apply_config(parser, config, config_path, also_valid=(*launch_keys, "defense"))
    # a flag the training dataclasses do not know must be an `accelerate launch` option, else it is a typo
    check_flags(rest, parser, also_valid=tuple(launch_keys))
    with warnings.catch_warnings():
        # TRL's SFTConfig sets the old `gradient_checkpointing` name itself: nothing the user can act on
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        *parsed, _, cli_remaining = parse_or_usage(
            parser.parse_args_into_dataclasses, rest, return_remaining_strings=True
        )
    check_training_arguments(*parsed)
    launch_args = [] if launched else cli_remaining + _config_launch_args(file_launch)
    script_argv = _subtract_subsequence(rest, cli_remaining)
    if config_path is not None:
        script_argv = ["--config", config_path, *script_argv]
    if defense is not None:
        script_argv = ["--defense", defense, *script_argv]
    return defense, script_argv, parsed, launch_args


def run(argv: list[str], prog: str = "trl-safety sft", command: str | None = "sft") -> int:
    defense, script_argv, parsed, launch_args = parse_training_arguments(argv, command, prog)
    accelerate_config, launch_args = _pop_accelerate_config(launch_args)
    if accelerate_config is not None:
        launch_args = ["--config_file", check_accelerate_config(accelerate_config), *launch_args]
    if launch_args:
        # Re-launch this file through `accelerate launch` with the remaining (accelerate) arguments
        from accelerate.commands.launch import launch_command, launch_command_parser

        accelerate_parser = launch_command_parser()

        def one_line_error(message: str):  # instead of accelerate's ~115-line usage text
            raise UsageError(f"accelerate launch: {message}")

        accelerate_parser.error = one_line_error
        accelerate_args = accelerate_parser.parse_args([*launch_args, __file__, *script_argv])
        launch_command(accelerate_args)
        return 0
    main(*parsed, defense=defense)
    return 0


def _launched(argv: list[str], prog: str, command: str | None) -> int:
    """What each process started by `accelerate launch` runs."""
    defense, _, parsed, _ = parse_training_arguments(argv, None, prog, launched=True)
    main(*parsed, defense=defense)
    return 0


if __name__ == "__main__":  # entry point under `accelerate launch`
    from trl_safety.cli.main import run_command

    sys.exit(run_command(_launched, sys.argv[1:], prog="trl-safety", command=None))
