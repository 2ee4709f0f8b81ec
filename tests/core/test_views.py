"""core.views: the rows a view returns and how they are padded, against tokenizing and padding those rows by hand."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from trl import SFTTrainer

from trl_safety import compat
from trl_safety.core.views import ROW_COLUMN, RowAlignedCollator, RowAlignedView, add_row_ids, pop_view


MAX_LENGTH = 32


class JoinedTrainer(SFTTrainer):
    """SFTTrainer keeping the row id (and a flag) through its column pruning, as the defenses that join views do."""

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        compat.extend_signature_columns(self, [ROW_COLUMN, "flag"])


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tokenizer):
    return SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path_factory.mktemp("views"), max_length=MAX_LENGTH),
        train_dataset=prompt_completion_dataset(4),
        processing_class=tokenizer,
    )


def by_hand(tokenizer, row):
    """TRL's prompt/completion preparation written out: EOS appended, loss on the completion only, kept start."""
    prompt_length = len(tokenizer(row["prompt"])["input_ids"])
    ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"][:MAX_LENGTH]
    return {"input_ids": ids, "labels": [-100 if t < prompt_length else token for t, token in enumerate(ids)]}


def padded(rows, pad_id):
    """Right padding to the longest row: `pad_id` in the ids, 0 in the attention mask, -100 in the labels."""
    width = max(len(row["input_ids"]) for row in rows)

    def pad(key, value):
        return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])

    mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in rows])
    return {"input_ids": pad("input_ids", pad_id), "attention_mask": mask, "labels": pad("labels", -100)}


def raw_rows(n=10, seed=3, drop=4):
    """Prompt/completion rows; row `drop` has a prompt that fills `max_length`, so TRL's preparation removes it."""
    data = prompt_completion_dataset(n, seed=seed).to_dict()
    data["prompt"][drop] = " ".join(["write a story about the cat"] * 20)
    return Dataset.from_dict(data)


def assert_batch_equal(batch, expected, prefix=""):
    for key, value in expected.items():
        assert torch.equal(batch[prefix + key], value), prefix + key


def test_view_returns_the_asked_rows_after_shuffling_and_preparation(trainer, tokenizer):
    raw = raw_rows()
    shuffled = add_row_ids(raw, "raw rows").shuffle(seed=1)  # positions no longer equal row ids
    assert shuffled[ROW_COLUMN] != list(range(len(raw)))
    view = RowAlignedView.prepare(trainer, shuffled, "test view")

    assert len(view) == len(raw) - 1 and 4 not in view and view.missing([4, 2, 9]) == [4]
    asked = [7, 0, 9, 2, 2, 5]  # any order, repeats allowed
    expected = [by_hand(tokenizer, raw[row]) for row in asked]
    assert view.examples(asked) == expected
    assert view.row(7)["input_ids"] == expected[0]["input_ids"] and view.row(7)[ROW_COLUMN] == 7
    # Padded like TRL's collator pads the training data (right padding with the pad token, -100 labels)
    assert_batch_equal(view.collate(asked, trainer.data_collator), padded(expected, tokenizer.pad_token_id))


def test_collator_joins_each_shuffled_training_batch_to_its_rows(tmp_path, tokenizer):
    main = prompt_completion_dataset(8, seed=0)
    main = main.add_column("flag", [i % 3 == 0 for i in range(8)])
    other = Dataset.from_dict(
        {"prompt": main["prompt"], "completion": prompt_completion_dataset(8, seed=5)["completion"]}
    )
    trainer = JoinedTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, max_length=MAX_LENGTH, per_device_train_batch_size=3),
        train_dataset=add_row_ids(main, "train_dataset"),
        processing_class=tokenizer,
    )
    view = RowAlignedView.prepare(trainer, add_row_ids(other, "other"), "other view")
    trainer.data_collator = RowAlignedCollator(trainer.data_collator, {"other_": view}, columns={"flag": torch.bool})

    order = []
    for batch in trainer.get_train_dataloader():
        rows = batch[ROW_COLUMN].tolist()
        order += rows
        assert_batch_equal(batch, padded([by_hand(tokenizer, main[r]) for r in rows], tokenizer.pad_token_id))
        other_rows = [by_hand(tokenizer, other[r]) for r in rows]
        assert_batch_equal(batch, padded(other_rows, tokenizer.pad_token_id), prefix="other_")
        assert batch["flag"].tolist() == [r % 3 == 0 for r in rows] and batch["flag"].dtype == torch.bool
        assert batch[ROW_COLUMN].dtype == torch.long
    assert sorted(order) == list(range(8)) and order != sorted(order)  # every row once, in the loader's shuffle

    # Rows without ids (evaluation data): the wrapped collator's batch, nothing joined
    plain = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = trainer.data_collator(plain)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert_batch_equal(batch, padded(plain, tokenizer.pad_token_id))


def test_pop_view_takes_out_the_prefixed_keys():
    inputs = {"input_ids": 1, "other_input_ids": 2, "other_labels": 3, "labels": 4}
    assert pop_view(inputs, "other_") == {"input_ids": 2, "labels": 3}
    assert inputs == {"input_ids": 1, "labels": 4}


def test_add_row_ids():
    rows = Dataset.from_dict({"prompt": ["a", "b", "c"]})
    assert add_row_ids(rows, "train_dataset")[ROW_COLUMN] == [0, 1, 2]
    with pytest.raises(TypeError, match="train_dataset must be a map-style"):
        add_row_ids([{"prompt": "a"}], "train_dataset")
    chosen = rows.add_column(ROW_COLUMN, [5, 3, 4])
    with pytest.raises(ValueError, match=f"train_dataset already has a '{ROW_COLUMN}' column"):
        add_row_ids(chosen, "train_dataset")
    assert add_row_ids(chosen, "train_dataset", keep_existing=True)[ROW_COLUMN] == [5, 3, 4]


def test_bad_views_and_ids_fail_naming_the_dataset(trainer):
    prepared = RowAlignedView.prepare(trainer, add_row_ids(prompt_completion_dataset(8), "x"), "x").dataset
    with pytest.raises(ValueError, match="harmful_dataset has no 'pair' row-id column"):
        RowAlignedView(prepared, "harmful_dataset", column="pair")
    with pytest.raises(ValueError, match=r"harmful_dataset repeats row ids in 'pair' \(e.g. \[1\]\)"):
        RowAlignedView(prepared.add_column("pair", [0, 1, 1, 2, 3, 4, 5, 6]), "harmful_dataset", column="pair")

    # Paired data of different lengths: the train rows past the end of the partner have no partner
    partner = RowAlignedView(prepared.select(range(5)), "harmful_dataset")
    with pytest.raises(
        ValueError,
        match=r"3 row\(s\) of the train_dataset \(row ids \[5, 6, 7\]\) have no row with the same "
        rf"'{ROW_COLUMN}' in the harmful_dataset \(5 rows\): pair them",
    ):
        partner.require(prepared, "train_dataset", "pair them")
    partner.require(prepared.select([4, 0, 2]), "train_dataset")  # a shorter main side is fine
    with pytest.raises(ValueError, match=f"train_dataset has no '{ROW_COLUMN}' row-id column"):
        partner.require(prepared.remove_columns(ROW_COLUMN), "train_dataset")
    with pytest.raises(KeyError, match=rf"harmful_dataset has no row with '{ROW_COLUMN}' in \[6, 9\]"):
        partner.collate([0, 6, 9], trainer.data_collator)
    with pytest.raises(KeyError, match="harmful_dataset"):
        partner.row(7)


def test_aligned_with_keeps_the_common_rows_in_one_order(trainer):
    raw = raw_rows(drop=4)
    view = RowAlignedView.prepare(trainer, add_row_ids(raw, "raw").shuffle(seed=2), "refusal view")  # lacks row 4
    main = RowAlignedView.prepare(trainer, add_row_ids(raw_rows(drop=6), "raw"), "harmful").dataset  # lacks row 6
    kept_main, kept_view = view.aligned_with(main, "harmful dataset")
    expected = [0, 1, 2, 3, 5, 7, 8, 9]
    assert kept_main[ROW_COLUMN] == expected and kept_view[ROW_COLUMN] == expected
    assert kept_view["input_ids"] == [view.row(r)["input_ids"] for r in expected]
    disjoint = RowAlignedView(view.dataset.select([0]), "refusal view")
    with pytest.raises(ValueError, match=f"No row of the harmful dataset has a row with the same '{ROW_COLUMN}'"):
        disjoint.aligned_with(
            main.filter(lambda row: row != view.dataset[0][ROW_COLUMN], input_columns=ROW_COLUMN), "harmful dataset"
        )
