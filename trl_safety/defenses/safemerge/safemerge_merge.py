"""SafeMERGE: merge the fine-tuned LoRA update with a safety adapter where it leaves the alignment subspace.

docs/design/algorithms.md (SafeMERGE section). Per LoRA module (A: r×d_in, B: d_out×r, scaling s, ΔW = s·B·A), with
V = W_aligned − W_base of the same module (paired by module name, never by iteration order):

1. C = V·Vᵀ/‖V‖_F (SafeLoRA's approximate projection; the zero matrix when alignment left the module unchanged);
2. cos = cos(flatten(C·ΔW_ft), flatten(ΔW_ft)) rounded to 5 decimals, for every module on the unmodified adapter;
3. a module with cos < τ (strict) is merged with weights (w_ft, w_safe); the others keep their factors untouched.

Merges (new factors with scaling 1): `peft_linear` (PEFT's factor-wise "linear", what the official code runs)
A = Σ √(w_i s_i) A_i, B = Σ √(w_i s_i) B_i, so B·A = w_ft ΔW_ft + w_safe ΔW_safe + √(w_ft w_safe s_ft s_safe)·
(B_ft A_safe + B_safe A_ft) — cross terms between two unrelated adapters; `delta` the exact weighted sum as a rank
r_ft + r_safe adapter, B = [√(w_ft s_ft) B_ft, √(w_safe s_safe) B_safe], A = [√(w_ft s_ft) A_ft; √(w_safe s_safe) A_safe].
The factors are written back under the module's own scaling (divided by √s), so the adapter config keeps its
`lora_alpha`; a rank change is recorded in its `rank_pattern` / `alpha_pattern`, so `save_pretrained` reloads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import check_defense_fields
from ...core.distributed import gathered, is_zero3_param
from ...core.layers import unwrap_model
from ..safelora.safelora_project import (
    _dense_weight,
    _is_adapter_folder,
    _load_model,
    active_lora_layers,
    alignment_projection,
    build_aligned_model,
)
from .safemerge_config import SAFEMERGE_MERGES, SafeMERGEConfig


logger = logging.getLogger(__name__)

SAFEMERGE_STATS_NAME = "safemerge_stats.json"
# name under which a safety-adapter folder is loaded for the merge (deleted again afterwards)
SAFETY_ADAPTER_NAME = "safemerge_safety"


def module_cosine(projection: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """cos(flatten(C·B·A), flatten(B·A)) rounded to 5 decimals (the official rounding); 0 for C = None (V = 0).

    The scaling s cancels. A zero C gives cosine 0, as the official zero matrix does, so such a module is merged
    whenever τ > 0.
    """
    if projection is None:
        return 0.0
    delta = lora_b @ lora_a
    return round(F.cosine_similarity((projection @ delta).flatten(), delta.flatten(), dim=0).item(), 5)


def merge_factors(ft, safe, w_ft: float, w_safe: float, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged (A, B), to be used with scaling 1, from ft = (A, B, s) and safe = (A, B, s) or None (zero adapter)."""
    a_f, b_f, s_f = ft
    c_f = math.sqrt(w_ft * s_f)
    if safe is None:  # the aligned model as merge partner: both merges give w_ft·ΔW_ft exactly
        return c_f * a_f, c_f * b_f
    a_s, b_s, s_s = safe
    c_s = math.sqrt(w_safe * s_s)
    if merge == "peft_linear":
        if a_f.shape != a_s.shape or b_f.shape != b_s.shape:
            raise ValueError(
                f"merge='peft_linear' needs adapters of the same rank and shape (got A {tuple(a_f.shape)} and "
                f"{tuple(a_s.shape)}); use merge='delta' (`--merge delta`)."
            )
        return c_f * a_f + c_s * a_s, c_f * b_f + c_s * b_s
    if merge == "delta":
        return torch.cat([c_f * a_f, c_s * a_s], dim=0), torch.cat([c_f * b_f, c_s * b_s], dim=1)
    raise ValueError(f"`merge` must be one of {SAFEMERGE_MERGES}, got {merge!r}.")


def select_and_merge(finetuned: dict, safety: dict | None, projections: dict, *, threshold, weights, merge):
    """Per module name: its record (`cosine`, `merged`) and, for merged modules, the new (A, B) with scaling 1.

    `finetuned` / `safety`: name -> (A, B, s); `projections`: name -> C or None. Pairing is by the dict keys only.
    Every cosine is computed before anything is merged.
    """
    if safety is not None:
        missing = sorted(set(finetuned) - set(safety))
        if missing:
            raise ValueError(
                f"The safety adapter has no LoRA pair for {missing}: both adapters need the same target modules "
                "(`safety_adapter`)."
            )
        if merge == "peft_linear":
            for name in finetuned:  # before anything is merged: no half-merged model on a rank mismatch
                if finetuned[name][0].shape != safety[name][0].shape:
                    merge_factors(finetuned[name], safety[name], *weights, merge)  # raises with the message
    records = {name: {"cosine": module_cosine(projections[name], a, b)} for name, (a, b, _) in finetuned.items()}
    merged = {}
    for name, record in records.items():
        record["merged"] = record["cosine"] < threshold
        if record["merged"]:
            merged[name] = merge_factors(finetuned[name], None if safety is None else safety[name], *weights, merge)
    return records, merged


def _peft_model(model: nn.Module):
    from peft import PeftModel

    while not isinstance(model, PeftModel) and hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    return model if isinstance(model, PeftModel) else None


def _lora_pairs(model: nn.Module, config: SafeMERGEConfig, exclude: str | None) -> list[tuple[str, str, nn.Module]]:
    """(module name, adapter, LoRA layer) of every active Linear LoRA pair of the fine-tuned adapter."""
    pairs = []
    for name, adapter, module in active_lora_layers(model, config.target_modules, "SafeMERGE"):
        if adapter == exclude:
            continue
        if not isinstance(module.lora_A[adapter], nn.Linear):
            raise ValueError(f"{name}: SafeMERGE merges Linear LoRA pairs; this adapter adapts a non-Linear layer.")
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(f"{name}: SafeMERGE merges plain LoRA updates; DoRA adapters are not supported.")
        if module.lora_B[adapter].bias is not None:
            raise ValueError(f"{name}: SafeMERGE does not merge LoRA biases (`lora_bias=True`).")
        pairs.append((name, adapter, module))
    if not pairs:
        raise ValueError(
            "SafeMERGE merges LoRA updates, but the model has no active LoRA adapter"
            + (f" on target_modules={config.target_modules!r}." if config.target_modules else ".")
            + " Pass the fine-tuned PeftModel (or the adapter folder on the CLI); full fine-tuning is not supported."
        )
    return pairs


def _factors(module: nn.Module, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    with torch.no_grad(), gathered([lora_a, lora_b]):
        return (
            lora_a.detach().to(dtype, copy=True),
            lora_b.detach().to(dtype, copy=True),
            float(module.scaling[adapter]),
        )


def _resolve_safety_adapter(model: nn.Module, safety_adapter: str | None) -> tuple[str | None, bool]:
    """(adapter name on the model, whether it was loaded here and must be deleted afterwards)."""
    if safety_adapter is None:
        return None, False
    peft_model = _peft_model(model)
    if peft_model is not None and safety_adapter in peft_model.peft_config:
        return safety_adapter, False
    if not _is_adapter_folder(safety_adapter):
        raise ValueError(
            f"`safety_adapter`={safety_adapter!r} is neither a PEFT adapter folder (with adapter_config.json) nor the "
            "name of an adapter loaded on the model."
        )
    if peft_model is None:
        raise ValueError("SafeMERGE loads the safety adapter next to the fine-tuned one: pass the PeftModel.")
    if any(is_zero3_param(p) for p in peft_model.parameters()):
        raise NotImplementedError(
            "SafeMERGE cannot load a safety-adapter folder into a ZeRO-3 partitioned model; apply it to the saved "
            "adapter with `trl-safety prune --defense safemerge`."
        )
    peft_model.load_adapter(safety_adapter, adapter_name=SAFETY_ADAPTER_NAME, is_trainable=False)
    return SAFETY_ADAPTER_NAME, True


def _write(
    peft_configs: dict, name: str, adapter: str, module: nn.Module, new_a: torch.Tensor, new_b: torch.Tensor
) -> None:
    """Store ΔW = B·A (scaling 1) in the module under its own scaling s; a new rank is recorded in the config."""
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    scaling = float(module.scaling[adapter])
    root = math.sqrt(scaling)
    new_a, new_b = new_a / root, new_b / root
    rank = new_a.shape[0]
    if rank == getattr(lora_a.weight, "ds_shape", lora_a.weight.shape)[0]:  # ZeRO-3: the full shape, not the shard
        with torch.no_grad(), gathered([lora_a.weight, lora_b.weight], modifier_rank=0):
            lora_a.weight.copy_(new_a.to(lora_a.weight.dtype))
            lora_b.weight.copy_(new_b.to(lora_b.weight.dtype))
        return
    if is_zero3_param(lora_a.weight):
        raise NotImplementedError("merge='delta' changes the adapter's rank, which ZeRO-3 partitioned LoRA cannot.")
    for old, new in ((lora_a, new_a), (lora_b, new_b)):
        weight = old.weight
        old.weight = nn.Parameter(new.to(device=weight.device, dtype=weight.dtype), requires_grad=weight.requires_grad)
        old.in_features, old.out_features = new.shape[1], new.shape[0]
    config = peft_configs[adapter]
    alpha = scaling * (math.sqrt(rank) if config.use_rslora else rank)  # the same scaling at the new rank
    module.r[adapter], module.lora_alpha[adapter] = rank, alpha
    key = re.escape(name)  # PEFT matches pattern keys as regexes on the module name; ours first, so they win
    config.rank_pattern = {key: rank, **{k: v for k, v in (config.rank_pattern or {}).items() if k != key}}
    config.alpha_pattern = {key: alpha, **{k: v for k, v in (config.alpha_pattern or {}).items() if k != key}}


def safemerge(
    model: nn.Module,
    config: SafeMERGEConfig | None = None,
    *,
    base_model=None,
    aligned_model=None,
    output_dir: str | None = None,
) -> nn.Module:
    """Merge, in place, the fine-tuned LoRA adapter of `model` with the safety adapter where it leaves the alignment
    subspace; return the model.

    Args:
        model: the fine-tuned `PeftModel` (its active LoRA adapter is edited; `save_pretrained` saves the result).
        config: a [`SafeMERGEConfig`]; `safety_adapter` names the safety LoRA adapter (defaults when omitted).
        base_model: the unaligned base model, as a model or a path (loaded on CPU).
        aligned_model: the aligned model, as a model or a path; an alignment-adapter folder is merged onto
            `base_model`, as trl_safety's pipeline defines the aligned model.
        output_dir: where to write the per-module similarities and merge flags (`safemerge_stats.json`).
    """
    config = config or SafeMERGEConfig()
    check_defense_fields(config, warn_no_effect=False)  # again: it may have been changed since it was built
    peft_model = _peft_model(model)
    exclude = (
        config.safety_adapter if peft_model is not None and config.safety_adapter in peft_model.peft_config else None
    )
    pairs = _lora_pairs(model, config, exclude)
    for role, value in (("base", base_model), ("aligned", aligned_model)):
        if value is None:
            raise ValueError(
                f"SafeMERGE's criterion needs the {role} model (C from W_aligned − W_base): pass `{role}_model=` "
                f"(`--{role}_model` on the CLI)."
            )
    base_model = _load_model(base_model, "base")
    if _is_adapter_folder(aligned_model):
        aligned_model = build_aligned_model(base_model, aligned_model)
    base_modules = dict(unwrap_model(base_model).named_modules())
    aligned_modules = dict(unwrap_model(_load_model(aligned_model, "aligned")).named_modules())
    neutral_weights = config.finetuned_weight == 1 and config.safety_weight == 0

    safety_name, loaded = _resolve_safety_adapter(model, config.safety_adapter)
    if safety_name is None:
        logger.warning(
            "SafeMERGE: no `safety_adapter`; merged modules are merged with the aligned model itself (a zero safety "
            "adapter), i.e. their update is scaled by finetuned_weight=%s.",
            config.finetuned_weight,
        )
    try:
        finetuned, safety, projections, keys = {}, {} if safety_name else None, {}, {}
        for name, adapter, module in pairs:
            key = name if len({p[1] for p in pairs}) == 1 else f"{name}.{adapter}"
            keys[key] = (name, adapter, module)
            lora_b = module.lora_B[adapter].weight
            dtype = torch.promote_types(lora_b.dtype, torch.float32)
            finetuned[key] = _factors(module, adapter, dtype)
            if safety is not None:
                if safety_name not in module.lora_A:
                    raise ValueError(
                        f"The safety adapter has no LoRA pair for {name}: both adapters need the same target modules "
                        "(`safety_adapter`)."
                    )
                safety[key] = _factors(module, safety_name, dtype)
            for role, modules in (("base", base_modules), ("aligned", aligned_modules)):
                if name not in modules:
                    raise ValueError(f"The {role} model has no module {name!r} to compute the alignment matrix from.")
            device = finetuned[key][1].device
            w_base = _dense_weight(base_modules[name], dtype, device)
            w_aligned = _dense_weight(aligned_modules[name], dtype, device)
            a, b, _ = finetuned[key]
            if w_base.shape != w_aligned.shape or w_base.shape != (b.shape[0], a.shape[1]):
                raise ValueError(
                    f"{name}: base {tuple(w_base.shape)} and aligned {tuple(w_aligned.shape)} weights do not match "
                    f"the LoRA update ({b.shape[0]}, {a.shape[1]})."
                )
            projections[key] = alignment_projection(w_base, w_aligned, config.projection, config.projection_rtol)
            if projections[key] is None:
                logger.warning("SafeMERGE: %s is identical in the base and aligned models (cosine 0).", name)
        records, merged = select_and_merge(
            finetuned,
            safety,
            projections,
            threshold=config.threshold,
            weights=(config.finetuned_weight, config.safety_weight),
            merge=config.merge,
        )
    finally:
        if loaded:
            peft_model.delete_adapter(safety_name)
    if neutral_weights:  # w = (1, 0): ΔW unchanged; the factors are not rewritten (bit-exact neutral setting)
        merged = {}
    # PeftModel's configs, or those of a transformers model carrying the adapter itself (`add_adapter`)
    peft_configs = getattr(peft_model if peft_model is not None else unwrap_model(model), "peft_config", {})
    for key, (new_a, new_b) in merged.items():
        name, adapter, module = keys[key]
        _write(peft_configs, name, adapter, module, new_a, new_b)
    if merged and config.merge == "peft_linear" and safety is not None:
        logger.warning(
            "SafeMERGE merge='peft_linear' (the official code's) adds cross terms between the two adapters to each "
            "merged update; merge='delta' is the exact weighted sum."
        )

    stats = {
        "defense": "safemerge",
        "threshold": config.threshold,
        "weights": [config.finetuned_weight, config.safety_weight],
        "merge": config.merge,
        "projection": config.projection,
        "safety_adapter": config.safety_adapter,
        "num_modules": len(records),
        "num_merged": len(merged),
        "modules": {
            key: {"cosine": r["cosine"], "selected": r["merged"], "merged": key in merged}
            for key, r in records.items()
        },
    }
    logger.info("SafeMERGE merged %d of %d LoRA modules (%s).", len(merged), len(records), config.merge)
    is_main = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
    if output_dir is not None and is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, SAFEMERGE_STATS_NAME), "w") as f:
            json.dump(stats, f, indent=2)
    return model
