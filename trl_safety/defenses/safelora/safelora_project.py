"""SafeLoRA: project the least aligned LoRA updates onto the alignment subspace (docs/design/algorithms.md §4.3, IBM code).

For every LoRA module (A: r×d_in, B: d_out×r, ΔW ∝ B·A) with V = W_aligned − W_base of the same module:

1. C = V·Vᵀ / ‖V‖_F (the official approximation of the projection V(VᵀV)⁻¹Vᵀ; the exact one is an option);
2. cos_i = cos(flatten(C·B·A), flatten(B·A)), computed for *all* modules on the unmodified adapter;
3. select the modules with cos_i ≤ threshold, or the `num_proj_layers` modules with the lowest cos_i;
4. replace B by C·B in the selected modules.

The official "number" mode first runs a projection pass with a fixed cutoff (0.3) that mutates the adapter, then
chooses the real cutoff (IBM/SafeLoRA issue #2); here similarities are computed once, before anything changes, and the
count is exact (ties broken by module order) instead of a `<=` cutoff that can select more than `num_proj_layers`.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import check_defense_fields
from ...core.distributed import gathered
from ...core.layers import find_modules, unwrap_model
from .safelora_config import SafeLoRAConfig


logger = logging.getLogger(__name__)

SAFELORA_STATS_NAME = "safelora_stats.json"


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def _is_adapter_folder(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def build_aligned_model(base_model, alignment_adapter, **from_pretrained_kwargs) -> nn.Module:
    """The aligned model of the trl_safety pipeline: the base model with the alignment LoRA adapter merged in.

    Args:
        base_model: the base (unaligned) model, or its path / Hub id. A model object is not modified: the adapter is
            merged into a deep copy.
        alignment_adapter: folder (or Hub id) of the alignment-stage LoRA adapter.
        from_pretrained_kwargs: passed to `AutoModelForCausalLM.from_pretrained` when `base_model` is a path.
    """
    import copy

    from peft import PeftModel

    if isinstance(base_model, (str, os.PathLike)):
        base_model = _load_model(base_model, "base", **from_pretrained_kwargs)
    else:
        base_model = copy.deepcopy(base_model)
    return PeftModel.from_pretrained(base_model, alignment_adapter, is_trainable=False).merge_and_unload()


def _load_model(model_or_path, role: str, **from_pretrained_kwargs) -> nn.Module:
    """A model object as is; a plain model folder/Hub id loaded on CPU; an adapter folder merged onto its base."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    if model_or_path is None:
        raise ValueError(
            f"SafeLoRA needs the {role} model (a model object or a path): pass `{role}_model=`. In the trl_safety "
            "pipeline the base is the pre-trained model and the aligned model is the base with the alignment adapter "
            "merged (`build_aligned_model(base, adapter)`, or pass the adapter folder as the aligned model)."
        )
    if _is_adapter_folder(model_or_path):
        from peft import PeftConfig

        adapter_base = PeftConfig.from_pretrained(model_or_path).base_model_name_or_path
        logger.info("SafeLoRA: %s model = %s + merged adapter %s.", role, adapter_base, model_or_path)
        return build_aligned_model(adapter_base, model_or_path, **from_pretrained_kwargs)
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": "auto", **from_pretrained_kwargs}
    return AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs)


def _dense_weight(module: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The effective weight of a linear module: a LoRA layer's base weight plus its unmerged active adapters."""
    if _is_lora_layer(module):
        with gathered([module.base_layer.weight]):
            weight = module.base_layer.weight.detach().to(device=device, dtype=dtype, copy=True)
        if not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    params = [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
                    with gathered(params):
                        weight += module.get_delta_weight(adapter).detach().to(device=device, dtype=dtype)
        return weight
    with gathered([module.weight]):
        return module.weight.detach().to(device=device, dtype=dtype, copy=True)


def alignment_factor(
    base_weight: torch.Tensor, aligned_weight: torch.Tensor, projection: str = "approximate", rtol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(F, c)` with projection matrix C = F·Fᵀ / c of one module, or None when alignment did not change it (V = 0).

    `"approximate"`: F = V = W_aligned − W_base (d_out×d_in), c = ‖V‖_F; `"exact"`: F = U_k (d_out×k, float64), the
    left singular vectors of V above `rtol`·σ_max, c = 1. `C·X = F(FᵀX)/c` never forms the d_out×d_out matrix.
    """
    v = aligned_weight - base_weight
    norm = torch.linalg.matrix_norm(v)  # Frobenius
    if norm == 0:
        return None
    if projection == "approximate":
        return v, norm
    u, s, _ = torch.linalg.svd(v.double(), full_matrices=False)
    rank = int((s > rtol * s[0]).sum())
    return u[:, :rank], torch.ones((), dtype=u.dtype, device=u.device)


def alignment_projection(
    base_weight: torch.Tensor, aligned_weight: torch.Tensor, projection: str = "approximate", rtol: float = 1e-4
) -> torch.Tensor | None:
    """The d_out×d_out projection matrix of one module, or None when alignment did not change it (V = 0)."""
    factor = alignment_factor(base_weight, aligned_weight, projection, rtol)
    if factor is None:
        return None
    basis, norm = factor
    if projection == "approximate":
        return basis @ basis.T / norm
    return (basis @ basis.T).to(torch.result_type(aligned_weight, base_weight))


def active_lora_layers(model: nn.Module, target_modules, who: str) -> list[tuple[str, str, nn.Module]]:
    """(module name, adapter name, LoRA layer) of every active adapter of every LoRA layer (among `target_modules`
    when given); an adapter merged into its base weights is refused, naming `who`."""
    base = unwrap_model(model)
    candidates = find_modules(base, target_modules) if target_modules else list(base.named_modules())
    found = []
    for name, module in candidates:
        if not _is_lora_layer(module):
            continue
        if getattr(module, "merged", False):
            raise ValueError(f"The LoRA adapter of {name} is merged into the base weights; {who} needs it unmerged.")
        found += [(name, adapter, module) for adapter in module.active_adapters if adapter in module.lora_A]
    return found


def _lora_pairs(model: nn.Module, config: SafeLoRAConfig) -> list[tuple[str, str, nn.Module]]:
    """(module name, adapter name, LoRA layer) of every active LoRA pair SafeLoRA may project."""
    pairs = [
        (name, adapter, module)
        for name, adapter, module in active_lora_layers(model, config.target_modules, "SafeLoRA")
        if isinstance(module.lora_A[adapter], nn.Linear)
    ]
    if not pairs:
        raise ValueError(
            "SafeLoRA projects LoRA updates, but the model has no active LoRA adapter"
            + (f" on target_modules={config.target_modules!r}." if config.target_modules else ".")
            + " Pass the fine-tuned PeftModel (or the adapter folder on the CLI)."
        )
    return pairs


def safelora_project(
    model: nn.Module,
    config: SafeLoRAConfig | None = None,
    *,
    base_model=None,
    aligned_model=None,
    output_dir: str | None = None,
) -> nn.Module:
    """Project, in place, the least aligned LoRA updates of `model` onto the alignment subspace; return the model.

    Args:
        model: the fine-tuned `PeftModel` (its active LoRA adapter is edited; `save_pretrained` saves the result).
        config: a [`SafeLoRAConfig`] (defaults when omitted).
        base_model: the unaligned base model, as a model or a path / Hub id (loaded on CPU).
        aligned_model: the aligned model, as a model or a path; an alignment-adapter folder is merged onto
            `base_model` ([`build_aligned_model`]), which is how trl_safety defines the aligned model of its pipeline.
        output_dir: where to write the per-module similarities and selection (`safelora_stats.json`).
    """
    config = config or SafeLoRAConfig()
    check_defense_fields(config, warn_no_effect=False)  # again: it may have been changed since it was built
    pairs = _lora_pairs(model, config)
    base_model = _load_model(base_model, "base")
    if _is_adapter_folder(aligned_model):
        # trl_safety's pipeline: aligned = base + merged alignment adapter, on the same base model
        aligned_model = build_aligned_model(base_model, aligned_model)
    base_modules = dict(unwrap_model(base_model).named_modules())
    aligned_modules = dict(unwrap_model(_load_model(aligned_model, "aligned")).named_modules())

    # Pass 1, on the unmodified adapter: similarity of every module and its candidate projected B
    records = []
    for name, adapter, module in pairs:
        for role, modules in (("base", base_modules), ("aligned", aligned_modules)):
            if name not in modules:
                raise ValueError(f"The {role} model has no module {name!r} to compute the alignment matrix from.")
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        with torch.no_grad(), gathered([lora_a, lora_b]):
            device = lora_b.device
            dtype = torch.promote_types(lora_b.dtype, torch.float32)
            w_base = _dense_weight(base_modules[name], dtype, device)
            w_aligned = _dense_weight(aligned_modules[name], dtype, device)
            if w_base.shape != w_aligned.shape or w_base.shape != (lora_b.shape[0], lora_a.shape[1]):
                raise ValueError(
                    f"{name}: base {tuple(w_base.shape)} and aligned {tuple(w_aligned.shape)} weights do not match "
                    f"the LoRA update ({lora_b.shape[0]}, {lora_a.shape[1]})."
                )
            projection = alignment_projection(w_base, w_aligned, config.projection, config.projection_rtol)
            if projection is None:
                logger.warning(
                    "SafeLoRA: %s is identical in the base and aligned models; it is never projected.", name
                )
                records.append({"name": name, "adapter": adapter, "module": module, "cosine": None})
                continue
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            delta = b @ a
            projected_b = projection @ b
            cosine = F.cosine_similarity((projected_b @ a).flatten(), delta.flatten(), dim=0).item()
        records.append(
            {"name": name, "adapter": adapter, "module": module, "cosine": cosine, "projected_b": projected_b}
        )

    # Selection, from the similarities alone
    scored = [i for i, record in enumerate(records) if record["cosine"] is not None]
    if config.select_layers_type == "threshold":
        selected = {i for i in scored if records[i]["cosine"] <= config.threshold}
    else:
        ranked = sorted(scored, key=lambda i: records[i]["cosine"])  # stable: ties keep module order
        selected = set(ranked[: config.num_proj_layers])

    # Pass 2: B ← C·B on the selected modules
    for index in sorted(selected):
        record = records[index]
        lora_b = record["module"].lora_B[record["adapter"]].weight
        with torch.no_grad(), gathered([lora_b], modifier_rank=0):
            lora_b.copy_(record["projected_b"].to(device=lora_b.device, dtype=lora_b.dtype))

    stats = {
        "defense": "safelora",
        "select_layers_type": config.select_layers_type,
        "num_proj_layers": config.num_proj_layers,
        "threshold": config.threshold,
        "projection": config.projection,
        "num_modules": len(records),
        "num_projected": len(selected),
        "modules": {
            f"{r['name']}.{r['adapter']}": {"cosine": r["cosine"], "projected": i in selected}
            for i, r in enumerate(records)
        },
    }
    logger.info("SafeLoRA projected %d of %d LoRA modules (%s).", len(selected), len(records), config.projection)
    is_main = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
    if output_dir is not None and is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, SAFELORA_STATS_NAME), "w") as f:
            json.dump(stats, f, indent=2)
    return model
