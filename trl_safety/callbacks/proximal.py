"""`ProximalCallback`: Lisa's proximal term on any trainer."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .. import compat
from ..core.config import check_range
from ..core.proximal import ProximalTerm, anchor_from_pretrained, micro_batches_in_step, proximal_active
from ..core.snapshot import trainable_parameters
from .logging_utils import log_metrics


logger = logging.getLogger(__name__)

METRIC = "proximal_term"  # the callback's namespace (docs/design/architecture.md §14), as Lisa's `lisa/proximal_term`


class ProximalCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that pulls the trainable weights towards an anchor with Lisa's proximal term
    ρ/2‖w − anchor‖², on any trainer ([`~trl.SFTTrainer`], [`~trl.DPOTrainer`], KTO, GRPO or a plain
    [`~transformers.Trainer`]).

    At `on_train_begin` a gradient hook is registered on every trainable parameter (the LoRA factors of a PEFT model);
    each backward adds ρ(w − anchor)/k to the parameter's gradient, with k the number of micro-batches of the optimizer
    step, so an optimizer step carries exactly ρ(w − anchor). Hooks run before DDP/DeepSpeed gradient reduction and
    see the gathered parameter under ZeRO-3, so the callback works on one process, DDP, ZeRO-2 and ZeRO-3. They are
    removed at `on_train_end`. The mechanics are those of [`LisaTrainer`] (`trl_safety.core.proximal`): with
    `alignment_steps=0` Lisa is this callback on [`~trl.SFTTrainer`]. Lisa's alternation with alignment data is
    [`LisaCallback`], which holds the trainer to run its own alignment steps.

    Args:
        rho (`float`, *optional*, defaults to `1.0`):
            Proximal intensity ρ.
        anchor (`str` or `None`, *optional*, defaults to `None`):
            `None` anchors at the weights when training starts (on a resumed run: the resumed weights). A path
            anchors at the weights saved there by `save_pretrained`: a PEFT adapter folder (for a PEFT model, e.g. the
            aligned adapter continued in Single-LoRA mode) or a full model folder (e.g. the aligned checkpoint).
        reanchor_steps (`int` or `None`, *optional*, defaults to `None`):
            Move the anchor to the current weights every `reanchor_steps` optimizer steps (a lazy, Lisa-like drift
            limit without alignment data). `None` keeps it fixed.
        warmup_ratio (`float`, *optional*, defaults to `0.0`):
            The term is off for optimizer steps `0 … ⌊warmup_ratio · max_steps⌋` (Lisa's official warm-up uses 0.1).
        trainer ([`~transformers.Trainer`], *optional*, defaults to `None`):
            The trainer this callback is added to (it can also be set later as `callback.trainer`). With it, the term
            reaches every `report_to` integration (W&B, TensorBoard, Trackio, …): on a TRL trainer it joins TRL's
            averaged metrics and is logged with the step's `loss`; on a plain `Trainer` it is logged through
            `Trainer.log` right after each training log. Without it, it is added to the training logs that
            `state.log_history` and the console receive, after the integrations have already been called.

    The value ρ/2‖w − anchor‖² applied in each optimizer step is logged as `proximal_term` (averaged over the logging
    interval, like `loss`; the callback namespace rule of `docs/design/architecture.md` §14), and the last one is kept
    in `last_value`.

    Example:

    ```python
    from trl import DPOConfig, DPOTrainer
    from trl_safety.callbacks import ProximalCallback

    proximal = ProximalCallback(rho=1.0, anchor="path/to/aligned-model")
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(output_dir="dpo-proximal"),
        train_dataset=preference_dataset,
        processing_class=tokenizer,
        callbacks=[proximal],
    )
    proximal.trainer = trainer  # so `proximal_term` reaches report_to
    trainer.train()
    ```
    """

    def __init__(
        self,
        rho: float = 1.0,
        anchor: str | None = None,
        reanchor_steps: int | None = None,
        warmup_ratio: float = 0.0,
        trainer=None,
    ):
        self.rho = rho
        self.trainer = trainer
        self.anchor = anchor
        self.reanchor_steps = reanchor_steps
        self.warmup_ratio = warmup_ratio
        check_range(self, "rho", 0.0)
        check_range(self, "reanchor_steps", 1)
        check_range(self, "warmup_ratio", 0.0, 1.0)
        self.term: ProximalTerm | None = None
        self.last_value: float | None = None
        self._scale = 1.0
        self._unlogged: list[float] = []  # values of the steps since the last training log (no TRL buffer)
        self._logging = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError(
                "ProximalCallback needs the model in `on_train_begin` (every transformers Trainer passes it)."
            )
        params = trainable_parameters(model)
        if not params:
            raise ValueError("ProximalCallback found no trainable parameter (`requires_grad=True`) in the model.")
        anchor = None
        if self.anchor is not None:
            adapter = getattr(model, "active_adapter", "default")
            anchor = anchor_from_pretrained(self.anchor, params, adapter if isinstance(adapter, str) else "default")
        self._unlogged.clear()
        self.term = ProximalTerm(params, self.rho, anchor=anchor, scale=lambda: self._scale)
        if self.rho > 0:
            self.term.attach()
        logger.info("ProximalCallback: rho=%s on %d trainable tensors.", self.rho, len(params))

    def on_step_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.term is None:
            return
        step = state.global_step
        if self.reanchor_steps and step > 0 and step % self.reanchor_steps == 0:
            self.term.reanchor()
        # Trainer groups the last micro-batches of an epoch into a shorter step; the share per backward follows it
        self._scale = 1.0 / micro_batches_in_step(args, step, train_dataloader)
        self.term.enabled = proximal_active(step, state.max_steps, self.warmup_ratio)

    def on_step_end(self, args, state, control, **kwargs):
        if self.term is None:
            return
        self.last_value = self.term.pop_value() or 0.0
        if self.trainer is not None and compat.has_metrics_buffer(self.trainer):
            # TRL averages the buffer over the logging interval and logs it with the step's loss
            compat.metrics_buffer(self.trainer, "train")[METRIC].append(self.last_value)
        else:
            self._unlogged.append(self.last_value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only the regular training logs (they carry `loss`; evaluation logs carry `eval_loss`), never our own
        if self._logging or not self._unlogged or logs is None or "loss" not in logs:
            return
        metrics = {METRIC: sum(self._unlogged) / len(self._unlogged)}
        self._unlogged.clear()
        if self.trainer is not None:
            # A plain Trainer: a log of its own, which goes through `on_log` to every integration
            self._logging = True
            try:
                log_metrics(self.trainer, state, control, metrics)
            finally:
                self._logging = False
            return
        # Without the trainer: the entry `Trainer.log` just appended, and the callbacks after this one
        logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.term is not None:
            self.term.remove()
            self.term = None
