"""T-Vaccine (Targeted Vaccine): layer-selective Vaccine (Liu et al., 2024), `docs/design/algorithms.md` §2.2.

Per optimizer step t (on its first micro-batch):

- every `rescore_interval` steps: s_l = ‖∂h/∂e_l‖ on one harmful batch, p_l = s_l / Σ_j s_j;
- every `resample_interval` steps: draw `num_active_layers` distinct layers from p (a seeded generator whose state is
  checkpointed), freeze the inactive layers' attention parameters (whole layers with `freeze_mlp`) and run the
  inactive layers under activation checkpointing.

Each micro-batch is then a Vaccine step restricted to the active layers: ε_l = ρ ∇_{e_l} f / ‖(∇_{e_l} f)_{l∈𝒜}‖.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

from ... import compat
from ...core.hooks import gradient_checkpointing_disabled
from ...core.layers import get_attention_modules, get_decoder_layers
from ...core.perturbation import activation_gradients, vaccine_perturbation
from ...core.trainer import DefenseTrainerMixin


logger = logging.getLogger(__name__)


_DEEPSPEED_REASON = (
    "T-Vaccine freezes inactive layers by toggling `requires_grad`, and DeepSpeed's ZeRO optimizer keeps stepping "
    "frozen parameters with Adam momentum, so they are not frozen (measured). Use a single process or DDP."
)


class TVaccineTrainer(DefenseTrainerMixin, SFTTrainer):
    """Drop-in [`~trl.SFTTrainer`] running T-Vaccine on the `train_dataset` (alignment data).

    Needs a harmful dataset (`harmful_dataset=` or `harmful_dataset_name`), used only to score layers. See
    [`TVaccineConfig`] for the defense's fields.
    """

    extra_datasets = ("harmful",)
    split_dependence = (
        "ε = ρ·g/‖g‖ with the norm over the whole micro-batch: each row's ε scales with 1/√(micro-batch size)."
    )
    unsupported_backends = {
        "zero1": _DEEPSPEED_REASON,
        "zero2": _DEEPSPEED_REASON,
        "zero3": _DEEPSPEED_REASON,
        "fsdp": "under FSDP2 its update differed from a single-process run (measured, docs/distributed.md).",
    }
    locates_layers = True

    def uses_attention_modules(self) -> bool:
        return True

    def setup_defense(self) -> None:
        args = self.args
        self._layers = list(get_decoder_layers(self.model, args.layers_path))
        self._attention = get_attention_modules(self.model, args.attention_attr, args.layers_path)
        num_layers = len(self._layers)
        if args.num_active_layers > num_layers:
            raise ValueError(
                f"`num_active_layers={args.num_active_layers}` exceeds the {num_layers} decoder layers of the model; "
                f"set it to at most {num_layers}."
            )
        # Parameters T-Vaccine may freeze: those trainable at start inside each layer's attention module (or the
        # whole layer with `freeze_mlp`). Everything else keeps its `requires_grad`.
        scope = self._layers if args.freeze_mlp else self._attention
        self._freezable = [[p for p in module.parameters() if p.requires_grad] for module in scope]
        if not any(self._freezable):
            raise ValueError(
                "T-Vaccine found no trainable parameter in the decoder layers' attention modules, so it cannot train "
                "the active layers only. Add attention projections to the LoRA `target_modules` or use "
                "`freeze_mlp=True`."
            )
        # The user's per-layer checkpointing flags, read when T-Vaccine first changes them (Trainer.train() enables
        # checkpointing after __init__) and put back at the end of training
        self._checkpoint_flags: list[bool | None] | None = None
        self._generator = torch.Generator().manual_seed(args.seed)  # same seed on every rank: same active layers
        self._probabilities = torch.full((num_layers,), 1.0 / num_layers)
        self._active: list[int] = list(range(num_layers))
        self._prepared_step = -1
        self._harmful_batches = None
        self._harmful_state = None

    # ------------------------------------------------------------------------------------------ layer selection
    def _harmful_batch(self):
        if self._harmful_batches is None:
            self._harmful_batches = self.cycling_batches("harmful", self.args.harmful_batch_size)
            if self._harmful_state is not None:
                self._harmful_batches.load_state_dict(self._harmful_state)
        return next(self._harmful_batches)

    def score_layers(self, model) -> torch.Tensor:
        """p_l ∝ ‖∂h/∂e_l‖ on one harmful batch, averaged over ranks so every rank draws the same layers."""
        batch = compat.prepare_inputs(self, self._harmful_batch())
        # Scoring sees every layer: the inactive ones are still checkpointed with frozen adapters from the last
        # step, and making their outputs differentiable inside a checkpointed region breaks its recomputation
        with gradient_checkpointing_disabled(self._layers):
            grads, harmful_loss = activation_gradients(
                self.accelerator.unwrap_model(model),
                batch,
                self._attention,
                layers=self._layers,
                autocast=self.compute_loss_context_manager,
            )
        scores = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        scores = self.accelerator.reduce(scores, reduction="mean").cpu()
        self.log_metric("harmful_loss", harmful_loss)
        total = scores.sum()
        if not torch.isfinite(total) or total <= 0:
            logger.warning("T-Vaccine layer scores are degenerate (sum %s); sampling layers uniformly.", total)
            return torch.full_like(scores, 1.0 / len(scores))
        return scores / total

    def sample_layers(self) -> list[int]:
        """Draw `num_active_layers` distinct layers from the scores, without replacement (successive draws)."""
        probabilities = self._probabilities.double()
        if int((probabilities > 0).sum()) < self.args.num_active_layers:
            # Too few layers with a positive score: give the rest a tiny weight so sampling is still possible
            probabilities = probabilities + 1e-12
        drawn = torch.multinomial(
            probabilities, self.args.num_active_layers, replacement=False, generator=self._generator
        )
        return sorted(drawn.tolist())

    def _apply_active_layers(self) -> None:
        active = set(self._active)
        for index, params in enumerate(self._freezable):
            for param in params:
                param.requires_grad_(index in active)
        if not self.args.checkpoint_inactive_layers:
            return
        if self._checkpoint_flags is None:
            self._checkpoint_flags = [getattr(layer, "gradient_checkpointing", None) for layer in self._layers]
            if None in self._checkpoint_flags:
                logger.warning(
                    "Some decoder layers have no `gradient_checkpointing` flag (not a transformers "
                    "GradientCheckpointingLayer); T-Vaccine cannot run them under activation checkpointing."
                )
        for index, layer in enumerate(self._layers):
            if self._checkpoint_flags[index] is None:
                continue
            if index in active:
                layer.gradient_checkpointing = self._checkpoint_flags[index]
            else:
                if getattr(layer, "_gradient_checkpointing_func", None) is None:
                    layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
                layer.gradient_checkpointing = True

    def _restore_layers(self) -> None:
        self._prepared_step = -1  # a later `train()` call re-applies the active set
        for params in self._freezable:
            for param in params:
                param.requires_grad_(True)
        if self._checkpoint_flags is not None:
            for layer, flag in zip(self._layers, self._checkpoint_flags):
                if flag is not None:
                    layer.gradient_checkpointing = flag
            self._checkpoint_flags = None

    def _prepare_step(self, model) -> None:
        step = self.state.global_step
        if step == self._prepared_step:
            return
        self._prepared_step = step
        if step % self.args.rescore_interval == 0:
            self._probabilities = self.score_layers(model)
        if step % self.args.resample_interval == 0:
            self._active = self.sample_layers()
            logger.debug("T-Vaccine step %d: active layers %s", step, self._active)
        self._apply_active_layers()

    # ------------------------------------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        self._prepare_step(model)
        inputs = compat.prepare_inputs(self, inputs)
        # Vaccine restricted to the active layers: the norm of ε is joint over their attention outputs only
        perturbation = vaccine_perturbation(
            self.accelerator.unwrap_model(model),
            inputs,
            [self._attention[i] for i in self._active],
            self.args.rho,
            layers=self._layers,
            autocast=self.compute_loss_context_manager,
        )
        self.log_metric("unperturbed_loss", perturbation.probe_loss)
        self.log_metric("perturbation_norm", perturbation.perturbation_norm)
        with perturbation.applied():
            return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            # Leave the model as it was given: every parameter trainable, the user's checkpointing flags
            if self.args.rho != 0:
                self._restore_layers()

    # -------------------------------------------------------------------------------------------------- resume
    def defense_state_dict(self):
        if self.args.rho == 0:
            return {}
        harmful = self._harmful_batches.state_dict() if self._harmful_batches is not None else self._harmful_state
        return {
            "generator": self._generator.get_state(),
            "probabilities": self._probabilities.clone(),
            "active": list(self._active),
            "harmful_batches": harmful,
        }

    def load_defense_state_dict(self, state):
        if not state:
            return
        self._generator.set_state(state["generator"])
        self._probabilities = state["probabilities"].clone()
        self._active = list(state["active"])
        self._harmful_state = state["harmful_batches"]
        self._harmful_batches = None
