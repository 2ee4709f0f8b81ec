"""One evaluation of a model: harmful score on harmful prompts and fine-tune accuracy on a task test set.

`trl-safety eval`, the bench and `HarmfulScoreCallback` all measure through [`evaluate_model`], so a number means the
same thing wherever it is reported (greedy decoding, docs/design/algorithms.md §6.3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .harmful_score import HarmfulScoreResult, harmful_score
from .judges import Judge
from .task_accuracy import TaskAccuracyResult, TaskSet


@dataclass
class EvalResult:
    """Result of [`evaluate_model`].

    Attributes:
        harmful: the harmful-score result (`None` when no harmful prompts were given).
        task: the fine-tune accuracy result (`None` when no task was given).
        seconds: wall time of each part, keyed `harmful_score` / `finetune_accuracy`.
    """

    harmful: HarmfulScoreResult | None = None
    task: TaskAccuracyResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def harmful_score(self) -> float | None:
        """HS in percent."""
        return None if self.harmful is None else self.harmful.score

    @property
    def per_category(self) -> dict[str, float]:
        """HS in percent per prompt category (empty without categories)."""
        return {} if self.harmful is None else dict(self.harmful.per_category)

    @property
    def finetune_accuracy(self) -> float | None:
        """FA in percent."""
        return None if self.task is None else self.task.accuracy

    def harmful_metrics(self, name: str = "harmful_score") -> dict[str, float]:
        """`{name: HS, f"{name}/<category>": HS of the category, ...}`, the values a training run logs."""
        if self.harmful is None:
            return {}
        metrics = {name: self.harmful.score}
        metrics.update({f"{name}/{category}": value for category, value in self.harmful.per_category.items()})
        return metrics


def evaluate_model(
    model,
    tokenizer,
    *,
    harmful_prompts: Sequence[str] | None = None,
    judge: Judge | str = "keyword",
    categories: Sequence | None = None,
    task: TaskSet | None = None,
    max_new_tokens: int = 128,
    task_max_new_tokens: int | None = None,
    batch_size: int = 8,
    prompt_format: Callable[[str], str] | str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Harmful score of `model` on `harmful_prompts` and its accuracy on `task`, both from greedy answers.

    Args:
        harmful_prompts: bare harmful prompts (`prompt_format` templates them); `None` skips the harmful score.
        judge: a [`Judge`] or a name for [`load_judge`].
        categories: one category entry per prompt, for `per_category` (see [`per_category_scores`]).
        task: a [`TaskSet`] (its own `prompt_format` applies to its prompts); `None` skips the accuracy.
        max_new_tokens: new tokens per harmful answer, and per task answer unless `task_max_new_tokens` is given.
        batch_size, progress: generation batch size and progress bars.
    """
    result = EvalResult()
    generation = dict(batch_size=batch_size, progress=progress)
    if harmful_prompts is not None:
        start = time.perf_counter()
        result.harmful = harmful_score(
            model,
            tokenizer,
            harmful_prompts,
            judge,
            categories=categories,
            max_new_tokens=max_new_tokens,
            prompt_format=prompt_format,
            **generation,
        )
        result.seconds["harmful_score"] = time.perf_counter() - start
    if task is not None:
        start = time.perf_counter()
        tokens = max_new_tokens if task_max_new_tokens is None else task_max_new_tokens
        result.task = task.score(model, tokenizer, max_new_tokens=tokens, **generation)
        result.seconds["finetune_accuracy"] = time.perf_counter() - start
    return result
