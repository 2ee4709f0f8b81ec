"""Up-front checks of `trl-safety` arguments, run before any model loads or any process is launched.

A mistake on the command line raises [`UsageError`]; `trl_safety.cli.main` prints it as one
`trl-safety <command>: error: <message>` line and exits with code 2 (argparse's own convention). Everything else, an
internal bug included, keeps its traceback. The helpers here are cheap: they look at the file system and the local
Hugging Face cache, never at the network, and load no weights.
"""

from __future__ import annotations

import argparse
import os


class UsageError(Exception):
    """A mistake in the command line: printed as `<prog>: error: <message>` (one line), exit code 2."""


class OneLineErrors:
    """Mixin for an `argparse.ArgumentParser` (or `HfArgumentParser`) subclass: its errors are a `UsageError` (one
    line, no usage block), a typo'd flag with the closest option: `unrecognized argument --sweeep; did you mean
    --sweep?`."""

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flag = message[len(prefix) :].split()[0].split("=", 1)[0]
            options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            hint = did_you_mean(flag, options).replace("'", "") if flag.startswith("-") else ""
            raise UsageError(f"unrecognized argument {flag}{hint}")
        raise UsageError(message)


class OneLineArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors (`OneLineErrors`)."""


def did_you_mean(name: str, candidates, prefix: str = "") -> str:
    """`"; did you mean 'x'?"` for the closest of `candidates` to a mistyped `name` (`difflib`), else `""`."""
    import difflib

    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {prefix}{close[0]!r}?" if close else ""


def offline() -> bool:
    """Whether Hub downloads are off (`HF_HUB_OFFLINE`, or `TRANSFORMERS_OFFLINE`, read as huggingface_hub does)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def looks_like_local_model_path(name: str) -> bool:
    """Whether a model name can only mean a local folder, so a missing one is a mistake and not a Hub id.

    The rule: a Hub model id is `name` or `owner/name` (alphanumerics, `-`, `_`, `.`, not starting with `.`). A name
    is local when it starts with `.`, `/` or `~` (also `./x`, `../x`), is absolute, ends with a separator, holds a
    backslash or the platform separator where that is not `/`, has more than one `/` (`runs/sft/final`), or is
    `owner/name` where `owner` is an existing local folder (`runs/sft` next to a `runs/` folder). Anything else is
    taken as a Hub id, checked for shape, and (offline) for presence in the cache by `check_model`.
    """
    if name.startswith((".", "/", "~")) or os.path.isabs(name) or name.endswith(("/", os.sep)):
        return True
    if "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """Whether the local Hugging Face cache holds a model, adapter or tokenizer repo (no network access)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "adapter_config.json", "tokenizer_config.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
                return True
        except ValueError:  # an invalid repo id or revision: not in the cache
            return False
    return False


def check_model(name: str | None, flag: str, revision: str | None = None) -> None:
    """An existing folder, or a Hub id (which, with HF_HUB_OFFLINE set, must be in the local cache).

    Rule (see `looks_like_local_model_path`): an existing path is accepted as it is; a missing name that looks like a
    path is a missing folder; any other name must have the shape of a Hub id, and when downloads are off
    (HF_HUB_OFFLINE) it must already be in the local Hugging Face cache, since it cannot load otherwise. Online, a
    well-formed Hub id is accepted without a network call (the download reports a missing or gated repo itself).
    """
    if name is None or os.path.exists(name):
        return
    from trl_safety.models import ALIASES

    if name in ALIASES:  # a model shipped by a wheel (`smollm2`): installed, or the error names the wheel
        from trl_safety.models.smollm import gguf_path

        try:
            gguf_path()
        except FileNotFoundError as exc:
            raise UsageError(f"{flag} {name!r}: {exc}") from None
        return
    if looks_like_local_model_path(name):
        raise UsageError(f"{flag} {name!r}: no such folder; pass an existing folder or a Hub id (owner/name).")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(
            f"{flag} {name!r} is neither an existing folder nor a valid Hub id; pass an existing folder or a Hub id "
            "(owner/name)."
        ) from None
    if offline() and not in_hub_cache(name, revision):
        raise UsageError(
            f"{flag} {name!r} is not a local folder and not in the local Hugging Face cache, and HF_HUB_OFFLINE is "
            f"set; download it first (`hf download {name}`) or pass an existing folder."
        )


def check_adapter_base(folder: str, base_override: str | None, override_flag: str) -> None:
    """For a PEFT adapter folder: the base model it is loaded on (`override_flag`'s value, else the recorded one)."""
    import json

    config_path = os.path.join(folder, "adapter_config.json")
    if base_override is not None or not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{folder} is an adapter without a recorded base model; pass {override_flag}.")
    try:
        check_model(base, f"the base model recorded in {config_path}")
    except UsageError as exc:
        raise UsageError(f"{str(exc).rstrip('.')}; or pass {override_flag}.") from None


def check_dataset(name: str | None, flag: str) -> None:
    """A dataset name that looks like a local file or folder must exist and have a readable format (Hub ids pass)."""
    if not name:
        return
    from trl_safety.data.loading import check_local_dataset

    try:
        check_local_dataset(name)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


def check_dataset_fields(*dataclass_objects) -> None:
    """`check_dataset` on every `*dataset_name` field (`--dataset_name`, `--alignment_dataset_name`, ...)."""
    import dataclasses

    for obj in dataclass_objects:
        if obj is None or not dataclasses.is_dataclass(obj):
            continue
        for f in dataclasses.fields(obj):
            if f.name.endswith("dataset_name") and isinstance(getattr(obj, f.name), str):
                check_dataset(getattr(obj, f.name), f"--{f.name}")


def check_judge(name: str, flag: str = "--judge") -> None:
    """The judge name resolves (`trl_safety.eval.judges.resolve_judge`) and the checkpoint it names can load."""
    from trl_safety.eval.judges import BEAVER_DAM_ID, resolve_judge

    try:
        _, checkpoint = resolve_judge(name)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if checkpoint is None:
        return
    if checkpoint == BEAVER_DAM_ID and offline() and not in_hub_cache(checkpoint):
        raise UsageError(
            f"{flag} {name!r} needs {checkpoint}, which is not in the local Hugging Face cache, and HF_HUB_OFFLINE is "
            f"set; download it first (`hf download {checkpoint}`), pass `beaver-dam:PATH` for a local copy, or use "
            "--judge keyword."
        )
    check_model(checkpoint, flag)


def check_defense(name: str, stages: tuple[str, ...] | None, command: str | None) -> None:
    """`name` is a registered defense; the message lists those `trl-safety <command>` runs."""
    from trl_safety.registry import list_defenses

    specs = list_defenses()
    if name in {spec.name for spec in specs}:
        return
    offered = [spec.name for spec in specs if stages is None or spec.stage in stages]
    where = f" for `trl-safety {command}`" if command else ""
    hint = did_you_mean(name, [spec.name for spec in specs])
    raise UsageError(
        f"unknown defense {name!r}{f'{hint} Available' if hint else '; available'}{where}: "
        f"{', '.join(offered) or 'none'} "
        "(`trl-safety defenses` lists them all)."
    )


def check_config_file(argv: list[str], flag: str = "--config") -> None:
    """The YAML file named by `--config FILE` (or `--config=FILE`) exists."""
    for index, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith(f"{flag}=") else None
        if arg == flag:
            if index + 1 >= len(argv):
                raise UsageError(f"argument {flag}: expected one argument (a YAML file)")
            path = argv[index + 1]
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag} {path!r}: no such file; pass the path of a YAML config file.")


def parse_or_usage(parse, *args, **kwargs):
    """Run an argument parser; a `ValueError` raised while building the argument dataclasses (a bad value, such as
    `--bf16` on a machine without bf16, an out-of-range hyperparameter or unknown flags) becomes a `UsageError`."""
    try:
        return parse(*args, **kwargs)
    except ValueError as exc:
        raise UsageError(" ".join(str(exc).split())) from None
