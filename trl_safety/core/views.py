"""A second, row-aligned view of a dataset: the rows of another dataset that belong to a training batch's rows.

Several defenses need, for each row of a batch, the matching row of another view of the same data: RepNoise the
harmful answer to the prompt a refusal answers, Antibody the refusal view of a user sample (same prompt, refusal
answer), Antibody-align the refusal view of a harmful sample. Positions cannot join them: TRL's preparation drops
rows left fully masked by truncation, and the loaders shuffle and shard rows across ranks. So, as
`docs/design/integration.md` §2.2 describes:

1. `add_row_ids` gives the raw rows a row-id column *before* TRL's preparation, which keeps extra columns;
2. the other view is tokenized by TRL's own preparation (`RowAlignedView.prepare`), keeping the same ids;
3. the training loader keeps the id column (the trainer adds it to `_signature_columns` with
   `compat.extend_signature_columns`), and `RowAlignedCollator` looks each batch's ids up in the view and collates
   those rows with the training collator, under a key prefix. The lookup runs inside the loader, per rank and per
   worker, so every rank gets the partners of exactly the rows it trains on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from datasets import Dataset

from .. import compat


# The row-id column of the views built by trl_safety (a defense may key a view by its own documented column)
ROW_COLUMN = "_trl_safety_row"

# Columns of a prepared row that the training collator pads (it builds `attention_mask` itself)
MODEL_COLUMNS = ("input_ids", "labels")


def add_row_ids(dataset, name: str, column: str = ROW_COLUMN, keep_existing: bool = False) -> Dataset:
    """`dataset` with a `column` holding each row's number (0, 1, …), to join other views of its rows on.

    Args:
        dataset: a map-style `datasets.Dataset` (raw rows, before TRL's preparation).
        name: what the dataset is called in messages (`"train_dataset"`, `"harmful dataset"`).
        column: the row-id column.
        keep_existing: keep a `column` the dataset already has (row ids the user chose) instead of refusing it.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"The {name} must be a map-style `datasets.Dataset` (got {type(dataset).__name__}): its rows are joined "
            "with another view of them by row id."
        )
    if column in dataset.column_names:
        if keep_existing:
            return dataset
        raise ValueError(f"The {name} already has a {column!r} column, which trl_safety reserves for row ids.")
    return dataset.add_column(column, list(range(len(dataset))))


def pop_view(inputs: dict, prefix: str) -> dict:
    """Remove the keys `RowAlignedCollator` added under `prefix` from a batch and return them without the prefix."""
    return {key[len(prefix) :]: inputs.pop(key) for key in list(inputs) if key.startswith(prefix)}


class RowAlignedView:
    """A prepared (tokenized) dataset whose rows are found by row id.

    Args:
        dataset: the prepared dataset, with the row-id column.
        name: what the view is called in messages (`"harmful_dataset"`, `"refusal view"`).
        column: the row-id column.
    """

    def __init__(self, dataset: Dataset, name: str, column: str = ROW_COLUMN):
        if column not in dataset.column_names:
            raise ValueError(
                f"The {name} has no {column!r} row-id column (columns {sorted(dataset.column_names)}); add it to the "
                "raw rows with `add_row_ids` before TRL's preparation."
            )
        self.dataset = dataset
        self.name = name
        self.column = column
        ids = dataset[column]
        self._position = {row: position for position, row in enumerate(ids)}
        if len(self._position) != len(ids):
            repeated = sorted({row for row in ids if ids.count(row) > 1})
            raise ValueError(f"The {name} repeats row ids in {column!r} (e.g. {repeated[:5]}); each must be unique.")

    @classmethod
    def prepare(cls, trainer, rows: Dataset, name: str, column: str = ROW_COLUMN) -> RowAlignedView:
        """Tokenize raw `rows` (with their row ids) exactly as the trainer prepared its training data, unpacked."""
        return cls(compat.prepare_dataset(trainer, rows, trainer.args, f"{name} (trl_safety)"), name, column)

    def __len__(self) -> int:
        return len(self.dataset)

    def __contains__(self, row_id) -> bool:
        return row_id in self._position

    def missing(self, row_ids: Iterable[int]) -> list[int]:
        """The ids among `row_ids` that have no row in the view, in their order."""
        return [row for row in row_ids if row not in self._position]

    def _ids_of(self, dataset: Dataset, of: str) -> list[int]:
        if self.column not in dataset.column_names:
            raise ValueError(
                f"The {of} has no {self.column!r} row-id column (lost in TRL's preparation?), so it cannot be joined "
                f"with the {self.name}."
            )
        return dataset[self.column]

    def require(self, dataset: Dataset, of: str, hint: str = "") -> None:
        """Fail unless every row of `dataset` (the `of` dataset, with the same id column) has a row in the view."""
        missing = self.missing(self._ids_of(dataset, of))
        if missing:
            raise ValueError(
                f"{len(missing)} row(s) of the {of} (row ids {missing[:5]}) have no row with the same "
                f"{self.column!r} in the {self.name} ({len(self)} rows)" + (f": {hint}" if hint else ".")
            )

    def aligned_with(self, dataset: Dataset, of: str) -> tuple[Dataset, Dataset]:
        """`dataset` and the view restricted to the row ids both have, the view's rows in `dataset`'s order.

        Two loaders with one seed over the results then draw the rows of the same ids together.
        """
        ids = self._ids_of(dataset, of)
        kept = [position for position, row in enumerate(ids) if row in self._position]
        if not kept:
            raise ValueError(
                f"No row of the {of} has a row with the same {self.column!r} in the {self.name} (TRL's preparation "
                "drops rows left without a trainable token, e.g. by truncation to `max_length`)."
            )
        return dataset.select(kept), self.dataset.select([self._position[ids[position]] for position in kept])

    def row(self, row_id: int) -> dict:
        """The prepared row with this id (every column)."""
        self._check_present([row_id])
        return self.dataset[self._position[row_id]]

    def examples(self, row_ids: Sequence[int]) -> list[dict]:
        """The rows with these ids, in this order, as collator examples (`input_ids` and, when present, `labels`)."""
        self._check_present(row_ids)
        columns = [c for c in MODEL_COLUMNS if c in self.dataset.column_names]
        selected = self.dataset.select_columns(columns)[[self._position[row] for row in row_ids]]
        return [{c: selected[c][i] for c in columns} for i in range(len(row_ids))]

    def collate(self, row_ids: Sequence[int], collator) -> dict:
        """The rows with these ids, in this order, collated (padded) by `collator`."""
        return collator(self.examples(row_ids))

    def _check_present(self, row_ids: Iterable[int]) -> None:
        missing = self.missing(row_ids)
        if missing:
            raise KeyError(f"The {self.name} has no row with {self.column!r} in {missing[:5]}.")


class RowAlignedCollator:
    """Wraps a collator: the batch as before, plus for each view the rows of the batch's row ids, collated alike.

    The columns in `columns` are taken out of the examples before the wrapped collator sees them (TRL's collator
    drops unknown keys) and returned as tensors of their dtype; the row-id column is one of them. The rows of view `v`
    for the batch's ids come under `<prefix><key>` (`refusal_input_ids`, `refusal_attention_mask`, …), padded by the
    same collator. Examples without row ids (evaluation data) get neither.

    Args:
        collator: the trainer's collator.
        views: `{prefix: RowAlignedView}`.
        row_column: the row-id column the views are keyed by.
        columns: other per-row columns to pass through, `{column: dtype}`; a column an example lacks is skipped.
    """

    def __init__(
        self,
        collator,
        views: Mapping[str, RowAlignedView],
        row_column: str = ROW_COLUMN,
        columns: Mapping[str, torch.dtype] | None = None,
    ):
        self.collator = collator
        self.views = dict(views)
        self.row_column = row_column
        self.columns = {row_column: torch.long, **(columns or {})}

    def __call__(self, examples):
        batch = self.collator([{k: v for k, v in example.items() if k not in self.columns} for example in examples])
        for column, dtype in self.columns.items():
            if column in examples[0]:
                values = [example[column] for example in examples]
                if dtype == torch.bool:
                    values = [bool(value) for value in values]
                batch[column] = torch.tensor(values, dtype=dtype)
        if self.row_column in examples[0]:
            row_ids = [example[self.row_column] for example in examples]
            for prefix, view in self.views.items():
                batch.update({prefix + key: value for key, value in view.collate(row_ids, self.collator).items()})
        return batch
