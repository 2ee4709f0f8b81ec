"""An endless, resumable loader over an auxiliary dataset (alignment or harmful batches drawn during training)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..compat import remove_unused_columns


class EpochPermutationSampler(Sampler[int]):
    """A random permutation per epoch, seeded by `(seed, epoch)` only.

    Unlike `RandomSampler` it neither reads nor advances the global RNG, so drawing auxiliary batches does not change
    dropout masks or the main loader's order, and the same seed gives the same order on every rank.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class CyclingBatches:
    """Yields batches from a dataset forever, reshuffling each pass; its position is saved with checkpoints.

    Built from the trainer so batches go through its column pruning, collator and `accelerator.prepare` (sharded
    across ranks like the training data).

    Args:
        trainer: the trainer (its data collator and accelerator are used).
        dataset: a prepared (tokenized) dataset.
        batch_size: per-device batch size.
        description: name used in messages (`"alignment"`, `"harmful"`).
        seed: shuffling seed.
        shuffle: whether to shuffle each pass.
    """

    def __init__(self, trainer, dataset, batch_size: int, description: str, seed: int, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError(f"The {description} dataset is empty.")
        self.description = description
        self.sampler = EpochPermutationSampler(len(dataset), seed, shuffle)
        dataset = remove_unused_columns(trainer, dataset, description)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            collate_fn=trainer.data_collator,
            num_workers=0,
            generator=torch.Generator().manual_seed(seed),
        )
        self.loader = trainer.accelerator.prepare(loader)
        self.epoch = 0
        self.position = 0  # batches consumed in the current epoch
        self._iterator = None

    def _start_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._iterator = iter(self.loader)

    def __next__(self):
        if self._iterator is None:
            self._start_epoch()
            for _ in range(self.position):  # fast-forward after a resume
                next(self._iterator)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.position = 0
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"The {self.description} dataset yields no batch: it has fewer samples than the global batch "
                    "size while `dataloader_drop_last` is set."
                ) from None
        self.position += 1
        return batch

    def __iter__(self):
        return self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._iterator = None
