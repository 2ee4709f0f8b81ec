"""Activation capture and perturbation hooks that are always removed, even when the forward raises."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
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


class _StopForward(Exception):
    """Raised by a forward hook to end a calibration forward once the module it waits for has run."""


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (of its first parameter without them)."""
    from .layers import unwrap_model

    base = unwrap_model(model)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return embeddings.weight.device
    return next(base.parameters()).device


@torch.no_grad()
def input_statistics(
    model: nn.Module,
    modules: Sequence[nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    statistic: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    stop_after: nn.Module | None = None,
) -> tuple[list[torch.Tensor], int, int]:
    """Σ over the batches of `statistic(x, mask)` for each module's input `x` (the calibration statistics of the
    post-hoc repairs: Antidote's feature norms, Safe Delta's Hessians), from no-grad forwards in eval mode.

    `mask` is the batch's attention mask (None without one): the statistic leaves the padding out itself. The hooks
    are always removed and every module's training flag restored; `stop_after` (a module) ends each forward once it
    has run, since later layers are not needed. Returns the sums, the number of sequences and of (unpadded) tokens;
    a module that never ran, or no batch at all, is an error.
    """
    from .layers import unwrap_model

    sums: list[torch.Tensor | None] = [None] * len(modules)
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(index: int):
        def hook(_module, inputs, _output):
            value = statistic(inputs[0].detach(), current["mask"])
            sums[index] = value if sums[index] is None else sums[index] + value

        return hook

    def stop(_module, _inputs, _output):
        raise _StopForward

    forward_kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(type(unwrap_model(model)).forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # only the hooks' statistics matter, not the (B, T, V) logits
    device = input_device(model)
    training_flags = {module: module.training for module in model.modules()}
    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    num_samples = num_tokens = 0
    try:
        model.eval()
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = attention_mask.to(device) if attention_mask is not None else None
            current["mask"] = attention_mask
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
            except _StopForward:
                pass
            num_samples += input_ids.shape[0]
            num_tokens += int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags.items():
            module.training = flag
    if num_samples == 0:
        raise ValueError("The calibration pass saw no sample.")
    for index, total in enumerate(sums):
        if total is None:
            raise RuntimeError(
                f"Module #{index} ({type(modules[index]).__name__}) never ran during the calibration forward, so it "
                "has no input statistics. Check `target_modules` and that the adapter is active."
            )
    return sums, num_samples, num_tokens
