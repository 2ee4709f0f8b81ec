"""core.batches: the order of `EpochPermutationSampler` and `CyclingBatches` against the seeding rule written out here,
and a resumed loader continuing with the same batches."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from trl import SFTTrainer

from trl_safety.core.batches import CyclingBatches, EpochPermutationSampler


N, BATCH, SEED = 7, 3, 11
OFFSET = 10  # row i holds tokens OFFSET + i, so a batch names its rows


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path_factory.mktemp("batches")),
        train_dataset=prompt_completion_dataset(4),
        processing_class=build_tokenizer(),
    )


def rows_dataset(n=N):
    """Pre-tokenized rows of different lengths, plus a column the trainer's column pruning drops."""
    ids = [[OFFSET + i] * (1 + i % 3) for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "note": [f"row {i}" for i in range(n)]})


def permutation(seed, epoch, n=N):
    """The documented rule: a fresh generator seeded with seed · 1 000 003 + epoch, one `randperm` per epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def expected_batches(count, seed=SEED, start=0):
    """Batches `start`..`start + count` of the endless sequence: each epoch's permutation cut into batches, the last
    one short, then the next epoch."""
    batches, epoch = [], 0
    while len(batches) < start + count:
        order = permutation(seed, epoch)
        batches += [order[i : i + BATCH] for i in range(0, N, BATCH)]
        epoch += 1
    return batches[start : start + count]


def rows_of(batch):
    return (batch["input_ids"][:, 0] - OFFSET).tolist()


def test_sampler_permutes_per_epoch_from_the_seed_only():
    sampler = EpochPermutationSampler(N, seed=SEED)
    state = torch.random.get_rng_state()
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is neither read nor advanced
    assert first == permutation(SEED, 0) and second == permutation(SEED, 1) and first != second
    assert sorted(first) == list(range(N)) and len(sampler) == N
    assert list(EpochPermutationSampler(N, seed=SEED)) == first  # same seed, same order (on every rank)
    assert list(EpochPermutationSampler(N, seed=SEED + 1)) != first
    assert list(EpochPermutationSampler(N, seed=SEED, shuffle=False)) == list(range(N))


def test_cycling_order_across_epochs_and_padding(trainer):
    batches = CyclingBatches(trainer, rows_dataset(), BATCH, "harmful", seed=SEED)
    drawn = [next(batches) for _ in range(8)]  # 3 batches per epoch: into the third epoch
    assert [rows_of(b) for b in drawn] == expected_batches(8)
    assert batches.state_dict() == {"epoch": 2, "position": 2}
    # The trainer's collator pads each batch on the right (pad id, attention 0, labels -100); pruned columns are gone
    pad = trainer.processing_class.pad_token_id
    for batch in drawn:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        for row, ids, mask, labels in zip(
            rows_of(batch), batch["input_ids"], batch["attention_mask"], batch["labels"]
        ):
            length = 1 + row % 3
            width = ids.numel()
            assert ids.tolist() == [OFFSET + row] * length + [pad] * (width - length)
            assert mask.tolist() == [1] * length + [0] * (width - length)
            assert labels.tolist() == [OFFSET + row] * length + [-100] * (width - length)


def test_state_dict_resumes_with_the_same_next_batches(trainer):
    straight = CyclingBatches(trainer, rows_dataset(), BATCH, "harmful", seed=SEED)
    for _ in range(4):  # one batch into the second epoch
        next(straight)
    state = straight.state_dict()
    assert state == {"epoch": 1, "position": 1}
    resumed = CyclingBatches(trainer, rows_dataset(), BATCH, "harmful", seed=SEED)
    resumed.load_state_dict(state)
    after_resume = [rows_of(next(resumed)) for _ in range(5)]
    assert after_resume == [rows_of(next(straight)) for _ in range(5)] == expected_batches(5, start=4)
    assert resumed.state_dict() == straight.state_dict() == {"epoch": 2, "position": 3}  # 9 batches


def test_unshuffled_and_empty(trainer):
    batches = CyclingBatches(trainer, rows_dataset(), BATCH, "alignment", seed=SEED, shuffle=False)
    assert [rows_of(next(batches)) for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]
    with pytest.raises(ValueError, match="The alignment dataset is empty"):
        CyclingBatches(trainer, rows_dataset().select([]), BATCH, "alignment", seed=SEED)
