"""Safe Delta: safety-budgeted selection of fine-tuning deltas with OBS compensation (docs/safe_delta.md).

Per decoder-layer `nn.Linear` (weight W_a aligned, W_f fine-tuned, d_out × d_in):

1. H = (2/N)·Σ_sequences Σ_tokens x xᵀ over the *aligned* layer's inputs on the safety set (N sequences, padding
   left out), from forward hooks on the aligned model; dead diagonals set to 1, H += percdamp·mean(diag H)·I;
   U = chol(H⁻¹) upper, d_j = U_jj.
2. Per block of `block_size` columns, with W1 the current (already compensated) block: cost_ij = (W_f,ij − W1_ij)²/d_j²,
   r_j = 1/d_j². Entries sorted by r ascending (stable; ties in row-major order), the `exclude_ratio` most sensitive
   ones made ineligible, and the longest prefix with cumulative cost ≤ mean(r)·s·(block_size/ref)·(d_out/ref) selected.
3. Column by column, selected entries are set to W_f and the error (w − q)/d_j is propagated to the later columns,
   W[:, later] −= err·U[j, later] (SparseGPT's lazy batches of `sub_block` columns), so unselected entries end at
   "aligned + compensation".

Every other parameter takes its aligned value (the official code's choice) or keeps its fine-tuned one
(`non_linear_params`). Computed in fp32 (fp64 for fp64 weights), cast back to the weight dtype once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from contextlib import nullcontext as _nullcontext

import torch
from torch import nn

from ...core.config import check_defense_fields
from ...core.hooks import input_device, input_statistics
from ...core.layers import check_decoder_only, find_modules, get_decoder_layers, is_peft_model, unwrap_model
from ..antidote.antidote_prune import calibration_batches, load_calibration_dataset, tokenize_calibration_dataset
from ..safelora.safelora_project import _dense_weight, _is_lora_layer, _load_model
from .safe_delta_config import SafeDeltaConfig


logger = logging.getLogger(__name__)

SAFE_DELTA_STATS_NAME = "safe_delta_stats.json"
_LORA_PARTS = {"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}


# ------------------------------------------------------------------------------------------------ one matrix
def inverse_cholesky_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U upper triangular with UᵀU = (damped H)⁻¹; dead diagonals of H are set to 1 first, as SparseGPT does."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1
    diag += percdamp * torch.mean(diag)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


def select_block(cost: torch.Tensor, r: torch.Tensor, budget: float, exclude_ratio: float) -> torch.Tensor:
    """Boolean mask of the selected entries of one block: eligible entries sorted by r ascending (stable, ties in
    row-major order), the longest prefix whose cumulative cost stays within `budget`.

    The `int(exclude_ratio·n)` entries with the largest r are never eligible; a count of 0 excludes nothing (the
    official `sorted[0:-0]` is empty and selects nothing).
    """
    rows, cols = cost.shape
    n = rows * cols
    order = torch.sort(r.expand(rows, cols).reshape(-1), stable=True).indices
    excluded = int(exclude_ratio * n)
    eligible = order[: n - excluded]
    cumulative = torch.cumsum(cost.reshape(-1)[eligible], dim=0)
    count = int((cumulative <= budget).sum())  # costs are ≥ 0: the entries within budget are a prefix
    mask = torch.zeros(n, dtype=torch.bool, device=cost.device)
    mask[eligible[:count]] = True
    return mask.reshape(rows, cols)


def safe_delta_matrix(
    aligned: torch.Tensor,
    finetuned: torch.Tensor,
    hessian: torch.Tensor,
    *,
    scale: float,
    exclude_ratio: float = 0.15,
    percdamp: float = 0.01,
    block_size: int = 2048,
    sub_block: int = 4,
    budget_ref_dim: int = 4096,
) -> tuple[torch.Tensor, dict]:
    """The Safe Delta weight of one Linear (in fp32, fp64 for fp64 inputs) and its statistics."""
    dtype = torch.promote_types(finetuned.dtype, torch.float32)
    w_f = finetuned.detach().to(dtype=dtype)
    w = aligned.detach().to(device=w_f.device, dtype=dtype, copy=True)
    rows, cols = w.shape
    u = inverse_cholesky_factor(hessian.to(device=w.device, dtype=dtype), percdamp)
    d = torch.diagonal(u)
    factor = (block_size / budget_ref_dim) * (rows / budget_ref_dim)
    selected = budget_total = cost_used = 0.0
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, target, u_block = w[:, start:end].clone(), w_f[:, start:end], u[start:end, start:end]
        d_block = d[start:end]
        r = 1.0 / d_block.square()
        cost = (target - block).square() * r
        budget = float(r.mean()) * scale * factor
        mask = select_block(cost, r, budget, exclude_ratio)
        errors = torch.zeros_like(block)
        width = end - start
        for s0 in range(0, width, sub_block):
            s1 = min(s0 + sub_block, width)
            for j in range(s0, s1):
                column = block[:, j]
                q = torch.where(mask[:, j], target[:, j], column)
                err = (column - q) / d_block[j]
                block[:, j] = q
                block[:, j + 1 : s1] -= err.unsqueeze(1) * u_block[j, j + 1 : s1].unsqueeze(0)
                errors[:, j] = err
            block[:, s1:] -= errors[:, s0:s1] @ u_block[s0:s1, s1:]
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
        selected += int(mask.sum())
        budget_total += budget
        cost_used += float(cost[mask].sum())
    stats = {
        "shape": [rows, cols],
        "selected": int(selected),
        "selected_fraction": selected / (rows * cols),
        "budget": budget_total,
        "cost_used": cost_used,
    }
    return w, stats


# ------------------------------------------------------------------------------------------------ Hessians
def input_hessians(
    model: nn.Module, modules: Sequence[nn.Module], batches: Iterable[dict[str, torch.Tensor]], stop_after=None
) -> tuple[list[torch.Tensor], int]:
    """H = (2/N)·Σ x xᵀ of each module's input over the batches (eval mode, padding left out), and N.

    `stop_after` (a module): the forward is cut once it has run, since later layers are not needed.
    """

    def outer(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.bool()]
        x = x.reshape(-1, x.shape[-1])
        return x.T @ x

    sums, num_samples, _ = input_statistics(model, modules, batches, outer, stop_after=stop_after)
    return [total * (2.0 / num_samples) for total in sums], num_samples


# ------------------------------------------------------------------------------------------------ targets
def _targets(model: nn.Module, config: SafeDeltaConfig) -> list[tuple[int, list[tuple[str, nn.Module]]]]:
    """Target Linear modules grouped by decoder layer: (layer index, [(qualified name, module), ...])."""
    base = unwrap_model(model)
    layers = get_decoder_layers(model)
    names = {id(module): name for name, module in base.named_modules()}
    wanted = None
    if config.target_modules:
        wanted = {
            id(module)
            for name, module in find_modules(base, config.target_modules)
            if not _LORA_PARTS & set(name.split("."))
        }
    groups, covered = [], set()
    for index, layer in enumerate(layers):
        group = []
        for sub_name, module in layer.named_modules():
            if _LORA_PARTS & set(sub_name.split(".")):
                continue  # the pieces of a LoRA layer: the LoRA layer stands for them
            linear = module.base_layer if _is_lora_layer(module) else module
            if not isinstance(linear, nn.Linear) or (wanted is not None and id(module) not in wanted):
                continue
            group.append((names[id(module)], module))
            covered.add(id(module))
        if group:
            groups.append((index, group))
    if wanted is not None and wanted - covered:
        outside = sorted(names[i] for i in wanted - covered)
        raise ValueError(
            f"Safe Delta processes nn.Linear modules inside the decoder layers; target_modules also matches {outside}. "
            "Their calibration input is not collected: narrow `target_modules` (other parameters follow "
            "`non_linear_params`)."
        )
    if not groups:
        raise ValueError(f"No nn.Linear inside the decoder layers matches target_modules={config.target_modules!r}.")
    return groups


# ------------------------------------------------------------------------------------------------ the repair
def _load_safety_dataset(safety_dataset, config: SafeDeltaConfig):
    return load_calibration_dataset(
        safety_dataset,
        config,
        "alignment",
        "safe_delta",
        "Safe Delta's Hessians need safety calibration data (harmful prompt → safe answer): pass `safety_dataset=` "
        "or set `alignment_dataset_name` (a Hub id or a local file/folder).",
    )


def _refuse_zero3(model: nn.Module, who: str) -> None:
    from ...core.distributed import is_zero3_param

    if any(is_zero3_param(p) for p in model.parameters()):
        raise NotImplementedError(
            f"{who} reads whole weight matrices and Hessians layer by layer and does not support DeepSpeed ZeRO-3 "
            "partitioned parameters; save the fine-tuned model and run `trl-safety prune --defense safe-delta`."
        )


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def safe_delta(
    model: nn.Module,
    safety_dataset=None,
    config: SafeDeltaConfig | None = None,
    *,
    aligned_model=None,
    processing_class=None,
    data_collator=None,
    output_dir: str | None = None,
) -> nn.Module:
    """Apply Safe Delta to the fine-tuned `model` and return the repaired model (a dense model).

    Args:
        model: the fine-tuned causal LM, dense (edited in place) or a `PeftModel` whose unmerged LoRA adapter is the
            fine-tuning update: its W_f = W_base + s·B·A is merged, and the *returned* model is the merged dense
            model (the selection breaks the low-rank structure, so no adapter can hold the result).
        safety_dataset: the safety calibration set in a TRL format (or `input_ids`); loaded from
            `config.alignment_dataset_name` when omitted.
        config: a [`SafeDeltaConfig`] (defaults when omitted).
        aligned_model: the aligned model W_a (a dense model, a folder / Hub id, or an alignment-adapter folder, merged
            onto its base). Optional for a `PeftModel`: its base weights are then the aligned weights.
        processing_class: tokenizer for a non-tokenized safety set.
        data_collator: optional collator for calibration batches (fed `{"input_ids": ...}` examples).
        output_dir: where to write the per-module statistics (`safe_delta_stats.json`).

    At `scale=inf, exclude_ratio=0, non_linear_params="finetuned"` every delta is kept: the model is returned as given.
    """
    config = config or SafeDeltaConfig()
    check_defense_fields(config, warn_no_effect=False)  # again: it may have been changed since it was built
    if config.is_neutral:
        logger.info("Safe Delta: scale=inf, exclude_ratio=0, non_linear_params='finetuned': the model is unchanged.")
        return model
    check_decoder_only(model, "safe_delta")
    _refuse_zero3(model, "safe_delta")
    peft = is_peft_model(model)
    base = unwrap_model(model)
    lora_layers = {name: m for name, m in base.named_modules() if _is_lora_layer(m)}
    if any(getattr(m, "merged", False) for m in lora_layers.values()):
        raise ValueError(
            "The model's LoRA adapter is merged into its base weights: pass the unmerged PeftModel, or "
            "the merged dense model with `aligned_model=`."
        )
    if lora_layers and not peft:
        raise ValueError("The model carries LoRA layers but is not a PeftModel: pass the PeftModel or a merged model.")
    groups = _targets(model, config)
    target_names = {name for _, group in groups for name, _ in group}

    if aligned_model is not None:
        loaded = not isinstance(aligned_model, nn.Module)
        aligned = _load_model(aligned_model, "aligned")
        if any(_is_lora_layer(m) for m in aligned.modules()):
            raise ValueError(
                "`aligned_model` carries a LoRA adapter: pass it merged (`merge_and_unload()`, `trl-safety merge`) or "
                "as the alignment-adapter folder, which is merged onto its base."
            )
        if loaded:
            aligned = aligned.to(input_device(model))
        aligned_modules = dict(unwrap_model(aligned).named_modules())
        calibration_model, adapter_off = aligned, None
    elif peft:
        aligned, aligned_modules, calibration_model, adapter_off = None, None, model, model.disable_adapter
        extra = [n for n in getattr(model, "modules_to_save", None) or []]
        if extra and config.non_linear_params == "aligned":
            raise ValueError(
                f"The adapter also trains full copies of {extra} (modules_to_save); their aligned values are not in "
                "the PeftModel. Pass `aligned_model=` (the adapter's base), or set `non_linear_params='finetuned'`."
            )
    else:
        raise ValueError(
            "Safe Delta needs the aligned weights W_a: pass `aligned_model=` (`--aligned_model` on the CLI); only a "
            "PeftModel can do without (its base weights are then the aligned ones)."
        )

    dataset = _load_safety_dataset(safety_dataset, config)
    if "input_ids" not in dataset.column_names and processing_class is None:
        raise ValueError("Safe Delta needs a tokenizer (`processing_class=`) for a safety set without `input_ids`.")
    sequences = tokenize_calibration_dataset(dataset, processing_class, config.max_length, config.dataset_text_field)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "eos_token_id", None) or 0  # padded positions are masked anyway
    calibration_layers = get_decoder_layers(calibration_model)

    pending, records, num_samples = {}, {}, 0
    for layer_index, group in groups:
        if aligned_modules is not None:
            missing = [name for name, _ in group if name not in aligned_modules]
            if missing:
                raise ValueError(f"The aligned model has no module {missing[0]!r}: it must share the architecture.")
            calibration_modules = [aligned_modules[name] for name, _ in group]
        else:
            calibration_modules = [module for _, module in group]
        batches = calibration_batches(sequences, config.calibration_batch_size, pad_token_id, data_collator)
        with adapter_off() if adapter_off is not None else _nullcontext():
            hessians, num_samples = input_hessians(
                calibration_model, calibration_modules, batches, stop_after=calibration_layers[layer_index]
            )
        for (name, module), hessian, calibration_module in zip(group, hessians, calibration_modules, strict=True):
            target = module.base_layer if _is_lora_layer(module) else module
            weight = target.weight
            dtype = torch.promote_types(weight.dtype, torch.float32)
            w_f = _dense_weight(module, dtype, weight.device)
            aligned_linear = (
                calibration_module.base_layer if _is_lora_layer(calibration_module) else calibration_module
            )
            w_a = aligned_linear.weight.detach().to(device=weight.device, dtype=dtype)
            if w_a.shape != w_f.shape:
                raise ValueError(
                    f"{name}: aligned {tuple(w_a.shape)} and fine-tuned {tuple(w_f.shape)} weights differ."
                )
            result, stats = safe_delta_matrix(
                w_a,
                w_f,
                hessian,
                scale=config.scale,
                exclude_ratio=config.exclude_ratio,
                percdamp=config.percdamp,
                block_size=config.block_size,
                sub_block=config.sub_block,
                budget_ref_dim=config.budget_ref_dim,
            )
            pending[name] = result.to(weight.dtype)
            records[name] = stats

    with torch.no_grad():
        restore = {}
        if peft and aligned is None and config.non_linear_params == "aligned":
            # LoRA layers outside the targets: their aligned value is the base weight, which merging overwrites
            restore = {
                f"{name}.weight": m.base_layer.weight.detach().clone()
                for name, m in lora_layers.items()
                if name not in target_names
            }
        if peft:
            model = model.merge_and_unload()
        dense = unwrap_model(model)
        modules = dict(dense.named_modules())
        for name, weight in pending.items():
            modules[name].weight.copy_(weight)
        if config.non_linear_params == "aligned":
            targets = {f"{name}.weight" for name in pending}
            if aligned is not None:
                aligned_params = dict(unwrap_model(aligned).named_parameters())
                for name, param in dense.named_parameters():
                    if name in targets:
                        continue
                    source = aligned_params.get(name)
                    if source is None or source.shape != param.shape:
                        raise ValueError(
                            f"The aligned model has no parameter {name!r} of shape {tuple(param.shape)}; it must share "
                            "the fine-tuned model's architecture (or set `non_linear_params='finetuned'`)."
                        )
                    param.copy_(source.to(param.dtype))
            else:
                params = dict(dense.named_parameters())
                for name, value in restore.items():
                    params[name].copy_(value)

    total = sum(r["shape"][0] * r["shape"][1] for r in records.values())
    kept = sum(r["selected"] for r in records.values())
    summary = {
        "defense": "safe-delta",
        "scale": config.scale,
        "exclude_ratio": config.exclude_ratio,
        "non_linear_params": config.non_linear_params,
        "calibration_samples": num_samples,
        "selected": kept,
        "total": total,
        "selected_fraction": kept / total if total else 0.0,
        "modules": records,
    }
    logger.info(
        "Safe Delta kept %d of %d Linear deltas (%.4f) in %d matrices.", kept, total, kept / total, len(records)
    )
    if output_dir is not None and _is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, SAFE_DELTA_STATS_NAME), "w") as f:
            json.dump(summary, f, indent=2)
    return model
