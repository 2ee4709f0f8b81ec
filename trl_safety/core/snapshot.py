"""Snapshots of trainable parameters with exact (bit-for-bit) restore.

Booster-style defenses perturb weights in place and must put them back; subtracting the step again is not exact in
bf16, so the snapshot is copied back instead. Lisa keeps snapshots as proximal anchors and saves them in checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .distributed import gathered


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with `requires_grad`, by qualified name (the LoRA factors for a PEFT model)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class ParameterSnapshot:
    """Detached copies of a set of parameters.

    Args:
        params: parameters by name, e.g. from [`trainable_parameters`].
        device: where the copies live (`"cpu"` keeps a full-model anchor off the accelerator).
    """

    def __init__(self, params: dict[str, nn.Parameter], device: torch.device | str | None = None):
        self.params = dict(params)
        with torch.no_grad(), gathered(self.params.values()):
            self.tensors = {
                name: param.detach().to(device=device or param.device, copy=True)
                for name, param in self.params.items()
            }

    def __iter__(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        for name, param in self.params.items():
            yield name, param, self.tensors[name]

    def __len__(self) -> int:
        return len(self.tensors)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back into the live parameters."""
        with gathered(self.params.values(), modifier_rank=0):
            for name, param in self.params.items():
                param.copy_(self.tensors[name].to(param.device))

    @torch.no_grad()
    def update(self) -> None:
        """Re-take the snapshot from the live parameters (in place, no new allocation)."""
        with gathered(self.params.values()):
            for name, param in self.params.items():
                self.tensors[name].copy_(param.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu() for name, tensor in self.tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.tensors) - set(state)
        unexpected = set(state) - set(self.tensors)
        if missing or unexpected:
            raise ValueError(
                f"Snapshot does not match the trainable parameters (missing: {sorted(missing)[:5]}, "
                f"unexpected: {sorted(unexpected)[:5]}). Was the checkpoint written for another model or LoRA setup?"
            )
        for name, tensor in state.items():
            self.tensors[name].copy_(tensor)

    def squared_distance(self) -> torch.Tensor:
        """Σ‖w − snapshot‖² over all parameters (for logging)."""
        with torch.no_grad(), gathered(self.params.values()):
            return sum(
                ((param.detach() - self.tensors[name].to(param.device)).float() ** 2).sum()
                for name, param in self.params.items()
            )
