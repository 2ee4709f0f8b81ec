"""AsFT: anchor fine-tuning updates to the alignment direction (docs/asft.md).

Per targeted module, with V = W_aligned − W_base and Ĉ = F·Fᵀ/c (`safelora_project.alignment_factor`):
R = ‖(I − Ĉ)·ΔW‖_F². Under LoRA ΔW = B·A and R = tr((MB)ᵀ(MB)·A·Aᵀ) with MB = B − F(FᵀB)/c, so no d×d matrix is
ever formed; under full fine-tuning ΔW = W − W_start and R = ‖D − F(FᵀD)/c‖_F².
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from trl import SFTTrainer

from ...core.layers import find_modules, is_peft_model, unwrap_model
from ...core.snapshot import ParameterSnapshot
from ...core.trainer import DefenseTrainerMixin
from ...core.weight_perturbation import extra_term_scale
from ..safelora.safelora_project import _dense_weight, active_lora_layers, alignment_factor


logger = logging.getLogger(__name__)

ZERO3_REASON = (
    "the AsFT penalty reads the LoRA factors (or the full weights) outside the forward pass, where ZeRO-3 holds only "
    "empty parameter shards."
)


def lora_penalty(b: torch.Tensor, a: torch.Tensor, factor: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """‖(I − F·Fᵀ/c)·B·A‖_F² by the trace form: products with F and two r×r Gram matrices, never a d×d matrix."""
    mb = b - factor @ (factor.T @ b) / norm
    return ((mb.T @ mb) * (a @ a.T)).sum()  # tr(G·H) = Σ G∘H for the symmetric H = A·Aᵀ


def dense_penalty(delta: torch.Tensor, factor: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """‖(I − F·Fᵀ/c)·D‖_F² for a dense update D (full fine-tuning)."""
    return (delta - factor @ (factor.T @ delta) / norm).pow(2).sum()


class _Target:
    """One regularised module: its alignment factor and how to read its update."""

    def __init__(self, name, factor, norm, *, lora=None, weight=None):
        self.name, self.factor, self.norm = name, factor, norm
        self.lora = lora  # (module, adapter, B₀, A₀ or None when the adapter starts at zero)
        self.weight = weight  # the full-FT parameter


class AsFTTrainer(DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for AsFT (fine-tuning stage): the SFT loss plus λ·Σ_m ‖(I − Ĉ_m)·ΔW_m‖_F², once per optimizer step.

    Ĉ_m comes from V_m = W_aligned − W_base of each targeted module, paired by module name: W_aligned is the model
    given to the trainer (under LoRA its weights with the adapter as it starts), W_base the model given as
    `base_model=` (a model, a folder, a Hub id or `smollm2`) or by `base_model_name_or_path`; only V's factor is kept.
    Under LoRA ΔW = B·A (s·B·A with `scale_by_lora_scaling`), minus the adapter's starting value when it does not
    start at zero; under full fine-tuning ΔW = W − W_start (an extension: the official code is LoRA-only).

    Takes every argument of [`~trl.SFTTrainer`] plus `base_model=`. `train_dataset` is the user's fine-tuning data.
    """

    extra_models = ("base",)
    unsupported_backends = {"zero3": ZERO3_REASON}

    def setup_defense(self) -> None:
        base = self.raw_extra_models.pop("base")
        self._targets: list[_Target] = []
        if self.args.asft_lambda != 0:
            self._targets = self._build_targets(base)
        del base  # only the factors are kept

    def _build_targets(self, base_model: nn.Module) -> list[_Target]:
        args = self.args
        base_modules = dict(unwrap_model(base_model).named_modules())
        if is_peft_model(self.model):
            found = [
                (name, module, adapter)
                for name, adapter, module in active_lora_layers(self.model, args.target_modules, "AsFT")
                if isinstance(module.lora_A[adapter], nn.Linear)
            ]
            if not found:
                raise ValueError(
                    "AsFT regularises LoRA updates, but the model has no active LoRA adapter"
                    + (f" on target_modules={args.target_modules!r}." if args.target_modules else ".")
                )
        else:
            model = unwrap_model(self.model)
            output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            modules = find_modules(model, args.target_modules) if args.target_modules else model.named_modules()
            found = [
                (name, module, None)
                for name, module in modules
                if isinstance(module, nn.Linear)
                and module.weight.requires_grad
                and (args.target_modules or module is not output)
            ]
            if not found:
                raise ValueError(
                    "AsFT found no trainable nn.Linear to regularise"
                    + (f" among target_modules={args.target_modules!r}." if args.target_modules else ".")
                )
        targets, unchanged = [], []
        for name, module, adapter in found:
            if name not in base_modules:
                raise ValueError(
                    f"The base model has no module {name!r}: AsFT pairs the base and fine-tuned modules by name; "
                    "pass a base model of the same architecture."
                )
            weight = module.base_layer.weight if adapter is not None else module.weight
            with torch.no_grad():
                dtype = torch.promote_types(weight.dtype, torch.float32)
                aligned = _dense_weight(module, dtype, weight.device)
                w_base = _dense_weight(base_modules[name], dtype, weight.device)
                if w_base.shape != aligned.shape:
                    raise ValueError(
                        f"{name}: the base weight {tuple(w_base.shape)} does not match the fine-tuned model's "
                        f"{tuple(aligned.shape)}."
                    )
                factor = alignment_factor(w_base, aligned, args.projection, args.projection_rtol)
                del aligned, w_base
            if factor is None:
                unchanged.append(name)
                factor = None, None
            basis, norm = factor
            if basis is not None:
                basis, norm = basis.to(dtype), norm.to(dtype)
            if adapter is not None:
                b0, a0 = module.lora_B[adapter].weight, module.lora_A[adapter].weight
                start = None
                if bool(b0.any()) and bool(a0.any()):  # a non-zero adapter to start from: penalise its change
                    start = (b0.detach().to(dtype, copy=True), a0.detach().to(dtype, copy=True))
                targets.append(_Target(name, basis, norm, lora=(module, adapter, start)))
            else:
                targets.append(_Target(name, basis, norm, weight=module.weight))
        if unchanged:
            logger.warning(
                "AsFT: %d module(s) are identical in the base and aligned models (V = 0, Ĉ = 0): their whole update "
                "is penalised (%s).",
                len(unchanged),
                ", ".join(unchanged[:5]) + (" ..." if len(unchanged) > 5 else ""),
            )
        if not is_peft_model(self.model):
            self._start = ParameterSnapshot({t.name: t.weight for t in targets})
        return targets

    def penalty(self) -> torch.Tensor:
        """Σ_m ‖(I − Ĉ_m)·ΔW_m‖_F² over the targeted modules, differentiable in the trainable weights."""
        total = None
        for target in self._targets:
            if target.lora is not None:
                module, adapter, start = target.lora
                b, a = module.lora_B[adapter].weight, module.lora_A[adapter].weight
                dtype = (
                    target.factor.dtype if target.factor is not None else torch.promote_types(b.dtype, torch.float32)
                )
                b, a = b.to(dtype), a.to(dtype)
                if start is not None:  # B·A − B₀·A₀ = [B, −B₀]·[A; A₀]
                    if start[0].device != b.device:  # moved once, not every step
                        start = tuple(t.to(b.device) for t in start)
                        target.lora = (module, adapter, start)
                    b0, a0 = start
                    b, a = torch.cat([b, -b0], dim=1), torch.cat([a, a0], dim=0)
                if self.args.scale_by_lora_scaling:
                    b = b * module.scaling[adapter]
                if target.factor is None:
                    value = ((b.T @ b) * (a @ a.T)).sum()
                else:
                    value = lora_penalty(b, a, *self._on_device(target, b.device))
            else:
                weight = target.weight
                reference = self._start.tensors[target.name]
                if reference.device != weight.device:  # moved once, not every step
                    reference = self._start.tensors[target.name] = reference.to(weight.device)
                dtype = torch.promote_types(weight.dtype, torch.float32)
                delta = weight.to(dtype) - reference.to(dtype)
                if target.factor is None:
                    value = delta.pow(2).sum()
                else:
                    value = dense_penalty(delta, *self._on_device(target, weight.device))
            total = value if total is None else total + value.to(total.device)
        return total

    @staticmethod
    def _on_device(target: _Target, device: torch.device):
        # the model may reach its device after set-up (DeepSpeed moves it in `train()`): move the factor once
        if target.factor.device != device:
            target.factor, target.norm = target.factor.to(device), target.norm.to(device)
        return target.factor, target.norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.asft_lambda == 0:  # strength zero: exactly SFTTrainer
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = self.penalty()
        self.log_metric("penalty", penalty)
        # SFT's loss is already divided for GA; the per-micro-batch penalty must be too, so that it counts once per
        # optimizer step (the official code adds it undivided: GA times per step)
        loss = loss + self.args.asft_lambda * penalty.to(loss.dtype) * extra_term_scale(self, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss
