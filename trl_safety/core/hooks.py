"""Activation capture and perturbation hooks that are always removed, even when the forward raises."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def first_tensor(output) -> torch.Tensor:
    """The hidden-state tensor of a module output (`output[0]` for tuples, as attention modules return)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_first(output, tensor: torch.Tensor):
    """Return `output` with its hidden-state tensor replaced, keeping the container type."""
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record the hidden-state output of each module during the forwards run inside the block.

    Yields a list aligned with `modules`. Only the first call of each module is kept: under non-reentrant gradient
    checkpointing the forward is re-run during backward, and that recomputation must not replace the tensors the
    caller differentiates against.
    """
    captured: list[torch.Tensor | None] = [None] * len(modules)
    handles = []

    def make_hook(index: int):
        def hook(_module, _inputs, output):
            if captured[index] is None:
                captured[index] = first_tensor(output)

        return hook

    try:
        for index, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_hook(index)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_to_outputs(modules: Sequence[nn.Module], deltas: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Add a constant tensor to each module's hidden-state output while the block runs.

    The hook returns a new output (`out + delta`) instead of editing `.data`, so autograd sees the sum; the delta is a
    constant, so gradients w.r.t. parameters are those of the perturbed forward. It fires again in checkpoint
    recomputation, adding the same delta, which keeps recomputed activations identical.
    """
    if len(modules) != len(deltas):
        raise ValueError(f"Got {len(deltas)} perturbations for {len(modules)} modules.")
    handles = []

    def make_hook(delta: torch.Tensor):
        def hook(_module, _inputs, output):
            hidden = first_tensor(output)
            if hidden.shape != delta.shape:
                raise RuntimeError(
                    f"Perturbation of shape {tuple(delta.shape)} does not fit the module output "
                    f"{tuple(hidden.shape)}: the perturbed pass must see the same batch as the probe pass."
                )
            return replace_first(output, hidden + delta.to(hidden.dtype))

        return hook

    try:
        for module, delta in zip(modules, deltas):
            if delta is not None:
                handles.append(module.register_forward_hook(make_hook(delta)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def gradient_checkpointing_disabled(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily run decoder layers without activation checkpointing.

    `torch.autograd.grad` cannot differentiate through reentrant checkpointing, which TRL forces for PEFT + ZeRO-3.
    Probe passes that only need activation gradients therefore run with full activations.
    """
    previous = [getattr(layer, "gradient_checkpointing", None) for layer in layers]
    try:
        for layer, flag in zip(layers, previous):
            if flag is not None:
                layer.gradient_checkpointing = False
        yield
    finally:
        for layer, flag in zip(layers, previous):
            if flag is not None:
                layer.gradient_checkpointing = flag
