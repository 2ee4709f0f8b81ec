from __future__ import annotations

import logging
import math
import textwrap

import torch
from datasets import Dataset
from trl import SFTTrainer

from ...core.losses import is_packed_batch, lm_forward, per_sample_token_mean_nll
from ...core.trainer import DefenseTrainerMixin
from ...data.refusals import ROW_COLUMN, refusal_pool, refusal_view
from .antibody_config import AntibodyConfig


logger = logging.getLogger(__name__)

REFUSAL_PREFIX = "refusal_"
REFUSAL_COLUMNS = (f"{REFUSAL_PREFIX}input_ids", f"{REFUSAL_PREFIX}labels")

_CITATION = textwrap.dedent(
    """\
    @inproceedings{nguyen2026antibody,
        title        = {{Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via Attenuating Harmful Gradient Influence}},
        author       = {Quoc Minh Nguyen and Trung Le and Jing Wu and Anh Tuan Bui and Mehrtash Harandi},
        year         = 2026,
        booktitle    = {The Fourteenth International Conference on Learning Representations},
        url          = {https://openreview.net/forum?id=qur2ef8MqQ},
    }"""
)


def likelihood_ratio_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """`softmax(scores / τ)` up to its normalisation, i.e. `exp((scores − max) / τ)` (largest weight 1).

    Antibody's loss is a ratio in the weights, so the normalisation cancels; leaving it out makes uniform weights
    (τ = ∞, or τ so large that every weight rounds to 1) exactly 1.0 and the loss bit-identical to SFT's token mean.
    """
    if math.isinf(temperature):
        return torch.ones_like(scores)
    return torch.exp((scores - scores.max()) / temperature)


class RefusalViewCollator:
    """Wraps a collator: pads each sample and, separately, its refusal view (keys prefixed with `refusal_`).

    TRL's collator drops keys it does not know, so the refusal columns are collated by a second call of the same
    collator; an optional harmful-flag column becomes a boolean tensor. Examples without a refusal view (evaluation
    data) pass through unchanged.
    """

    def __init__(self, collator, flag_column: str | None = None):
        self.collator = collator
        self.flag_column = flag_column

    def __call__(self, examples):
        extra = {*REFUSAL_COLUMNS, self.flag_column}
        main = [{k: v for k, v in example.items() if k not in extra} for example in examples]
        batch = self.collator(main)
        if REFUSAL_COLUMNS[0] in examples[0]:
            refusals = self.collator(
                [{"input_ids": ex[REFUSAL_COLUMNS[0]], "labels": ex[REFUSAL_COLUMNS[1]]} for ex in examples]
            )
            batch.update({f"{REFUSAL_PREFIX}{key}": value for key, value in refusals.items()})
        if self.flag_column is not None and self.flag_column in examples[0]:
            batch[self.flag_column] = torch.tensor([bool(ex[self.flag_column]) for ex in examples])
        return batch


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

    The loss is a per-micro-batch mean, so `Trainer` divides it by the gradient-accumulation steps
    (`loss_is_scaled_for_ga = False`, as in the official code's GA-free setting and TRL's DPO/KTO trainers).

    Takes every argument of [`~trl.SFTTrainer`] plus `refusals=` (a list of refusal strings overriding the pool). The
    training data must be prompt/completion data (standard or conversational), the only format in which a refusal
    view is defined; an optional `is_harmful` column is used for logging only.

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

    defense_name = "antibody"
    stage = "fine-tuning"
    config_class = AntibodyConfig
    extra_datasets = ()
    unsupported_backends = {
        "fsdp": "the no-grad refusal-view pass on the bare module is untested under FSDP (see docs/antibody.md).",
    }
    loss_is_scaled_for_ga = False
    _name = "Antibody"
    _paper = {
        "title": "Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via "
        "Attenuating Harmful Gradient Influence",
        "id": "2603.00498",
        "citation": _CITATION,
    }
    _tag_names = ["trl", "sft", "trl-safety", "antibody"]

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
        if refusals is not None and (isinstance(refusals, str) or len(refusals) == 0):
            raise ValueError("`refusals` must be a non-empty list of refusal strings.")
        self._raw_train = self._with_row_ids(train_dataset)
        self._refusals = list(refusals) if refusals is not None else None
        super().__init__(model, args, data_collator, self._raw_train, *positional, **kwargs)

    @staticmethod
    def _with_row_ids(dataset) -> Dataset:
        if not isinstance(dataset, Dataset):
            raise TypeError(
                "AntibodyTrainer needs a map-style `datasets.Dataset` as `train_dataset` (got "
                f"{type(dataset).__name__}): each row is joined with its refusal view by row index."
            )
        columns = set(dataset.column_names)
        if not {"prompt", "completion"} <= columns or "input_ids" in columns:
            raise ValueError(
                f"AntibodyTrainer needs prompt/completion training data (standard or conversational) to build each "
                f"sample's refusal view (same prompt, refusal answer); got columns {sorted(columns)}. Convert "
                "`messages` data to `prompt` (the turns before the last assistant turn) and `completion` (that turn)."
            )
        if ROW_COLUMN in columns:
            raise ValueError(f"The training data already has a {ROW_COLUMN!r} column, which AntibodyTrainer reserves.")
        return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))

    def _refusal_pool(self) -> list[str]:
        if self._refusals is not None:
            return self._refusals
        if self.args.refusals_file is not None:
            with open(self.args.refusals_file, encoding="utf-8") as f:
                pool = [line.strip() for line in f if line.strip()]
            if not pool:
                raise ValueError(f"`refusals_file` {self.args.refusals_file!r} holds no refusal.")
            return pool
        return refusal_pool()

    def setup_defense(self) -> None:
        # Tokenize the refusal view exactly like the training data, then join it on the row id: preparation may drop
        # rows (fully masked after truncation), so positions do not line up
        view = self._prepare_dataset(
            refusal_view(self._raw_train, self._refusal_pool()),
            self.processing_class,
            self.args,
            False,
            None,
            "refusal view (trl_safety)",
        )
        by_row = dict(zip(view[ROW_COLUMN], zip(view["input_ids"], view["labels"])))
        missing = [row for row in self.train_dataset[ROW_COLUMN] if row not in by_row]
        if missing:
            raise ValueError(
                f"{len(missing)} training sample(s) (rows {missing[:5]}) have no refusal view left after truncation to "
                f"max_length={self.args.max_length}; increase `max_length` or shorten their prompts."
            )

        def attach(row):
            input_ids, labels = by_row[row]
            return {REFUSAL_COLUMNS[0]: input_ids, REFUSAL_COLUMNS[1]: labels}

        self.train_dataset = self.train_dataset.map(attach, input_columns=ROW_COLUMN, desc="Joining refusal views")
        self.data_collator = RefusalViewCollator(self.data_collator, self.args.harmful_flag_column)
        del self._raw_train

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [*REFUSAL_COLUMNS, self.args.harmful_flag_column]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    # ---------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        flags = inputs.pop(self.args.harmful_flag_column, None)
        refusal = {
            key[len(REFUSAL_PREFIX) :]: inputs.pop(key) for key in list(inputs) if key.startswith(REFUSAL_PREFIX)
        }
        if not refusal:  # evaluation data has no refusal view: plain SFT loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if is_packed_batch(inputs):
            raise ValueError("AntibodyTrainer cannot weight samples of a packed / padding-free batch.")

        with torch.no_grad():
            refusal_nll = per_sample_token_mean_nll(lm_forward(self.accelerator.unwrap_model(model), refusal))
        outputs = model(**inputs, fused_lm_head=True, use_cache=False)
        token_nll = -outputs.log_probs  # (B, T-1), zero where the label is -100
        counts = outputs.label_mask.sum(dim=-1)
        sample_nll = token_nll.detach().sum(dim=-1) / counts.clamp(min=1)
        weights = likelihood_ratio_weights(refusal_nll - sample_nll, self.args.temperature).to(token_nll.dtype)
        denominator = (weights * counts).sum().clamp(min=torch.finfo(token_nll.dtype).tiny)
        loss = (token_nll * weights[:, None]).sum() / denominator

        self._log_weights(weights, flags)
        self._log_token_metrics(outputs, inputs)
        if return_outputs:
            return loss, outputs
        return loss

    def _log_weights(self, weights: torch.Tensor, flags: torch.Tensor | None) -> None:
        probabilities = weights / weights.sum()
        entropy = -(probabilities * probabilities.clamp(min=1e-30).log()).sum()
        self.log_metric("weight_entropy", entropy)
        if flags is not None:
            self.log_metric("harmful_weight_share", probabilities[flags.to(probabilities.device)].sum())

    def _log_token_metrics(self, outputs, inputs) -> None:
        """The metrics `SFTTrainer.compute_loss` logs (entropy, token accuracy, token count), which it cannot log here."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy = gather(outputs.entropy.detach().sum()).sum()
        correct = gather(outputs.is_top1.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
