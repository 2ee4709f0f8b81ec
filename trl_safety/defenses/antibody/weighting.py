"""Antibody's batch weighting, shared by [`AntibodyTrainer`] and the `AntibodyWeighting` callback.

The pieces: the refusal pool, the refusal view joined to the training rows by row id (`core.views`), and the weights
`w = softmax((NLL̄(refusal) − NLL̄(answer)) / τ)` of a micro-batch.
"""

from __future__ import annotations

import math

import torch

from ...core.views import ROW_COLUMN, RowAlignedCollator, RowAlignedView
from ...data.refusals import refusal_pool, refusal_view


REFUSAL_PREFIX = "refusal_"  # batch keys of the refusal views: `refusal_input_ids`, `refusal_labels`, …


def likelihood_ratio_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """`softmax(scores / τ)` up to its normalisation, i.e. `exp((scores − max) / τ)` (largest weight 1).

    Antibody's loss is a ratio in the weights, so the normalisation cancels; leaving it out makes uniform weights
    (τ = ∞, or τ so large that every weight rounds to 1) exactly 1.0 and the loss bit-identical to SFT's token mean.
    """
    if math.isinf(temperature):
        return torch.ones_like(scores)
    return torch.exp((scores - scores.max()) / temperature)


def load_refusal_pool(refusals: list[str] | None, refusals_file: str | None) -> list[str]:
    """`refusals` when given, else the lines of `refusals_file`, else the shipped pool."""
    if refusals is not None:
        return list(refusals)
    if refusals_file is not None:
        with open(refusals_file, encoding="utf-8") as f:
            pool = [line.strip() for line in f if line.strip()]
        if not pool:
            raise ValueError(f"`refusals_file` {refusals_file!r} holds no refusal.")
        return pool
    return refusal_pool()


def attach_refusal_view(trainer, raw_rows, pool: list[str], flag_column: str | None) -> RowAlignedView:
    """Tokenize the refusal view of `raw_rows` (prompt/completion rows with row ids) as the trainer prepares data, and
    wrap `trainer.data_collator` so that training batches carry it under `refusal_*` keys (and the flag column as a
    bool tensor). The trainer's loader must keep the row-id and flag columns (`_signature_columns`)."""
    view = RowAlignedView.prepare(trainer, refusal_view(raw_rows, pool, row_column=ROW_COLUMN), "refusal view")
    view.require(
        trainer.train_dataset,
        "train_dataset",
        f"they have no refusal view left after truncation to max_length={trainer.args.max_length}; increase "
        "`max_length` or shorten their prompts.",
    )
    trainer.data_collator = RowAlignedCollator(
        trainer.data_collator, {REFUSAL_PREFIX: view}, columns={flag_column: torch.bool} if flag_column else None
    )
    return view


def sample_weights(
    refusal_nll: torch.Tensor, token_nll: torch.Tensor, counts: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Detached per-sample weights (largest 1) from the refusal view's token-mean NLL and the samples' per-token NLL
    `(B, T-1)` (zero off the labels), in `token_nll`'s dtype."""
    sample_nll = token_nll.detach().sum(dim=-1) / counts.clamp(min=1)
    return likelihood_ratio_weights(refusal_nll - sample_nll, temperature).to(token_nll.dtype)


def rescale_to_token_count(weights: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weights · N_mb / Σ wᵢNᵢ, Σ wᵢNᵢ)`: weights whose weighted token count is the micro-batch's, so the weighted
    sum normalised like SFT's loss (by the step's token count) counts the micro-batch by its share of the step's
    tokens; uniform weights stay exactly 1."""
    weighted_count = (weights * counts).sum().clamp(min=torch.finfo(weights.dtype).tiny)
    return weights * (counts.sum() / weighted_count), weighted_count


def weight_statistics(weights: torch.Tensor, flags: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The logged statistics of a micro-batch's weights: their entropy and, with flags, the harmful samples' share."""
    probabilities = weights / weights.sum()
    stats = {"weight_entropy": -(probabilities * probabilities.clamp(min=1e-30).log()).sum()}
    if flags is not None:
        stats["harmful_weight_share"] = probabilities[flags.to(probabilities.device)].sum()
    return stats
