from __future__ import annotations

import logging
import textwrap
from contextlib import nullcontext

import torch
from trl import SFTTrainer

from ...core.hooks import add_to_outputs
from ...core.layers import get_attention_modules, get_decoder_layers
from ...core.perturbation import activation_gradients, joint_norm, vaccine_perturbations
from ...core.snapshot import ParameterSnapshot, trainable_parameters
from ...core.trainer import DefenseTrainerMixin
from ...core.weight_perturbation import (
    PendingGradientMixin,
    all_reduce_mean,
    global_norm,
    normalized_step,
    parameter_gradients,
    shifted_parameters,
)
from .booster_config import BoosterConfig


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

    defense_name = "booster"
    stage = "alignment"
    config_class = BoosterConfig
    extra_datasets = ("harmful",)
    unsupported_backends = {"zero3": ZERO3_REASON}
    locates_layers = True
    _name = "Booster"
    _tag_names = ["trl", "sft", "trl-safety", "booster"]
    _paper = {
        "title": "Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating Harmful Perturbation",
        "id": "2409.01586",
        "citation": textwrap.dedent(
            """\
            @inproceedings{huang2025booster,
                title        = {{Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating Harmful Perturbation}},
                author       = {Tiansheng Huang and Sihao Hu and Fatih Ilhan and Selim Furkan Tekin and Ling Liu},
                year         = 2025,
                booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
            }"""
        ),
    }

    def uses_attention_modules(self) -> bool:
        return self.args.perturb_aware

    def setup_defense(self) -> None:
        self._harmful_batches = self.cycling_batches("harmful", self.args.harmful_batch_size)
        self._trainable = trainable_parameters(self.model)
        self._snapshot = None  # allocated on the first harmful step
        self._pending_gradient = None

    def defense_state_dict(self):
        return {"harmful_batches": self._harmful_batches.state_dict()}

    def load_defense_state_dict(self, state):
        self._harmful_batches.load_state_dict(state["harmful_batches"])

    # ------------------------------------------------------------------------------------------------- the step
    def harmful_gradient_difference(self, model) -> list[torch.Tensor]:
        """`∇h(w) − ∇h(w − α·ĝ)` on the next harmful batch, with w restored exactly afterwards."""
        bare = self.accelerator.unwrap_model(model)
        params = list(self._trainable.values())
        if self._snapshot is None:
            self._snapshot = ParameterSnapshot(self._trainable)
        harmful = self._prepare_inputs(next(self._harmful_batches))
        autocast = self.compute_loss_context_manager
        grads, loss = parameter_gradients(bare, harmful, params, autocast=autocast)
        if self.args.all_reduce_harmful_grad:
            grads = all_reduce_mean(grads, self.accelerator)
        norm = global_norm(grads)
        with shifted_parameters(self._snapshot, normalized_step(grads, -self.args.alpha, norm)):
            moved, moved_loss = parameter_gradients(bare, harmful, params, autocast=autocast)
        if self.args.all_reduce_harmful_grad:
            moved = all_reduce_mean(moved, self.accelerator)
        self.log_metric("harmful_loss", loss)
        self.log_metric("harmful_loss_after_step", moved_loss)
        self.log_metric("harmful_grad_norm", norm)
        return [g - m for g, m in zip(grads, moved)]

    def training_step(self, model, inputs, num_items_in_batch=None):
        lamb = self.args.lamb
        if lamb == 0 and not (self.args.perturb_aware and self.args.rho > 0):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if lamb > 0:
            difference = self.harmful_gradient_difference(model)
            self._pending_gradient = [lamb * d for d in difference]
        perturbation = nullcontext()
        if self.args.perturb_aware and self.args.rho > 0:
            # Booster + Vaccine: ∇f is taken with every attention output pushed by Vaccine's worst-case ε
            bare = self.accelerator.unwrap_model(model)
            prepared = self._prepare_inputs(inputs)
            modules = get_attention_modules(bare)
            grads, clean_loss = activation_gradients(
                bare, prepared, modules, layers=get_decoder_layers(bare), autocast=self.compute_loss_context_manager
            )
            self.log_metric("alignment_loss_unperturbed", clean_loss)
            self.log_metric("activation_grad_norm", joint_norm(grads))
            perturbation = add_to_outputs(modules, vaccine_perturbations(grads, self.args.rho))
        try:
            # The hooks stay until the backward has run: non-reentrant checkpointing recomputes the forward in it
            with perturbation:
                return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._pending_gradient = None
