"""Model cards with a harmful-fine-tuning-defense section, built from `defense_config.json` content."""

from __future__ import annotations

import os
from importlib import resources
from importlib.metadata import PackageNotFoundError, version

from huggingface_hub import ModelCard, ModelCardData


STAGE_NOTES = {
    "alignment": "This is an alignment-stage defense: it hardens the model before any customer fine-tuning. Users "
    "fine-tune it with plain SFT afterwards.",
    "fine-tuning": "This is a fine-tuning-stage defense: it ran during (possibly poisoned) user fine-tuning to keep "
    "the safety alignment.",
    "post-fine-tuning": "This is a post-fine-tuning defense: it repaired the weights after user fine-tuning.",
}

DEFENSE_CONFIG_NAME = "defense_config.json"


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def build_model_card(
    info: dict,
    model_name: str,
    hub_model_id: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    results: dict | None = None,
) -> ModelCard:
    """Render the model card of a defended model.

    Args:
        info: the content of `defense_config.json` (`defense`, `stage`, `title`, `trainer`, `hyperparameters`,
            `datasets`, `paper`, `base_model`, `is_adapter`, `licence_notes`).
        model_name: name shown in the title.
        hub_model_id: repository id used in the quick start.
        dataset_name: training dataset id, when known.
        tags: extra tags.
        results: safety/utility metrics to show (e.g. harmful score and fine-tune accuracy).
    """
    base_model = info.get("base_model")
    base_model_link = bool(base_model) and not os.path.isabs(base_model) and not os.path.isdir(base_model)
    is_adapter = bool(info.get("is_adapter"))
    paper = info.get("paper") or {}
    all_tags = {"generated_from_trainer", "trl", "trl-safety", "harmful-finetuning-defense", info["defense"]}
    all_tags.update(tags or [])
    card_data = ModelCardData(
        base_model=base_model if base_model_link else None,
        datasets=dataset_name if dataset_name and not os.path.exists(dataset_name) else None,
        library_name="peft" if is_adapter else "transformers",
        model_name=model_name,
        tags=sorted(all_tags),
    )
    template = resources.files("trl_safety").joinpath("templates/model_card.md")
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        base_model=base_model or "a model built from a config",
        base_model_link=base_model_link,
        is_adapter=is_adapter,
        hub_model_id=hub_model_id or model_name,
        dataset_name=dataset_name,
        defense=info["defense"],
        defense_title=info.get("title", info["defense"]),
        stage=info["stage"],
        stage_note=STAGE_NOTES.get(info["stage"], ""),
        trainer_class=info.get("trainer", "n/a"),
        hyperparameters=info.get("hyperparameters", {}),
        datasets=info.get("datasets", {}),
        results=results or info.get("results") or {},
        licence_notes=info.get("licence_notes", []),
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
        citation=paper.get("citation"),
        versions={name: _version(name) for name in ("trl-safety", "trl", "transformers", "peft", "torch", "datasets")},
    )
