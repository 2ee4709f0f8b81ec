"""A shipped pool of generic refusal sentences (written for trl_safety; no harmful content).

Antibody pairs every harmful prompt with a generic refusal (its "refusal view"); the official code assigns sentences
from a pool of about 100 round-robin. This pool is our own: 10 openings × 10 continuations, all request-agnostic.
"""

from __future__ import annotations

import itertools


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
