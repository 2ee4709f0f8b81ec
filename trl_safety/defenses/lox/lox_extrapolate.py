"""LoX: low-rank extrapolation of the alignment update (docs/design/algorithms.md, LoX section).

W_LoX = W_aligned + α·Proj_k(ΔW_align), ΔW_align = W_aligned − W_base, Proj_k = rank-k truncated SVD (k = 0: full rank).

Two forms of the aligned model:

- **an alignment LoRA adapter** (trl_safety's alignment stage): ΔW_align = s·B·A is read from the adapter. With thin
  QRs B = Q_B R_B and Aᵀ = Q_A R_A, ΔW_align = Q_B M Q_Aᵀ with the r×r core M = s·R_B R_Aᵀ; if M = U Σ Vᵀ and M_k its
  rank-k truncation, ΔW_LoX = Q_B (M + α M_k) Q_Aᵀ, stored exactly as the adapter B′ = Q_B (M + α M_k)/s, A′ = Q_Aᵀ
  (same rank, same scaling s). For k = 0 or k ≥ r this is B′ = (1 + α)·B with A unchanged.
- **a dense aligned model** plus its base: per 2-D weight (Linear, embedding, LM head — the official code's set),
  SVD of ΔW_align. Everything is computed in fp32 (fp64 for fp64 weights), where the official script subtracts and
  adds in bf16; the result is cast back to the weight's dtype once.

1-D tensors (norms, biases) are never changed. α = 0 returns the model untouched (nothing is written).
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from ...core.config import check_defense_fields
from ...core.distributed import gathered
from ...core.layers import find_modules, unwrap_model
from ..safelora.safelora_project import _is_lora_layer, _load_model
from .lox_config import LoXConfig


logger = logging.getLogger(__name__)

LOX_STATS_NAME = "lox_stats.json"


def truncated(delta: torch.Tensor, rank: int, svd: str = "exact") -> tuple[torch.Tensor, float]:
    """Proj_k(delta), the rank-`rank` truncated SVD (the whole `delta` for rank 0), and R_align = ‖Proj_k Δ‖/‖Δ‖."""
    if rank == 0 or rank >= min(delta.shape):
        return delta, 1.0
    if svd == "lowrank":
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):
            torch.manual_seed(0)  # the sketch is random: the same on every rank and every run
            u, s, v = torch.svd_lowrank(delta, q=min(rank + 10, *delta.shape), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = (u[:, :rank] * s[:rank]) @ vh[:rank]
    total = torch.linalg.matrix_norm(delta).square()  # not s.square().sum(): the sketch misses part of Δ
    return kept, (s[:rank].square().sum() / total).sqrt().item() if total > 0 else 1.0


def extrapolate_lora_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, rank: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """New (A′, B′) with s·B′A′ = s·BA + α·Proj_k(s·BA), and R_align of s·BA, all in the factors' dtype."""
    r = lora_a.shape[0]
    if rank == 0 or rank >= r:
        return lora_a, (1 + alpha) * lora_b, 1.0
    q_b, r_b = torch.linalg.qr(lora_b)  # d_out×r, r×r
    q_a, r_a = torch.linalg.qr(lora_a.T)  # d_in×r, r×r
    core = scaling * r_b @ r_a.T  # ΔW = Q_B core Q_Aᵀ, and Q_B, Q_A have orthonormal columns: same singular values
    kept, ratio = truncated(core, rank)
    return q_a.T.contiguous(), q_b @ (core + alpha * kept) / scaling, ratio


def _adapter_pairs(model: nn.Module, target_modules) -> list[tuple[str, str, nn.Module]]:
    base = unwrap_model(model)
    candidates = find_modules(base, target_modules) if target_modules else list(base.named_modules())
    pairs = []
    for name, module in candidates:
        if not _is_lora_layer(module):
            continue
        if getattr(module, "merged", False):
            raise ValueError(f"The LoRA adapter of {name} is merged into the base weights; LoX needs it unmerged.")
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_embedding_A", {}):
                raise ValueError(
                    f"{name}: LoX extrapolates Linear LoRA pairs; this adapter also adapts an embedding. Merge the "
                    "alignment adapter and pass the dense aligned model with its base (`base_model=`) instead."
                )
            if adapter in module.lora_A and isinstance(module.lora_A[adapter], nn.Linear):
                pairs.append((name, adapter, module))
    return pairs


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full shape, also of a ZeRO-3 partitioned parameter (whose local tensor is an empty placeholder)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _dense_weights(model: nn.Module, target_modules) -> list[tuple[str, nn.Parameter]]:
    """(module name, weight) of every module owning a 2-D `weight`; tied weights (embeddings = LM head) once."""
    base = unwrap_model(model)
    candidates = find_modules(base, target_modules) if target_modules else list(base.named_modules())
    seen, weights = set(), []
    for name, module in candidates:
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None or len(_shape(weight)) != 2 or id(weight) in seen:
            continue
        seen.add(id(weight))
        weights.append((name, weight))
    return weights


def lox_extrapolate(
    model: nn.Module,
    config: LoXConfig | None = None,
    *,
    base_model=None,
    output_dir: str | None = None,
) -> nn.Module:
    """Extrapolate, in place, the alignment update of `model` along its top-k singular subspace; return the model.

    Args:
        model: the aligned model: a `PeftModel` whose active LoRA adapter is the alignment update (the adapter is
            edited; `save_pretrained` saves the extrapolated adapter), or a dense aligned model (needs `base_model`).
        config: a [`LoXConfig`] (defaults when omitted).
        base_model: the unaligned base model (a model, a folder or a Hub id; loaded on CPU) for a dense `model`.
            Ignored for an adapter, whose update is the adapter itself.
        output_dir: where to write the per-module statistics (`lox_stats.json`).
    """
    config = config or LoXConfig()
    check_defense_fields(config, warn_no_effect=False)  # again: it may have been changed since it was built
    is_adapter = any(_is_lora_layer(m) for m in unwrap_model(model).modules())
    pairs = _adapter_pairs(model, config.target_modules) if is_adapter else []
    if is_adapter and not pairs:
        raise ValueError(
            f"LoX: the model's LoRA adapter has no active Linear pair on target_modules={config.target_modules!r}."
        )
    records = {}
    if config.alpha == 0:
        logger.info("LoX: alpha = 0, the model is left unchanged.")
    elif is_adapter:
        if base_model is not None:
            logger.info("LoX: the model carries a LoRA adapter; its update is extrapolated and base_model is unused.")
        for name, adapter, module in pairs:
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            with torch.no_grad(), gathered([lora_a, lora_b], modifier_rank=0):
                dtype = torch.promote_types(lora_b.dtype, torch.float32)
                scaling = float(module.scaling[adapter])
                new_a, new_b, ratio = extrapolate_lora_factors(
                    lora_a.to(dtype), lora_b.to(dtype), scaling, config.rank, config.alpha
                )
                lora_a.copy_(new_a.to(lora_a.dtype))
                lora_b.copy_(new_b.to(lora_b.dtype))
            records[f"{name}.{adapter}"] = {"r_align": ratio}
    else:
        if base_model is None:
            raise ValueError(
                "LoX extrapolates W_aligned − W_base: the model has no active LoRA adapter, so pass the unaligned "
                "model as `base_model=` (`--base_model` on the CLI)."
            )
        base_modules = dict(unwrap_model(_load_model(base_model, "base")).named_modules())
        weights = _dense_weights(model, config.target_modules)
        for name, weight in weights:
            base_weight = getattr(base_modules.get(name), "weight", None)
            if base_weight is None or _shape(base_weight) != _shape(weight):
                raise ValueError(
                    f"The base model has no weight of shape {_shape(weight)} at {name!r}: base_model must be "
                    "the model the aligned model was trained from."
                )
            with torch.no_grad(), gathered([weight], modifier_rank=0), gathered([base_weight]):
                dtype = torch.promote_types(weight.dtype, torch.float32)
                aligned = weight.detach().to(dtype=dtype, copy=True)
                delta = aligned - base_weight.detach().to(device=weight.device, dtype=dtype)
                kept, ratio = truncated(delta, config.rank, config.svd)
                weight.copy_((aligned + config.alpha * kept).to(weight.dtype))
            records[name] = {"r_align": ratio, "delta_norm": torch.linalg.matrix_norm(delta).item()}
    stats = {
        "defense": "lox",
        "rank": config.rank,
        "alpha": config.alpha,
        "form": "adapter" if is_adapter else "dense",
        "num_modules": len(records),
        "modules": records,
    }
    logger.info("LoX extrapolated %d weights (rank %d, alpha %s).", len(records), config.rank, config.alpha)
    is_main = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
    if output_dir is not None and is_main and config.alpha != 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, LOX_STATS_NAME), "w") as f:
            json.dump(stats, f, indent=2)
    return model
