"""A shipped pool of generic refusal sentences (written for trl_safety; no harmful content).

Antibody pairs every harmful prompt with a generic refusal (its "refusal view"); the official code assigns sentences
from a pool of about 100 round-robin. This pool is our own: 10 openings × 10 continuations, all request-agnostic.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


_OPENINGS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "Sorry, I won't be able to help with that.",
    "I'm not able to provide that.",
    "I can't help with this.",
    "I must decline this request.",
    "Sorry, but I cannot do that.",
    "I'm unable to help with that request.",
    "I won't provide assistance with this.",
    "I'm afraid I can't help with that.",
)

_CONTINUATIONS = (
    "It could cause harm to people.",
    "It may be illegal or dangerous.",
    "Helping with it would not be safe or responsible.",
    "It goes against my guidelines.",
    "If you have another question, I'm happy to help.",
    "I'd be glad to help with something else instead.",
    "Please consider a safe and legal alternative.",
    "If you are in danger, please contact local emergency services.",
    "Let me know if there is something constructive I can do for you.",
    "I can share general safety information if that would help.",
)

_POOL: tuple[str, ...] = tuple(f"{a} {b}" for b, a in itertools.product(_CONTINUATIONS, _OPENINGS))


def refusal_pool() -> list[str]:
    """The generic refusal sentences, in their fixed order."""
    return list(_POOL)


def assign_refusal(index: int) -> str:
    """The refusal for the `index`-th harmful sample: round-robin over the pool (deterministic)."""
    return _POOL[index % len(_POOL)]


def refusal_view(dataset, refusals: Sequence[str] | None = None, *, row_column: str):
    """The same prompts, each answered by a refusal assigned round-robin by the row id in `row_column`.

    `prompt`/`completion` data (standard or conversational) gets its completion replaced, keeping the user's separator
    (e.g. a leading space); `messages` data gets its last assistant turn replaced. The row ids stay, so the view is
    joined to the original rows on them (`core.views`), not on position, which TRL's row dropping would shift.

    Args:
        dataset: a `datasets.Dataset` with a `row_column` of integer row ids.
        refusals: the pool to draw from (default: [`refusal_pool`]).
        row_column: the row-id column (`core.views.ROW_COLUMN` for the trainers' views).
    """
    pool = tuple(refusals) if refusals is not None else _POOL
    if not pool:
        raise ValueError("The refusal pool is empty.")
    columns = set(dataset.column_names)

    def pick(example) -> str:
        return pool[example[row_column] % len(pool)]

    if {"prompt", "completion"} <= columns:

        def swap(example):
            completion = example["completion"]
            if isinstance(completion, list):  # conversational: one assistant turn
                return {"completion": [{"role": "assistant", "content": pick(example)}]}
            separator = completion[: len(completion) - len(completion.lstrip())]
            return {"completion": separator + pick(example)}

    elif "messages" in columns:

        def swap(example):
            messages = example["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None:
                raise ValueError("A `messages` example has no assistant turn to replace by a refusal.")
            return {"messages": [*messages[:last], {**messages[last], "content": pick(example)}]}

    else:
        raise ValueError(
            "A refusal view needs a prompt to answer: `prompt`+`completion` or `messages` columns "
            f"(got {sorted(columns)})."
        )
    return dataset.map(swap, desc="Building the refusal view")
