"""The proximal term ρ/2‖w − anchor‖² on trainable parameters, applied as parameter gradient hooks.

Lisa's proximal term (and [`ProximalCallback`]) adds ρ(w − anchor) to the gradient of every trainable parameter. It is
added by a hook on each parameter rather than as a loss term because the loss form fails under DeepSpeed ZeRO-3:
outside its module's forward a parameter is an empty shard, while during the backward ZeRO-3 gathers it, so the hook
sees the full parameter and gradient (docs/design/integration.md §4.3, measured bit-identical to the loss form on one process,
DDP, ZeRO-2 and ZeRO-3). The hook runs before DDP/ZeRO gradient reduction, so every rank adds the same term and the
averaged gradient carries it once.

Each backward adds ρ(w − anchor)·scale, with `scale` = 1 / (micro-batches of the optimizer step), so gradient
accumulation sums to exactly ρ(w − anchor) per optimizer step. Hooks also fire inside `torch.autograd.grad(...,
params)`: gate probe passes with [`ProximalTerm.disabled`].
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .snapshot import ParameterSnapshot


def proximal_active(step: int, max_steps: int, warmup_ratio: float) -> bool:
    """Whether the term applies at optimizer step `step` (0-based).

    As in the official Lisa code (`steps > warmup_ratio * total_steps`), the term is off for the steps
    `0 … ⌊warmup_ratio·max_steps⌋`; a ratio of 0 turns it on from the first step.
    """
    return warmup_ratio <= 0 or step > warmup_ratio * max_steps


class ProximalTerm:
    """Gradient hooks adding ρ·(w − anchor)·scale to the gradient of each given parameter.

    Args:
        params: the parameters the term covers, by name (the trainable ones, see [`trainable_parameters`]).
        rho: proximal intensity ρ.
        anchor: a [`ParameterSnapshot`] over the same names; a snapshot of the current values when omitted. It may be
            swapped later by assigning `term.anchor` (Lisa keeps two anchors).
        scale: callable returning the factor of the current backward, `1 / micro-batches per optimizer step`.
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        rho: float,
        anchor: ParameterSnapshot | None = None,
        scale: Callable[[], float] | None = None,
    ):
        self.params = dict(params)
        self.rho = float(rho)
        self.anchor = anchor if anchor is not None else ParameterSnapshot(self.params)
        if set(self.anchor.tensors) != set(self.params):
            raise ValueError("The anchor snapshot does not cover the same parameters as the proximal term.")
        self.scale = scale or (lambda: 1.0)
        self.enabled = True
        self._handles: list = []
        self._value: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------- hooks
    def attach(self) -> ProximalTerm:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = [param.register_hook(self._hook(name, param)) for name, param in self.params.items()]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Switch the term off inside the block (for probe passes that differentiate w.r.t. the parameters)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def _hook(self, name: str, param: nn.Parameter):
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled or self.rho == 0.0:
                return None  # gradient unchanged
            coefficient = self.rho * self.scale()
            with torch.no_grad():
                # Under ZeRO-3 the parameter is gathered while its gradient is computed, so this is the full tensor
                diff = param.detach() - self.anchor.tensors[name].to(param.device)
                term = 0.5 * coefficient * diff.float().pow(2).sum()
                self._value = term if self._value is None else self._value + term
                return grad + (coefficient * diff).to(grad.dtype)

        return hook

    # ------------------------------------------------------------------------------------------------- anchors
    def reanchor(self) -> None:
        """Move the anchor to the current weights."""
        self.anchor.update()

    def pop_value(self) -> float | None:
        """ρ/2‖w − anchor‖² as applied since the last call (summed over the micro-batches' shares), or None."""
        value, self._value = self._value, None
        return None if value is None else float(value)

    def value(self) -> float:
        """ρ/2‖w − anchor‖² at the current weights (gathers ZeRO-3 shards)."""
        return 0.5 * self.rho * float(self.anchor.squared_distance())


def micro_batches_in_step(args, global_step: int, train_dataloader=None) -> int:
    """Micro-batches of optimizer step `global_step`, as `Trainer._run_epoch` groups them.

    `gradient_accumulation_steps`, except for the last step of an epoch whose dataloader length is not a multiple of
    it. Used where the trainer's `current_gradient_accumulation_steps` is out of reach (callbacks).
    """
    accumulation = args.gradient_accumulation_steps
    try:
        length = len(train_dataloader) if train_dataloader is not None else None
    except TypeError:
        length = None
    if not length:
        return accumulation
    steps_per_epoch = max(math.ceil(length / accumulation), 1)
    remainder = length % accumulation or accumulation
    return remainder if global_step % steps_per_epoch == steps_per_epoch - 1 else accumulation


# ----------------------------------------------------------------------------------------- anchors from a folder
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _load_state_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_model_state(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a `save_pretrained` folder (single file or sharded)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_load_state_file(os.path.join(folder, shard)))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return _load_state_file(os.path.join(folder, name))
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
    raise FileNotFoundError(
        f"No model weights found in {folder!r} (looked for model.safetensors, pytorch_model.bin and their sharded "
        f"indexes; the folder holds {found[:10]})."
    )


def anchor_from_pretrained(path: str, params: dict[str, nn.Parameter], adapter_name: str = "default"):
    """A [`ParameterSnapshot`] over `params` holding the values saved in `path` instead of the live ones.

    `path` is a folder written by `save_pretrained`: a PEFT adapter (`adapter_model.safetensors`, for a PEFT model
    whose trainable parameters are the adapter's) or a full model (`model.safetensors`, possibly sharded). Parameter
    names are matched as PEFT and transformers save them (the adapter name is dropped from adapter keys, a
    `base_model.model.` prefix is tolerated).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Anchor checkpoint {path!r} is not a folder written by `save_pretrained`.")
    adapter_file = next((os.path.join(path, n) for n in _ADAPTER_FILES if os.path.exists(os.path.join(path, n))), None)
    state = _load_state_file(adapter_file) if adapter_file else _load_model_state(path)

    def candidates(name: str) -> list[str]:
        keys = [name, name.replace(f".{adapter_name}.", "."), name.replace(f".{adapter_name}", "")]
        prefix = "base_model.model."
        keys += [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        keys += [prefix + k for k in keys[:3] if not k.startswith(prefix)]
        return keys

    values, missing = {}, []
    for name in params:
        key = next((k for k in candidates(name) if k in state), None)
        if key is None:
            missing.append(name)
            continue
        values[name] = state[key]
    if missing:
        raise ValueError(
            f"The anchor checkpoint {path!r} has no weights for {len(missing)} trainable parameter(s), e.g. "
            f"{missing[:3]}. Pass a checkpoint of the same model (and the same LoRA configuration for an adapter)."
        )
    snapshot = ParameterSnapshot(params)
    for name, value in values.items():
        if tuple(value.shape) != tuple(snapshot.tensors[name].shape):
            raise ValueError(
                f"Anchor weight {name!r} has shape {tuple(value.shape)} in {path!r}, but the parameter has "
                f"{tuple(snapshot.tensors[name].shape)}."
            )
    snapshot.load_state_dict(values)
    return snapshot
