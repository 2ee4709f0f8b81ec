"""Trainer for token-wise constrained fine-tuning (Qi et al., ICLR 2025)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from trl import SFTTrainer

from ... import compat
from ...core.layers import is_peft_model
from ...core.losses import is_packed_batch
from ...core.trainer import DefenseTrainerMixin


def position_betas(label_mask: torch.Tensor, beta: float, bias_factor: float, first_factor: float, length: int):
    """βₜ for every label position of a padded batch: t counts the row's supervised tokens from 1 (prompt and padding
    positions, where `label_mask` is False, get the value of their neighbours but carry no loss)."""
    position = label_mask.long().cumsum(dim=-1)  # 1 at the first supervised token of the row
    betas = torch.full(label_mask.shape, beta, dtype=torch.float32, device=label_mask.device)
    betas = torch.where(position <= length, torch.full_like(betas, beta * bias_factor), betas)
    return torch.where(position <= 1, torch.full_like(betas, beta * first_factor), betas)


def constrained_token_weights(log_probs, ref_log_probs, betas, min_weight: float) -> torch.Tensor:
    """The detached weight `max(2σ(−βₜΔₜ), min_weight)` whose weighted CE has the gradient of `−(2/βₜ) log σ(βₜΔₜ)`."""
    dtype = torch.promote_types(log_probs.dtype, torch.float32)  # fp32 at least (bf16 log-ratios are too coarse)
    delta = log_probs.detach().to(dtype) - ref_log_probs.to(dtype)
    return (2.0 * torch.sigmoid(-betas.to(dtype) * delta)).clamp(min=min_weight)


class TokenConstrainedTrainer(DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for token-wise constrained fine-tuning: SFT whose per-token loss is weighted by `2σ(−βₜΔₜ)`, with Δₜ the
    log-ratio of the model's and the starting model's probability of the label and βₜ large on the first response
    tokens, so that the first tokens (where shallow safety alignment lives) can move only a little.

    The reference log-probs come from the same fused-LM-head forward as the loss (no `(B, T, V)` logits), run under
    `no_grad` each step on the PEFT model with its adapter disabled (`reference_mode="adapter_off"`) or on a frozen
    copy of the starting model (`"copy"`). Takes every argument of [`~trl.SFTTrainer`]; the train set is the user's
    data, in any TRL format, no extra dataset.

    Example:

    ```python
    from trl_safety import TokenConstrainedConfig, TokenConstrainedTrainer

    trainer = TokenConstrainedTrainer(
        model="aligned-model",
        args=TokenConstrainedConfig(output_dir="token-constrained", beta=0.1),
        train_dataset=user_dataset,
    )
    trainer.train()
    ```
    """

    unsupported_backends = {
        "zero3": "the reference forward (adapter disabled or frozen copy) is untested on ZeRO-3 sharded weights; the "
        "official code refuses ZeRO-3 too (see docs/token_constrained.md).",
        "fsdp": "the reference forward is untested under FSDP (see docs/token_constrained.md).",
    }

    def __init__(self, model, args=None, *positional, **kwargs):
        if args is not None and (getattr(args, "packing", False) or getattr(args, "padding_free", False)):
            raise ValueError(
                "TokenConstrainedTrainer does not support `packing` or `padding_free`: response positions are counted "
                "per row. Set `packing=False` and `padding_free=False`."
            )
        super().__init__(model, args, *positional, **kwargs)

    def setup_defense(self) -> None:
        self._reference: nn.Module | None = None
        self.reference_mode: str | None = None
        if self.args.beta == 0:
            return
        if self.args.loss_type != "nll" or self.args.label_smoothing_factor or self.compute_loss_func is not None:
            raise ValueError(
                "TokenConstrainedTrainer re-weights SFT's negative log-likelihood: set `loss_type='nll'`, "
                "`label_smoothing_factor=0` and pass no `compute_loss_func`."
            )
        bare = self.accelerator.unwrap_model(self.model)
        if not compat.uses_fused_lm_head(bare):
            raise ValueError("TokenConstrainedTrainer needs the model patched with TRL's fused LM head by SFTTrainer.")
        is_peft = is_peft_model(bare)
        mode = self.args.reference_mode
        if mode == "auto":
            mode = "adapter_off" if is_peft else "copy"
        if mode == "adapter_off":
            if not is_peft:
                raise ValueError("`reference_mode='adapter_off'` needs a PEFT model; use `reference_mode='copy'`.")
            nonzero = [
                name for name, p in bare.named_parameters() if "lora_B" in name and torch.count_nonzero(p.detach())
            ]
            if nonzero:
                raise ValueError(
                    "`reference_mode='adapter_off'` takes the model without its adapter as the starting model, but the "
                    f"adapter does not start at zero ({nonzero[0]} is non-zero); use `reference_mode='copy'`."
                )
        else:
            self._reference = self._frozen_copy(bare)
        self.reference_mode = mode
        if self.args.disable_dropout:
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0

    @staticmethod
    def _frozen_copy(bare: nn.Module) -> nn.Module:
        """A no-grad copy of the starting model with its own fused LM head (the trained model's patched forward
        closes over the original, so a plain deep copy would run the live weights)."""
        reference = compat.strip_fused_lm_head(copy.deepcopy(bare))
        if hasattr(reference, "merge_and_unload"):
            reference = reference.merge_and_unload()  # the fused head is added to a plain model, not a PEFT wrapper
        compat.add_fused_lm_head(reference)
        reference.requires_grad_(False)
        return reference.eval()

    def _place_reference(self, bare: nn.Module) -> None:
        """Keep the copy on the live model's device and dtype: DeepSpeed moves and casts the model only when training
        starts, after the copy was made."""
        live = next(p for p in bare.parameters() if p.is_floating_point())
        held = next(p for p in self._reference.parameters() if p.is_floating_point())
        if (held.device, held.dtype) != (live.device, live.dtype):
            self._reference.to(device=live.device, dtype=live.dtype)

    def _reference_log_probs(self, model, inputs) -> torch.Tensor:
        with torch.no_grad():
            if self._reference is not None:
                self._place_reference(self.accelerator.unwrap_model(model))
                return compat.fused_forward(self._reference, **inputs).log_probs
            with self.accelerator.unwrap_model(model).disable_adapter():
                return compat.fused_forward(self.accelerator.unwrap_model(model), **inputs).log_probs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.reference_mode is None:  # beta = 0: exactly SFTTrainer
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if is_packed_batch(inputs):
            raise ValueError(
                "TokenConstrainedTrainer cannot count response positions in a packed / padding-free batch."
            )
        inputs = {k: v for k, v in inputs.items() if k != "num_items_in_batch"}
        ref_log_probs = self._reference_log_probs(model, inputs)
        outputs = compat.fused_forward(model, **inputs)
        mask = outputs.label_mask
        args = self.args
        betas = position_betas(mask, args.beta, args.bias_factor, args.first_token_bias_factor, args.bias_length)
        weights = constrained_token_weights(outputs.log_probs, ref_log_probs, betas, args.min_weight)
        weighted = -(weights * outputs.log_probs).sum()  # log_probs are 0 where the label is -100
        if num_items_in_batch is not None and compat.loss_is_scaled_for_ga(self, num_items_in_batch):
            # normalised like SFT's loss: by the step's token count, times the processes DDP averages over
            loss = weighted / torch.as_tensor(num_items_in_batch).clamp(min=1)
            loss = loss * compat.step_loss_scale(self, num_items_in_batch)
        else:  # no step count (a model without loss kwargs): the micro-batch token mean, which Trainer divides by GA
            loss = weighted / mask.sum().clamp(min=1)

        self._log_token_metrics(outputs, inputs, weights)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, outputs, inputs, weights) -> None:
        """The defense's weight and CE, and the metrics `SFTTrainer.compute_loss` logs (entropy, token accuracy,
        token count), which it cannot log here."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        mask = outputs.label_mask
        num_valid = gather(mask.sum()).sum()
        weight_sum = gather((weights * mask).sum().detach()).sum()
        nll_sum = gather(-outputs.log_probs.detach().sum()).sum()
        denominator = num_valid.clamp(min=1)
        self.log_metric("mean_weight", (weight_sum / denominator).item(), mode)
        self.log_metric("ce", (nll_sum / denominator).item(), mode)
        metrics = compat.metrics_buffer(self, mode)
        if outputs.entropy is not None:
            entropy = gather(outputs.entropy.detach().sum()).sum()
            metrics["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        if outputs.is_top1 is not None:
            correct = gather(outputs.is_top1.sum()).sum()
            metrics["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            compat.count_train_tokens(self, gather(inputs["attention_mask"].sum()).sum().item())
        metrics["num_tokens"] = [compat.total_train_tokens(self)]
