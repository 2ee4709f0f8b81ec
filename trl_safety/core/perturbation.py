"""Vaccine's activation-space perturbation, shared by Vaccine, T-Vaccine and any trainer that wants it (Booster's
perturbation-aware variant).

Two steps, both side-effect free:

1. [`activation_gradients`]: one probe forward on the bare module and `torch.autograd.grad` w.r.t. the hidden-state
   outputs of the given modules. No parameter gradient is produced, so nothing reaches `.grad`, DDP's reducer or
   DeepSpeed's buckets, and gradient accumulation is untouched.
2. [`vaccine_perturbations`]: ε_l = ρ · g_l / (‖(g_1, …, g_L)‖ + 1e-7), the norm taken jointly over all modules, tokens
   and samples (Vaccine's closed-form inner maximisation, `docs/design/algorithms.md` §2.1).

Apply the result with [`~trl_safety.core.hooks.add_to_outputs`] around the real forward/backward, and keep the hooks in
place until that backward has finished: non-reentrant checkpointing re-runs the forward during backward.

[`vaccine_perturbation`] is the whole Vaccine step for a trainer (Vaccine, T-Vaccine, Booster's `perturb_aware`):

```python
perturbation = vaccine_perturbation(accelerator.unwrap_model(model), inputs, modules, rho, layers=layers)
with perturbation.applied():
    loss = super().training_step(model, inputs, num_items_in_batch)  # the one real backward
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .hooks import add_to_outputs, first_tensor, gradient_checkpointing_disabled, replace_first
from .losses import lm_loss


__all__ = [
    "VaccinePerturbation",
    "activation_gradients",
    "gaussian_output_noise",
    "joint_norm",
    "needs_full_activations",
    "vaccine_perturbation",
    "vaccine_perturbations",
]


def needs_full_activations(layers: Sequence[nn.Module]) -> bool:
    """Whether some layer runs under reentrant (or unspecified-mode) activation checkpointing.

    `torch.autograd.grad` cannot differentiate through reentrant checkpointing ("When use_reentrant=True,
    torch.utils.checkpoint is incompatible with .grad()"); TRL forces that mode for PEFT + ZeRO-3. Non-reentrant
    checkpointing (the transformers default) works and keeps its memory savings, so only the reentrant case pays for a
    probe pass with full activations.
    """
    for layer in layers:
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        func = getattr(layer, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        if keywords.get("use_reentrant") is not False:
            return True
    return False


@contextmanager
def _capture_differentiable_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record each module's first hidden-state output, turned into a graph leaf when it does not require grad.

    An attention output computed only from frozen weights (e.g. LoRA on later layers only) still influences the loss,
    so ∂L/∂out is defined; making it a leaf that requires grad lets `autograd.grad` return it. Only the first call is
    kept: checkpoint recomputation during backward must not replace the tensors being differentiated against.
    """
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(index: int):
        def hook(_module, _inputs, output):
            hidden = first_tensor(output)
            if torch.is_grad_enabled() and not hidden.requires_grad:
                hidden = hidden.detach().requires_grad_(True)
                output = replace_first(output, hidden)
            if captured[index] is None:
                captured[index] = hidden
            return output

        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def activation_gradients(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    modules: Sequence[nn.Module],
    *,
    layers: Sequence[nn.Module] = (),
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = lm_loss,
    autocast: Callable[[], object] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient of a probe loss w.r.t. the hidden-state output of each module (`out[0]` for tuple outputs).

    Args:
        model: the bare module (`accelerator.unwrap_model(model)`), never a DDP/DeepSpeed wrapper: running the probe
            through a ZeRO-2 engine corrupts its gradient buckets.
        inputs: the batch, already on the device (`labels` required for the default loss).
        modules: the modules whose outputs are differentiated against (e.g. each decoder layer's `self_attn`).
        layers: the decoder layers; when some run under reentrant checkpointing, the probe runs them without it.
        loss_fn: `(model, inputs) -> scalar loss`; the default is the token-mean cross-entropy of the batch.
            The perturbation direction is scale-invariant, so any positive rescaling of the loss gives the same ε.
        autocast: a context-manager factory for the forward (e.g. `trainer.compute_loss_context_manager`), so the
            probe sees the same precision as the real pass.

    Returns:
        `(grads, loss)`: detached gradients aligned with `modules` (zeros for a module whose output does not
        influence the loss) and the detached probe loss.
    """
    if not modules:
        raise ValueError("activation_gradients needs at least one module to differentiate against.")
    checkpointing = gradient_checkpointing_disabled(layers) if needs_full_activations(layers) else nullcontext()
    with checkpointing, torch.enable_grad():
        with _capture_differentiable_outputs(modules) as captured:
            with autocast() if autocast is not None else nullcontext():
                loss = loss_fn(model, inputs)
        missing = [i for i, out in enumerate(captured) if out is None]
        if missing:
            raise RuntimeError(
                f"Modules {missing} did not run during the probe forward; the hooked module set must be part of the "
                "model's forward."
            )
        computed = torch.autograd.grad(loss, captured, allow_unused=True)
    grads = [torch.zeros_like(out) if grad is None else grad.detach() for out, grad in zip(captured, computed)]
    return grads, loss.detach()


def joint_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, …, t_n)‖₂: the L2 norm of the concatenation of all tensors, in fp32."""
    if not tensors:
        raise ValueError("joint_norm needs at least one tensor.")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def vaccine_perturbations(grads: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """Vaccine's worst-case activation perturbation: ε_l = ρ · g_l / (‖(g_1, …, g_L)‖ + 1e-7).

    The norm is joint over all tensors (layers, tokens and samples), so ‖ε‖ = ρ up to the 1e-7 guard. Each ε_l is
    detached and has its gradient's dtype and shape; it is valid only for the exact batch it was computed on.
    """
    norm = joint_norm(grads)
    scale = rho / (norm + 1e-7)
    return [(g.float() * scale).to(g.dtype).detach() for g in grads]


@dataclass
class VaccinePerturbation:
    """Vaccine's worst-case perturbation of one batch: ε_l for each module, and the probe that produced it.

    Valid only for the exact batch it was computed on (ε is token- and sample-specific).

    Attributes:
        modules: the hooked modules.
        grads: ∂L/∂e_l of the probe, per module (detached).
        deltas: ε_l = ρ · g_l / (‖(g_1, …, g_L)‖ + 1e-7), per module (detached).
        probe_loss: the unperturbed loss of the probe forward (detached).
    """

    modules: Sequence[nn.Module]
    grads: list[torch.Tensor]
    deltas: list[torch.Tensor]
    probe_loss: torch.Tensor

    @property
    def grad_norm(self) -> torch.Tensor:
        """‖(g_1, …, g_L)‖, the joint norm of the activation gradients."""
        return joint_norm(self.grads)

    @property
    def perturbation_norm(self) -> torch.Tensor:
        """‖(ε_1, …, ε_L)‖ (= ρ up to the 1e-7 guard)."""
        return joint_norm(self.deltas)

    def applied(self) -> AbstractContextManager[None]:
        """Add ε_l to each module's output while the block runs; keep it open until the real backward has ended."""
        return add_to_outputs(self.modules, self.deltas)


def vaccine_perturbation(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    modules: Sequence[nn.Module],
    rho: float,
    *,
    layers: Sequence[nn.Module] = (),
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = lm_loss,
    autocast: Callable[[], object] | None = None,
) -> VaccinePerturbation:
    """The Vaccine step's probe: [`activation_gradients`] then [`vaccine_perturbations`] at radius `rho`.

    Arguments as for [`activation_gradients`] (`model` is the bare module).
    """
    grads, probe_loss = activation_gradients(model, inputs, modules, layers=layers, loss_fn=loss_fn, autocast=autocast)
    return VaccinePerturbation(list(modules), grads, vaccine_perturbations(grads, rho), probe_loss)


@contextmanager
def gaussian_output_noise(
    modules: Sequence[nn.Module], std: float, generator: torch.Generator | None = None
) -> Iterator[list[torch.Tensor | None]]:
    """Add `std · N(0, I)` to each module's hidden-state output while the block runs (Random-Vaccine ablation).

    The noise of each module is drawn once, at its first call, and reused when the forward is re-run by activation
    checkpointing, so the recomputed activations match. Yields the list of drawn noise tensors (for logging).
    """
    noise: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(index: int):
        def hook(_module, _inputs, output):
            hidden = first_tensor(output)
            if noise[index] is None:
                device = generator.device if generator is not None else hidden.device
                draw = torch.randn(hidden.shape, generator=generator, device=device, dtype=torch.float32)
                noise[index] = (std * draw).to(device=hidden.device, dtype=hidden.dtype)
            elif noise[index].shape != hidden.shape:
                raise RuntimeError("The module output changed shape within one step; cannot reuse its noise.")
            return replace_first(output, hidden + noise[index])

        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        yield noise
    finally:
        for handle in handles:
            handle.remove()
