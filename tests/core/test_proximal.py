"""`core.proximal`: the ρ/2‖w − anchor‖² gradient hooks against a hand computation, warm-up and step-size helpers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import build_model
from torch import nn

from trl_safety.core import ParameterSnapshot, trainable_parameters
from trl_safety.core.proximal import ProximalTerm, anchor_from_pretrained, micro_batches_in_step, proximal_active


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def loss_of(net, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=generator)
    return net(x).pow(2).mean()


def plain_gradients(net, seed=1):
    params = dict(net.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss_of(net, seed), list(params.values()))))


def move(net, amount=0.3, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(amount * torch.randn(p.shape, generator=generator))


def test_gradient_is_loss_gradient_plus_rho_times_distance_to_anchor():
    net = tiny_net()
    params = dict(net.named_parameters())
    anchor = {n: p.detach().clone() for n, p in params.items()}
    rho = 0.7
    term = ProximalTerm(params, rho).attach()  # anchored at the current weights
    move(net)
    term.enabled = False  # autograd.grad fires the hooks too: the plain ∇L is computed with the term off
    expected_loss_grads = plain_gradients(net)
    term.enabled = True
    loss_of(net).backward()
    for name, p in params.items():
        # same autograd graph for ∇L, then one elementwise fp32 multiply-add done in the same order as the hook
        # (ρ·scale first, then ·(w − a)): exact (docs/testing.md)
        expected = expected_loss_grads[name] + rho * 1.0 * (p.detach() - anchor[name])
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0, msg=name)
    # the term is not negligible against ∇L, so the comparison has teeth
    assert all(
        (p.grad - expected_loss_grads[n]).abs().max() > 1e-2 * expected_loss_grads[n].abs().max()
        for n, p in params.items()
    )
    # the applied value is ρ/2‖w − a‖², summed here in float64 by hand: fp32 sum of ~40 squares, rtol 1e-6
    by_hand = (
        0.5 * rho * sum(((p.detach().double() - anchor[n].double()) ** 2).sum().item() for n, p in params.items())
    )
    assert term.pop_value() == pytest.approx(by_hand, rel=1e-6)
    assert term.pop_value() is None  # popped
    assert term.value() == pytest.approx(by_hand, rel=1e-6)


def test_gradient_accumulation_shares_sum_to_one_term_per_step():
    """scale = 1/GA per backward: two micro-batches add ρ(w − a) once in total."""
    net = tiny_net()
    params = dict(net.named_parameters())
    anchor = ParameterSnapshot(params)
    move(net)
    rho, ga = 2.0, 2
    with_term = ProximalTerm(params, rho, anchor=anchor, scale=lambda: 1 / ga)
    with_term.enabled = False
    first, second = plain_gradients(net, seed=1), plain_gradients(net, seed=3)
    with_term.enabled = True
    with_term.attach()
    (loss_of(net, seed=1) / ga).backward()
    (loss_of(net, seed=3) / ga).backward()
    for name, p in params.items():
        distance = p.detach() - anchor.tensors[name]
        expected = first[name] / ga + second[name] / ga + rho * distance
        # the package adds (ρ/2)(w − a) in each of two backwards and ∇L/2 in another order than this sum: a few
        # fp32 roundings of entries ≲ 2 → atol 1e-6 (the term itself is ≥ 1e-2 here, checked above)
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-6, msg=name)
    by_hand = (
        0.5
        * rho
        * sum(((p.detach().double() - anchor.tensors[n].double()) ** 2).sum().item() for n, p in params.items())
    )
    assert with_term.pop_value() == pytest.approx(by_hand, rel=1e-6)  # the two halves add up to the full value


def test_disabled_rho_zero_removed_and_reanchored_leave_the_gradient_alone():
    net = tiny_net()
    params = dict(net.named_parameters())
    term = ProximalTerm(params, 1.5)  # anchored before the move, so w − a ≠ 0 below
    move(net)
    reference = plain_gradients(net)  # no hook attached yet
    term.attach()
    assert term.attached and term.attach() is term and len(term._handles) == len(params)  # idempotent
    assert not torch.equal(plain_gradients(net)["0.weight"], reference["0.weight"])  # attached, it acts
    term.pop_value()
    with term.disabled():
        inside = plain_gradients(net)
    assert term.enabled
    zero = ProximalTerm(params, 0.0)
    term.remove()
    zero.attach()
    at_zero = plain_gradients(net)
    zero.remove()
    term.attach()
    term.reanchor()  # anchor = current weights: w − a = 0 exactly
    reanchored = plain_gradients(net)
    term.remove()
    assert not term.attached
    after_remove = plain_gradients(net)
    for name in params:
        for grads in (inside, at_zero, reanchored, after_remove):
            assert torch.equal(grads[name], reference[name]), name
    assert term.value() == 0.0


def test_anchor_over_other_parameters_is_refused():
    net = tiny_net()
    params = dict(net.named_parameters())
    first = dict(list(params.items())[:1])
    with pytest.raises(ValueError, match="does not cover the same parameters"):
        ProximalTerm(params, 1.0, anchor=ParameterSnapshot(first))


@pytest.mark.parametrize(
    ("warmup", "max_steps", "active_steps"),
    [(0.2, 6, [2, 3, 4, 5]), (0.0, 3, [0, 1, 2]), (0.5, 4, [3]), (1.0, 4, [])],
)
def test_proximal_active_after_the_warmup_steps(warmup, max_steps, active_steps):
    # off for steps 0 … ⌊warmup·max_steps⌋ (step > warmup·max_steps), on from the first step with a ratio of 0
    assert [s for s in range(max_steps) if proximal_active(s, max_steps, warmup)] == active_steps


class _Loader:
    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length


@pytest.mark.parametrize(
    ("length", "ga", "expected"), [(5, 2, [2, 2, 1, 2, 2, 1]), (4, 2, [2, 2, 2, 2]), (3, 4, [3, 3])]
)
def test_micro_batches_in_step_follows_the_epoch_remainder(length, ga, expected):
    class Args:
        gradient_accumulation_steps = ga

    # expected by hand: ⌈length/ga⌉ steps per epoch, the last one holding length mod ga (or ga) micro-batches
    assert [micro_batches_in_step(Args, s, _Loader(length)) for s in range(len(expected))] == expected
    assert micro_batches_in_step(Args, 0, None) == ga  # no loader: the configured accumulation


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_anchor_from_pretrained_holds_the_saved_weights(tmp_path, peft):
    model = build_model("llama", seed=0)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    saved = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    model.save_pretrained(tmp_path)
    move(model, seed=5)
    params = trainable_parameters(model)
    anchor = anchor_from_pretrained(str(tmp_path), params)
    for name in params:  # bytes written and read back: exact
        assert torch.equal(anchor.tensors[name], saved[name]), name
        assert not torch.equal(params[name].detach(), saved[name]), name  # the live weights did move
    if peft:  # an adapter of another LoRA layout has no weights for these factors
        other = get_peft_model(build_model("llama", seed=0), LoraConfig(r=4, target_modules=["v_proj"]))
        match = "has no weights for"
    else:  # a model of another width: same names, other shapes
        other = build_model("llama", hidden=64, seed=0)
        match = "has shape"
    with pytest.raises(ValueError, match=match):
        anchor_from_pretrained(str(tmp_path), trainable_parameters(other))
