"""Loading datasets by Hub id or local path, with adapters that turn known safety datasets into TRL formats."""

from __future__ import annotations

import os
from collections.abc import Callable

import datasets
from datasets import Dataset, DatasetDict


# Hub id -> adapter(dataset, role, **options) -> Dataset in a TRL format. `role` is "alignment" or "harmful".
_ADAPTERS: dict[str, Callable[..., Dataset]] = {}

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def register_dataset_adapter(dataset_id: str):
    """Decorator registering how a Hub dataset becomes alignment/harmful data in a TRL format."""

    def decorator(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        _ADAPTERS[dataset_id] = fn
        return fn

    return decorator


def get_dataset_adapter(dataset_id: str) -> Callable[..., Dataset] | None:
    return _ADAPTERS.get(dataset_id)


def looks_like_local_path(name: str) -> bool:
    """Whether a dataset name can only mean a local file or folder, never a Hub id.

    True when it starts with `./`, `../`, `/` or `~` (or is otherwise absolute), or ends with a supported local file
    extension (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`): Hub dataset ids (`owner/name`) do neither.
    """
    prefixes = ("./", "../", "/", "~", "." + os.sep, ".." + os.sep)
    if name.startswith(prefixes) or os.path.isabs(name):
        return True
    return os.path.splitext(name)[1].lower() in _LOCAL_FORMATS


def check_local_dataset(name: str) -> None:
    """Raise if `name` names a local dataset that cannot be read; a Hub id (or an existing folder) passes.

    `FileNotFoundError` when `name` looks like a local path (`looks_like_local_path`) but does not exist, `ValueError`
    when it is an existing file in a format that cannot be read. Cheap: only looks at the file system.
    """
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in _LOCAL_FORMATS:
            raise ValueError(f"Cannot read {name!r}: supported local formats are {sorted(_LOCAL_FORMATS)}.")
        return
    if os.path.isdir(name) or not looks_like_local_path(name):
        return
    raise FileNotFoundError(
        f"dataset path {name!r} does not exist (looked for {os.path.abspath(name)}); pass an existing file "
        f"({', '.join(sorted(_LOCAL_FORMATS))}) or folder, or a Hub dataset id (owner/name); a name like this one "
        "is read as a local path, not looked up on the Hub."
    )


def load_named_dataset(name: str, config: str | None = None, split: str | None = "train") -> Dataset | DatasetDict:
    """Load a dataset from a local file or folder, or from the Hub by id.

    Local files are read by extension (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`); a folder written by
    `Dataset.save_to_disk` is loaded from disk, any other folder with `datasets.load_dataset`. A name that looks like
    a local path (`looks_like_local_path`: `./`, `../`, `/`, `~`, or a local file extension) but does not exist
    raises `FileNotFoundError`; it is not looked up on the Hub. Without network access a Hub id fails with an error
    saying how to pass a local copy instead.
    """
    check_local_dataset(name)
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        loaded = datasets.load_dataset(_LOCAL_FORMATS[extension], data_files=name, split="train")
        return loaded
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_info.json")) or os.path.exists(
            os.path.join(name, "dataset_dict.json")
        ):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, DatasetDict) and split is not None:
                return loaded[split]
            return loaded
        return datasets.load_dataset(name, name=config, split=split)
    try:
        return datasets.load_dataset(name, name=config, split=split)
    except Exception as exc:  # network / not found / gated
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = "the Hub is unreachable (HF_HUB_OFFLINE is set)" if offline else f"{type(exc).__name__}: {exc}"
        raise RuntimeError(
            f"Could not load dataset {name!r} (config={config!r}, split={split!r}): {reason}. Download it on a "
            "machine with network access (`datasets.load_dataset(...).save_to_disk(path)` or export to JSON/JSONL) "
            "and pass the local path instead, or pass the dataset object directly to the trainer."
        ) from exc


def load_role_dataset(
    role: str,
    name: str,
    config: str | None = None,
    split: str = "train",
    num_samples: int | None = None,
) -> Dataset:
    """Load an alignment or harmful dataset by name, applying the registered adapter for known Hub ids."""
    if role not in ("alignment", "harmful"):
        raise ValueError(f"role must be 'alignment' or 'harmful', got {role!r}.")
    adapter = get_dataset_adapter(name)
    if adapter is not None:
        return adapter(role=role, split=split, config=config, num_samples=num_samples)
    dataset = load_named_dataset(name, config=config, split=split)
    if isinstance(dataset, DatasetDict):
        raise ValueError(
            f"{name!r} has several splits ({list(dataset)}); choose one with the `*_dataset_split` field."
        )
    if num_samples is not None:
        if num_samples > len(dataset):
            raise ValueError(f"Asked for {num_samples} {role} samples but {name!r} has only {len(dataset)}.")
        dataset = dataset.select(range(num_samples))
    return dataset
