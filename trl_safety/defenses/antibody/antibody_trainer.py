from __future__ import annotations

import logging

import torch
from datasets import Dataset
from trl import SFTTrainer

from ... import compat
from ...core.losses import is_packed_batch, lm_forward, per_sample_token_mean_nll
from ...core.trainer import DefenseTrainerMixin
from ...core.views import ROW_COLUMN, add_row_ids, pop_view
from .weighting import (
    REFUSAL_PREFIX,
    attach_refusal_view,
    likelihood_ratio_weights,
    load_refusal_pool,
    rescale_to_token_count,
    sample_weights,
    weight_statistics,
)


logger = logging.getLogger(__name__)

__all__ = ["REFUSAL_PREFIX", "AntibodyTrainer", "likelihood_ratio_weights", "messages_to_prompt_completion"]


def messages_to_prompt_completion(dataset):
    """`messages` data as conversational prompt/completion: `prompt` the turns before the last assistant turn,
    `completion` that turn (docs/antibody.md, "Expected dataset type"); other columns are kept, other formats are
    returned unchanged.

    A row without an assistant turn, or with turns after its last one (which the completion would silently drop), is
    refused with its index.
    """
    columns = dataset.column_names if isinstance(dataset, Dataset) else ()
    if "messages" not in columns or {"prompt", "completion"} & set(columns):
        return dataset

    def split(example, index):
        messages = example["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise ValueError(
                f"train_dataset row {index}: a `messages` conversation needs an assistant turn after at least one "
                "other turn, to be split into prompt (the turns before the last assistant turn) and completion."
            )
        if last != len(messages) - 1:
            raise ValueError(
                f"train_dataset row {index}: the conversation continues after its last assistant turn "
                f"({len(messages) - 1 - last} turn(s)), which the completion (that assistant turn) would drop."
            )
        return {"prompt": messages[:last], "completion": [messages[last]]}

    return dataset.map(split, with_indices=True, remove_columns=["messages"], desc="messages to prompt/completion")


class AntibodyTrainer(DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for Antibody's fine-tuning stage: per-sample likelihood-ratio weighting inside each micro-batch.

    Every user sample `(x, y)` is paired with a refusal view `(x, y_r)`: the same prompt answered by a generic
    refusal, assigned round-robin by the sample's row index from a shipped pool (or `refusals=` / `refusals_file`).
    Per micro-batch:

    1. `NLL̄(y_r|x)` per sample: one no-grad forward of the refusal view on the bare module;
    2. one grad forward of the samples; its detached per-sample token-mean NLL gives `NLL̄(y|x)` (the official code
       spends an extra no-grad forward on it);
    3. `w = softmax((NLL̄(y_r|x) − NLL̄(y|x)) / τ)` over the micro-batch, detached;
    4. `loss = Σᵢ wᵢ Σₜ CEᵢₜ / Σᵢ wᵢ Nᵢ` (a weighted token mean, plain SFT's token mean for uniform weights).

    With gradient accumulation the micro-batch's weighted mean is counted as SFT counts a micro-batch: by its share
    `N_mb / N_step` of the accumulated step's target tokens (`num_items_in_batch`, all ranks when
    `average_tokens_across_devices`). At GA 1 on one process this is the official (GA-free) loss; with uniform
    weights it is SFT's loss bit for bit at any GA and on any number of ranks.

    Takes every argument of [`~trl.SFTTrainer`] plus `refusals=` (a list of refusal strings overriding the pool). The
    training data is prompt/completion data (standard or conversational), the format in which a refusal view is
    defined, or `messages` data, converted first (`prompt`: the turns before the last assistant turn, `completion`:
    that turn, so the loss is on that turn only); an optional `is_harmful` column is used for logging only.

    Example:

    ```python
    from trl_safety import AntibodyConfig, AntibodyTrainer

    trainer = AntibodyTrainer(
        model="aligned-model",
        args=AntibodyConfig(output_dir="antibody", per_device_train_batch_size=16, temperature=1.0),
        train_dataset=user_dataset,  # prompt / completion
    )
    trainer.train()
    ```
    """

    extra_datasets = ()
    # FSDP2 measured by tests/distributed/test_fsdp2.py (2 CPU ranks, equal to one process; docs/distributed.md)
    fsdp_verified = True

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, *positional, refusals=None, **kwargs):
        if getattr(args, "packing", False) or getattr(args, "padding_free", False):
            raise ValueError(
                "AntibodyTrainer does not support `packing` or `padding_free`: the per-sample weights need one sample "
                "per row. Set `packing=False` and `padding_free=False`."
            )
        if kwargs.get("formatting_func") is not None:
            raise ValueError(
                "AntibodyTrainer does not support `formatting_func`: it builds each sample's refusal view from the "
                "`prompt` column, so pass prompt/completion data instead."
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "AntibodyTrainer does not support `compute_loss_func`: its loss is the likelihood-ratio weighted token "
                "mean, computed by the trainer itself."
            )
        if refusals is not None and (isinstance(refusals, str) or len(refusals) == 0):
            raise ValueError("`refusals` must be a non-empty list of refusal strings.")
        # The raw rows, kept until `setup_defense` derives their refusal view (the pool needs the final config)
        # `messages` rows are split first, so that the row ids and refusal views see prompt/completion rows
        self._raw_train = self._check_prompt_completion(
            add_row_ids(messages_to_prompt_completion(train_dataset), "train_dataset")
        )
        self._refusals = list(refusals) if refusals is not None else None
        super().__init__(model, args, data_collator, self._raw_train, *positional, **kwargs)

    @staticmethod
    def _check_prompt_completion(dataset):
        columns = set(dataset.column_names)
        if not {"prompt", "completion"} <= columns or "input_ids" in columns:
            raise ValueError(
                "AntibodyTrainer builds each sample's refusal view (same prompt, refusal answer) from its prompt, so "
                "it takes prompt/completion data (standard or conversational) or conversational `messages` data; "
                f"`text` and pre-tokenized `input_ids` data have no prompt to answer. Got columns {sorted(columns)}."
            )
        return dataset

    def _refusal_pool(self) -> list[str]:
        return load_refusal_pool(self._refusals, self.args.refusals_file)

    def setup_defense(self) -> None:
        flag = self.args.harmful_flag_column
        self.refusal_view = attach_refusal_view(self, self._raw_train, self._refusal_pool(), flag)
        del self._raw_train

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        compat.extend_signature_columns(self, [c for c in (ROW_COLUMN, self.args.harmful_flag_column) if c])

    # ---------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        flags = inputs.pop(self.args.harmful_flag_column, None)
        inputs.pop(ROW_COLUMN, None)
        refusal = pop_view(inputs, REFUSAL_PREFIX)
        if not refusal:  # evaluation data has no refusal view: plain SFT loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if is_packed_batch(inputs):
            raise ValueError("AntibodyTrainer cannot weight samples of a packed / padding-free batch.")

        with torch.no_grad():
            refusal_nll = per_sample_token_mean_nll(lm_forward(self.accelerator.unwrap_model(model), refusal))
        outputs = compat.fused_forward(model, **inputs)
        token_nll = -outputs.log_probs  # (B, T-1), zero where the label is -100
        counts = outputs.label_mask.sum(dim=-1)
        weights = sample_weights(refusal_nll, token_nll, counts, self.args.temperature)
        rescaled, weighted_count = rescale_to_token_count(weights, counts)
        if num_items_in_batch is not None and compat.loss_is_scaled_for_ga(self, num_items_in_batch):
            # Rescaled so that Σ wᵢNᵢ = N_mb (uniform weights stay exactly 1), then normalised like SFT's loss
            weights = rescaled
            loss = (token_nll * weights[:, None]).sum() / num_items_in_batch
            loss = loss * compat.step_loss_scale(self, num_items_in_batch)
        else:  # no step count (evaluation, a model without loss kwargs): the micro-batch mean, which Trainer divides
            loss = (token_nll * weights[:, None]).sum() / weighted_count

        self._log_weights(weights, flags)
        self._log_token_metrics(outputs, inputs)
        if return_outputs:
            return loss, outputs
        return loss

    def _log_weights(self, weights: torch.Tensor, flags: torch.Tensor | None) -> None:
        for name, value in weight_statistics(weights, flags).items():
            self.log_metric(name, value)

    def _log_token_metrics(self, outputs, inputs) -> None:
        """The metrics `SFTTrainer.compute_loss` logs (entropy, token accuracy, token count), which it cannot log here."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy = gather(outputs.entropy.detach().sum()).sum()
        correct = gather(outputs.is_top1.sum()).sum()
        metrics = compat.metrics_buffer(self, mode)
        metrics["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            compat.count_train_tokens(self, gather(inputs["attention_mask"].sum()).sum().item())
        metrics["num_tokens"] = [compat.total_train_tokens(self)]
