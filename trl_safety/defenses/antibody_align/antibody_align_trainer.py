from __future__ import annotations

import logging
from functools import partial

import torch
from trl import SFTTrainer

from ...core.trainer import DefenseTrainerMixin
from ...core.views import ROW_COLUMN, RowAlignedView, add_row_ids
from ...core.weight_perturbation import PendingGradientMixin, cosine_similarity
from ...data.refusals import refusal_view


logger = logging.getLogger(__name__)

ZERO3_REASON = (
    "Antibody's alignment step moves the trainable weights in place to the perturbed point θ', which ZeRO-3's "
    "parameter shards do not allow (docs/design/integration.md §4.4, measured for Booster's identical step)."
)


class AntibodyAlignTrainer(PendingGradientMixin, DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for Antibody's alignment stage: flatness of the harmful loss with an adaptive weight, plus a refusal loss
    at the perturbed weights.

    Per micro-batch, with a harmful batch `hx` and its refusal view `rx` (same prompts, generic refusals):

    1. `G_h = ∇h(θ)` on `hx`; `θ' = θ − α·G_h/(‖G_h‖ + 1e-7)` in place;
    2. `G_p = ∇h(θ')` on `hx` and `G_r = ∇L_refusal(θ')` on `rx`; exact restore of θ from a snapshot;
    3. the alignment forward through the (wrapped) model, `G_a = ∇L_align` by `torch.autograd.grad`,
       `λ_raw = max(0, eta_lbd − cos(G_a, G_h − G_p))`, `λ_t` = EMA of `λ_raw`;
    4. the one real backward carries `G_a + (λ_t·(G_h − G_p) + λ2·G_r)/GA` through a value-neutral linear term.

    Four forward/backward passes (the official code runs five and deep-copies the model every step; neither is
    needed). Takes every argument of [`~trl.SFTTrainer`] plus `harmful_dataset=`; `train_dataset` is the alignment
    (refusal) data.
    """

    extra_datasets = ("harmful",)
    split_dependence = "The λ EMA is updated once per micro-batch: GA 2 updates it twice per optimizer step."
    unsupported_backends = {"zero3": ZERO3_REASON}
    locates_layers = True

    # ----------------------------------------------------------------------------------------------------- data
    def _load_extra_dataset(self, role, dataset, args):
        dataset = super()._load_extra_dataset(role, dataset, args)
        # Row ids survive TRL's preparation, so each harmful row finds its refusal view (same prompt, a pool refusal)
        return add_row_ids(dataset, "harmful dataset") if role == "harmful" else dataset

    def setup_defense(self) -> None:
        rows = refusal_view(self.raw_extra_datasets["harmful"], row_column=ROW_COLUMN)
        refusals = RowAlignedView.prepare(self, rows, "refusal view")
        # Both restricted to the rows TRL kept in both, in one order: two loaders with one seed draw them together
        self.harmful_dataset, self.refusal_dataset = refusals.aligned_with(self.harmful_dataset, "harmful dataset")
        batch_size = self.args.harmful_batch_size or self.args.per_device_train_batch_size
        self._harmful_batches = self.cycling_batches("harmful", batch_size)
        self._refusal_batches = self.cycling_batches("refusal", batch_size)
        self.setup_weight_perturbation()
        self.lambda_ema: float | None = None

    def defense_state_dict(self):
        return {
            "harmful_batches": self._harmful_batches.state_dict(),
            "refusal_batches": self._refusal_batches.state_dict(),
            "lambda_ema": self.lambda_ema,
        }

    def load_defense_state_dict(self, state):
        self._harmful_batches.load_state_dict(state["harmful_batches"])
        self._refusal_batches.load_state_dict(state["refusal_batches"])
        self.lambda_ema = state["lambda_ema"]

    # ------------------------------------------------------------------------------------------------- the step
    @property
    def _active(self) -> bool:
        return not (self.args.fixed_lambda == 0 and self.args.lambda2 == 0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._active:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        # Both loaders advance together (same seed, same row order), so `refusal` is the refusal view of `harmful`
        harmful, refusal = next(self._harmful_batches), next(self._refusal_batches)
        step = self.harmful_weight_step(
            model,
            harmful,
            -self.args.alpha,
            moved=self.args.fixed_lambda != 0,
            others=[refusal] if self.args.lambda2 > 0 else (),
        )
        difference = refusal_grad = None
        if step.moved_grads is not None:
            difference = [h - p for h, p in zip(step.grads, step.moved_grads)]  # G_d = G_h − G_p
            self.log_metric("harmful_loss_after_step", step.moved_loss)
        if step.others:
            refusal_grad, refusal_loss = step.others[0]  # G_r = ∇L_refusal(θ')
            self.log_metric("refusal_loss_after_step", refusal_loss)
        self.log_metric("harmful_loss", step.loss)
        self.log_metric("harmful_grad_norm", step.norm)
        if difference is not None and self.args.fixed_lambda is None:
            # λ_t depends on G_a, the alignment loss's own gradient in this very step
            adaptive = partial(self._adaptive_gradient, difference, refusal_grad)
            return self.training_step_with_gradient(model, inputs, num_items_in_batch, from_loss_gradient=adaptive)
        extra = self._harmful_terms(self.args.fixed_lambda or 0.0, difference, refusal_grad)
        return self.training_step_with_gradient(model, inputs, num_items_in_batch, extra)

    def _harmful_terms(self, lamb, difference, refusal_grad) -> list[torch.Tensor] | None:
        """`λ·G_d + λ₂·G_r`, the per-micro-batch part of the gradient (None when both terms are off)."""
        extra = [lamb * d for d in difference] if difference is not None and lamb != 0 else None
        if refusal_grad is not None:
            refusal = [self.args.lambda2 * r for r in refusal_grad]
            extra = refusal if extra is None else [e + r for e, r in zip(extra, refusal)]
        return extra

    def _adaptive_gradient(self, difference, refusal_grad, align_grad, scale) -> list[torch.Tensor]:
        """`G_a + (λ_t·G_d + λ₂·G_r)/GA`, with `λ_t` updated from `cos(G_a, G_d)`."""
        extra = self._harmful_terms(self._update_lambda(align_grad, difference), difference, refusal_grad)
        return align_grad if extra is None else [a + scale * e for a, e in zip(align_grad, extra)]

    def _update_lambda(self, align_grad, difference) -> float:
        cosine = cosine_similarity(align_grad, difference).item()
        raw = max(0.0, self.args.eta_lbd - cosine)
        m = self.args.ema_momentum
        self.lambda_ema = raw if self.lambda_ema is None else m * self.lambda_ema + (1 - m) * raw
        self.log_metric("cosine", cosine)
        self.log_metric("lambda_raw", raw)
        self.log_metric("lambda", self.lambda_ema)
        return self.lambda_ema
