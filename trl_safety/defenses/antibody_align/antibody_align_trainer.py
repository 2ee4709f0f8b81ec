from __future__ import annotations

import logging
import textwrap
from contextlib import nullcontext

import torch
from trl import SFTTrainer

from ...core.hooks import gradient_checkpointing_disabled
from ...core.layers import get_decoder_layers
from ...core.perturbation import needs_full_activations
from ...core.snapshot import ParameterSnapshot, trainable_parameters
from ...core.trainer import DefenseTrainerMixin
from ...core.weight_perturbation import (
    cosine_similarity,
    extra_term_scale,
    global_norm,
    normalized_step,
    parameter_gradients,
    shifted_parameters,
    value_neutral_term,
)
from ...data.refusals import ROW_COLUMN, refusal_view
from .antibody_align_config import AntibodyAlignConfig


logger = logging.getLogger(__name__)

ZERO3_REASON = (
    "Antibody's alignment step moves the trainable weights in place to the perturbed point θ', which ZeRO-3's "
    "parameter shards do not allow (docs/design/integration.md §4.4, measured for Booster's identical step)."
)


class AntibodyAlignTrainer(DefenseTrainerMixin, SFTTrainer):
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

    defense_name = "antibody-align"
    stage = "alignment"
    config_class = AntibodyAlignConfig
    extra_datasets = ("harmful",)
    unsupported_backends = {"zero3": ZERO3_REASON}
    locates_layers = True
    _name = "Antibody"
    _tag_names = ["trl", "sft", "trl-safety", "antibody-align"]
    _paper = {
        "title": "Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via "
        "Attenuating Harmful Gradient Influence",
        "id": "2603.00498",
        "citation": textwrap.dedent(
            """\
            @inproceedings{nguyen2026antibody,
                title        = {{Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via Attenuating Harmful Gradient Influence}},
                author       = {Quoc Minh Nguyen and Trung Le and Jing Wu and Anh Tuan Bui and Mehrtash Harandi},
                year         = 2026,
                booktitle    = {The Fourteenth International Conference on Learning Representations},
            }"""
        ),
    }

    # ----------------------------------------------------------------------------------------------------- data
    def _load_extra_dataset(self, role, dataset, args):
        dataset = super()._load_extra_dataset(role, dataset, args)
        if role == "harmful":
            # A row id survives TRL's preparation (which may drop rows), so both views can be joined on it
            dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
            self._raw_harmful = dataset
        return dataset

    def setup_defense(self) -> None:
        refusals = self._prepare_dataset(
            refusal_view(self._raw_harmful), self.processing_class, self.args, False, None, "refusal view (trl_safety)"
        )
        common = set(self.harmful_dataset[ROW_COLUMN]) & set(refusals[ROW_COLUMN])
        if not common:
            raise ValueError("No harmful example survives tokenization in both its harmful and its refusal view.")
        # Both views in the same row order, so two loaders with the same seed draw the same prompts together
        self.harmful_dataset = self.harmful_dataset.filter(lambda row: row in common, input_columns=ROW_COLUMN)
        self.refusal_dataset = refusals.filter(lambda row: row in common, input_columns=ROW_COLUMN)
        del self._raw_harmful
        batch_size = self.args.harmful_batch_size or self.args.per_device_train_batch_size
        self._harmful_batches = self.cycling_batches("harmful", batch_size)
        self._refusal_batches = self.cycling_batches("refusal", batch_size)
        self._trainable = trainable_parameters(self.model)
        self._snapshot = None
        self._pending = None
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
        bare = self.accelerator.unwrap_model(model)
        params = list(self._trainable.values())
        if self._snapshot is None:
            self._snapshot = ParameterSnapshot(self._trainable)
        harmful = self._prepare_inputs(next(self._harmful_batches))
        refusal = self._prepare_inputs(next(self._refusal_batches))
        autocast = self.compute_loss_context_manager
        g_h, loss_h = parameter_gradients(bare, harmful, params, autocast=autocast)
        norm = global_norm(g_h)
        difference = refusal_grad = None
        with shifted_parameters(self._snapshot, normalized_step(g_h, -self.args.alpha, norm)):
            if self.args.fixed_lambda != 0:
                g_p, loss_p = parameter_gradients(bare, harmful, params, autocast=autocast)
                difference = [h - p for h, p in zip(g_h, g_p)]
                self.log_metric("harmful_loss_after_step", loss_p)
            if self.args.lambda2 > 0:
                refusal_grad, loss_r = parameter_gradients(bare, refusal, params, autocast=autocast)
                self.log_metric("refusal_loss_after_step", loss_r)
        self.log_metric("harmful_loss", loss_h)
        self.log_metric("harmful_grad_norm", norm)
        self._pending = (difference, refusal_grad)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._pending = None

    def _update_lambda(self, align_grad, difference) -> float:
        cosine = cosine_similarity(align_grad, difference).item()
        raw = max(0.0, self.args.eta_lbd - cosine)
        m = self.args.ema_momentum
        self.lambda_ema = raw if self.lambda_ema is None else m * self.lambda_ema + (1 - m) * raw
        self.log_metric("cosine", cosine)
        self.log_metric("lambda_raw", raw)
        self.log_metric("lambda", self.lambda_ema)
        return self.lambda_ema

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pending, self._pending = self._pending, None
        if pending is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        difference, refusal_grad = pending
        params = list(self._trainable.values())
        scale = extra_term_scale(self, num_items_in_batch)
        adaptive = difference is not None and self.args.fixed_lambda is None
        layers = get_decoder_layers(self.accelerator.unwrap_model(model))
        # The adaptive λ needs ∇L_align by autograd.grad, which reentrant checkpointing does not allow
        no_reentrant = gradient_checkpointing_disabled(layers) if adaptive and needs_full_activations(layers) else None
        with no_reentrant or nullcontext():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)

        coefficients = [torch.zeros_like(p) for p in params]
        if adaptive:
            computed = torch.autograd.grad(loss, params, allow_unused=True)
            align_grad = [torch.zeros_like(p) if g is None else g for p, g in zip(params, computed)]
            lamb = self._update_lambda(align_grad, difference)
            # The alignment graph is consumed: the real backward runs through the linear term, whose gradient is
            # G_a + extra exactly (no second backward through the model)
            coefficients = align_grad
            loss_for_backward = loss.detach()
        else:
            lamb = self.args.fixed_lambda or 0.0
            loss_for_backward = loss
        if difference is not None and lamb != 0:
            coefficients = [c + (lamb * scale) * d for c, d in zip(coefficients, difference)]
        if refusal_grad is not None:
            coefficients = [c + (self.args.lambda2 * scale) * r for c, r in zip(coefficients, refusal_grad)]
        loss = loss_for_backward + value_neutral_term(params, coefficients).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss
