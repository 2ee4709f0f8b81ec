"""Model cards in TRL's shape plus a harmful-fine-tuning-defense section, built from `defense_config.json` content.

The same builder serves `trainer.create_model_card()` / `trainer.push_to_hub()` and `trl-safety push FOLDER`. TRL's
own card (`generate_model_card`, reached through `trl_safety.compat`) gives the training procedure, framework versions
and citations; ours gives the title and intro, a quick start that loads the tokenizer and generates, and the defense
section from `defense_config.json`, with evaluation results from the report files found in the folder
([`find_results`], also written as the YAML header's `model-index`) and licence notes from the datasets and judges
those name ([`licence_notes_for`]).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


logger = logging.getLogger(__name__)

STAGE_NOTES = {
    "alignment": "This is an alignment-stage defense: it hardens the model before any customer fine-tuning. Users "
    "fine-tune it with plain SFT afterwards.",
    "fine-tuning": "This is a fine-tuning-stage defense: it ran during (possibly poisoned) user fine-tuning to keep "
    "the safety alignment.",
    "post-fine-tuning": "This is a post-fine-tuning defense: it repaired the weights after user fine-tuning.",
}

DEFENSE_CONFIG_NAME = "defense_config.json"
# Report files looked for in a model folder, first found wins: `trl-safety eval`'s report, a bench `results.json`,
# and the `eval_results.json` that `Trainer.save_metrics("eval", ...)` writes.
RESULT_FILES = ("eval_report.json", "results.json", "eval_results.json")
_MAX_METRICS = 40

# Lower-cased substring of a dataset / judge id -> licence caveat shown on the card (from the datasets' and judges' own licences)
KNOWN_LICENCES = {
    "beavertails": "PKU-Alignment/BeaverTails is licensed CC BY-NC 4.0 (non-commercial use only).",
    "beaver-dam": "The judge PKU-Alignment/beaver-dam-7b is derived from LLaMA-1 and its card states a "
    "non-commercial licence.",
    "hex-phi": "HEx-PHI is gated under a custom licence that forbids redistribution.",
    "llama-guard": "Llama Guard judges are gated and distributed under Meta's Llama community licences.",
    "shieldgemma": "ShieldGemma judges are gated under the Gemma terms of use.",
    "wildguard": "allenai/wildguard is Apache-2.0, gated under the AI2 Responsible Use Guidelines.",
}


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _is_hub_id(name: str | None) -> bool:
    """`owner/name` that is not a local path or a data file (`data/refusals.jsonl`)."""
    if not name or os.path.exists(name) or os.path.isabs(name):
        return False
    if re.search(r"\.(jsonl?|csv|parquet|arrow|txt|tsv)$", name):
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def licence_notes_for(names) -> list[str]:
    """Licence caveats for the datasets / judges named in `names` (any strings; unknown names give nothing)."""
    notes = []
    for name in names:
        lowered = str(name).lower()
        for key, note in KNOWN_LICENCES.items():
            if key in lowered and note not in notes:
                notes.append(note)
    return notes


# ------------------------------------------------------------------------------------------------------- results
def _number(value) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _strings(obj, depth: int = 0) -> list[str]:
    """String values of a JSON object (for licence scanning), skipping long per-prompt lists."""
    if isinstance(obj, str):
        return [obj]
    if depth > 3:
        return []
    if isinstance(obj, dict):
        return [
            s for key, value in obj.items() if key not in ("responses", "prompts") for s in _strings(value, depth + 1)
        ]
    if isinstance(obj, list) and len(obj) <= 20:
        return [s for value in obj for s in _strings(value, depth + 1)]
    return []


def _flatten_metrics(obj: dict, prefix: str = "", depth: int = 0) -> dict[str, float]:
    metrics = {}
    # A serialised `HarmfulScoreResult` ({"score", "flags", "judge", ...}) reads as a harmful score
    if "score" in obj and "flags" in obj:
        name = prefix.rstrip("/") or "harmful_score"
        metrics[name] = obj["score"]
        for key in ("num_prompts", "num_flagged"):
            if _number(obj.get(key)) is not None:
                metrics[f"{name}/{key}"] = obj[key]
        for category, value in (obj.get("per_category") or {}).items():
            if _number(value) is not None:
                metrics[f"{name}/{category}"] = value
        return metrics
    for key, value in obj.items():
        # run settings and timings, not results (an eval report records what ran: its protocol, token budget)
        if key in ("config", "calibration", "seconds", "protocol", "preset_deviations", "max_new_tokens"):
            continue
        if _number(value) is not None:
            metrics[f"{prefix}{key}"] = value
        elif isinstance(value, dict) and depth < 2:
            metrics.update(_flatten_metrics(value, f"{prefix}{key}/", depth + 1))
    return metrics


def _bench_metrics(data: dict, defense: str | None) -> dict[str, float]:
    """The defense's row of a bench `results.json` (output contract: docs/design/architecture.md §10), with the SFT baseline beside it."""
    rows = [row for row in data.get("rows", []) if isinstance(row, dict)]
    own = next((row for row in rows if defense and defense in (row.get("defense"), row.get("name"))), None)
    if own is None:
        return {}
    metrics = {}
    for key in ("harmful_score", "finetune_accuracy"):
        if _number(own.get(key)) is not None:
            metrics[key] = own[key]
    baseline = next((row for row in rows if row.get("name") == "sft"), None)
    if baseline is not None and baseline is not own:
        for key in ("harmful_score", "finetune_accuracy"):
            if _number(baseline.get(key)) is not None:
                metrics[f"{key} (SFT baseline)"] = baseline[key]
    for key in ("p", "n", "seed"):
        if _number((data.get("config") or {}).get(key)) is not None:
            metrics[f"bench {key}"] = data["config"][key]
    return metrics


def find_results(folder: str, defense: str | None = None) -> dict[str, Any]:
    """Evaluation results saved in a model folder, for the card.

    Looks for [`RESULT_FILES`] in `folder` and reads the first one that holds metrics: a `trl-safety eval` report or
    a serialised harmful-score result, a bench `results.json` (the row of `defense`, with the SFT baseline), or a
    `Trainer.save_metrics` file.

    Returns:
        `{"metrics": {name: value}, "source": file name, "judge": judge name or None, "mentions": [strings naming
        judges/datasets]}`, or `{}` when the folder holds no results.
    """
    for name in RESULT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            logger.warning("Could not read results from %s: %s", path, exc)
            continue
        if not isinstance(data, dict):
            continue
        metrics = _bench_metrics(data, defense) if "rows" in data else _flatten_metrics(data)
        if not metrics:
            continue
        if len(metrics) > _MAX_METRICS:
            logger.info("%s holds %d metrics; the card shows the first %d.", path, len(metrics), _MAX_METRICS)
            metrics = dict(list(metrics.items())[:_MAX_METRICS])
        return {
            "metrics": metrics,
            "source": name,
            "judge": _find_key(data, "judge"),
            "mentions": _strings(data),
            "eval_datasets": _eval_datasets(data),
        }
    return {}


def _eval_datasets(data: dict) -> dict[str, dict[str, str]]:
    """The data each headline metric was measured on, as far as a report records it: `{"harmful_score":
    {"name", "split"}, "finetune_accuracy": {"name"}}` (a metric whose data is not recorded is left out)."""
    found = {}
    if "rows" in data:  # a bench results.json: its config names the data (docs/design/architecture.md §10.1)
        config = data.get("config") or {}
        real = isinstance(config.get("model"), str)
        harmful = config.get("eval_dataset") if real else "trl_safety toy world"
        task = config.get("task") if real else "trl_safety toy world sentiment"
    else:
        harmful = _find_key(data, "prompt_source")
        task = _find_key(data.get("finetune_accuracy"), "task")
    if isinstance(harmful, str) and harmful:
        found["harmful_score"] = {"name": harmful}
        split = _find_key(data, "prompt_split")
        if "rows" not in data and isinstance(split, str):
            found["harmful_score"]["split"] = split
    if isinstance(task, str) and task:
        found["finetune_accuracy"] = {"name": task}
    return found


# model-index entries: metric key of `find_results` -> (task name, metric name); `harmful_score/<category>` follow HS
_INDEXED = {
    "harmful_score": ("Harmful score", "Harmful score (%, lower is better)"),
    "finetune_accuracy": ("Fine-tune accuracy", "Fine-tune accuracy (%)"),
    "finetune_accuracy/accuracy": ("Fine-tune accuracy", "Fine-tune accuracy (%)"),
}


def model_index_results(metrics: dict, eval_datasets: dict) -> list[EvalResult]:
    """`model-index` entries for the card's YAML header: the harmful score (with its per-category breakdown) and the
    fine-tune accuracy, each on the dataset the report names; metrics of unrecorded data, baselines and counts are not
    indexed (the Hub requires a dataset for every entry)."""
    results = []
    for key, value in metrics.items():
        head = key.split("/", 1)[0]
        if key in _INDEXED:
            task_name, metric_name = _INDEXED[key]
        elif head == "harmful_score" and key.split("/", 1)[1] not in ("num_prompts", "num_flagged"):
            task_name, metric_name = _INDEXED[head][0], f"Harmful score: {key.split('/', 1)[1]} (%)"
        else:
            continue
        dataset = eval_datasets.get(head)
        if dataset is None or _number(value) is None:
            continue
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name=task_name,
                dataset_type=dataset["name"],
                dataset_name=dataset["name"],
                dataset_split=dataset.get("split"),
                metric_type=head if key in _INDEXED else key,
                metric_name=metric_name,
                metric_value=value,
            )
        )
    return results


def _find_key(obj, key: str, depth: int = 0) -> str | None:
    """A string stored under `key` in a JSON object: its own key first, then nested objects (3 levels at most)."""
    if not isinstance(obj, dict) or depth > 2:
        return None
    if isinstance(obj.get(key), str):
        return obj[key]
    for value in obj.values():
        found = _find_key(value, key, depth + 1)
        if found is not None:
            return found
    return None


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------- card
# Sections of TRL's card that ours replaces (its title and intro, before the first section, are replaced too)
_REPLACED_TRL_SECTIONS = ("Quick start",)
# Versions added to TRL's "Framework versions" list (TRL lists TRL, Transformers, Pytorch, Datasets, Tokenizers)
_EXTRA_VERSIONS = {"trl-safety": "trl-safety", "PEFT": "peft", "Accelerate": "accelerate"}


def _trl_sections(
    info: dict, model_name: str, hub_model_id: str, dataset_name: str | None, tags, tracker_urls: dict | None
) -> str:
    """TRL's generated card body from its first `## ` section on, without the sections ours replaces, with our
    packages added to its framework versions."""
    from .. import compat  # imports TRL: only when a card is built

    paper = info.get("paper") or {}
    base_model = info.get("base_model")
    trl_card = compat.generate_model_card(
        base_model=base_model if _is_hub_id(base_model) else None,
        model_name=model_name,
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        tags=list(tags),
        trainer_name=info.get("title", info["defense"]),
        trainer_citation=paper.get("citation"),
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
        **{"wandb_url": None, "trackio_url": None, "comet_url": None, **(tracker_urls or {})},
    )
    sections = re.split(r"(?m)^(?=## )", trl_card.text)[1:]
    kept = [part for part in sections if part[3:].splitlines()[0].strip() not in _REPLACED_TRL_SECTIONS]
    # TRL's template leaves blank or space-only lines where a tracker badge is absent: one blank line is enough
    body = re.sub(r"\n(?:[ \t]*\n){2,}", "\n\n", re.sub(r"(?m)^[ \t]+$", "", "".join(kept)))
    extra = "".join(f"- {label}: {_version(name)}\n" for label, name in _EXTRA_VERSIONS.items())
    versions = re.search(r"(?m)^### Framework versions\n\n(?:- .*\n)+", body)
    if versions is None:  # a TRL whose card lists no versions: add ours as their own subsection
        return body.rstrip("\n") + f"\n\n### Framework versions\n\n{extra}"
    return body[: versions.end()] + extra + body[versions.end() :]


def build_model_card(
    info: dict,
    model_name: str,
    hub_model_id: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    results: dict | None = None,
    *,
    results_source: str | None = None,
    judge: str | None = None,
    licence_notes: list[str] | None = None,
    eval_datasets: dict | None = None,
    tracker_urls: dict | None = None,
) -> ModelCard:
    """Render the model card of a defended model: TRL's card with our intro, quick start and defense section.

    Args:
        info: the content of `defense_config.json` (`defense`, `stage`, `title`, `trainer`, `hyperparameters`,
            `datasets`, `paper`, `base_model`, `is_adapter`, `licence_notes`).
        model_name: name shown in the title.
        hub_model_id: repository id used in the quick start.
        dataset_name: training dataset id, when known.
        tags: extra tags.
        results: safety/utility metrics to show (e.g. harmful score and fine-tune accuracy), `{name: value}`.
        results_source: where the results come from (a file name), shown under the table.
        judge: the judge that scored the harmful answers, shown under the table.
        licence_notes: extra licence caveats (e.g. for the judge that produced `results`); caveats for the datasets
            named in `info` and `dataset_name` are added automatically.
        eval_datasets: the data the results were measured on (`find_results(...)["eval_datasets"]`); the results
            on recorded data go into the YAML header's `model-index`.
        tracker_urls: the W&B / Trackio / Comet links of the run (`trl_safety.compat.tracker_urls()`), for TRL's
            badges.
    """
    base_model = info.get("base_model")
    base_model_link = _is_hub_id(base_model)
    is_adapter = bool(info.get("is_adapter"))
    paper = info.get("paper") or {}
    datasets = info.get("datasets") or {}
    all_tags = {"generated_from_trainer", "trl", "trl-safety", "harmful-finetuning-defense", info["defense"]}
    all_tags.update(tags or [])
    hub_datasets = [name for name in [dataset_name, *datasets.values()] if _is_hub_id(name)]
    notes = []
    for note in [
        *info.get("licence_notes", []),
        *licence_notes_for([dataset_name or "", *datasets.values()]),
        *(licence_notes or []),
    ]:
        if note not in notes:
            notes.append(note)
    results = results if results is not None else info.get("results") or {}
    hub_model_id = hub_model_id or model_name
    card_data = ModelCardData(
        base_model=base_model if base_model_link else None,
        datasets=list(dict.fromkeys(hub_datasets)) or None,
        library_name="peft" if is_adapter else "transformers",
        model_name=model_name,
        tags=sorted(all_tags),
        eval_results=model_index_results(results, eval_datasets or {}) or None,
    )
    template = resources.files("trl_safety").joinpath("templates/model_card.md")
    ours = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        base_model=base_model or "a model built from a config",
        base_model_link=base_model_link,
        is_adapter=is_adapter,
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        defense=info["defense"],
        defense_title=info.get("title", info["defense"]),
        stage=info["stage"],
        stage_note=STAGE_NOTES.get(info["stage"], ""),
        trainer_class=info.get("trainer", "n/a"),
        hyperparameters=info.get("hyperparameters", {}),
        datasets=datasets,
        results={key: _format(value) for key, value in results.items()},
        results_source=results_source,
        judge=judge,
        explain_scores=any(key.startswith(("harmful_score", "finetune_accuracy")) for key in results),
        licence_notes=notes,
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
        defense_config_name=DEFENSE_CONFIG_NAME,
    )
    trl_part = _trl_sections(info, model_name, hub_model_id, dataset_name, sorted(all_tags), tracker_urls)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{ours.text.strip()}\n\n{trl_part.strip()}\n")


def write_folder_card(
    folder: str,
    hub_model_id: str | None = None,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """(Re)write `folder/README.md` from `folder/defense_config.json` and the results files found in the folder.

    The training dataset and tags of an existing card are kept unless given.
    """
    path = os.path.join(folder, DEFENSE_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder} has no {DEFENSE_CONFIG_NAME}: it was not saved by a trl_safety trainer. Save the model with "
            f"`trainer.save_model(...)` on a defense trainer (it writes {DEFENSE_CONFIG_NAME} beside the weights), "
            "or push a plain model with `huggingface-cli upload`."
        )
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    missing = [key for key in ("defense", "stage") if key not in info]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; it is not a trl_safety defense config.")
    readme = os.path.join(folder, "README.md")
    if os.path.isfile(readme) and (dataset_name is None or tags is None):
        existing = ModelCard.load(readme).data
        existing_datasets = existing.datasets if isinstance(existing.datasets, list) else [existing.datasets]
        # The defense's own datasets are re-derived from defense_config.json; keep only the training dataset
        own = set((info.get("datasets") or {}).values())
        others = [name for name in existing_datasets if name and name not in own]
        dataset_name = dataset_name or (others[0] if others else None)
        tags = tags if tags is not None else list(existing.tags or [])
    found = find_results(folder, info["defense"])
    card = build_model_card(
        info,
        model_name=model_name or (hub_model_id or os.path.basename(os.path.normpath(folder))).split("/")[-1],
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        tags=tags,
        results=found.get("metrics"),
        results_source=found.get("source"),
        judge=found.get("judge"),
        licence_notes=licence_notes_for(found.get("mentions", [])),
        eval_datasets=found.get("eval_datasets"),
    )
    card.save(readme)
    return card
