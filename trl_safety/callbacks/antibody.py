"""`AntibodyWeighting`: Antibody's per-sample batch weighting on a stock `SFTTrainer`, through its fused LM head."""

from __future__ import annotations

import logging

import torch
from datasets import Dataset
from transformers import TrainerCallback

from .. import compat
from ..core.config import check_range
from ..core.losses import is_packed_batch, lm_forward, per_sample_token_mean_nll
from ..core.views import ROW_COLUMN, pop_view
from ..defenses.antibody.weighting import (
    REFUSAL_PREFIX,
    attach_refusal_view,
    load_refusal_pool,
    rescale_to_token_count,
    sample_weights,
    weight_statistics,
)


logger = logging.getLogger(__name__)

METRIC = "antibody_weighting"  # the callback's namespace (docs/design/architecture.md §14)


class AntibodyWeighting(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that applies Antibody's fine-tuning-stage batch weighting
    (`docs/antibody.md`) inside a stock [`~trl.SFTTrainer`]: each sample of a micro-batch is weighted by
    `w = softmax((NLL̄(refusal) − NLL̄(answer)) / τ)`, the same loss as [`AntibodyTrainer`] (bit for bit, tested).

    It is built from the trainer, before `train()`, and registers itself (`trainer.add_callback`). At construction it
    derives the refusal view of the training rows (the same prompt answered by a refusal assigned round-robin by row
    id), tokenizes it with the trainer's own preparation, and wraps `trainer.data_collator` so that training batches
    carry it. During training, a forward pre-hook on the model takes the refusal view out of the batch and scores it
    (one no-grad forward); a forward hook then multiplies the per-token log-probs of TRL's fused LM head output by the
    sample weights, rescaled so that `Σ wᵢNᵢ = N_mb`. `SFTTrainer.compute_loss` turns them into its loss as usual
    (`Σ wᵢ Σₜ CEᵢₜ / num_items_in_batch`, scaled for gradient accumulation and devices as SFT's loss), and its
    entropy / accuracy / token metrics stay those of the unweighted samples, as `AntibodyTrainer` logs them.

    This is a forward hook rather than a `compute_loss_func` because `SFTTrainer`'s `compute_loss_func` path calls
    the model without `labels` (full `(B, T, V)` logits) and then runs a second, no-grad fused forward for the
    metrics; the hook rides the default fused-LM-head path, which `use_liger_kernel` keeps in TRL 1.16 (it turns
    Liger's fused linear cross-entropy off). Refused: a trainer other than `SFTTrainer` (DPO, KTO, GRPO, …: their loss
    is not a sum of per-sample SFT token losses), `packing` / `padding_free`, a `compute_loss_func`, label smoothing,
    `loss_type` other than `"nll"`, and data without `prompt` / `completion` columns.

    Args:
        trainer ([`~trl.SFTTrainer`]):
            The trainer, built with prompt/completion `train_dataset` (standard or conversational; convert
            `messages` rows first with `trl_safety.defenses.antibody.antibody_trainer.messages_to_prompt_completion`).
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature τ; `inf` gives uniform weights (plain SFT).
        refusals (`list[str]`, *optional*), refusals_file (`str`, *optional*):
            The refusal pool, as for `AntibodyTrainer` (default: the shipped pool).
        harmful_flag_column (`str`, *optional*, defaults to `"is_harmful"`):
            Optional boolean column used only to log the harmful samples' weight share.

    Row ids: a `_trl_safety_row` column of the raw rows (`trl_safety.core.views.add_row_ids`) is used when present;
    otherwise the prepared rows are numbered in order, which is `AntibodyTrainer`'s assignment whenever TRL's
    preparation dropped no row (it drops rows left without a trainable token by truncation).

    Logged: `antibody_weighting/weight_entropy` and `antibody_weighting/harmful_weight_share` (TRL's averaged metrics).

    Example:

    ```python
    from trl import SFTTrainer
    from trl_safety.callbacks import AntibodyWeighting

    trainer = SFTTrainer(model, args=args, train_dataset=user_dataset)  # prompt / completion
    AntibodyWeighting(trainer, temperature=1.0)
    trainer.train()
    ```
    """

    def __init__(
        self,
        trainer,
        temperature: float = 1.0,
        refusals: list[str] | None = None,
        refusals_file: str | None = None,
        harmful_flag_column: str | None = "is_harmful",
    ):
        self.temperature = temperature
        check_range(self, "temperature", 0.0, low_inclusive=False, allow_inf=True)
        if refusals is not None and (isinstance(refusals, str) or len(refusals) == 0):
            raise ValueError("`refusals` must be a non-empty list of refusal strings.")
        self._check_trainer(trainer)
        self.trainer = trainer
        self.harmful_flag_column = harmful_flag_column
        train = trainer.train_dataset
        if ROW_COLUMN not in train.column_names:
            train = train.add_column(ROW_COLUMN, list(range(len(train))))
            trainer.train_dataset = train
        raw = train.select_columns(["prompt", "completion", ROW_COLUMN])
        flag = harmful_flag_column if harmful_flag_column in train.column_names else None
        self.refusal_view = attach_refusal_view(trainer, raw, load_refusal_pool(refusals, refusals_file), flag)
        compat.keep_columns(trainer, [c for c in (ROW_COLUMN, flag) if c])
        self._flag = flag
        self._handles = []
        self._busy = False
        self._pending = None
        self.last_weights: torch.Tensor | None = None
        trainer.add_callback(self)

    @staticmethod
    def _check_trainer(trainer) -> None:
        from trl import SFTTrainer

        name = type(trainer).__name__
        if not isinstance(trainer, SFTTrainer):
            raise ValueError(
                f"AntibodyWeighting needs an SFTTrainer, got {name}: it re-weights the per-sample token log-probs of "
                "SFTTrainer's fused LM head forward, which this trainer does not compute its loss from (preference and "
                "RL objectives compare or sample completions; a plain Trainer uses the model's own loss)."
            )
        args = trainer.args
        problems = {
            "packing": "set `packing=False` (the weights need one sample per row)",
            "padding_free": "set `padding_free=False` (the weights need one sample per row)",
        }
        for field, fix in problems.items():
            if getattr(args, field, False):
                raise ValueError(f"AntibodyWeighting does not support `{field}`: {fix}.")
        if trainer.compute_loss_func is not None:
            raise ValueError(
                "AntibodyWeighting does not support a `compute_loss_func`: SFTTrainer then computes the loss from full "
                "logits outside the fused LM head output the weights act on."
            )
        if getattr(args, "label_smoothing_factor", 0.0) or getattr(args, "loss_type", "nll") != "nll":
            raise ValueError(
                "AntibodyWeighting needs SFT's plain token loss: set `label_smoothing_factor=0` and `loss_type='nll'`."
            )
        if not isinstance(trainer.train_dataset, Dataset):
            raise ValueError(
                "AntibodyWeighting needs a map-style `datasets.Dataset` as train_dataset (got "
                f"{type(trainer.train_dataset).__name__}): its rows are joined with their refusal view by row id."
            )
        columns = set(trainer.train_dataset.column_names)
        if not {"prompt", "completion"} <= columns:
            raise ValueError(
                "AntibodyWeighting builds each sample's refusal view from its prompt, so the train_dataset must be "
                "prompt/completion data (standard or conversational; convert `messages` data with "
                f"`messages_to_prompt_completion` first). Got columns {sorted(columns)}."
            )

    # ------------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("AntibodyWeighting needs the model in `on_train_begin`.")
        self._remove()
        self._handles = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward),
        ]

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = None

    # -------------------------------------------------------------------------------------------------- hooks
    def _pre_forward(self, module, args, kwargs):
        if self._busy:  # the refusal view's own forward
            return None
        self._pending = None
        flags = kwargs.pop(self._flag, None) if self._flag else None
        kwargs.pop(ROW_COLUMN, None)
        refusal = pop_view(kwargs, REFUSAL_PREFIX)
        if not refusal:  # evaluation data has no refusal view: plain SFT
            return args, kwargs
        if is_packed_batch(kwargs):
            raise ValueError("AntibodyWeighting cannot weight samples of a packed / padding-free batch.")
        if not kwargs.get("fused_lm_head", False):
            raise ValueError(
                "AntibodyWeighting weights the per-token log-probs of SFTTrainer's fused LM head forward, but this "
                "training forward does not use it (a `compute_loss_func`, label smoothing or sequence parallelism)."
            )
        self._busy = True
        try:
            with torch.no_grad():
                refusal_nll = per_sample_token_mean_nll(lm_forward(module, refusal))
        finally:
            self._busy = False
        self._pending = (refusal_nll, flags)
        return args, kwargs

    def _post_forward(self, module, args, outputs):
        if self._busy or self._pending is None:
            return None
        refusal_nll, flags = self._pending
        self._pending = None
        log_probs = getattr(outputs, "log_probs", None)
        if log_probs is None:
            raise ValueError("AntibodyWeighting: the fused LM head output has no `log_probs` to weight.")
        counts = outputs.label_mask.sum(dim=-1)
        weights = sample_weights(refusal_nll, -log_probs, counts, self.temperature)
        rescaled, _ = rescale_to_token_count(weights, counts)
        # SFTTrainer's loss is Σ −log_probs / num_items_in_batch: the weighted sum, normalised as SFT normalises it
        outputs.log_probs = log_probs * rescaled[:, None]
        self.last_weights = weights.detach()
        if compat.has_metrics_buffer(self.trainer):
            metrics = compat.metrics_buffer(self.trainer, "train" if module.training else "eval")
            for name, value in weight_statistics(weights, flags).items():
                metrics[f"{METRIC}/{name}"].append(value.item())
        return outputs
