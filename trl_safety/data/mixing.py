"""The attack set: `n` fine-tuning rows of which a fraction `p` are harmful (docs/design/algorithms.md §6.1)."""

from __future__ import annotations

import logging
import random

from datasets import Dataset, Value, concatenate_datasets


logger = logging.getLogger(__name__)


def num_harmful(n: int, p: float) -> int:
    """Number of harmful rows in a mix of `n` rows at ratio `p`: Python's `round(n * p)` (ties go to even)."""
    return round(n * p)


def mix_harmful(
    user: Dataset,
    harmful: Dataset | None,
    n: int,
    p: float,
    seed: int = 0,
    *,
    select: str = "first",
    shuffle: bool = True,
) -> Dataset:
    """Mix `round(n·p)` harmful rows into `n - round(n·p)` user rows.

    Args:
        user, harmful: datasets in the same TRL format (only their shared columns are kept); `harmful` may be `None`
            when no harmful row is needed (`round(n·p) == 0`).
        n: total rows; p: harmful fraction in [0, 1].
        seed: seeds row selection (for `select="random"`) and the shuffle; same seed → same dataset.
        select: `"first"` takes the first rows of each dataset, as the papers do; `"random"` samples them.
        shuffle: interleave the two parts (otherwise harmful rows come first).

    Returns:
        A `Dataset` of exactly `n` rows with a boolean `is_harmful` column.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}.")
    if select not in ("first", "random"):
        raise ValueError(f"select must be 'first' or 'random', got {select!r}.")
    n_harmful = num_harmful(n, p)
    n_user = n - n_harmful
    if harmful is None:
        if n_harmful:
            raise ValueError(f"Need {n_harmful} harmful rows (n={n}, p={p}) but no harmful dataset was given.")
        harmful = user.select([])
    if n_harmful > len(harmful):
        raise ValueError(f"Need {n_harmful} harmful rows (n={n}, p={p}) but the harmful dataset has {len(harmful)}.")
    if n_user > len(user):
        raise ValueError(f"Need {n_user} user rows (n={n}, p={p}) but the user dataset has {len(user)}.")
    shared = [c for c in user.column_names if c in harmful.column_names and c != "is_harmful"]
    if not shared:
        raise ValueError(
            f"The user ({user.column_names}) and harmful ({harmful.column_names}) datasets share no column; convert "
            "them to the same TRL format first."
        )
    dropped = sorted((set(user.column_names) | set(harmful.column_names)) - set(shared) - {"is_harmful"})
    if dropped:
        logger.info("mix_harmful: dropping columns not present in both datasets: %s", dropped)
    rng = random.Random(seed)

    def pick(dataset: Dataset, k: int) -> Dataset:
        indices = list(range(k)) if select == "first" else sorted(rng.sample(range(len(dataset)), k))
        part = dataset.select(indices).select_columns(shared)
        return part

    flag = Value("bool")
    harmful_part = pick(harmful, n_harmful).add_column("is_harmful", [True] * n_harmful, feature=flag)
    user_part = pick(user, n_user).add_column("is_harmful", [False] * n_user, feature=flag)
    try:
        mixed = concatenate_datasets([harmful_part.cast(user_part.features), user_part])
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"The user and harmful rows have different formats ({user_part.features} vs {harmful_part.features}); "
            "convert them to the same TRL format first."
        ) from exc
    if shuffle:
        order = list(range(len(mixed)))
        rng.shuffle(order)
        mixed = mixed.select(order)
    return mixed.flatten_indices()
