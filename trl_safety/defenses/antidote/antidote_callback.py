from __future__ import annotations

import logging

from transformers import TrainerCallback

from ...core.distributed import refuse_sharded_weights
from .antidote_config import AntidoteConfig
from .antidote_prune import _load_harmful_dataset, antidote_prune


logger = logging.getLogger(__name__)


class AntidoteCallback(TrainerCallback):
    """Run [`antidote_prune`] on the trained model at the end of training, so the saved model is the pruned one.

    Works on any transformers/TRL trainer (SFT, DPO, GRPO, ...): `on_train_end` fires before the user's
    `trainer.save_model()`. Every rank runs the same calibration pass on the full harmful set, so no communication is
    needed; under DeepSpeed ZeRO-3 parameters are gathered for the edit and rank 0's result is broadcast.

    Args:
        harmful_dataset: the re-alignment set (harmful prompt → harmful answer) in a TRL format, or pre-tokenized
            (`input_ids`). Loaded from `config.harmful_dataset_name` when omitted (only the `wanda` variant needs it).
        config: an [`AntidoteConfig`].
        processing_class: tokenizer for a non-tokenized dataset; defaults to the trainer's processing class.
        data_collator: optional collator for calibration batches (fed `{"input_ids": ...}` examples).

    Example:
    ```python
    from trl import SFTTrainer
    from trl_safety import AntidoteCallback, AntidoteConfig

    trainer = SFTTrainer(model, args=args, train_dataset=data, peft_config=lora,
                         callbacks=[AntidoteCallback(harmful, AntidoteConfig(prune_ratio=0.1))])
    trainer.train()
    trainer.save_model()  # the pruned adapter
    ```
    """

    def __init__(
        self, harmful_dataset=None, config: AntidoteConfig | None = None, processing_class=None, data_collator=None
    ):
        self.config = config or AntidoteConfig()
        # Load the data now, so a missing dataset fails before training rather than after it
        if self.config.variant == "wanda" and self.config.prune_ratio > 0:
            harmful_dataset = _load_harmful_dataset(harmful_dataset, self.config)
        self.harmful_dataset = harmful_dataset
        self.processing_class = processing_class
        self.data_collator = data_collator

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_weights(model, "AntidoteCallback")

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            raise ValueError("AntidoteCallback needs the model in the callback arguments (transformers passes it).")
        antidote_prune(
            model,
            self.harmful_dataset,
            self.config,
            processing_class=self.processing_class or processing_class,
            data_collator=self.data_collator,
            output_dir=args.output_dir if state.is_world_process_zero else None,
        )
