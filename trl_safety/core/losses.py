"""Side-effect-free language-model losses for probe passes.

`SFTTrainer.compute_loss` logs entropy, accuracy and token counts as side effects, so probe passes (Vaccine's first
pass, Booster's harmful passes, Antibody's refusal view) must not call it. These helpers run the model's forward
directly: through TRL's fused LM head when `SFTTrainer` patched it in (no `(B, T, V)` logits), and through the
ordinary logits otherwise, so they also work on models no trainer has touched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..compat import FusedCausalLMOutput, fused_forward, uses_fused_lm_head


# Keys of an SFT batch that are bookkeeping, not model inputs
_NON_MODEL_KEYS = ("num_items_in_batch",)


def lm_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> FusedCausalLMOutput:
    """Forward returning per-token log-probs of the labels (shifted), a label mask and the token-mean loss.

    `log_probs` and `label_mask` have shape `(B, T-1)`; `log_probs` is zero where the label is `-100`.
    """
    inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    if "labels" not in inputs:
        raise ValueError("lm_forward needs `labels` in the batch (use -100 for positions without loss).")
    if uses_fused_lm_head(model):
        return fused_forward(model, **inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    loss = -log_probs.sum() / mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask)


def lm_loss(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy of the batch (the quantity `SFTTrainer` optimises at GA=1, one process)."""
    return lm_forward(model, inputs).loss


def per_sample_nll(outputs: FusedCausalLMOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed NLL and number of target tokens, each of shape `(B,)`.

    Only valid for padded batches (one sample per row); packed or padding-free rows hold several samples.
    """
    nll = -outputs.log_probs.sum(dim=-1)
    counts = outputs.label_mask.sum(dim=-1)
    return nll, counts


def per_sample_token_mean_nll(outputs: FusedCausalLMOutput) -> torch.Tensor:
    """Per-sample token-mean NLL, shape `(B,)` (rows without target tokens give 0)."""
    nll, counts = per_sample_nll(outputs)
    return nll / counts.clamp(min=1)


def is_packed_batch(inputs: Mapping[str, torch.Tensor]) -> bool:
    """Whether a batch is padding-free / packed (several samples per row)."""
    return "cu_seq_lens_q" in inputs or ("position_ids" in inputs and "attention_mask" not in inputs)
