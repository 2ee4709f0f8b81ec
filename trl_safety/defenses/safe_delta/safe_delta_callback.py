from __future__ import annotations

import copy

from transformers import TrainerCallback

from ...compat import strip_fused_lm_head
from ...core.distributed import refuse_sharded_weights
from ...core.hooks import input_device
from ...core.layers import is_peft_model, unwrap_model
from .safe_delta_config import SafeDeltaConfig
from .safe_delta_select import _load_safety_dataset, _refuse_zero3, safe_delta


class SafeDeltaCallback(TrainerCallback):
    """Apply [`safe_delta`] to the model at the end of a *full* fine-tuning run, so the saved model is the repaired one.

    Works on any transformers/TRL trainer: `on_train_end` fires before the user's `trainer.save_model()`. The aligned
    weights are the model the run starts from (a CPU copy taken at `on_train_begin`) unless `aligned_model` is given.
    Every rank computes the same edit from the same data, so DDP needs no communication. A LoRA run is refused: the
    result is a dense model, which the trainer's adapter save cannot hold (save the adapter and run
    `trl-safety prune --defense safe-delta` on it).

    Example:
    ```python
    from trl import SFTTrainer
    from trl_safety import SafeDeltaCallback, SafeDeltaConfig

    callback = SafeDeltaCallback(safety_data, SafeDeltaConfig(scale=0.11))
    trainer = SFTTrainer("aligned", args=args, train_dataset=user_data, callbacks=[callback])
    trainer.train()
    trainer.save_model()  # the Safe Delta model
    ```
    """

    def __init__(
        self,
        safety_dataset=None,
        config: SafeDeltaConfig | None = None,
        aligned_model=None,
        processing_class=None,
        data_collator=None,
    ):
        self.config = config or SafeDeltaConfig()
        if not self.config.is_neutral:  # a missing dataset fails before training rather than after it
            safety_dataset = _load_safety_dataset(safety_dataset, self.config)
        self.safety_dataset = safety_dataset
        self.aligned_model = aligned_model
        self.processing_class = processing_class
        self.data_collator = data_collator
        self._start = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_weights(model, "SafeDeltaCallback")
        if model is None:
            raise ValueError("SafeDeltaCallback needs the model in the callback arguments (transformers passes it).")
        _refuse_zero3(model, "SafeDeltaCallback")
        if is_peft_model(model):
            raise ValueError(
                "SafeDeltaCallback: Safe Delta's result after LoRA fine-tuning is a dense model, which the trainer's "
                "adapter save cannot hold. Save the adapter and run `trl-safety prune --defense safe-delta` on it (or "
                "call `safe_delta(trainer.model, ...)` and `save_pretrained` the dense model it returns)."
            )
        if self.aligned_model is None and self._start is None and not self.config.is_neutral:
            # W_a: the weights the run starts from; the copy must not keep the trainer's forward patch, which would
            # run the original (trained) model
            self._start = strip_fused_lm_head(copy.deepcopy(unwrap_model(model))).to("cpu")

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            raise ValueError("SafeDeltaCallback needs the model in the callback arguments (transformers passes it).")
        aligned = self.aligned_model
        if aligned is None and self._start is not None:
            aligned = self._start.to(input_device(model))
        safe_delta(
            unwrap_model(model),
            self.safety_dataset,
            self.config,
            aligned_model=aligned,
            processing_class=self.processing_class or processing_class,
            data_collator=self.data_collator,
            output_dir=args.output_dir if state.is_world_process_zero else None,
        )
        self._start = None
