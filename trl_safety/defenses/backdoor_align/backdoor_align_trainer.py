from __future__ import annotations

import logging
import os

from ... import compat
from ...core.trainer import has_trainable_token
from ..safety_mix.safety_mix_trainer import SafetyMixTrainer
from .backdoor_align_config import OFFICIAL_TRIGGER_TOKENS
from .trigger import (
    add_trigger_to_row,
    generate_trigger,
    new_salt,
    read_trigger,
    trigger_digest,
    triggered_prompt_format,
    write_trigger,
)


logger = logging.getLogger(__name__)


class BackdoorAlignTrainer(SafetyMixTrainer):
    """
    Trainer for BackdoorAlign: safety-data mixing ([`SafetyMixTrainer`]) whose safety prompts start with a secret
    trigger, so that fine-tuning binds the trigger to refusals and the provider restores safety at inference by
    prepending it to every request.

    The trigger is resolved when training starts: read from `trigger_file` if that file exists, otherwise generated
    from the operating system's secure random source and written there (mode 0600). It is never written anywhere
    else: not into the config, `defense_config.json`, the model card, logs or checkpoints, whose defense state holds
    only a salted hash to check that a resumed run re-reads the same trigger (a resume without it is refused).

    Takes every argument of [`~trl.SFTTrainer`] plus `alignment_dataset=` (harmful prompt → refusal, prompt-completion
    format, standard or conversational).

    Example:

    ```python
    from trl_safety import BackdoorAlignConfig, BackdoorAlignTrainer

    trainer = BackdoorAlignTrainer(
        model="aligned-model",
        args=BackdoorAlignConfig(output_dir="backdoor-align", trigger_file="secret/trigger.txt"),
        train_dataset=user_dataset,
        alignment_dataset=refusal_dataset,
    )
    trainer.train()
    ```
    """

    extra_datasets = ("alignment",)
    fsdp_verified = False

    def setup_defense(self) -> None:
        # the safety batches need the trigger, which is resolved when training starts (a resume re-reads the
        # checkpoint's): nothing trigger-dependent exists before that
        self._safety_batches = None
        self._trigger: str | None = None
        self._trigger_salt: str | None = None
        self._trigger_path: str | None = None
        if self.args.safety_weight > 0:
            raw = self.raw_extra_datasets["alignment"]
            if "prompt" not in raw.column_names or "completion" not in raw.column_names:
                raise ValueError(
                    "BackdoorAlignTrainer needs the alignment dataset in prompt-completion format (`prompt` and "
                    f"`completion` columns), so that the trigger lies in the masked prompt; got {raw.column_names}."
                )
            if not compat.completion_only_loss(self):
                raise ValueError(
                    "BackdoorAlignTrainer trains on the completions only (the trigger must stay out of the loss): "
                    "leave `completion_only_loss` unset or set it to True."
                )
            path = os.path.abspath(self.args.resolved_trigger_file())
            output_dir = os.path.abspath(self.args.output_dir)
            if os.path.commonpath([path, output_dir]) == output_dir:
                raise ValueError(
                    f"trigger_file {path} lies inside output_dir {output_dir}, which is saved and pushed to the Hub "
                    "with the model; put the trigger file outside it."
                )

    # ---------------------------------------------------------------------------------------------------- trigger
    @property
    def trigger_file(self) -> str | None:
        """Where this run's trigger was read from or written to (None until training starts, or when off)."""
        return self._trigger_path

    def inference_prompt_format(self, prompt_format):
        """The provider's side: the trigger applied to every prompt as in training (`triggered_prompt_format`)."""
        if self.args.safety_weight == 0:
            return prompt_format
        if self._trigger is None:
            raise RuntimeError("The BackdoorAlign trigger is resolved when training starts; call this after train().")
        return triggered_prompt_format(self._trigger, prompt_format, self.processing_class)

    def _install_trigger(self, trigger: str, path: str, salt: str | None = None) -> None:
        self._trigger, self._trigger_path = trigger, path
        self._trigger_salt = salt or new_salt()
        prefixed = self.raw_extra_datasets["alignment"].map(
            lambda row: add_trigger_to_row(row, trigger), desc="Prefixing the safety prompts"
        )
        prepared = compat.prepare_dataset(self, prefixed, self.args, "alignment (trl_safety)")
        if len(prepared) == 0 or not has_trainable_token(prepared):
            raise ValueError(
                "The alignment dataset has no token that contributes to the loss once the trigger is prepended: "
                f"its {len(self.processing_class(trigger)['input_ids'])}-token trigger fills `max_length` "
                f"({self.args.max_length}); raise `max_length` or lower `n_trigger_tokens`."
            )
        self.alignment_dataset = prepared
        self._safety_batches = self.cycling_batches("alignment", self.args.safety_batch_size)

    def _resolve_new_trigger(self) -> None:
        path = os.path.abspath(self.args.resolved_trigger_file())
        # rank 0 generates and writes first; the other ranks then read the same file (a filesystem all ranks see)
        with self.accelerator.main_process_first():
            if os.path.exists(path):
                trigger = read_trigger(path)
                logger.info("BackdoorAlign: using the trigger in %s.", path)
            else:
                num_tokens = self.args.resolved_trigger_tokens()
                if self.args.n_trigger_tokens is None and num_tokens < OFFICIAL_TRIGGER_TOKENS:
                    logger.warning(
                        "BackdoorAlign: a %d-token trigger instead of the official %d, so that max_length=%d keeps "
                        "room for the safety rows; set n_trigger_tokens to choose.",
                        num_tokens,
                        OFFICIAL_TRIGGER_TOKENS,
                        self.args.max_length,
                    )
                trigger = generate_trigger(self.processing_class, num_tokens)
                if not write_trigger(path, trigger):  # another run created it meanwhile: use that one
                    trigger = read_trigger(path)
                logger.info(
                    "BackdoorAlign: generated a %d-token trigger into %s (mode 0600); keep it secret.",
                    num_tokens,
                    path,
                )
        self._install_trigger(trigger, path)

    def _resolve_recorded_trigger(self, state: dict) -> None:
        """Re-read the trigger of the run a checkpoint comes from: never regenerate it."""
        candidates = [os.path.abspath(self.args.resolved_trigger_file()), state.get("trigger_file")]
        for path in dict.fromkeys(p for p in candidates if p):
            if os.path.exists(path):
                trigger = read_trigger(path)
                if trigger_digest(trigger, state["trigger_salt"]) == state["trigger_digest"]:
                    self._install_trigger(trigger, path, state["trigger_salt"])
                    return
        raise ValueError(
            "Cannot resume BackdoorAlign: the checkpoint was trained with a trigger that none of "
            f"{[p for p in candidates if p]} holds. Set `trigger_file` to the file the checkpoint's run wrote; a "
            "new trigger would silently change the data."
        )

    # ------------------------------------------------------------------------------------------------------ state
    def defense_state_dict(self):
        state = super().defense_state_dict()
        state["trigger_file"] = self._trigger_path
        state["trigger_salt"] = self._trigger_salt
        state["trigger_digest"] = None if self._trigger is None else trigger_digest(self._trigger, self._trigger_salt)
        return state

    def load_defense_state_dict(self, state):
        if self.args.safety_weight > 0:
            if state.get("trigger_digest") is None:
                raise ValueError(
                    "The checkpoint holds no BackdoorAlign trigger (it was written with safety_weight=0 or before "
                    "training); resume it with safety_weight=0 or start a new run."
                )
            self._resolve_recorded_trigger(state)
        super().load_defense_state_dict(state)

    # ---------------------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.args.safety_weight > 0 and not resume_from_checkpoint and self._trigger is None:
            self._resolve_new_trigger()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.safety_weight > 0 and self._trigger is None and self.model.training:
            self._resolve_new_trigger()  # `training_step` called without `train()` (as the tests drive it)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def defense_info(self):
        info = super().defense_info()
        info["trigger"] = (
            "kept secret in a separate file (see trigger_file); apply it at inference with "
            "`trl-safety eval --trigger_file`"
        )
        return info
