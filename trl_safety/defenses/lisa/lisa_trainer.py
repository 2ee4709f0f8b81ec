from __future__ import annotations

import logging

from trl import SFTTrainer

from ... import compat
from ...core.proximal import ProximalTerm, proximal_active
from ...core.snapshot import ParameterSnapshot, trainable_parameters
from ...core.trainer import DefenseTrainerMixin


logger = logging.getLogger(__name__)

ALIGNMENT, FINETUNE = "alignment", "finetune"


def enter_phase(anchors: dict[str, ParameterSnapshot], last_phase: str | None, phase: str) -> ParameterSnapshot:
    """The anchor of a step in `phase` after a step in `last_phase`, snapshotting the weights at a switch.

    `anchors["alignment"]` is the snapshot taken when an alignment state ends (the anchor of fine-tuning steps),
    `anchors["finetune"]` the one taken when a fine-tuning state ends (the anchor of alignment steps). Shared by
    [`LisaTrainer`] and `LisaCallback`.
    """
    previous = ALIGNMENT if phase == FINETUNE else FINETUNE
    if last_phase is not None and last_phase != phase:
        anchors[previous].update()
    return anchors[previous]


class LisaTrainer(DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for Lisa (fine-tuning stage): Bi-State Optimization with a proximal term.

    The optimizer steps alternate between `alignment_steps` (K1) steps on alignment batches and `finetune_steps` (K2)
    steps on the user's batches; step `s` is an alignment step when `s % (K1 + K2) < K1`, which is exactly the
    sequence of the official state machine. At each switch the weights are snapshotted: alignment steps are pulled
    towards the snapshot taken when the last fine-tuning state ended, fine-tuning steps towards the one taken when
    the last alignment state ended (both start as the initial weights). The pull is ρ(w − anchor) added to the
    gradient of every trainable parameter by hooks (`core.proximal`), so it also works under ZeRO-3; it is off during
    the first `proximal_warmup_ratio` of the steps.

    Alignment batches come from an endless loader over the alignment dataset prepared by the accelerator (sharded
    across ranks). In an alignment step the user's micro-batches are drawn and discarded, as the official code
    discards the user batch of an alignment step: the user data advances one step per optimizer step, which keeps
    Trainer's resume-time data skipping exact.

    Takes every argument of [`~trl.SFTTrainer`] plus `alignment_dataset=` (harmful prompt → refusal or safe answer,
    any TRL format).

    Example:

    ```python
    from trl_safety import LisaConfig, LisaTrainer

    trainer = LisaTrainer(
        model="aligned-model",
        args=LisaConfig(output_dir="lisa", max_steps=2000, alignment_steps=100, finetune_steps=900),
        train_dataset=user_dataset,
        alignment_dataset=refusal_dataset,
    )
    trainer.train()
    ```
    """

    extra_datasets = ("alignment",)
    unsupported_backends = {
        "fsdp": "under FSDP2 the proximal hooks on sharded parameters gave another update than one process "
        "(measured, docs/distributed.md).",
    }

    # -------------------------------------------------------------------------------------------- state machine
    def setup_defense(self) -> None:
        args = self.args
        self._alignment_batches = self.cycling_batches("alignment") if args.alignment_steps > 0 else None
        self._proximal: ProximalTerm | None = None  # hooks and anchors, created when training starts
        self._anchors: dict[str, ParameterSnapshot] = {}
        self._phase: str | None = None  # state of the last optimizer step
        self._micro_batches_left = 0

    def phase_of(self, step: int) -> str:
        """State of optimizer step `step` (0-based)."""
        k1, k2 = self.args.alignment_steps, self.args.finetune_steps
        return ALIGNMENT if step % (k1 + k2) < k1 else FINETUNE

    def _start(self) -> None:
        """Snapshot the anchors and register the proximal hooks (the model is prepared by now)."""
        params = trainable_parameters(self.model)
        if not params:
            raise ValueError("LisaTrainer found no trainable parameter for the proximal term.")
        self._warn_if_user_data_unreached()
        # Both anchors start as the initial weights (official `init`); a resumed run overwrites them below
        self._anchors = {ALIGNMENT: ParameterSnapshot(params), FINETUNE: ParameterSnapshot(params)}
        self._proximal = ProximalTerm(
            params,
            self.args.rho,
            anchor=self._anchors[FINETUNE],
            scale=lambda: 1.0 / compat.current_accumulation_steps(self),
        )
        if self._pending_defense_state is not None:
            self._restore(self._pending_defense_state)
            self._pending_defense_state = None
        if self.args.rho > 0:
            self._proximal.attach()

    def _warn_if_user_data_unreached(self) -> None:
        """Warn when every optimizer step of the run is an alignment step, so `train_dataset` is never trained on.

        Called once per run at its first step, where `state.max_steps` holds the run's length whether it was set by
        `max_steps` or by epochs × steps per epoch.
        """
        total, k1 = self.state.max_steps, self.args.alignment_steps
        if k1 > 0 and 0 < total <= k1:
            logger.warning(
                "LisaTrainer: this run has %d optimizer step(s) and the first %d (`alignment_steps`) train on the "
                "alignment data, so no step trains on `train_dataset`. Raise `max_steps` (or `num_train_epochs`) "
                "above `alignment_steps`, or lower `alignment_steps`.",
                total,
                k1,
            )

    def _enter(self, phase: str) -> None:
        """Switch state when `phase` differs from the last step's, snapshotting the weights the new state is pulled to.

        Naming follows the official code: `anchors["alignment"]` is the snapshot taken when an alignment state ends
        (the anchor of fine-tuning steps) and `anchors["finetune"]` the one taken when a fine-tuning state ends (the
        anchor of alignment steps).
        """
        self._proximal.anchor = enter_phase(self._anchors, self._phase, phase)
        self._phase = phase

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, num_items_in_batch
        if self._proximal is None:
            self._start()
        step = self.state.global_step
        phase = self.phase_of(step)
        self._enter(phase)
        if phase == ALIGNMENT:
            # The user batches of this step are discarded, as in the official code
            batches = [next(self._alignment_batches) for _ in batches]
            num_items_in_batch = compat.num_items_in_batch(self, batches, device)
        self._proximal.enabled = proximal_active(step, self.state.max_steps, self.args.proximal_warmup_ratio)
        self._micro_batches_left = len(batches)
        # Logged as a training metric even if the model is still in eval mode (from_pretrained, or after evaluation)
        self.log_metric("alignment_phase", float(phase == ALIGNMENT), mode="train")
        return batches, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._micro_batches_left -= 1
        if self._micro_batches_left == 0 and self._proximal is not None:
            # ρ/2‖w − anchor‖² of this optimizer step, as the hooks applied it (0 while warming up or with ρ=0)
            value = self._proximal.pop_value()
            self.log_metric("proximal_term", value or 0.0)
        return loss

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._proximal is not None:
                # A later `train()` starts a new run: fresh anchors, unless it resumes from a checkpoint
                self._proximal.remove()
                self._proximal = None
                self._phase = None

    # ------------------------------------------------------------------------------------------------ resume
    def defense_state_dict(self):
        if self._proximal is None:
            return dict(self._pending_defense_state or {"phase": None, "anchors": None, "alignment_batches": None})
        return {
            "phase": self._phase,
            "anchors": {name: snapshot.state_dict() for name, snapshot in self._anchors.items()},
            "alignment_batches": None if self._alignment_batches is None else self._alignment_batches.state_dict(),
        }

    def load_defense_state_dict(self, state):
        # Anchors exist only once training has started; restore then
        self._pending_defense_state = state
        if self._alignment_batches is not None and state.get("alignment_batches") is not None:
            self._alignment_batches.load_state_dict(state["alignment_batches"])

    def _restore(self, state) -> None:
        self._phase = state.get("phase")
        if state.get("anchors") is not None:
            for name, snapshot in self._anchors.items():
                snapshot.load_state_dict(state["anchors"][name])
