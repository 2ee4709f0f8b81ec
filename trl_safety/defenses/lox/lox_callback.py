from __future__ import annotations

from transformers import TrainerCallback

from ...core.distributed import refuse_sharded_weights
from .lox_config import LoXConfig
from .lox_extrapolate import lox_extrapolate


class LoXCallback(TrainerCallback):
    """Apply [`lox_extrapolate`] to the model at the end of an *alignment* run, so the saved model (or alignment
    adapter) is the extrapolated one that users then fine-tune.

    Works on any transformers/TRL trainer: `on_train_end` fires before the user's `trainer.save_model()`. With a LoRA
    alignment adapter the adapter's own update is extrapolated; after full fine-tuning pass the model the run started
    from as `base_model` (a model or a path, loaded on CPU only at the end of training).

    Example:
    ```python
    from trl import SFTTrainer
    from trl_safety import LoXCallback, LoXConfig

    callback = LoXCallback(LoXConfig(rank=6, alpha=0.5))
    trainer = SFTTrainer("base", args=args, train_dataset=safety_data, peft_config=lora, callbacks=[callback])
    trainer.train()
    trainer.save_model()  # the extrapolated alignment adapter
    ```
    """

    def __init__(self, config: LoXConfig | None = None, base_model=None):
        self.config = config or LoXConfig()
        self.base_model = base_model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_weights(model, "LoXCallback")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("LoXCallback needs the model in the callback arguments (transformers passes it).")
        lox_extrapolate(
            model,
            self.config,
            base_model=self.base_model,
            output_dir=args.output_dir if state.is_world_process_zero else None,
        )
