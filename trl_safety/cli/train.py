"""Training script behind `trl-safety align` and `trl-safety sft`, shaped like TRL's `trl/scripts/sft.py`.

```bash
# alignment stage (model provider): Vaccine on a local refusal file, LoRA
trl-safety align --defense vaccine --model_name_or_path meta-llama/Llama-2-7b-hf \
    --dataset_name data/refusals.jsonl --use_peft --lora_r 8 --output_dir vaccine-aligned

# fine-tuning stage (service): Lisa on the customer's data, 2 GPUs with DeepSpeed ZeRO-2
trl-safety sft --defense lisa --accelerate_config zero2 --model_name_or_path vaccine-aligned-merged \
    --dataset_name customer.jsonl --alignment_dataset_name data/refusals.jsonl --output_dir lisa-run
```

Arguments not known to the training dataclasses (e.g. `--num_processes 2`) go to `accelerate launch`; with any of
them, or with `--accelerate_config`, the script re-launches itself through accelerate, as `trl sft` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import resources
from pathlib import Path

from trl_safety.cli.checks import (
    UsageError,
    check_config_file,
    check_dataset,
    check_dataset_fields,
    check_defense,
    check_model,
    parse_or_usage,
)


STAGE_OF_COMMAND = {"align": ("alignment",), "sft": ("fine-tuning",)}


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
        raise UsageError(
            f"unknown accelerate profile {name!r}; available: {', '.join(ours)} (TRL's: {', '.join(trl)}), or pass "
            "the path of an accelerate config file."
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


def make_parser(config_class=None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, config_class or SFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def build_trainer(script_args, training_args, model_args, dataset_args, defense: str | None):
    """The trainer a TRL script would build, with the defense's trainer class swapped in."""
    from datasets import load_dataset
    from trl import SFTTrainer, get_dataset, get_peft_config, get_quantization_config

    from trl_safety.data.loading import load_named_dataset, looks_like_local_path
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
        model=model_args.model_name_or_path,
        args=training_args,
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


def parse_training_arguments(argv: list[str], command: str | None, prog: str | None = None, **parse_kwargs):
    """(defense, parsed...) from the command line, checked: a mistake is a `UsageError` before anything loads."""
    defense, rest = _pop_defense(argv)
    check_config_file(rest)
    parser = make_parser(_config_class(defense, command), prog=prog)
    with warnings.catch_warnings():
        # TRL's SFTConfig sets the old `gradient_checkpointing` name itself: nothing the user can act on
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        parsed = parse_or_usage(parser.parse_args_and_config, rest, **parse_kwargs)
    check_training_arguments(*parsed[:4])
    return defense, rest, parsed


def run(argv: list[str], prog: str = "trl-safety sft", command: str | None = "sft") -> int:
    defense, rest, parsed = parse_training_arguments(
        argv, command, prog, return_remaining_strings=True, separate_remaining_strings=True
    )
    *parsed, config_remaining, cli_remaining = parsed
    launch_args = config_remaining + cli_remaining
    accelerate_config, launch_args = _pop_accelerate_config(launch_args)
    if accelerate_config is not None:
        launch_args = ["--config_file", check_accelerate_config(accelerate_config), *launch_args]
    if launch_args:
        # Re-launch this file through `accelerate launch` with the remaining (accelerate) arguments
        from accelerate.commands.launch import launch_command, launch_command_parser

        script_args = _subtract_subsequence(rest, cli_remaining)
        if defense is not None:
            script_args = ["--defense", defense, *script_args]
        accelerate_args = launch_command_parser().parse_args([*launch_args, __file__, *script_args])
        launch_command(accelerate_args)
        return 0
    main(*parsed, defense=defense)
    return 0


def _launched(argv: list[str], prog: str, command: str | None) -> int:
    """What each process started by `accelerate launch` runs."""
    defense, _, parsed = parse_training_arguments(argv, None, prog)
    main(*parsed, defense=defense)
    return 0


if __name__ == "__main__":  # entry point under `accelerate launch`
    from trl_safety.cli.main import run_command

    sys.exit(run_command(_launched, sys.argv[1:], prog="trl-safety", command=None))
