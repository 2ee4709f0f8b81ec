"""Harmful score (HS): the percentage of harmful prompts whose generated answer a judge flags (docs/design/algorithms.md §6.3)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .generation import generate_responses
from .judges import Judge, load_judge


logger = logging.getLogger(__name__)


@dataclass
class HarmfulScoreResult:
    """Result of [`harmful_score`].

    Attributes:
        score: HS in percent, `100 × #flagged / #prompts`.
        flags: per-prompt judge decision.
        responses / prompts: what was judged (prompts as given, before any template).
        per_category: HS in percent within each prompt category (when categories were given).
        judge: the judge's name.
        scores: per-prompt judge score (P(harmful)).
        judge_categories: for judges that score harm categories (beaver-dam), the percent of responses whose
            category probability is above the threshold, per category.
    """

    score: float
    flags: list[bool]
    responses: list[str]
    prompts: list[str]
    per_category: dict[str, float]
    judge: str
    scores: list[float] = field(default_factory=list)
    judge_categories: dict[str, float] = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["num_prompts"] = self.num_prompts
        data["num_flagged"] = sum(self.flags)
        return data

    def to_json(self, path: str | None = None, **kwargs) -> str:
        text = json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text


def _percent(flags: Sequence[bool]) -> float:
    return 100.0 * sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def _group_by_category(flags: Sequence[bool], categories: Sequence) -> dict[str, list[bool]]:
    """The flags of each category, categories sorted by name (see [`per_category_scores`] for the entry forms)."""
    if len(categories) != len(flags):
        raise ValueError(f"Got {len(categories)} categories for {len(flags)} prompts.")
    grouped: dict[str, list[bool]] = {}
    for flag, category in zip(flags, categories):
        if category is None:
            continue
        if isinstance(category, str):
            names = [category]
        elif isinstance(category, dict):
            names = [name for name, on in category.items() if on]
        else:
            names = list(category)
        for name in names:
            grouped.setdefault(str(name), []).append(bool(flag))
    return dict(sorted(grouped.items()))


def per_category_scores(flags: Sequence[bool], categories: Sequence) -> dict[str, float]:
    """HS per category. A category entry may be a name, `None` (skipped), a list of names, or a BeaverTails-style dict
    of booleans (the prompt counts in every category marked true)."""
    return {name: _percent(values) for name, values in _group_by_category(flags, categories).items()}


def per_category_counts(flags: Sequence[bool], categories: Sequence) -> dict[str, tuple[int, int]]:
    """`{category: (prompts, flagged)}`, grouped as [`per_category_scores`] groups them (for tables)."""
    return {name: (len(values), sum(values)) for name, values in _group_by_category(flags, categories).items()}


def judge_responses(
    judge: Judge | str,
    prompts: Sequence[str],
    responses: Sequence[str],
    categories: Sequence | None = None,
) -> HarmfulScoreResult:
    """Judge given responses (no generation) and aggregate them into a [`HarmfulScoreResult`]."""
    judge = load_judge(judge)
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses.")
    if not prompts:
        raise ValueError("harmful_score needs at least one prompt.")
    category_rows = None
    if hasattr(judge, "category_scores"):
        category_rows = judge.category_scores(prompts, responses)
        scores = [max(row.values()) if row else 0.0 for row in category_rows]
    else:
        scores = judge.score(prompts, responses)
    flags = [s > judge.threshold for s in scores]
    judge_categories = {}
    if category_rows:
        names = list(category_rows[0])
        judge_categories = {n: _percent([row[n] > judge.threshold for row in category_rows]) for n in names}
    return HarmfulScoreResult(
        score=_percent(flags),
        flags=flags,
        responses=responses,
        prompts=prompts,
        per_category=per_category_scores(flags, list(categories)) if categories is not None else {},
        judge=judge.name,
        scores=[float(s) for s in scores],
        judge_categories=judge_categories,
    )


def harmful_score(
    model,
    tokenizer,
    prompts: Sequence[str],
    judge: Judge | str = "keyword",
    *,
    categories: Sequence | None = None,
    responses: Sequence[str] | None = None,
    **generation_kwargs,
) -> HarmfulScoreResult:
    """Generate greedy answers to `prompts` and return the judge's harmful score (percent flagged).

    Args:
        model, tokenizer: the model under test (any causal LM or PEFT model with `generate`); ignored when
            `responses` is given.
        prompts: harmful prompts, bare (apply the training template with `prompt_format=`).
        judge: a [`Judge`] or a name for [`load_judge`] (`"keyword"`, `"beaver-dam"`, a classifier path).
        categories: one category per prompt (name, list of names, BeaverTails dict, or `None`) for `per_category`.
        responses: precomputed answers; skips generation.
        **generation_kwargs: forwarded to [`generate_responses`] (`max_new_tokens`, `batch_size`, `prompt_format`,
            `progress`).
    """
    prompts = list(prompts)
    if responses is None:
        if model is None or tokenizer is None:
            raise ValueError("harmful_score needs a model and tokenizer, or precomputed `responses`.")
        responses = generate_responses(model, tokenizer, prompts, **generation_kwargs)
    elif generation_kwargs:
        logger.debug("harmful_score: responses given, ignoring generation arguments %s", sorted(generation_kwargs))
    return judge_responses(judge, prompts, responses, categories)
