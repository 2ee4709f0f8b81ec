"""`VaccineCallback`: Vaccine's perturbation-aware step on any trainer whose loss is the model's own LM loss."""

from __future__ import annotations

import logging
from contextlib import ExitStack

import torch
from transformers import TrainerCallback, TrainingArguments

from .. import compat
from ..core.config import check_range
from ..core.layers import find_modules, get_attention_modules, get_decoder_layers
from ..core.perturbation import vaccine_perturbation


logger = logging.getLogger(__name__)

METRIC = "vaccine_perturbation"  # the callback's namespace (docs/design/architecture.md §14)

# Forward kwargs a trainer adds to the batch that the probe loss (`core.losses.lm_loss`) sets itself
_FORWARD_FLAGS = ("fused_lm_head", "use_cache", "return_dict", "output_router_logits")


def probe_loss_unavailable(trainer=None, args=None) -> str | None:
    """Why the probe loss cannot be recomputed for this trainer, or `None` when it can.

    The probe is the token-mean LM loss of the batch the model is called with, which is the trainer's own objective
    only when the training forward is the model's LM forward on `labels`: `SFTTrainer` (its default loss path) and a
    `Trainer` that keeps `Trainer.compute_loss` (the model's `loss`). Preference and RL trainers (DPO, KTO, ORPO,
    GRPO, RLOO, reward modelling) build their loss outside the model from chosen/rejected or sampled completions.
    """
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    if trainer is not None:
        name = type(trainer).__name__
        if isinstance(trainer, SFTTrainer):
            if trainer.compute_loss_func is not None:
                return f"{name} has a `compute_loss_func`, whose loss the probe pass cannot recompute"
            return None
        if type(trainer).compute_loss is Trainer.compute_loss and trainer.compute_loss_func is None:
            return None
        return (
            f"{name} computes its loss in its own `compute_loss`, not as the model's LM loss on `labels`; Vaccine's "
            "probe pass would need that loss as a function of the batch"
        )
    if args is None or isinstance(args, SFTConfig) or type(args).__module__.split(".")[0] != "trl":
        return None
    name = type(args).__name__.removesuffix("Config") + "Trainer"
    return (
        f"{name} (config {type(args).__name__}) computes its loss outside the model's LM forward; Vaccine's probe pass "
        "would need that loss as a function of the batch"
    )


class VaccineCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that runs Vaccine's perturbation-aware step (`docs/vaccine.md`) inside
    any trainer whose training loss is the model's LM loss on the batch: [`~trl.SFTTrainer`] and a plain
    [`~transformers.Trainer`] (or a subclass keeping `Trainer.compute_loss`).

    At `on_train_begin` a forward pre-hook is put on the model. Each training forward (model in train mode, gradients
    on, `labels` in the batch) first runs Vaccine's probe on the same batch, ∇_{e_l}L of every hooked module's output
    (`trl_safety.core.perturbation.vaccine_perturbation`, the code [`VaccineTrainer`] runs), then adds
    ε_l = ρ · ∇_{e_l}L / ‖(∇_{e_1}L, …, ∇_{e_L}L)‖ to those outputs for the real forward and its backward (kept until
    the micro-batch's backward has ended, as non-reentrant checkpointing re-runs the forward). On `SFTTrainer` this
    is `VaccineTrainer`'s gradient bit for bit. Forwards between
    steps (evaluation, other callbacks) are not perturbed.

    Trainers whose loss is built outside the model (DPO, KTO, ORPO, GRPO, RLOO, reward) are refused at
    `on_train_begin`, as is a training forward without `labels`.

    Args:
        rho (`float`, *optional*, defaults to `2.0`):
            Perturbation radius ρ (joint L2 norm over all hooked modules, tokens and samples of a micro-batch).
        target_modules (`list[str]` or `str`, *optional*, defaults to `None`):
            As `VaccineConfig.target_modules`; `None` hooks the attention module of every decoder layer.
        attention_attr (`str`, *optional*, defaults to `"self_attn"`):
            Name of the attention submodule of a decoder layer.
        layers_path (`str`, *optional*, defaults to `None`):
            Dotted path to the decoder-layer list, when it cannot be found structurally.
        trainer ([`~transformers.Trainer`], *optional*, defaults to `None`):
            The trainer (or set `callback.trainer` later). With it the trainer class is checked directly and the
            probe's loss and norms reach TRL's averaged metrics; without it the check uses the config class.

    Logged (with `trainer` on a TRL trainer): `vaccine_perturbation/unperturbed_loss`,
    `vaccine_perturbation/activation_grad_norm` and `vaccine_perturbation` (‖ε‖).

    Example:

    ```python
    from trl import SFTTrainer
    from trl_safety.callbacks import VaccineCallback

    trainer = SFTTrainer(model, args=args, train_dataset=alignment_dataset, callbacks=[VaccineCallback(rho=2.0)])
    trainer.train()
    ```
    """

    def __init__(
        self,
        rho: float = 2.0,
        target_modules: list[str] | str | None = None,
        attention_attr: str = "self_attn",
        layers_path: str | None = None,
        trainer=None,
    ):
        self.rho = rho
        check_range(self, "rho", 0.0)
        if target_modules is not None and len(target_modules) == 0:
            raise ValueError("`target_modules` must name at least one module, or be None for the attention modules.")
        self.target_modules = target_modules
        self.attention_attr = attention_attr
        self.layers_path = layers_path
        self.trainer = trainer
        self._model = None
        self._modules: list = []
        self._layers: list = []
        self._handle = None
        self._applied = ExitStack()
        self._probing = False

    # ------------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args: TrainingArguments, state, control, model=None, **kwargs):
        reason = probe_loss_unavailable(self.trainer, args)
        if reason is not None:
            raise ValueError(
                f"VaccineCallback cannot run on this trainer: {reason}. It supports trainers whose loss is the model's "
                "LM loss on `labels` (SFTTrainer, a plain Trainer); for preference / RL training use a defense "
                "of that stage, e.g. ProximalCallback."
            )
        if model is None:
            raise ValueError(
                "VaccineCallback needs the model in `on_train_begin` (every transformers Trainer passes it)."
            )
        self._model = model
        self._layers = list(get_decoder_layers(model, self.layers_path))
        if self.target_modules is None:
            self._modules = get_attention_modules(model, self.attention_attr, self.layers_path)
        else:
            self._modules = [module for _, module in find_modules(model, self.target_modules)]
        if self.rho > 0:
            self._handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        logger.info("VaccineCallback perturbs the outputs of %d modules (rho=%s).", len(self._modules), self.rho)

    def on_substep_end(self, args, state, control, **kwargs):
        self._applied.close()  # the micro-batch's backward has ended

    def on_step_end(self, args, state, control, **kwargs):
        self._applied.close()

    def on_train_end(self, args, state, control, **kwargs):
        self._applied.close()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._model = None

    # --------------------------------------------------------------------------------------------------- hook
    def _pre_forward(self, module, args, kwargs):
        if self._probing:  # the probe's own forward
            return None
        if not (module.training and torch.is_grad_enabled()):
            # Not a training forward (evaluation, a no-grad metrics pass); the ε of a micro-batch whose backward is
            # still to come stays, since checkpoint recomputation needs it
            return None
        self._applied.close()  # a new training forward: the previous micro-batch's ε no longer applies
        if "labels" not in kwargs or args:
            raise ValueError(
                "VaccineCallback: a training forward came without `labels` as a keyword argument, so the probe loss "
                "(the LM loss of the batch) cannot be recomputed. This trainer's loss is not the model's LM loss."
            )
        inputs = {key: value for key, value in kwargs.items() if key not in _FORWARD_FLAGS}
        self._probing = True
        try:
            perturbation = vaccine_perturbation(module, inputs, self._modules, self.rho, layers=self._layers)
        finally:
            self._probing = False
        self._applied.enter_context(perturbation.applied())
        self._log(perturbation)
        return None

    def _log(self, perturbation) -> None:
        if self.trainer is None or not compat.has_metrics_buffer(self.trainer):
            return
        metrics = compat.metrics_buffer(self.trainer, "train")
        metrics[f"{METRIC}/unperturbed_loss"].append(perturbation.probe_loss.item())
        metrics[f"{METRIC}/activation_grad_norm"].append(perturbation.grad_norm.item())
        metrics[METRIC].append(perturbation.perturbation_norm.item())
