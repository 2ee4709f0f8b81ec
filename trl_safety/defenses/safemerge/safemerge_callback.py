from __future__ import annotations

from transformers import TrainerCallback

from ...core.distributed import is_zero3_param, refuse_sharded_weights
from .safemerge_config import SafeMERGEConfig
from .safemerge_merge import safemerge


ZERO3_REASON = (
    "the merged factors of a module can have another rank than the adapter's, and ZeRO-3's partitioned LoRA "
    "factors cannot change shape."
)


class SafeMERGECallback(TrainerCallback):
    """Apply [`safemerge`] to the fine-tuned LoRA adapter at the end of training, so the saved adapter is the merged
    one.

    Works on any transformers/TRL trainer: `on_train_end` fires before the user's `trainer.save_model()`. The base and
    aligned models (objects or paths) define the alignment subspace; they are loaded on CPU only at the end of
    training. The safety adapter is `config.safety_adapter` (a folder, or an adapter loaded on the model).

    Example:
    ```python
    from trl import SFTTrainer
    from trl_safety import SafeMERGECallback, SafeMERGEConfig

    callback = SafeMERGECallback(
        SafeMERGEConfig(safety_adapter="safety-lora/"), base_model="base", aligned_model="aligned"
    )
    trainer = SFTTrainer("aligned", args=args, train_dataset=user_data, peft_config=lora, callbacks=[callback])
    trainer.train()
    trainer.save_model()  # the merged adapter
    ```
    """

    def __init__(self, config: SafeMERGEConfig | None = None, base_model=None, aligned_model=None):
        self.config = config or SafeMERGEConfig()
        self.base_model = base_model
        self.aligned_model = aligned_model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_weights(model, "SafeMERGECallback")
        if model is not None and any(is_zero3_param(p) for p in model.parameters()):
            raise NotImplementedError(
                f"SafeMERGECallback does not support DeepSpeed ZeRO-3: {ZERO3_REASON} Supported: single process, "
                "DDP, ZeRO-1/2; or train under ZeRO-3 and apply `trl-safety prune --defense safemerge` to the saved "
                "adapter."
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SafeMERGECallback needs the model in the callback arguments (transformers passes it).")
        safemerge(
            model,
            self.config,
            base_model=self.base_model,
            aligned_model=self.aligned_model,
            output_dir=args.output_dir if state.is_world_process_zero else None,
        )
