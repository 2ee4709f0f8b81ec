"""How a callback logs a metric so every `report_to` integration receives it."""

from __future__ import annotations

from transformers import Trainer


def log_metrics(trainer, state, control, metrics: dict[str, float]) -> None:
    """Log `metrics` at the current step from inside a callback.

    With the trainer at hand, the base `Trainer.log` appends to `state.log_history` and fires `on_log`, which is how
    W&B, TensorBoard and the other `report_to` integrations receive values. TRL trainers override `log` to flush
    their averaged metric buffers into each call, so calling that override mid-interval would emit partial averages
    under the wrong step. `on_log` also clears `should_log`, which may be set for this step's regular loss log: it is
    restored so that log still happens. Without a trainer the values only reach `state.log_history`.
    """
    if trainer is None:
        state.log_history.append({**metrics, "step": state.global_step})
        return
    controls = {id(c): (c, c.should_log) for c in (control, trainer.control) if c is not None}
    Trainer.log(trainer, dict(metrics))
    for holder, should_log in controls.values():
        holder.should_log = should_log
