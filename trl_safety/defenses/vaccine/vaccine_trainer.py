"""Vaccine: perturbation-aware alignment (Huang et al., NeurIPS 2024), `docs/design/algorithms.md` §2.1.

One step on an alignment micro-batch:

1. probe pass on the bare module: ∇_{e_l} L for the output e_l of every hooked module (no parameter gradient);
2. ε_l = ρ · ∇_{e_l} L / ‖(∇_{e_1} L, …, ∇_{e_L} L)‖, the norm joint over all hooked modules, tokens and samples;
3. the ordinary SFT step (one real backward) with e_l ← e_l + ε_l.
"""

from __future__ import annotations

import logging

import torch
from trl import SFTTrainer

from ... import compat
from ...core.layers import find_modules, get_attention_modules, get_decoder_layers
from ...core.perturbation import gaussian_output_noise, vaccine_perturbation
from ...core.seeding import MicroBatchGenerators
from ...core.trainer import DefenseTrainerMixin


logger = logging.getLogger(__name__)


class VaccineTrainer(DefenseTrainerMixin, SFTTrainer):
    """Drop-in [`~trl.SFTTrainer`] that runs Vaccine's perturbation-aware alignment on the `train_dataset`.

    The `train_dataset` is the alignment (safety) data: harmful prompts with refusals or safe answers. Everything
    [`~trl.SFTTrainer`] accepts is accepted, including `peft_config`. See [`VaccineConfig`] for the defense's fields.

    Example:

    ```python
    from trl_safety import VaccineConfig, VaccineTrainer

    trainer = VaccineTrainer(model="Qwen/Qwen2.5-0.5B", args=VaccineConfig(output_dir="vaccine", rho=2.0),
                             train_dataset=alignment_dataset)
    trainer.train()
    ```
    """

    extra_datasets = ()
    split_dependence = (
        "ε = ρ·g/‖g‖ with the norm over the whole micro-batch: each row's ε scales with 1/√(micro-batch size)."
    )
    # FSDP2 measured by tests/distributed/test_fsdp2.py (2 CPU ranks, equal to one process; docs/distributed.md)
    fsdp_verified = True
    locates_layers = True

    def uses_attention_modules(self) -> bool:
        return self.args.target_modules is None

    def setup_defense(self) -> None:
        args = self.args
        model = self.model
        self._layers = list(get_decoder_layers(model, args.layers_path))
        if args.target_modules is None:
            self._modules = get_attention_modules(model, args.attention_attr, args.layers_path)
        else:
            self._modules = [module for _, module in find_modules(model, args.target_modules)]
        self._noise = MicroBatchGenerators(args.seed, self.accelerator.process_index)  # Random-Vaccine
        logger.info("Vaccine perturbs the outputs of %d modules (rho=%s).", len(self._modules), args.rho)

    # ------------------------------------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = compat.prepare_inputs(self, inputs)
        if self.args.perturbation == "random":
            perturbed = gaussian_output_noise(self._modules, self.args.rho**0.5, self._get_noise_generator(inputs))
        else:
            perturbed = self._worst_case_perturbation(model, inputs)
        with perturbed:
            # Hooks stay until the real backward is done: non-reentrant checkpointing re-runs the hooked forward
            return super().training_step(model, inputs, num_items_in_batch)

    def _worst_case_perturbation(self, model, inputs):
        # The probe runs on the bare module (a ZeRO-2 engine's buckets break otherwise) and produces no parameter
        # gradient, so DDP needs no `no_sync` and gradient accumulation is untouched
        perturbation = vaccine_perturbation(
            self.accelerator.unwrap_model(model),
            inputs,
            self._modules,
            self.args.rho,
            layers=self._layers,
            autocast=self.compute_loss_context_manager,
        )
        self.log_metric("unperturbed_loss", perturbation.probe_loss)
        self.log_metric("activation_grad_norm", perturbation.grad_norm)
        self.log_metric("perturbation_norm", perturbation.perturbation_norm)
        return perturbation.applied()

    # ------------------------------------------------------------------------------------ Random-Vaccine noise
    def _get_noise_generator(self, inputs) -> torch.Generator:
        """This micro-batch's generator (`core.seeding`): resumed runs draw the same noise, ranks different noise."""
        return self._noise.next(self.state.global_step, inputs["input_ids"].device)
