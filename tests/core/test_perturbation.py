"""`core.perturbation` (Vaccine's activation-space step) against a hand-written forward of a tiny residual stack whose
blocks return tuples like attention modules: the activation gradients, ε = ρ·g/‖g‖_joint
(`docs/design/algorithms.md` §2.1), and the perturbed loss and gradient of the step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trl_safety.core.perturbation import (
    activation_gradients,
    joint_norm,
    vaccine_perturbation,
    vaccine_perturbations,
)


class Block(nn.Module):
    """`(W h + b, None)`: the tuple output of an attention module, whose first element is perturbed."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, hidden):
        return self.proj(hidden), None


class Stack(nn.Module):
    """h ← h + block(tanh(h))[0] for each block, then a linear head."""

    def __init__(self, width: int = 5, depth: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        hidden = x
        for block in self.blocks:
            hidden = hidden + block(torch.tanh(hidden))[0]
        return self.head(hidden)


def mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def hand_forward(net, batch, deltas=None):
    """The stack written out from its weights; returns the loss and each block's output e_l (ε added when given).

    An output that does not require grad (frozen block on the raw input) is made a graph leaf, so ∂loss/∂e_l exists.
    """
    hidden, outputs = batch["x"], []
    for index, block in enumerate(net.blocks):
        out = F.linear(torch.tanh(hidden), block.proj.weight, block.proj.bias)
        if not out.requires_grad:
            out = out.requires_grad_(True)
        outputs.append(out)
        if deltas is not None:
            out = out + deltas[index]
        hidden = hidden + out
    loss = ((F.linear(hidden, net.head.weight, net.head.bias) - batch["y"]) ** 2).mean()
    return loss, outputs


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(4, 3, 5, generator=generator), "y": torch.randn(4, 3, 2, generator=generator)}


def hand_norm(tensors):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).float()


def test_activation_gradients_equal_the_hand_gradients_at_the_module_outputs():
    net, data = Stack(), batch()
    grads, loss = activation_gradients(net, data, list(net.blocks), loss_fn=mse)
    hand_loss, outputs = hand_forward(net, data)
    expected = torch.autograd.grad(hand_loss, outputs)
    # the same ops on the same inputs (the hooks only record the outputs): exact
    assert torch.equal(loss, hand_loss.detach())
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    assert all(p.grad is None for p in net.parameters())  # no parameter gradient
    # a subset of modules: the gradients at those outputs only, the same values
    subset, _ = activation_gradients(net, data, [net.blocks[2], net.blocks[0]], loss_fn=mse)
    assert torch.equal(subset[0], expected[2]) and torch.equal(subset[1], expected[0])


def test_activation_gradients_through_frozen_modules():
    """An output computed from frozen weights only still influences the loss, so its gradient is defined."""
    net, data = Stack(), batch()
    for p in net.blocks[0].parameters():
        p.requires_grad_(False)
    grads, _ = activation_gradients(net, data, [net.blocks[0]], loss_fn=mse)
    hand_loss, outputs = hand_forward(net, data)
    assert torch.equal(grads[0], torch.autograd.grad(hand_loss, outputs[0])[0])
    with pytest.raises(RuntimeError, match="did not run"):
        activation_gradients(net, data, [nn.Linear(2, 2)], loss_fn=mse)


def test_vaccine_perturbations_are_rho_times_g_over_the_joint_norm():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, 5, generator=generator) * scale for scale in (1.0, 0.1, 3.0)]
    deltas = vaccine_perturbations(grads, 2.0)
    n = hand_norm(grads)
    for d, g in zip(deltas, grads):
        # per-tensor norms stacked vs one flat fp64 sum, then one division: a few fp32 ulps → rtol 1e-6
        torch.testing.assert_close(d, 2.0 * g / (n + 1e-7), rtol=1e-6, atol=0)
    # one norm over all modules, tokens and samples: ‖ε‖ = ρ jointly, not per module
    assert hand_norm(deltas).item() == pytest.approx(2.0, rel=1e-6)
    assert hand_norm(deltas[1:2]).item() < 0.1
    assert joint_norm(grads).item() == pytest.approx(n.item(), rel=1e-6)
    assert all(not d.requires_grad for d in vaccine_perturbations([g.requires_grad_() for g in grads], 2.0))


def test_vaccine_step_perturbed_loss_and_gradient_equal_the_hand_computation():
    net, data = Stack(), batch()
    rho = 0.5
    perturbation = vaccine_perturbation(net, data, list(net.blocks), rho, loss_fn=mse)
    # the probe is the unperturbed pass; ε follows the formula above
    hand_loss, outputs = hand_forward(net, data)
    hand_grads = torch.autograd.grad(hand_loss, outputs)
    assert torch.equal(perturbation.probe_loss, hand_loss.detach())
    n = hand_norm(hand_grads)
    for d, g in zip(perturbation.deltas, hand_grads):
        torch.testing.assert_close(d, rho * g / (n + 1e-7), rtol=1e-6, atol=0)  # reduction order, as above
    assert perturbation.grad_norm.item() == pytest.approx(n.item(), rel=1e-6)
    assert perturbation.perturbation_norm.item() == pytest.approx(rho, rel=1e-6)

    params = list(net.parameters())
    with perturbation.applied():
        loss = mse(net, data)
        grads = torch.autograd.grad(loss, params)
    # the hand forward adds the same ε to each block's output: one fp32 add per entry, the same ops → exact
    expected_loss, _ = hand_forward(net, data, deltas=perturbation.deltas)
    expected = torch.autograd.grad(expected_loss, params)
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    # the perturbation matters (ε is worst-case: the loss rises) and the hooks are gone after the block
    assert loss.item() > hand_loss.item() * (1 + 1e-3)
    assert torch.equal(mse(net, data), hand_loss)
