"""Adapters turning the papers' datasets into TRL prompt/completion data, with the papers' selection rules.

Safety data (docs/design/algorithms.md §1.5):

- `PKU-Alignment/BeaverTails` (CC BY-NC 4.0), splits `30k_train` / `30k_test`: alignment rows are `is_safe=True`
  (safe *answers*, Vaccine/Lisa/Antidote), harmful rows `is_safe=False`. Offsets and counts index the filtered rows.
- `anonymous4486/repnoise_beavertail` (RepNoise's `beavertails_with_refusals_train.json`): each row pairs a harmful
  prompt with a harmful `response` and a `refusal` written as `"Question: … \\nAnswer: …"`; alignment rows use the
  text after the first `"\\nAnswer:"` (whitespace stripped), harmful rows the response (Booster, Panacea, T-Vaccine).

Task data (docs/design/algorithms.md §6.2): SST2, AGNews and GSM8K, with this package's instruction strings (see
`SST2_INSTRUCTION`, `AGNEWS_INSTRUCTION`; pass `instruction=` to use another, e.g. a repo's exact string; FA is an exact
match, so train and test must use the same one).

Every adapter loads a Hub id or a local file/folder in the same schema (`source=`), applies a prompt template
(`template=`, `"alpaca"` / `"alpaca_newline"` / `None` for bare prompts, see `templates.py`), and selects rows
`offset … offset+num_samples-1`. `booster_quirk=True` reproduces Booster's strict-inequality slicing
(`offset < idx < offset+num_samples`: index `offset` skipped, `num_samples-1` rows).

The two safety datasets are registered with `register_dataset_adapter`, so the trainers' `alignment_dataset_name` /
`harmful_dataset_name` fields accept their Hub ids. Adapter options travel in the `*_dataset_config` string as
comma-separated `key=value` pairs, e.g. `--harmful_dataset_config "offset=5000,booster_quirk=true,source=bt.jsonl"`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, DatasetDict

from .loading import load_named_dataset, register_dataset_adapter
from .templates import apply_template


logger = logging.getLogger(__name__)

BEAVERTAILS_ID = "PKU-Alignment/BeaverTails"
REPNOISE_REFUSALS_ID = "anonymous4486/repnoise_beavertail"
SST2_ID = "stanfordnlp/sst2"
AGNEWS_ID = "fancyzhx/ag_news"
GSM8K_ID = "openai/gsm8k"

# Written for this package from the papers' description (docs/design/algorithms.md §6.2); not the repos' literal strings.
SST2_INSTRUCTION = "Determine the sentiment of the input sentence. Reply with exactly one word: positive or negative."
AGNEWS_INSTRUCTION = (
    "Assign the news article in the input to exactly one of these four categories and reply with its name only:\n"
    "World\nSports\nBusiness\nSci/Tech"
)
SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_ANSWER_MARKER = "The final answer is: "

_BEAVERTAILS_SPLITS = {"train": "30k_train", "test": "30k_test"}


# -- selection -----------------------------------------------------------------------------------------------------
def select_indices(
    num_rows: int, offset: int = 0, num_samples: int | None = None, *, booster_quirk: bool = False
) -> list[int]:
    """Row indices `offset … offset+num_samples-1` (all remaining rows when `num_samples` is None).

    With `booster_quirk`, Booster's `offset < idx < offset+num_samples`: the first index is skipped, so one row
    fewer. Asking for more rows than exist is an error (a silently smaller set would change the protocol).
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}.")
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    stop = num_rows if num_samples is None else offset + num_samples
    if stop > num_rows:
        raise ValueError(
            f"Asked for rows {offset}..{stop - 1} but only {num_rows} rows are available after filtering."
        )
    start = offset + 1 if booster_quirk else offset
    return list(range(start, stop))


def parse_adapter_options(config: str | None) -> dict[str, Any]:
    """Parse `"key=value,key=value"` (ints, floats, true/false/none recognised) into adapter keyword arguments."""
    if not config:
        return {}
    options: dict[str, Any] = {}
    for item in config.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"Adapter option {item!r} must look like key=value (got config {config!r}).")
        key, value = (part.strip() for part in item.split("=", 1))
        options[key] = _parse_value(value)
    return options


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _load(source: str, split: str | None, config: str | None = None) -> Dataset:
    dataset = load_named_dataset(source, config=config, split=split)
    if isinstance(dataset, DatasetDict):
        raise ValueError(f"{source!r} has several splits ({list(dataset)}); name one.")
    return dataset


def _require_columns(dataset: Dataset, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source!r} lacks columns {missing}; it has {dataset.column_names}.")


def _is_safe_mask(dataset: Dataset) -> list[bool]:
    return [bool(v) for v in dataset["is_safe"]]


# -- BeaverTails ---------------------------------------------------------------------------------------------------
def beavertails_dataset(
    role: str = "harmful",
    split: str = "30k_train",
    *,
    source: str = BEAVERTAILS_ID,
    offset: int = 0,
    num_samples: int | None = None,
    booster_quirk: bool = False,
    template: str | None = "alpaca",
    keep_category: bool = False,
) -> Dataset:
    """BeaverTails as prompt/completion rows.

    `role="alignment"` keeps `is_safe=True` rows (safe answers), `role="harmful"` keeps `is_safe=False` rows; the
    offset/count select among the kept rows, in file order. `split` accepts `train`/`test` as aliases of
    `30k_train`/`30k_test` (a local file has a single split and ignores it). `keep_category` keeps the 14-boolean
    `category` column.
    """
    if role not in ("alignment", "harmful"):
        raise ValueError(f"role must be 'alignment' or 'harmful', got {role!r}.")
    dataset = _load(source, _BEAVERTAILS_SPLITS.get(split, split))
    _require_columns(dataset, ["prompt", "response", "is_safe"], source)
    wanted = role == "alignment"
    kept = [i for i, safe in enumerate(_is_safe_mask(dataset)) if safe == wanted]
    picked = [kept[i] for i in select_indices(len(kept), offset, num_samples, booster_quirk=booster_quirk)]
    rows = dataset.select(picked)
    data = {
        "prompt": [apply_template(template, p) for p in rows["prompt"]],
        "completion": list(rows["response"]),
    }
    if keep_category and "category" in rows.column_names:
        data["category"] = list(rows["category"])
    return Dataset.from_dict(data)


def beavertails_eval_prompts(
    split: str = "30k_test",
    *,
    source: str = BEAVERTAILS_ID,
    num_samples: int | None = 1000,
    only_unsafe: bool = True,
    offset: int = 0,
) -> Dataset:
    """The harmful-score prompt set: the first `num_samples` prompts of `split` (unsafe rows only by default; Lisa's
    code does not filter). Columns: `prompt`, `category` (names of the categories marked true)."""
    dataset = _load(source, _BEAVERTAILS_SPLITS.get(split, split))
    _require_columns(dataset, ["prompt"], source)
    if only_unsafe:
        _require_columns(dataset, ["is_safe"], source)
        kept = [i for i, safe in enumerate(_is_safe_mask(dataset)) if not safe]
    else:
        kept = list(range(len(dataset)))
    rows = dataset.select([kept[i] for i in select_indices(len(kept), offset, num_samples)])
    categories = rows["category"] if "category" in rows.column_names else [None] * len(rows)
    return Dataset.from_dict({"prompt": list(rows["prompt"]), "category": [_category_names(c) for c in categories]})


def _category_names(category) -> list[str]:
    if category is None:
        return []
    if isinstance(category, dict):
        return [name for name, on in category.items() if on]
    if isinstance(category, str):
        return [category]
    return [str(c) for c in category]


# -- RepNoise paired-refusal file ----------------------------------------------------------------------------------
def refusal_answer(refusal: str) -> str:
    """The answer part of a `"Question: … \\nAnswer: …"` refusal (text after the first `"\\nAnswer:"`, stripped);
    a string without that marker is returned stripped."""
    for marker in ("\nAnswer:", "Answer:"):
        if marker in refusal:
            return refusal.split(marker, 1)[1].strip()
    return refusal.strip()


def repnoise_refusal_dataset(
    role: str = "alignment",
    split: str = "train",
    *,
    source: str = REPNOISE_REFUSALS_ID,
    offset: int = 0,
    num_samples: int | None = None,
    booster_quirk: bool = False,
    template: str | None = "alpaca_newline",
    only_unsafe: bool = False,
    keep_category: bool = False,
) -> Dataset:
    """The paired-refusal file as prompt/completion rows: `role="alignment"` → (prompt, refusal answer),
    `role="harmful"` → (prompt, harmful response). Rows are indexed in file order, so the same offset/count gives
    both roles the same prompts (as in Booster). `only_unsafe` drops rows with `is_safe=True` first."""
    if role not in ("alignment", "harmful"):
        raise ValueError(f"role must be 'alignment' or 'harmful', got {role!r}.")
    dataset = _load(source, split)
    _require_columns(dataset, ["prompt", "response", "refusal"], source)
    kept = list(range(len(dataset)))
    if only_unsafe:
        _require_columns(dataset, ["is_safe"], source)
        kept = [i for i, safe in enumerate(_is_safe_mask(dataset)) if not safe]
    rows = dataset.select(
        [kept[i] for i in select_indices(len(kept), offset, num_samples, booster_quirk=booster_quirk)]
    )
    completions = [refusal_answer(r) for r in rows["refusal"]] if role == "alignment" else list(rows["response"])
    data = {"prompt": [apply_template(template, p) for p in rows["prompt"]], "completion": completions}
    if keep_category and "category" in rows.column_names:
        data["category"] = list(rows["category"])
    return Dataset.from_dict(data)


@register_dataset_adapter(BEAVERTAILS_ID)
def _beavertails_adapter(role: str, split: str = "train", config: str | None = None, num_samples=None) -> Dataset:
    options = parse_adapter_options(config)
    if num_samples is not None:
        options.setdefault("num_samples", num_samples)
    return beavertails_dataset(role, options.pop("split", split), **options)


@register_dataset_adapter(REPNOISE_REFUSALS_ID)
def _repnoise_adapter(role: str, split: str = "train", config: str | None = None, num_samples=None) -> Dataset:
    options = parse_adapter_options(config)
    if num_samples is not None:
        options.setdefault("num_samples", num_samples)
    return repnoise_refusal_dataset(role, options.pop("split", split), **options)


# -- task datasets -------------------------------------------------------------------------------------------------
def sst2_dataset(
    split: str = "train",
    *,
    source: str = SST2_ID,
    offset: int = 0,
    num_samples: int | None = None,
    template: str | None = "alpaca",
    instruction: str = SST2_INSTRUCTION,
) -> Dataset:
    """SST2: prompt = template(instruction, input=sentence), completion = `positive`/`negative`, plus `label`.
    The papers test on `validation` (all 872 rows)."""
    dataset = _load(source, split)
    _require_columns(dataset, ["sentence", "label"], source)
    rows = dataset.select(select_indices(len(dataset), offset, num_samples))
    labels = [int(v) for v in rows["label"]]
    if any(v not in (0, 1) for v in labels):
        raise ValueError(f"SST2 labels must be 0/1 (unlabelled test split?); got {sorted(set(labels))}.")
    return Dataset.from_dict(
        {
            "prompt": [apply_template(template, instruction, s) for s in rows["sentence"]],
            "completion": [SST2_LABELS[v] for v in labels],
            "label": labels,
        }
    )


def agnews_dataset(
    split: str = "train",
    *,
    source: str = AGNEWS_ID,
    offset: int = 0,
    num_samples: int | None = None,
    template: str | None = "alpaca",
    instruction: str = AGNEWS_INSTRUCTION,
) -> Dataset:
    """AGNews: prompt = template(instruction, input=text), completion = class name (World/Sports/Business/Sci/Tech),
    plus `label`. The papers test on the first 1000 `test` rows."""
    dataset = _load(source, split)
    _require_columns(dataset, ["text", "label"], source)
    rows = dataset.select(select_indices(len(dataset), offset, num_samples))
    labels = [int(v) for v in rows["label"]]
    return Dataset.from_dict(
        {
            "prompt": [apply_template(template, instruction, t) for t in rows["text"]],
            "completion": [AGNEWS_LABELS[v] for v in labels],
            "label": labels,
        }
    )


def gsm8k_dataset(
    split: str = "train",
    *,
    source: str = GSM8K_ID,
    config: str | None = "main",
    offset: int = 0,
    num_samples: int | None = None,
    template: str | None = "alpaca",
) -> Dataset:
    """GSM8K: prompt = template(question), completion = the solution with `####` replaced by
    `"The final answer is: "`. The papers test on the first 1000 `test` rows."""
    dataset = _load(source, split, config=None if _is_local(source) else config)
    _require_columns(dataset, ["question", "answer"], source)
    rows = dataset.select(select_indices(len(dataset), offset, num_samples))
    return Dataset.from_dict(
        {
            "prompt": [apply_template(template, q) for q in rows["question"]],
            "completion": [a.replace("####", GSM8K_ANSWER_MARKER) for a in rows["answer"]],
        }
    )


def _is_local(source: str) -> bool:
    return os.path.exists(source)


TASKS = {"sst2": sst2_dataset, "agnews": agnews_dataset, "gsm8k": gsm8k_dataset}
# Test split and size the papers evaluate fine-tune accuracy on (docs/design/algorithms.md §6.2)
TASK_TEST_SPLITS = {"sst2": ("validation", 872), "agnews": ("test", 1000), "gsm8k": ("test", 1000)}


def load_task_dataset(task: str, split: str = "train", **kwargs) -> Dataset:
    """Load a task dataset by name (`sst2`, `agnews`, `gsm8k`); kwargs go to its adapter."""
    key = task.lower().replace("_", "").replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}.")
    return TASKS[key](split, **kwargs)
