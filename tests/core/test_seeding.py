"""Per-micro-batch noise generators: seeded from (seed, rank, step, micro-batch), nothing else."""

import torch

from trl_safety.core.seeding import MicroBatchGenerators, micro_batch_seed


def draws(generators, steps):
    return [torch.rand(3, generator=generators.next(step, "cpu")) for step in steps]


def test_each_micro_batch_is_seeded_from_its_position():
    # Two optimizer steps of two micro-batches, then one of one: micro-batch indices 0, 1, 0, 1, 0
    got = draws(MicroBatchGenerators(seed=7, rank=1), [0, 0, 1, 1, 2])
    positions = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    expected = [
        torch.rand(3, generator=torch.Generator().manual_seed(hash((7, 1, s, m)) % 2**63)) for s, m in positions
    ]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)  # same generator seed, same kernel: exact
    assert micro_batch_seed(7, 1, 1, 0) == hash((7, 1, 1, 0)) % 2**63


def test_resume_needs_no_state_and_ranks_differ():
    uninterrupted = draws(MicroBatchGenerators(seed=0, rank=0), [0, 0, 1, 1])
    resumed = draws(MicroBatchGenerators(seed=0, rank=0), [1, 1])  # a new object, starting at step 1
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[2:], resumed, strict=True))
    other_rank = draws(MicroBatchGenerators(seed=0, rank=1), [0, 0, 1, 1])
    assert not any(torch.equal(a, b) for a, b in zip(uninterrupted, other_rank, strict=True))
