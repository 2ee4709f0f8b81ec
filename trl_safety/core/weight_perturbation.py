"""Weight-space perturbation mechanics shared by Booster, Antibody (alignment stage) and Panacea.

All three simulate a normalised gradient step on a harmful loss, look at the harmful gradient at the moved weights, and
add a combination of those gradients to the training gradient. The pieces, each side-effect free:

1. [`parameter_gradients`]: a probe forward on the bare module and `torch.autograd.grad` w.r.t. the trainable
   parameters. Nothing reaches `.grad`, DDP's reducer or DeepSpeed's buckets, so gradient accumulation is untouched.
2. [`normalized_step`] and [`shifted_parameters`]: move the trainable tensors in place by `scale · g/(‖g‖ + 1e-7)` under
   `no_grad` and put them back by copying a snapshot (bit-exact, unlike subtracting the step again in bf16).
3. [`value_neutral_term`]: `Σ_p ⟨c_p, p⟩ − (the same, detached)`. Added to the training loss it is exactly zero, so the
   logged loss is unchanged, and its gradient is exactly `c`: the extra gradient rides along the ONE real backward
   (`docs/design/integration.md` §4.4), with normal GA/DDP/DeepSpeed semantics.

[`HarmfulWeightStep`] puts 1–2 together (the simulated harmful step, with its lazily allocated snapshot) and
[`PendingGradientMixin`] does 3 for a trainer, so a defense only says how it combines the gradients (Booster):

```python
class BoosterTrainer(PendingGradientMixin, DefenseTrainerMixin, SFTTrainer):
    def setup_defense(self):
        self.setup_weight_perturbation()
    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.harmful_weight_step(model, next(self._harmful_batches), -self.args.alpha)
        extra = [self.args.lamb * (g - m) for g, m in zip(step.grads, step.moved_grads)]
        return self.training_step_with_gradient(model, inputs, num_items_in_batch, extra)
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import compat
from ..compat import current_accumulation_steps, prepare_inputs
from .hooks import gradient_checkpointing_disabled
from .layers import get_decoder_layers
from .losses import lm_loss
from .perturbation import joint_norm, needs_full_activations
from .snapshot import ParameterSnapshot, trainable_parameters


__all__ = [
    "HarmfulStep",
    "HarmfulWeightStep",
    "PendingGradientMixin",
    "all_reduce_mean",
    "cosine_similarity",
    "extra_term_scale",
    "global_norm",
    "normalized_step",
    "parameter_gradients",
    "shifted_parameters",
    "value_neutral_term",
]

# Guard of the normalised step, as in the official Booster code (`n + 1e-7`)
NORM_EPS = 1e-7


def _decoder_layers_or_empty(model: nn.Module) -> Sequence[nn.Module]:
    try:
        return get_decoder_layers(model)
    except ValueError:
        return ()


def parameter_gradients(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    params: Sequence[nn.Parameter],
    *,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = lm_loss,
    loss_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], object] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient of a probe loss w.r.t. `params`, computed with `torch.autograd.grad` (no `.grad` side effect).

    Args:
        model: the bare module (`accelerator.unwrap_model(model)`), never a DDP/DeepSpeed wrapper.
        inputs: the batch, already on the device.
        params: the parameters to differentiate against (the trainable ones).
        loss_fn: `(model, inputs) -> scalar`; default: token-mean cross-entropy of the batch.
        loss_transform: applied to the loss before differentiating (e.g. Panacea's clamp); the returned loss is the
            untransformed one. When the transformed loss does not depend on the parameters, the gradient is zero.
        autocast: context-manager factory for the forward, so the probe sees the training precision.

    Returns:
        `(grads, loss)`: detached gradients aligned with `params` (zeros where unused) and the detached loss.
    """
    layers = _decoder_layers_or_empty(model)
    # `autograd.grad` cannot differentiate through reentrant checkpointing; run those layers with full activations
    checkpointing = gradient_checkpointing_disabled(layers) if needs_full_activations(layers) else nullcontext()
    with checkpointing, torch.enable_grad():
        with autocast() if autocast is not None else nullcontext():
            loss = loss_fn(model, inputs)
        target = loss if loss_transform is None else loss_transform(loss)
        if target.requires_grad:
            computed = torch.autograd.grad(target, list(params), allow_unused=True)
        else:
            computed = [None] * len(params)
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, computed)]
    return grads, loss.detach()


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of all tensors (fp32)."""
    return joint_norm(tensors)


def normalized_step(
    grads: Sequence[torch.Tensor], scale: float, norm: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """`scale · g / (‖g‖ + 1e-7)` per tensor, the norm global over all of them (negative `scale` = descent step)."""
    norm = global_norm(grads) if norm is None else norm
    factor = scale / (norm + NORM_EPS)
    return [(g.float() * factor).to(g.dtype) for g in grads]


@contextmanager
def shifted_parameters(snapshot: ParameterSnapshot, deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add `deltas` to the snapshot's parameters in place for the block, then restore them bit-exactly.

    `snapshot` is re-taken from the live parameters on entry (no new allocation), so one snapshot object can be reused
    every step. Restoration happens even when the block raises.
    """
    if len(deltas) != len(snapshot):
        raise ValueError(f"Got {len(deltas)} parameter shifts for {len(snapshot)} parameters.")
    snapshot.update()
    try:
        with torch.no_grad():
            for (_name, param, _saved), delta in zip(snapshot, deltas):
                param.add_(delta.to(param.dtype))
        yield
    finally:
        snapshot.restore()


def value_neutral_term(params: Sequence[nn.Parameter], coefficients: Sequence[torch.Tensor]) -> torch.Tensor:
    """`Σ_p ⟨c_p, p⟩ − (same, detached)`: exactly zero in value, gradient exactly `c_p` w.r.t. each `p`."""
    if len(params) != len(coefficients):
        raise ValueError(f"Got {len(coefficients)} gradient coefficients for {len(params)} parameters.")
    terms = [(c.detach().to(p.dtype) * p).sum() for p, c in zip(params, coefficients)]
    linear = torch.stack([t.float() for t in terms]).sum()
    return linear - linear.detach()


def extra_term_scale(trainer, num_items_in_batch) -> float:
    """Factor for a gradient term added to `compute_loss`'s output so that it counts once per optimizer step.

    `Trainer.training_step` divides the loss by the GA steps unless it is already GA-scaled (SFT's loss is, being
    normalised by the token count of the whole accumulated batch). A per-micro-batch term must end up divided by GA
    exactly once, and is not multiplied by the number of processes (DDP averages gradients across ranks).
    """
    scaled = compat.loss_is_scaled_for_ga(trainer, num_items_in_batch)
    return 1.0 / current_accumulation_steps(trainer) if scaled else 1.0


Gradients = list[torch.Tensor]


@dataclass
class HarmfulStep:
    """What one simulated harmful step measured; every tensor is detached and lists follow the parameters' order.

    Attributes:
        grads: `∇h(θ)` on the harmful batch (averaged over processes when the step was given `reduce`).
        loss: `h(θ)`.
        norm: `‖∇h(θ)‖`, joint over all the tensors.
        shift: `δ = scale · ∇h(θ)/(‖∇h(θ)‖ + 1e-7)`, the move that was applied in place and undone.
        moved_grads: `∇h(θ + δ)` on the same batch (None unless asked with `moved=True`).
        moved_loss: `h(θ + δ)`, untransformed (None unless `moved=True`).
        others: `(∇, loss)` at `θ + δ` of each extra batch, in the order given (Antibody's refusal view).
    """

    grads: Gradients
    loss: torch.Tensor
    norm: torch.Tensor
    shift: Gradients
    moved_grads: Gradients | None = None
    moved_loss: torch.Tensor | None = None
    others: list[tuple[Gradients, torch.Tensor]] = field(default_factory=list)


class HarmfulWeightStep:
    """The simulated harmful step on the weights that Booster, Antibody (alignment stage) and Panacea share.

    `∇h(θ)` on a batch → `δ = scale·∇h/(‖∇h‖ + 1e-7)` → `θ + δ` in place → the asked gradients at `θ + δ` → `θ`
    restored bit-exactly. Every gradient comes from [`parameter_gradients`], so nothing reaches `.grad`.

    Args:
        params: the parameters to move and differentiate, by name (the trainable ones).
        loss_fn: `(model, inputs) -> scalar`; default: token-mean cross-entropy of the batch.
        autocast: context-manager factory for every probe forward (the trainer's `compute_loss_context_manager`).
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        *,
        loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = lm_loss,
        autocast: Callable[[], object] | None = None,
    ):
        self.params = dict(params)
        self.loss_fn = loss_fn
        self.autocast = autocast
        self._snapshot: ParameterSnapshot | None = None  # a copy of the weights, allocated on the first move

    def gradients(
        self,
        model: nn.Module,
        inputs: Mapping[str, torch.Tensor],
        loss_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[Gradients, torch.Tensor]:
        """`(∇loss, loss)` w.r.t. `params` at the current weights ([`parameter_gradients`])."""
        return parameter_gradients(
            model,
            inputs,
            list(self.params.values()),
            loss_fn=self.loss_fn,
            loss_transform=loss_transform,
            autocast=self.autocast,
        )

    def moved(self, deltas: Sequence[torch.Tensor]) -> AbstractContextManager[None]:
        """`params += deltas` for the block, then the exact values back ([`shifted_parameters`])."""
        if self._snapshot is None:
            self._snapshot = ParameterSnapshot(self.params)
        return shifted_parameters(self._snapshot, deltas)

    def __call__(
        self,
        model: nn.Module,
        inputs: Mapping[str, torch.Tensor],
        scale: float,
        *,
        moved: bool = True,
        loss_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        others: Sequence[Mapping[str, torch.Tensor]] = (),
        reduce: Callable[[Gradients], Gradients] | None = None,
    ) -> HarmfulStep:
        """Run the step on `inputs`; `scale < 0` descends `h` (an attacker's step), `scale > 0` ascends it.

        Args:
            model: the bare module, never a DDP/DeepSpeed wrapper.
            inputs: the harmful batch, on the device.
            scale: the signed step length (Booster's `−α`, Panacea's `+ρ`).
            moved: take `∇h(θ + δ)` on `inputs`; with neither `moved` nor `others` the weights are not moved at all.
            loss_transform: applied to `h(θ + δ)` before differentiating (Panacea's clamp).
            others: further batches whose gradients are taken at `θ + δ`, after `∇h(θ + δ)`.
            reduce: applied to `∇h(θ)` before its norm and to `∇h(θ + δ)` (e.g. [`all_reduce_mean`] across ranks).
        """
        grads, loss = self.gradients(model, inputs)
        if reduce is not None:
            grads = reduce(grads)
        norm = global_norm(grads)
        step = HarmfulStep(grads=grads, loss=loss, norm=norm, shift=normalized_step(grads, scale, norm))
        if not moved and not others:
            return step
        with self.moved(step.shift):
            if moved:
                step.moved_grads, step.moved_loss = self.gradients(model, inputs, loss_transform)
            step.others = [self.gradients(model, batch) for batch in others]
        if reduce is not None and step.moved_grads is not None:
            step.moved_grads = reduce(step.moved_grads)
        return step


class PendingGradientMixin:
    """The trainer side of the weight-perturbation pattern: the harmful step, and its gradient in the one backward.

    Placed first in a trainer's bases. [`setup_weight_perturbation`] records the trainable parameters;
    [`harmful_weight_step`] runs [`HarmfulWeightStep`] on the bare module; [`training_step_with_gradient`] runs the
    ordinary `training_step`, whose `compute_loss` adds the value-neutral term, scaled for gradient accumulation, so
    the logged loss is unchanged and the parameters' gradients gain exactly the extra tensors.
    """

    _pending_gradient: Gradients | None = None
    _pending_from_loss_gradient: Callable[[Gradients, float], Gradients] | None = None

    def setup_weight_perturbation(self) -> None:
        """Record the trainable parameters the step moves and the extra gradient targets (call in `setup_defense`)."""
        self._trainable = trainable_parameters(self.model)
        self._weight_step = HarmfulWeightStep(self._trainable, autocast=self.compute_loss_context_manager)
        self._pending_gradient = self._pending_from_loss_gradient = None

    def harmful_weight_step(self, model, batch, scale: float, *, others=(), **kwargs) -> HarmfulStep:
        """[`HarmfulWeightStep`] on loader batches (`batch`, `others`), run on the bare module of `model`."""
        bare = self.accelerator.unwrap_model(model)
        others = [prepare_inputs(self, other) for other in others]
        return self._weight_step(bare, prepare_inputs(self, batch), scale, others=others, **kwargs)

    def training_step_with_gradient(
        self,
        model,
        inputs,
        num_items_in_batch=None,
        extra: Gradients | None = None,
        *,
        from_loss_gradient: Callable[[Gradients, float], Gradients] | None = None,
        context: AbstractContextManager | None = None,
    ):
        """`Trainer.training_step` whose one backward also carries an extra gradient.

        Args:
            extra: one tensor per trainable parameter, added to the gradient divided by GA as the loss would be.
            from_loss_gradient: instead, `(∇loss, extra_term_scale) -> the whole gradient` for a combination that
                depends on the training loss's own gradient (Antibody's adaptive λ). `∇loss` is then taken by
                `autograd.grad` from the real forward and the backward runs through the value-neutral term only.
            context: held around the step, backward included (Vaccine's hooks for Booster's `perturb_aware`).
        """
        self._pending_gradient, self._pending_from_loss_gradient = extra, from_loss_gradient
        try:
            with context if context is not None else nullcontext():
                return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._pending_gradient = self._pending_from_loss_gradient = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extra, self._pending_gradient = self._pending_gradient, None
        combine, self._pending_from_loss_gradient = self._pending_from_loss_gradient, None
        if extra is None and combine is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        params = list(self._trainable.values())
        scale = extra_term_scale(self, num_items_in_batch)
        full_activations = nullcontext()
        if combine is not None:
            # ∇loss by autograd.grad, which reentrant checkpointing does not allow
            layers = _decoder_layers_or_empty(self.accelerator.unwrap_model(model))
            if needs_full_activations(layers):
                full_activations = gradient_checkpointing_disabled(layers)
        with full_activations:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        if combine is None:
            loss = loss + (value_neutral_term(params, extra) * scale).to(loss.dtype)
        else:
            computed = torch.autograd.grad(loss, params, allow_unused=True)
            loss_grad = [torch.zeros_like(p) if g is None else g for p, g in zip(params, computed)]
            # The loss's graph is consumed: the real backward runs through the linear term alone, whose gradient is
            # the combination exactly (no second backward through the model)
            loss = loss.detach() + value_neutral_term(params, combine(loss_grad, scale)).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


def all_reduce_mean(tensors: Sequence[torch.Tensor], accelerator) -> list[torch.Tensor]:
    """Average tensors over processes (one flat all-reduce); identity on a single process."""
    if accelerator.num_processes <= 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    flat = accelerator.reduce(flat, reduction="mean")
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def cosine_similarity(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """Cosine of the angle between two gradient lists, flattened and concatenated (fp32)."""
    dot = torch.stack([(x.float() * y.float()).sum() for x, y in zip(a, b)]).sum()
    return dot / torch.clamp(global_norm(a) * global_norm(b), min=eps)
