from __future__ import annotations

import logging

from trl import SFTTrainer

from ... import compat
from ...core.losses import lm_loss
from ...core.trainer import DefenseTrainerMixin


logger = logging.getLogger(__name__)


class SafetyMixTrainer(DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for the safety-data mixing baseline (Vlguard / SafeInstr): `loss = CE(user batch) + λ·CE(safety batch)`.

    Every micro-batch draws `safety_batch_size` alignment samples from an endless loader over the alignment dataset
    (prepared by the accelerator, sharded across ranks, resumable) and adds their token-mean cross-entropy, weighted
    by λ and divided by the gradient-accumulation steps, to SFT's loss, inside the one backward of the micro-batch. The
    safety forward runs on the bare module so that DDP sees a single forward of the wrapped model. The logged `loss`
    is the sum, as in the official code; `safety-mix/safety_loss` is logged separately.

    Takes every argument of [`~trl.SFTTrainer`] plus `alignment_dataset=` (harmful prompt → refusal or safe answer,
    any TRL format).

    Example:

    ```python
    from trl_safety import SafetyMixConfig, SafetyMixTrainer

    trainer = SafetyMixTrainer(
        model="aligned-model",
        args=SafetyMixConfig(output_dir="safety-mix", safety_weight=1.0),
        train_dataset=user_dataset,
        alignment_dataset=refusal_dataset,
    )
    trainer.train()
    ```
    """

    extra_datasets = ("alignment",)
    # FSDP2 measured by tests/distributed/test_fsdp2.py (2 CPU ranks, equal to one process; docs/distributed.md)
    fsdp_verified = True

    def setup_defense(self) -> None:
        self._safety_batches = (
            self.cycling_batches("alignment", self.args.safety_batch_size) if self.args.safety_weight > 0 else None
        )

    def defense_state_dict(self):
        return {"safety_batches": None if self._safety_batches is None else self._safety_batches.state_dict()}

    def load_defense_state_dict(self, state):
        if self._safety_batches is not None and state.get("safety_batches") is not None:
            self._safety_batches.load_state_dict(state["safety_batches"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self._safety_batches is None or not self.model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        safety_batch = compat.prepare_inputs(self, next(self._safety_batches))
        safety_loss = lm_loss(self.accelerator.unwrap_model(model), safety_batch)
        # SFT's loss is already scaled for gradient accumulation (normalised by the step's token count); this term is
        # a per-micro-batch mean, so it takes its 1/GA share here
        loss = loss + self.args.safety_weight * safety_loss / compat.current_accumulation_steps(self)
        self.log_metric("safety_loss", safety_loss)
        return (loss, outputs) if return_outputs else loss
