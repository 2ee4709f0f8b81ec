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

```python
params = list(trainable_parameters(bare).values())
g, h0 = parameter_gradients(bare, harmful, params)
with shifted_parameters(snapshot, normalized_step(g, -alpha)):
    g_moved, h1 = parameter_gradients(bare, harmful, params)
extra = [lamb * (a - b) for a, b in zip(g, g_moved)]
# in compute_loss: loss = loss + value_neutral_term(params, extra) * extra_term_scale(self, num_items_in_batch)
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .hooks import gradient_checkpointing_disabled
from .layers import get_decoder_layers
from .losses import lm_loss
from .perturbation import joint_norm, needs_full_activations
from .snapshot import ParameterSnapshot


__all__ = [
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
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    return 1.0 / trainer.current_gradient_accumulation_steps if scaled else 1.0


class PendingGradientMixin:
    """Adds a gradient assembled before the real step to that step's one backward.

    A trainer sets `self._pending_gradient` (one tensor per parameter of `self._trainable`, in order) before calling
    `super().training_step`; `compute_loss` then adds the value-neutral term, scaled for gradient accumulation, so the
    logged loss is unchanged and the parameters' gradients gain exactly the pending tensors.
    """

    _pending_gradient: list[torch.Tensor] | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        extra, self._pending_gradient = self._pending_gradient, None
        if extra is None:
            return result
        term = value_neutral_term(list(self._trainable.values()), extra) * extra_term_scale(self, num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return loss + term.to(loss.dtype), outputs
        return result + term.to(result.dtype)


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
