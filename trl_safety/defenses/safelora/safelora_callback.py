from __future__ import annotations

from transformers import TrainerCallback

from ...core.distributed import refuse_sharded_weights
from .safelora_config import SafeLoRAConfig
from .safelora_project import safelora_project


class SafeLoRACallback(TrainerCallback):
    """Apply [`safelora_project`] to the trained LoRA adapter at the end of training, so the saved adapter is the
    projected one.

    Works on any transformers/TRL trainer that trains a PEFT LoRA adapter: `on_train_end` fires before the user's
    `trainer.save_model()`. Base and aligned models given as paths are loaded (on CPU) only at the end of training.

    Args:
        config: a [`SafeLoRAConfig`].
        base_model: the unaligned base model, as a model or a path / Hub id.
        aligned_model: the aligned model, as a model or a path; an alignment-adapter folder is merged onto
            `base_model`.

    Example:
    ```python
    from trl import SFTTrainer
    from trl_safety import SafeLoRACallback, SafeLoRAConfig

    callback = SafeLoRACallback(SafeLoRAConfig(num_proj_layers=10), base_model="base", aligned_model="alignment-adapter")
    trainer = SFTTrainer("aligned-merged", args=args, train_dataset=data, peft_config=lora, callbacks=[callback])
    trainer.train()
    trainer.save_model()  # the projected adapter
    ```
    """

    def __init__(self, config: SafeLoRAConfig | None = None, base_model=None, aligned_model=None):
        if base_model is None or aligned_model is None:
            raise ValueError("SafeLoRACallback needs both `base_model` and `aligned_model` (models or paths).")
        self.config = config or SafeLoRAConfig()
        self.base_model = base_model
        self.aligned_model = aligned_model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_weights(model, "SafeLoRACallback")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SafeLoRACallback needs the model in the callback arguments (transformers passes it).")
        safelora_project(
            model,
            self.config,
            base_model=self.base_model,
            aligned_model=self.aligned_model,
            output_dir=args.output_dir if state.is_world_process_zero else None,
        )
