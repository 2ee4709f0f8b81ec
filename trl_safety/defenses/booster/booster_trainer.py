from __future__ import annotations

import logging
from functools import partial

import torch
from trl import SFTTrainer

from ... import compat
from ...core.layers import get_attention_modules, get_decoder_layers
from ...core.perturbation import vaccine_perturbation
from ...core.trainer import DefenseTrainerMixin
from ...core.weight_perturbation import PendingGradientMixin, all_reduce_mean


logger = logging.getLogger(__name__)

ZERO3_REASON = (
    "Booster moves the trainable weights in place for its simulated harmful step, which ZeRO-3's parameter shards do "
    "not allow (three variants, including GatheredParameters, were measured to fail; docs/design/integration.md §4.4)."
)


class BoosterTrainer(PendingGradientMixin, DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for Booster (alignment stage): SFT on alignment data plus the attenuation of a simulated harmful step.

    Per micro-batch: `∇f(w) + λ·(∇h(w) − ∇h(w − α·ĝ))` with `ĝ = ∇h(w)/(‖∇h(w)‖ + 1e-7)` (global norm over the
    trainable parameters) and `h` the token-mean loss of a batch drawn from the cycling harmful loader. The two
    harmful gradients come from probe passes on the bare module; the weights are restored bit-exactly from a snapshot;
    `λ·(∇h(w) − ∇h(w'))/GA` joins the one real backward through a value-neutral linear term, so the logged `loss` is
    the alignment loss.

    Takes every argument of [`~trl.SFTTrainer`] plus `harmful_dataset=` (harmful prompt → harmful answer, any TRL
    format). `train_dataset` is the alignment (refusal) data.
    """

    extra_datasets = ("harmful",)
    unsupported_backends = {"zero3": ZERO3_REASON}
    locates_layers = True

    def uses_attention_modules(self) -> bool:
        return self.args.perturb_aware

    def setup_defense(self) -> None:
        self._harmful_batches = self.cycling_batches("harmful", self.args.harmful_batch_size)
        self.setup_weight_perturbation()

    def defense_state_dict(self):
        return {"harmful_batches": self._harmful_batches.state_dict()}

    def load_defense_state_dict(self, state):
        self._harmful_batches.load_state_dict(state["harmful_batches"])

    # ------------------------------------------------------------------------------------------------- the step
    def harmful_gradient_difference(self, model) -> list[torch.Tensor]:
        """`∇h(w) − ∇h(w − α·ĝ)` on the next harmful batch, with w restored exactly afterwards."""
        reduce = partial(all_reduce_mean, accelerator=self.accelerator) if self.args.all_reduce_harmful_grad else None
        step = self.harmful_weight_step(model, next(self._harmful_batches), -self.args.alpha, reduce=reduce)
        self.log_metric("harmful_loss", step.loss)
        self.log_metric("harmful_loss_after_step", step.moved_loss)
        self.log_metric("harmful_grad_norm", step.norm)
        return [g - m for g, m in zip(step.grads, step.moved_grads)]

    def training_step(self, model, inputs, num_items_in_batch=None):
        lamb = self.args.lamb
        if lamb == 0 and not (self.args.perturb_aware and self.args.rho > 0):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        extra = [lamb * d for d in self.harmful_gradient_difference(model)] if lamb > 0 else None
        perturbation = None
        if self.args.perturb_aware and self.args.rho > 0:
            # Booster + Vaccine: ∇f is taken with every attention output pushed by Vaccine's worst-case ε
            bare = self.accelerator.unwrap_model(model)
            vaccine = vaccine_perturbation(
                bare,
                compat.prepare_inputs(self, inputs),
                get_attention_modules(bare),
                self.args.rho,
                layers=get_decoder_layers(bare),
                autocast=self.compute_loss_context_manager,
            )
            self.log_metric("alignment_loss_unperturbed", vaccine.probe_loss)
            self.log_metric("activation_grad_norm", vaccine.grad_norm)
            # The hooks stay until the backward has run: non-reentrant checkpointing recomputes the forward in it
            perturbation = vaccine.applied()
        return self.training_step_with_gradient(model, inputs, num_items_in_batch, extra, context=perturbation)
