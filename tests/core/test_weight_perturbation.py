"""`core.weight_perturbation` against hand computations on a tiny two-layer regression net (and a one-layer toy LM
for the default loss): the normalised step, the exact restore, the value-neutral term, the probe gradients, the whole
simulated harmful step and the trainer mixin's extra gradient."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from testing_utils import build_model
from torch import nn

from trl_safety.core.snapshot import ParameterSnapshot, trainable_parameters
from trl_safety.core.weight_perturbation import (
    HarmfulWeightStep,
    PendingGradientMixin,
    normalized_step,
    parameter_gradients,
    shifted_parameters,
    value_neutral_term,
)


class Net(nn.Module):
    """x → tanh(W1 x + b1) → W2 · + b2; `spare` never enters the forward (parameters 4 and 5)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 3)
        self.spare = nn.Linear(2, 1)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def hand_loss(net, batch):
    # The regression loss written out from the weights (the same ops as Net.forward + mse)
    hidden = torch.tanh(F.linear(batch["x"], net.first.weight, net.first.bias))
    return ((F.linear(hidden, net.second.weight, net.second.bias) - batch["y"]) ** 2).mean()


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 4, generator=generator), "y": torch.randn(5, 3, generator=generator)}


def used(net):
    return [net.first.weight, net.first.bias, net.second.weight, net.second.bias]


def hand_norm(tensors):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).float()


def assert_grads_close(actual, expected):
    # The package's step vs the test's (joint norm by per-tensor norms vs one flat fp64 sum, then a few fp32 ops):
    # the moved weights differ in the last ulp, so the gradients there agree to ~1e-7 of their largest entry;
    # rtol 1e-5, atol 1e-5·max (docs/testing.md "gradients, other path"), far below the step's own effect (> 1e-3·max,
    # asserted where it matters)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


# ------------------------------------------------------------------------------------------------ normalized_step


def test_normalized_step_is_scale_times_g_over_joint_norm():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=generator), torch.randn(7, generator=generator), torch.randn(2, 2, 2)]
    step = normalized_step(grads, -0.3)
    n = hand_norm(grads)
    expected = [-0.3 * g / (n + 1e-7) for g in grads]
    for s, e in zip(step, expected):
        # per-tensor norms stacked vs one flat fp64 sum, then one division: a few fp32 ulps → rtol 1e-6
        torch.testing.assert_close(s, e, rtol=1e-6, atol=0)
    # the norm is joint over all tensors (not per tensor): the whole step has length |scale|
    assert hand_norm(step).item() == pytest.approx(0.3, rel=1e-6)
    assert hand_norm(step[:1]).item() < 0.3 * 0.99
    # a given norm is used as is: the same ops as written here, so exact
    given = torch.tensor(2.0)
    for s, g in zip(normalized_step(grads, 0.5, given), grads):
        assert torch.equal(s, g * (0.5 / (given + 1e-7)))


# --------------------------------------------------------------------------------------------- shifted_parameters


def test_shifted_parameters_moves_then_restores_bit_exactly_in_bf16():
    net = Net().to(torch.bfloat16)
    params = trainable_parameters(net)
    original = {n: p.detach().clone() for n, p in params.items()}
    deltas = [torch.full_like(p, 1e-3) for p in params.values()]
    snapshot = ParameterSnapshot(params)
    with shifted_parameters(snapshot, deltas):
        for (name, p), d in zip(params.items(), deltas):
            assert torch.equal(p, original[name] + d)  # one elementwise bf16 add, as the test's: exact
    # w + δ − δ is not w in bf16 (why the restore copies a snapshot), yet the restore is exact
    assert any(not torch.equal((original[n] + d) - d, original[n]) for n, d in zip(params, deltas))
    assert all(torch.equal(p, original[n]) for n, p in params.items())
    with pytest.raises(RuntimeError, match="inside"), shifted_parameters(snapshot, deltas):
        raise RuntimeError("inside")
    assert all(torch.equal(p, original[n]) for n, p in params.items())
    with pytest.raises(ValueError, match="parameter shifts"), shifted_parameters(snapshot, deltas[:1]):
        pass


# --------------------------------------------------------------------------------------------- value_neutral_term


def test_value_neutral_term_is_zero_with_gradient_exactly_c():
    net = Net()
    params = used(net)
    generator = torch.Generator().manual_seed(3)
    coefficients = [torch.randn(p.shape, generator=generator) for p in params]
    term = value_neutral_term(params, coefficients)
    assert term.item() == 0.0
    grads = torch.autograd.grad(term, params)
    assert all(torch.equal(g, c) for g, c in zip(grads, coefficients))
    # added to a loss: the loss's value is unchanged and its gradient gains exactly c (one fp32 add per entry)
    loss = mse(net, batch())
    combined = loss + value_neutral_term(params, coefficients)
    assert torch.equal(combined, loss)
    plain = torch.autograd.grad(mse(net, batch()), params)
    for g, p_, c in zip(torch.autograd.grad(combined, params), plain, coefficients):
        assert torch.equal(g, p_ + c)
    with pytest.raises(ValueError, match="coefficients"):
        value_neutral_term(params, coefficients[:2])


# ---------------------------------------------------------------------------------------------- parameter_gradients


def test_parameter_gradients_equal_autograd_of_the_hand_loss():
    net = Net()
    params = list(trainable_parameters(net).values())
    data = batch()
    grads, loss = parameter_gradients(net, data, params, loss_fn=mse)
    expected = torch.autograd.grad(hand_loss(net, data), used(net))
    # the same ops on the same inputs: exact
    assert torch.equal(loss, hand_loss(net, data).detach())
    assert all(torch.equal(g, e) for g, e in zip(grads[:4], expected))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[4:])  # `spare`: zeros, not None
    assert all(p.grad is None for p in params)  # nothing reaches .grad
    # a transform that cuts the graph (Panacea's clamp above c) gives zero gradients; the loss is the raw one
    clamped, raw = parameter_gradients(net, data, params, loss_fn=mse, loss_transform=lambda h: h.detach().clamp(0))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in clamped) and torch.equal(raw, loss)


def test_parameter_gradients_default_loss_is_token_mean_cross_entropy():
    model = build_model("llama", hidden=32, layers=1, seed=0)
    ids = torch.randint(6, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = list(trainable_parameters(model).values())
    grads, loss = parameter_gradients(model, data, params)
    logits = model(input_ids=ids, attention_mask=data["attention_mask"]).logits[:, :-1]
    hand = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    # log_softmax + gather + masked mean vs F.cross_entropy: other op order, observed ≲ 2e-7 relative → rtol 1e-5
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert_grads_close(grads, torch.autograd.grad(hand, params))


# ------------------------------------------------------------------------------------------------ HarmfulWeightStep


def hand_harmful_step(net, data, scale, other=None):
    """Copy the weights, step by scale·g/(‖g‖ + 1e-7), recompute the gradients there, copy the weights back."""
    params = used(net)
    g = [t.detach() for t in torch.autograd.grad(hand_loss(net, data), params)]
    n = hand_norm(g)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, g):
            p += scale * t / (n + 1e-7)
    moved_loss = hand_loss(net, data)
    moved = [t.detach() for t in torch.autograd.grad(moved_loss, params)]
    at_moved_other = None
    if other is not None:
        at_moved_other = [t.detach() for t in torch.autograd.grad(hand_loss(net, other), params)]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return g, n, moved, moved_loss.detach(), at_moved_other


def test_harmful_weight_step_equals_hand_step_and_restores_weights():
    net = Net()
    params = trainable_parameters(net)
    original = {n: p.detach().clone() for n, p in params.items()}
    data, other = batch(1), batch(2)
    step = HarmfulWeightStep(params, loss_fn=mse)(net, data, -0.5, others=[other])
    g, n, moved, moved_loss, moved_other = hand_harmful_step(net, data, -0.5, other)
    assert all(torch.equal(a, e) for a, e in zip(step.grads[:4], g))  # same ops at the same weights: exact
    assert step.norm.item() == pytest.approx(n.item(), rel=1e-6)  # per-tensor norms vs a flat fp64 sum
    assert step.moved_loss.item() == pytest.approx(moved_loss.item(), rel=1e-5)  # ulp-different weights
    assert_grads_close(step.moved_grads[:4], moved)
    assert_grads_close(step.others[0][0][:4], moved_other)
    assert hand_norm(step.shift).item() == pytest.approx(0.5, rel=1e-6)
    # the effect being tested is far above the tolerance: the step moves the gradient by > 1e-3 of its largest entry
    assert max(float((m - a).abs().max() / a.abs().max()) for m, a in zip(moved, g)) > 1e-3
    assert all(torch.equal(p, original[name]) for name, p in params.items())
    assert all(p.grad is None for p in params.values())


def test_harmful_weight_step_options():
    net = Net()
    params = trainable_parameters(net)
    data = batch()
    weight_step = HarmfulWeightStep(params, loss_fn=mse)
    # without a probe at the moved point the weights are never moved (no snapshot is even allocated)
    only_here = weight_step(net, data, 0.2, moved=False)
    assert only_here.moved_grads is None and only_here.others == [] and weight_step._snapshot is None
    g, _, moved, moved_loss, _ = hand_harmful_step(net, data, 0.2)
    assert all(torch.equal(a, e) for a, e in zip(only_here.grads[:4], g))
    # `reduce` applies to ∇h(θ) before its norm and to ∇h(θ + δ): a doubling leaves δ and doubles both gradients
    doubled = weight_step(net, data, 0.2, reduce=lambda grads: [2 * t for t in grads])
    assert all(torch.equal(a, 2 * e) for a, e in zip(doubled.grads[:4], g))
    assert_grads_close(doubled.moved_grads[:4], [2 * m for m in moved])
    # the transform applies to the moved probe only, whose loss is reported untransformed
    cut = weight_step(net, data, 0.2, loss_transform=lambda h: h.detach())
    assert all(torch.equal(t, torch.zeros_like(t)) for t in cut.moved_grads)
    assert cut.moved_loss.item() == pytest.approx(moved_loss.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- PendingGradientMixin


class _Steps:
    """The two Trainer methods the mixin wraps, reduced to a loss and one backward."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = mse(model, inputs)
        return (loss, "outputs") if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        loss.backward()
        return loss.detach()


class _Trainer(PendingGradientMixin, _Steps):
    loss_is_scaled_for_ga = True  # the loss counts once per optimizer step; an extra term is divided by GA
    current_gradient_accumulation_steps = 4

    def __init__(self, model):
        self.model = model
        self.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
        self._trainable = trainable_parameters(model)


def test_pending_gradient_joins_the_one_backward_divided_by_ga():
    net, data = Net(), batch()
    trainer = _Trainer(net)
    params = list(trainer._trainable.values())
    extra = [torch.full_like(p, 0.5) for p in params]
    loss = trainer.training_step_with_gradient(net, data, 7, extra)
    plain = torch.autograd.grad(mse(net, data), params, allow_unused=True)
    assert torch.equal(loss, mse(net, data).detach())  # the logged loss is unchanged
    for p, g, e in zip(params[:4], plain, extra):
        assert torch.equal(p.grad, g + e * 0.25)  # one fp32 add of the same two tensors: exact
    assert all(torch.equal(p.grad, e * 0.25) for p, e in zip(params[4:], extra[4:]))
    assert trainer._pending_gradient is None
    net.zero_grad(set_to_none=True)
    # without a pending gradient it is the plain step
    trainer.training_step_with_gradient(net, data)
    assert all(torch.equal(p.grad, g) for p, g in zip(params[:4], plain)) and params[4].grad is None


def test_gradient_from_the_loss_gradient_replaces_the_backward():
    net, data = Net(), batch()
    trainer = _Trainer(net)
    params = list(trainer._trainable.values())
    seen = {}

    def combine(loss_grad, scale):
        seen["loss_grad"], seen["scale"] = loss_grad, scale
        return [3 * g + scale for g in loss_grad]

    loss = trainer.training_step_with_gradient(net, data, 7, from_loss_gradient=combine)
    plain = torch.autograd.grad(mse(net, data), used(net))
    assert torch.equal(loss, mse(net, data).detach()) and seen["scale"] == 0.25
    assert all(torch.equal(a, e) for a, e in zip(seen["loss_grad"][:4], plain))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in seen["loss_grad"][4:])
    # the backward runs through the value-neutral term only: the gradient is the combination exactly
    for p, g in zip(params, seen["loss_grad"]):
        assert torch.equal(p.grad, 3 * g + 0.25)
    # a failing step leaves nothing pending for the next one
    with pytest.raises(RuntimeError, match="boom"):
        trainer.training_step_with_gradient(
            net, {"x": data["x"]}, 7, [torch.zeros_like(p) for p in params], context=_Boom()
        )
    assert trainer._pending_gradient is None and trainer._pending_from_loss_gradient is None


class _Boom:
    def __enter__(self):
        raise RuntimeError("boom")

    def __exit__(self, *exc):
        return False
