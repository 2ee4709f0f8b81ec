"""Backend detection and sharding-aware parameter access (DDP, DeepSpeed ZeRO-2/3, FSDP)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch


def deepspeed_zero_stage(accelerator=None) -> int | None:
    """ZeRO stage of the running DeepSpeed plugin, or None when DeepSpeed is not in use."""
    plugin = None
    if accelerator is not None:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    else:
        try:
            from accelerate.state import AcceleratorState

            state = AcceleratorState()
            plugin = getattr(state, "deepspeed_plugin", None)
        except Exception:  # no accelerator state initialised yet
            plugin = None
    if plugin is None:
        return None
    return int(plugin.zero_stage)


def backend_name(accelerator) -> str:
    """Short name of the distributed backend: `single`, `ddp`, `zero1`/`zero2`/`zero3`, `fsdp`."""
    stage = deepspeed_zero_stage(accelerator)
    if stage is not None:
        return f"zero{stage}"
    if getattr(accelerator, "is_fsdp2", False) or getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return "fsdp"
    if accelerator.num_processes > 1:
        return "ddp"
    return "single"


def fsdp_version(accelerator) -> int | None:
    """1 or 2 when accelerate runs FSDP (its plugin's `fsdp_version`), None otherwise."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1))


def refuse_sharded_weights(model, who: str) -> None:
    """Refuse FSDP2-sharded (DTensor) parameters, before training, for an edit of whole weights at its end.

    The post-hoc callbacks (Antidote, SafeLoRA, LoX) read and write whole weight matrices; on FSDP2 each rank holds
    a DTensor shard and the edit would fail only after the whole run.
    """
    from torch.distributed.tensor import DTensor

    if model is not None and any(isinstance(p, DTensor) for p in model.parameters()):
        raise NotImplementedError(
            f"{who} edits whole weights at the end of training and does not support FSDP2's sharded (DTensor) "
            "parameters; train without it and apply the defense to the saved model with `trl-safety prune`."
        )


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Context that materialises ZeRO-3 shards (a no-op for ordinary tensors)."""
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
