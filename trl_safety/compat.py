"""The one place that reaches private (or undocumented) TRL / transformers internals.

Every access the package makes to a name TRL or transformers does not document as public goes through a function
here, so a library upgrade that moves one breaks this module (and `tests/test_compat.py`, which checks each name and
signature against the installed versions) rather than a dozen defense files. Why each internal is needed is in
`docs/design/integration.md` §11.

Methods that the trainers *override* cannot be wrapped: they are listed in `OVERRIDDEN_METHODS` with the signature the
overrides use, and the class attributes TRL reads and the trainers set in `TRL_CLASS_ATTRIBUTES`.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import FusedCausalLMOutput


__all__ = [
    "FusedCausalLMOutput",
    "OVERRIDDEN_METHODS",
    "TRL_CLASS_ATTRIBUTES",
    "TRL_METRICS",
    "add_fused_lm_head",
    "checkpoint_folder",
    "completion_only_loss",
    "count_train_tokens",
    "current_accumulation_steps",
    "extend_signature_columns",
    "formatting_func",
    "fused_forward",
    "generate_model_card",
    "has_metrics_buffer",
    "metrics_buffer",
    "num_items_in_batch",
    "prepare_dataset",
    "prepare_inputs",
    "quantization_method",
    "remove_quantization",
    "remove_unused_columns",
    "strip_fused_lm_head",
    "total_train_tokens",
    "tracker_urls",
    "train_batch_size",
    "uses_fused_lm_head",
]

# Private or signature-sensitive hooks the trainers override: {name: (class defining it, parameter names after self)}.
# An override keeps this signature; `tests/test_compat.py` checks it on the installed classes.
OVERRIDDEN_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    # `DefenseTrainerMixin`: writes the defense state into the folder the base call just wrote
    "_save_checkpoint": ("transformers.Trainer", ("model", "trial")),
    # `DefenseTrainerMixin`: writes defense_config.json; `_internal_call` tells checkpoint saves from a user's save
    "save_model": ("transformers.Trainer", ("output_dir", "_internal_call")),
    # Lisa: swaps the batches of alignment steps before the step's micro-batches are counted
    "get_batch_samples": ("transformers.Trainer", ("epoch_iterator", "num_batches", "device")),
    # Antibody, RepNoise: keep their extra columns through `_remove_unused_columns`
    "_set_signature_columns_if_needed": ("trl.SFTTrainer", ()),
    # every trainer: the step contract (`docs/design/architecture.md` §3) depends on `num_items_in_batch` reaching both
    "compute_loss": ("trl.SFTTrainer", ("model", "inputs", "return_outputs", "num_items_in_batch")),
    "training_step": ("transformers.Trainer", ("model", "inputs", "num_items_in_batch")),
}

# Class attributes TRL's trainers define and read (model tags in `SFTTrainer.__init__`, card title and paper in
# `create_model_card`); the defense trainers set them.
TRL_CLASS_ATTRIBUTES: tuple[str, ...] = ("_tag_names", "_name", "_paper")

# Metrics `SFTTrainer.compute_loss` logs; a defense that replaces that computation logs its own values under these
# names (they are TRL's, not `<defense>/<metric>`; `docs/design/architecture.md` §14).
TRL_METRICS: tuple[str, ...] = ("entropy", "mean_token_accuracy", "num_tokens")


# ------------------------------------------------------------------------------------------------ dataset preparation
def prepare_dataset(trainer, dataset, args, name: str, formatting_func=None):
    """Tokenize `dataset` exactly as `SFTTrainer` prepares its train data (`SFTTrainer._prepare_dataset`), unpacked.

    Extra datasets (alignment, harmful, refusal views) must see the same chat template, truncation and masking as the
    training data; TRL exposes no public entry point for that.
    """
    return trainer._prepare_dataset(dataset, trainer.processing_class, args, False, formatting_func, name)


def formatting_func(trainer):
    """The `formatting_func` given to `SFTTrainer` (stored as `SFTTrainer._formatting_func`), or None."""
    return getattr(trainer, "_formatting_func", None)


def completion_only_loss(trainer) -> bool:
    """Whether `SFTTrainer` resolved `completion_only_loss` to True (`SFTTrainer.completion_only_loss`, set in its
    `__init__` from the config and the data format); False for trainers that have no such attribute."""
    return bool(getattr(trainer, "completion_only_loss", False))


def extend_signature_columns(trainer, columns: Iterable[str]) -> None:
    """Append `columns` to `Trainer._signature_columns` (the columns `_remove_unused_columns` keeps), once each.

    Call it from an override of `_set_signature_columns_if_needed`, after `super()`; a `None` list (column pruning not
    set up) is left alone.
    """
    if trainer._signature_columns is None:
        return
    trainer._signature_columns = list(dict.fromkeys([*trainer._signature_columns, *columns]))


def keep_columns(trainer, columns: Iterable[str]) -> None:
    """From outside the trainer (a callback given a built trainer): set up `_signature_columns` as the trainer would
    (`_set_signature_columns_if_needed`) and add `columns`, so the loaders built later keep them."""
    trainer._set_signature_columns_if_needed()
    extend_signature_columns(trainer, columns)


def remove_unused_columns(trainer, dataset, description: str | None = None):
    """Drop the columns the model's forward does not take, as the trainer does for its own loaders
    (`Trainer._remove_unused_columns`; a no-op with `remove_unused_columns=False`)."""
    return trainer._remove_unused_columns(dataset, description=description)


# ------------------------------------------------------------------------------------------------ batches and steps
def prepare_inputs(trainer, inputs: Mapping):
    """Move a collated batch to the device as the trainer does for its own batches (`Trainer._prepare_inputs`)."""
    return trainer._prepare_inputs(inputs)


def num_items_in_batch(trainer, batches: list, device: torch.device):
    """The loss-normalising token count of an optimizer step's micro-batches (`Trainer._get_num_items_in_batch`);
    needed when a step's batches are replaced after `get_batch_samples` counted the original ones."""
    return trainer._get_num_items_in_batch(batches, device)


def loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Whether `Trainer.training_step` takes `compute_loss`'s value as already scaled for gradient accumulation (and
    so does not divide it by the GA steps): `loss_is_scaled_for_ga` when set, else `model_accepts_loss_kwargs` with a
    step token count, or a `compute_loss_func`."""
    if trainer.loss_is_scaled_for_ga is not None:
        return bool(trainer.loss_is_scaled_for_ga)
    accepts = bool(trainer.model_accepts_loss_kwargs) and num_items_in_batch is not None
    return accepts or trainer.compute_loss_func is not None


def step_loss_scale(trainer, num_items_in_batch) -> int:
    """The factor `Trainer.compute_loss` multiplies a loss normalised by `num_items_in_batch` with: the processes
    whose gradients DDP averages, when the count covers every device (`average_tokens_across_devices`; TP ranks
    counted once, `Trainer.get_tp_size`); else 1."""
    args = trainer.args
    counts_devices = trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
    if not (args.average_tokens_across_devices and counts_devices and num_items_in_batch is not None):
        return 1
    return trainer.accelerator.num_processes // trainer.get_tp_size() if args.n_gpu <= 1 else args.n_gpu


def train_batch_size(trainer) -> int:
    """Per-device batch size of the trainer's loader (`Trainer._train_batch_size`; it follows `auto_find_batch_size`)."""
    return trainer._train_batch_size


def current_accumulation_steps(trainer) -> int:
    """Micro-batches in the current optimizer step (`Trainer.current_gradient_accumulation_steps`, set by the training
    loop per step: shorter for the last step of an epoch). Before the loop ran, the configured value."""
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    return trainer.args.gradient_accumulation_steps if steps is None else steps


def sft_collator(pad_token_id: int):
    """TRL's SFT collator (`trl.trainer.sft_trainer.DataCollatorForLanguageModeling`, not exported by `trl`): pads
    `input_ids` and `labels` (with -100) and builds the attention mask, for SFT batches on a non-SFT trainer."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id)


def sync_gradients(accelerator) -> bool:
    """Whether the accelerator reduces gradients on the next backward (`GradientState.sync_gradients`)."""
    return bool(accelerator.gradient_state.sync_gradients)


def set_sync_gradients(accelerator, value: bool) -> None:
    """Set `GradientState.sync_gradients` (`GradientState._set_sync_gradients`), as `Trainer._run_epoch` does per
    micro-batch: an optimizer step run from a callback (Lisa's alignment steps) sets it for its own micro-batches
    and restores the host's value."""
    accelerator.gradient_state._set_sync_gradients(value)


def checkpoint_folder(trainer, trial=None) -> str:
    """The folder `Trainer._save_checkpoint` writes for the current step (`Trainer._get_output_dir` + the checkpoint
    prefix)."""
    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


# ------------------------------------------------------------------------------------------------ metrics
def metrics_buffer(trainer, mode: str):
    """`SFTTrainer._metrics[mode]`: `{name: [values]}` averaged and flushed by `SFTTrainer.log` each logging interval
    (`mode` is `"train"` or `"eval"`; eval values are logged with TRL's `eval_` prefix)."""
    return trainer._metrics[mode]


def has_metrics_buffer(trainer) -> bool:
    """Whether `trainer` keeps TRL's per-interval metric buffers (`_metrics = {"train": ..., "eval": ...}`, set by
    every TRL trainer: SFT, DPO, GRPO, KTO, …, and flushed by their `log`); a plain `transformers.Trainer` has none."""
    buffers = getattr(trainer, "_metrics", None)
    return isinstance(buffers, dict) and "train" in buffers


def count_train_tokens(trainer, num_tokens: int) -> int:
    """Add `num_tokens` to `SFTTrainer._total_train_tokens` (the `num_tokens` metric) and return the new total."""
    trainer._total_train_tokens += int(num_tokens)
    return trainer._total_train_tokens


def total_train_tokens(trainer) -> int:
    """`SFTTrainer._total_train_tokens`: tokens trained on so far, as the `num_tokens` metric reports them."""
    return trainer._total_train_tokens


# ------------------------------------------------------------------------------------------------ fused LM head
def uses_fused_lm_head(model: nn.Module) -> bool:
    """Whether `SFTTrainer` patched this model's forward with TRL's fused LM head (`trl.trainer.utils.
    add_fused_lm_head` installs an instance-level bound `forward`; the model may be wrapped by DDP/PEFT/compile)."""
    from .core.layers import unwrap_model

    return _has_instance_forward(unwrap_model(model))


def fused_forward(model: nn.Module, **inputs) -> FusedCausalLMOutput:
    """Run a fused-LM-head forward (`model(..., fused_lm_head=True)`): per-token label log-probs, entropy and top-1
    flags without the `(B, T, V)` logits. The model must have been patched (see `uses_fused_lm_head`)."""
    inputs.setdefault("use_cache", False)
    return model(**inputs, fused_lm_head=True)


def add_fused_lm_head(model: nn.Module) -> nn.Module:
    """Patch a plain (non-PEFT) causal LM with TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`), computing
    the fields `SFTTrainer` asks for (label log-probs, entropy, top-1 flags); returns the model."""
    from trl.trainer.utils import add_fused_lm_head as _add

    _add(model, outputs=("log_probs", "entropy", "is_top1"))
    return model


def strip_fused_lm_head(model: nn.Module) -> nn.Module:
    """Remove the instance-level `forward` of every submodule (the fused LM head patch), restoring the class forward.

    The patched forward closes over the original bound method, so a deep copy of a patched model would still run the
    original model's weights; stripping it makes models safe to copy and to hand to the next trainer.
    """
    for module in model.modules():
        if _has_instance_forward(module):
            del module.forward
    return model


def _has_instance_forward(module: nn.Module) -> bool:
    return isinstance(vars(module).get("forward"), types.MethodType)


# ------------------------------------------------------------------------------------------------ quantization
def quantization_method(model: nn.Module):
    """The quantization method of the quantizer `from_pretrained` attached (`model.hf_quantizer`), or `None`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    method = quantizer.quantization_config.quant_method
    return getattr(method, "value", method)


def remove_quantization(model: nn.Module) -> nn.Module:
    """Detach the quantizer from a model whose weights are plain tensors: what transformers itself does for a
    de-quantized checkpoint (`HfQuantizer.remove_quantization_config`), plus the per-config `_is_quantized` flag
    `_assign_is_quantized` set, which `save_pretrained` and `Trainer` read."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_is_quantized", False):
            config._is_quantized = False
        if getattr(module, "is_quantized", False):
            module.is_quantized = False
    return model


# ------------------------------------------------------------------------------------------------ model cards
def generate_model_card(**kwargs):
    """TRL's model card (`trl.trainer.utils.generate_model_card`, which every TRL trainer's `create_model_card`
    renders): title, quick start, training procedure with tracker badges and framework versions, the method's and
    TRL's citations. Keyword arguments as that function's (`base_model`, `model_name`, `hub_model_id`, …)."""
    from trl.trainer.utils import generate_model_card as _generate

    return _generate(**kwargs)


def tracker_urls() -> dict[str, str | None]:
    """The experiment-tracker links `create_model_card` of TRL's trainers puts on the card, as
    `generate_model_card` keywords: the live W&B run, the Trackio Space and the Comet experiment
    (`trl.trainer.utils.get_trackio_space_url` / `get_comet_experiment_url`)."""
    from transformers import is_wandb_available
    from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

    wandb_url = None
    if is_wandb_available():
        import wandb

        wandb_url = wandb.run.url if wandb.run is not None else None
    return {"wandb_url": wandb_url, "trackio_url": get_trackio_space_url(), "comet_url": get_comet_experiment_url()}
