"""Noise generators seeded per (seed, rank, optimizer step, micro-batch).

Defenses that draw random noise in their step (Random-Vaccine, RepNoise) take a fresh generator per micro-batch,
seeded from where the step is rather than from a running RNG: a resumed run draws exactly the noise the
uninterrupted run drew, with no generator state in the checkpoint, and ranks draw independent noise.
"""

from __future__ import annotations

import torch


def micro_batch_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """The seed of one micro-batch's generator (`hash` of a tuple of ints is the same in every process)."""
    return hash((seed, rank, step, micro_batch)) % (2**63)


class MicroBatchGenerators:
    """Hands out one generator per micro-batch, counting the micro-batches within each optimizer step.

    Args:
        seed: the run's seed (`args.seed`).
        rank: the process index (`accelerator.process_index`).
    """

    def __init__(self, seed: int, rank: int):
        self.seed = seed
        self.rank = rank
        self._last = (-1, 0)  # (optimizer step, micro-batch index) of the last draw

    def next(self, step: int, device: torch.device | str) -> torch.Generator:
        """The generator of the next micro-batch of optimizer step `step`."""
        micro_batch = self._last[1] + 1 if self._last[0] == step else 0
        self._last = (step, micro_batch)
        generator = torch.Generator(device=device)
        generator.manual_seed(micro_batch_seed(self.seed, self.rank, step, micro_batch))
        return generator
