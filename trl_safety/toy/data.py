"""Mixing harmful samples into a user's fine-tuning data (the attack of the threat model)."""

from __future__ import annotations

import logging


logger = logging.getLogger(__name__)


def mix_harmful(user, harmful, n: int, p: float, seed: int = 0):
    """`n` rows: `round(n·p)` from `harmful` (its first rows) and the rest from `user`, shuffled with `seed`.

    Uses `trl_safety.data.mix_harmful` when the package provides it, so the toy world and real runs mix alike.
    """
    try:
        from trl_safety.data import mix_harmful as package_mix
    except ImportError:
        package_mix = None
    if package_mix is not None:
        return package_mix(user, harmful, n=n, p=p, seed=seed)
    return _mix_harmful(user, harmful, n=n, p=p, seed=seed)


def _mix_harmful(user, harmful, n: int, p: float, seed: int = 0):
    from datasets import concatenate_datasets

    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`p` must be in [0, 1], got {p}.")
    num_harmful = round(n * p)
    num_user = n - num_harmful
    if num_user > len(user):
        raise ValueError(f"Need {num_user} user samples for n={n}, p={p}, but the user data has only {len(user)}.")
    parts = [user.select(range(num_user))]
    if num_harmful:
        if harmful is None or num_harmful > len(harmful):
            available = 0 if harmful is None else len(harmful)
            raise ValueError(f"Need {num_harmful} harmful samples for n={n}, p={p}, but only {available} are given.")
        parts.append(harmful.select(range(num_harmful)).cast(parts[0].features))
    return concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
