"""SafeGrad: gradient surgery of the user gradient against the alignment gradient (docs/safegrad.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from ...compat import prepare_inputs
from ...core.snapshot import ParameterSnapshot, trainable_parameters
from ...core.trainer import DefenseTrainerMixin
from ...core.weight_perturbation import all_reduce_mean, global_norm, parameter_gradients


DEEPSPEED_REASON = (
    "SafeGrad edits the accumulated, all-reduced gradient in `.grad` at the optimizer-step boundary; DeepSpeed keeps "
    "the reduced gradients in its own partitioned buffers, not in `.grad`, so there is nothing to project."
)
_NON_MODEL_KEYS = ("labels", "num_items_in_batch")


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean KL(softmax(reference_logits) ‖ softmax(logits)) over the positions where `mask` is true.

    The value is the KL; its gradient w.r.t. `logits` is built as `(q − p)/n` (the exact gradient of this KL), so at
    the reference itself (bitwise-equal logits) it is exactly zero rather than rounding noise of the log-softmax
    backward. `logits` and `reference_logits`: `(..., V)`; `mask`: the leading dimensions.
    """
    z = logits[mask].float()
    reference = reference_logits[mask].float().detach()
    count = mask.sum().clamp(min=1)
    log_q = F.log_softmax(z, dim=-1)
    log_p = F.log_softmax(reference, dim=-1)
    p = log_p.exp()
    with torch.no_grad():
        value = (p * (log_p - log_q)).sum() / count
    linear = ((log_q.exp() - p).detach() * z).sum() / count
    return value + (linear - linear.detach())


def project_conflicting(
    user: Sequence[torch.Tensor], alignment: Sequence[torch.Tensor], min_ratio: float = 0.0
) -> tuple[torch.Tensor, bool, bool]:
    """The projection coefficient of SafeGrad's surgery: `g_u′ = g_u − c·g_a`.

    `c = ⟨g_u, g_a⟩/‖g_a‖²` when the gradients conflict (`⟨g_u, g_a⟩ < 0`), else 0; also 0 (and `skipped`) when
    `‖g_a‖ ≤ min_ratio·‖g_u‖` or `g_a = 0`, where the direction of `g_a` is undefined. Returns `(c, conflict,
    skipped)`, `c` as an fp32 scalar tensor; dot products are global over all the tensors, in fp32.
    """
    dot = torch.stack([(u.float() * a.float()).sum() for u, a in zip(user, alignment)]).sum()
    squared = torch.stack([a.float().pow(2).sum() for a in alignment]).sum()  # ‖g_a‖², not a rounded norm squared
    skipped = bool(squared == 0) or bool(squared.sqrt() <= min_ratio * global_norm(user))
    conflict = not skipped and bool(dot < 0)
    coefficient = dot / squared if conflict else torch.zeros((), device=dot.device)
    return coefficient, conflict, skipped


class SafeGradTrainer(DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for SafeGrad (fine-tuning stage): the accumulated user gradient is de-conflicted from an alignment gradient
    at every optimizer step.

    The user gradient `g_u` is the ordinary accumulated gradient of the step (one real backward per micro-batch, with
    TRL's GA and DDP semantics), read from `.grad` after the last micro-batch, where DDP has already averaged it. The
    alignment gradient `g_a` is taken once per optimizer step by a probe pass on one batch of the alignment dataset
    (`autograd.grad` on the bare module, averaged over processes), as the gradient of the KL from the reference model
    (the weights at the start of training, kept as a snapshot of the trainable parameters) or of the cross-entropy
    on the refusals. Then `.grad ← g_u − c·g_a + λ_a·g_a`, before gradient clipping and the optimizer step; every rank
    holds the same `g_u` and `g_a`, so every rank applies the same surgery.

    Takes every argument of [`~trl.SFTTrainer`] plus `alignment_dataset=` (harmful prompt → refusal, any TRL format).
    `train_dataset` is the user's fine-tuning data.
    """

    extra_datasets = ("alignment",)
    unsupported_backends = {"zero1": DEEPSPEED_REASON, "zero2": DEEPSPEED_REASON, "zero3": DEEPSPEED_REASON}

    def defense_active(self) -> bool:
        return self.args.project_gradients or self.args.alignment_weight != 0

    def setup_defense(self) -> None:
        self._trainable = trainable_parameters(self.model)
        self._alignment_batches = self.cycling_batches("alignment", self.args.alignment_batch_size)
        self._reference = None  # the trainable weights of the reference model (π_ref of the KL)
        self._scratch = None  # the live weights while the reference is swapped in
        if self.defense_active() and self.args.alignment_loss == "kl":
            self._reference = ParameterSnapshot(self._trainable)

    def defense_state_dict(self):
        state = {"alignment_batches": self._alignment_batches.state_dict()}
        if self._reference is not None:
            state["reference"] = self._reference.state_dict()
        return state

    def load_defense_state_dict(self, state):
        self._alignment_batches.load_state_dict(state["alignment_batches"])
        if self._reference is not None:
            if "reference" not in state:
                raise ValueError("The checkpoint's SafeGrad state has no reference weights (alignment_loss='kl').")
            self._reference.load_state_dict(state["reference"])

    # ------------------------------------------------------------------------------------------------- alignment
    def _logits(self, model, batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        return model(**inputs, use_cache=False).logits[:, :-1]

    @torch.no_grad()
    def reference_logits(self, model, batch) -> torch.Tensor:
        """Logits of the reference model: its trainable weights swapped in for one forward, then restored exactly."""
        if self._scratch is None:
            self._scratch = ParameterSnapshot(self._trainable)
        self._scratch.update()
        try:
            for name, param in self._trainable.items():
                param.copy_(self._reference.tensors[name].to(param.device))
            with self.compute_loss_context_manager():
                return self._logits(model, batch).detach()
        finally:
            self._scratch.restore()

    def alignment_gradient(self, model) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`(g_a, L_a)` on the next alignment batch, `g_a` averaged over processes."""
        bare = self.accelerator.unwrap_model(model)
        batch = prepare_inputs(self, next(self._alignment_batches))
        params = list(self._trainable.values())
        if self.args.alignment_loss == "kl":
            reference = self.reference_logits(bare, batch)
            mask = batch["labels"][:, 1:] != -100

            def loss_fn(module, inputs):
                return kl_to_reference(self._logits(module, inputs), reference, mask)

            grads, loss = parameter_gradients(
                bare, batch, params, loss_fn=loss_fn, autocast=self.compute_loss_context_manager
            )
        else:
            grads, loss = parameter_gradients(bare, batch, params, autocast=self.compute_loss_context_manager)
        return all_reduce_mean(grads, self.accelerator), loss

    # ------------------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def gradient_surgery(self, model) -> None:
        """`.grad ← g_u − c·g_a + λ_a·g_a` on the trainable parameters, with `g_u` the accumulated `.grad`."""
        params = list(self._trainable.values())
        with torch.enable_grad():
            alignment, alignment_loss = self.alignment_gradient(model)
        user = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.args.project_gradients:
            coefficient, conflict, skipped = project_conflicting(user, alignment, self.args.min_alignment_grad_ratio)
        else:
            coefficient, conflict, skipped = torch.zeros(()), False, False
        user_norm, alignment_norm = global_norm(user), global_norm(alignment)
        dot = torch.stack([(u.float() * a.float()).sum() for u, a in zip(user, alignment)]).sum()
        cosine = dot / (user_norm * alignment_norm) if user_norm * alignment_norm > 0 else torch.zeros(())
        factor = self.args.alignment_weight - coefficient.to(alignment[0].device)
        for param, grad in zip(params, alignment):
            update = (factor * grad.float()).to(param.dtype)
            if param.grad is None:
                param.grad = update
            else:
                param.grad.add_(update.to(param.grad.dtype))
        self.log_metric("alignment_loss", alignment_loss)
        self.log_metric("alignment_grad_norm", alignment_norm)
        self.log_metric("grad_cosine", cosine)
        self.log_metric("conflict", float(conflict))
        self.log_metric("projection_skipped", float(skipped))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The last micro-batch of the optimizer step: its backward has accumulated (and under DDP averaged) `.grad`
        if self.defense_active() and self.accelerator.sync_gradients:
            self.gradient_surgery(model)
        return loss
