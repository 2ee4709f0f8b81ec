"""SafeGrad (docs/safegrad.md): the projection's geometry, the KL alignment loss, the surgery on `.grad` against a
hand computation, and the zero alignment gradient at the reference (step 0). The contract matrix
(`tests/test_defense_contract.py`) covers strength zero, GA, checkpointing, resume and the card."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from testing_utils import TINY_LORA, build_model, build_tokenizer, prompt_completion_dataset, tiny_config, token_nll
from trl import SFTConfig, SFTTrainer

from trl_safety import registry
from trl_safety.defenses.safegrad import SafeGradConfig, SafeGradTrainer, kl_to_reference, project_conflicting


FP32_EPS = torch.finfo(torch.float32).eps


def make_trainer(tmp_path, peft=False, trainer_class=SafeGradTrainer, config_class=SafeGradConfig, **values):
    kwargs = {} if trainer_class is SFTTrainer else {"alignment_dataset": prompt_completion_dataset(8, seed=1)}
    if trainer_class is not SFTTrainer:
        values.setdefault("alignment_batch_size", 4)
    return trainer_class(
        build_model("llama", hidden=32, layers=2, seed=0),
        args=tiny_config(tmp_path, config_class, **values),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(**TINY_LORA) if peft else None,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------ (a) geometry
def test_projection_geometry_closed_form():
    user, alignment = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    coefficient, conflict, skipped = project_conflicting(user, alignment)
    assert conflict and not skipped
    projected = user[0] - coefficient * alignment[0]
    assert torch.equal(projected, torch.tensor([0.5, 0.5]))  # ⟨g_u,g_a⟩ = −1, ‖g_a‖² = 2: exact in binary
    assert torch.dot(projected, alignment[0]) == 0
    # no conflict: unchanged
    coefficient, conflict, skipped = project_conflicting(user, [torch.tensor([1.0, 1.0])])
    assert coefficient == 0 and not conflict and not skipped
    # zero alignment gradient (the KL at the reference): skipped instead of dividing by ‖g_a‖² = 0
    coefficient, conflict, skipped = project_conflicting(user, [torch.zeros(2)])
    assert coefficient == 0 and skipped and not conflict and torch.isfinite(coefficient)
    # a g_a below the relative threshold is skipped too
    _, conflict, skipped = project_conflicting(user, [torch.tensor([-1e-9, 0.0])], min_ratio=1e-8)
    assert skipped and not conflict
    # the dot product is global over the tensors: two pieces conflicting only jointly
    coefficient, conflict, _ = project_conflicting(
        [torch.tensor([1.0]), torch.tensor([1.0])], [torch.tensor([-3.0]), torch.tensor([1.0])]
    )
    assert conflict and coefficient == pytest.approx(-2.0 / 10.0)


# -------------------------------------------------------------------------------------------------- (b) the KL
def test_kl_is_exactly_zero_with_zero_gradient_at_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    loss = kl_to_reference(logits, logits.detach().clone(), mask)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_kl_matches_an_independent_full_vocabulary_kl():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(2, 5, 11, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    loss = kl_to_reference(logits, reference, mask)
    # independent: KL(p‖q) = Σ_v p_v (log p_v − log q_v), per masked position, averaged
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    expected = per_position[mask].sum() / mask.sum()
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    # fp32 inside kl_to_reference (it upcasts to float, the test runs fp64): fp32 rounding of O(1) values
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    assert expected.item() > 0.1  # a real divergence, not a vacuous comparison


# ------------------------------------------------------------------------- (c) the surgery on .grad, by hand
def hand_alignment_gradient(trainer, batch, loss, reference_logits=None):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    if loss == "ce":
        value = token_nll(trainer.model, batch, "mean")
    else:
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["labels"][:, 1:] != -100
        log_p, log_q = reference_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
        value = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum() / mask.sum()
    return [g.detach() for g in torch.autograd.grad(value, params)]


@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("conflicting", [True, False], ids=["conflict", "no-conflict"])
def test_surgery_matches_a_hand_computation(tmp_path, loss, peft, conflicting):
    lamb = 0.5
    trainer = make_trainer(tmp_path, peft=peft, alignment_loss=loss, alignment_weight=lamb)
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    # the alignment batch the surgery will draw, peeked without moving the loader
    state = trainer._alignment_batches.state_dict()
    batch = trainer._prepare_inputs(next(trainer._alignment_batches))
    trainer._alignment_batches.load_state_dict(state)
    reference_logits = None
    if loss == "kl":
        with torch.no_grad():  # π_ref: the weights the trainer started from
            reference_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            reference_logits = reference_logits.logits[:, :-1]
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():  # move θ away from θ_ref, so the KL and its gradient are not zero
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    g_a = hand_alignment_gradient(trainer, batch, loss, reference_logits)
    generator = torch.Generator().manual_seed(4)
    sign = -1.0 if conflicting else 1.0
    g_u = [sign * a + 0.3 * torch.randn(a.shape, generator=generator) * a.abs().max() for a in g_a]
    for p, g in zip(params, g_u):
        p.grad = g.clone()
    trainer.gradient_surgery(trainer.model)

    dot = sum((u.double() * a.double()).sum() for u, a in zip(g_u, g_a))
    squared = sum((a.double() ** 2).sum() for a in g_a)
    assert (dot < 0) == conflicting
    coefficient = dot / squared if dot < 0 else 0.0
    expected = [u.double() - coefficient * a.double() + lamb * a.double() for u, a in zip(g_u, g_a)]
    scale = max(float(e.abs().max()) for e in expected)
    for p, e in zip(params, expected):
        # g_a from two code paths (lm_forward / the KL's explicit gradient vs plain autograd): fp32 reduction-order
        # differences ≲ 1e-6·max|g| (docs/testing.md gradient tolerance c = 1e-5)
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-5 * scale)
    if conflicting:  # teeth: the projection moved the gradient by much more than the tolerance
        moved = max(float((coefficient * a.double()).abs().max()) for a in g_a)
        assert moved > 1e-2 * scale
    metrics = trainer._metrics["train"]
    assert metrics["safegrad/conflict"] == [float(conflicting)]
    assert metrics["safegrad/projection_skipped"] == [0.0]


def test_projection_only_leaves_a_gradient_orthogonal_to_the_alignment_gradient(tmp_path):
    trainer = make_trainer(tmp_path, alignment_loss="ce", alignment_weight=0.0)
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    state = trainer._alignment_batches.state_dict()
    batch = trainer._prepare_inputs(next(trainer._alignment_batches))
    trainer._alignment_batches.load_state_dict(state)
    g_a = hand_alignment_gradient(trainer, batch, "ce")
    for p, a in zip(params, g_a):
        p.grad = (-a + 0.1 * torch.ones_like(a)).clone()
    trainer.gradient_surgery(trainer.model)
    dot = sum((p.grad.double() * a.double()).sum() for p, a in zip(params, g_a))
    before = sum(((-a + 0.1).double() * a.double()).sum() for a in g_a)
    assert before < 0
    # ⟨g_u′, g_a⟩ = 0 up to the fp32 rounding of the g_a the trainer computed (relative 1e-5, as above)
    assert abs(float(dot)) < 1e-4 * abs(float(before))


# ---------------------------------------------------------------------- (d) step 0: g_a = 0 at the reference
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_first_step_at_the_reference_is_plain_sft(tmp_path, peft):
    """At θ = θ_ref the KL is 0 and its gradient exactly 0: the projection is skipped, the update is SFT's."""
    common = dict(max_steps=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0)
    defense = make_trainer(tmp_path / "d", peft=peft, **common)
    defense.train()
    sft = make_trainer(tmp_path / "s", peft=peft, trainer_class=SFTTrainer, config_class=SFTConfig, **common)
    sft.train()
    sft_params = dict(sft.model.named_parameters())
    for name, param in defense.model.named_parameters():
        assert torch.equal(param, sft_params[name]), name  # same kernels, the added term is exactly zero
    logged = defense.state.log_history[0]
    assert logged["safegrad/projection_skipped"] == 1.0 and logged["safegrad/alignment_grad_norm"] == 0.0
    assert defense._alignment_batches.state_dict()["position"] == 1  # the alignment pass did run


def test_second_step_uses_a_nonzero_alignment_gradient(tmp_path):
    defense = make_trainer(tmp_path / "d", max_steps=2)
    defense.train()
    second = defense.state.log_history[1]
    assert second["safegrad/alignment_loss"] > 0 and second["safegrad/alignment_grad_norm"] > 0
    assert second["safegrad/projection_skipped"] == 0.0
    # the reference stays the starting weights (not the current ones)
    start = dict(build_model("llama", hidden=32, layers=2, seed=0).named_parameters())
    for name, tensor in defense._reference.tensors.items():
        assert torch.equal(tensor, start[name]), name


# ------------------------------------------------------------------------------------------------ config, spec
def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="alignment_loss"):
        SafeGradConfig(output_dir="/tmp/x", alignment_loss="mse", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="alignment_weight"):
        SafeGradConfig(output_dir="/tmp/x", alignment_weight=-1.0, use_cpu=True, report_to="none")


def test_ce_needs_no_reference_and_neutral_takes_no_snapshot(tmp_path):
    assert make_trainer(tmp_path / "ce", alignment_loss="ce")._reference is None
    assert make_trainer(tmp_path / "n", project_gradients=False, alignment_weight=0.0)._reference is None


def test_spec():
    spec = registry.get_defense("safegrad")
    assert spec.stage == "fine-tuning" and spec.trainer_class is SafeGradTrainer
    assert {"zero1", "zero2", "zero3"} <= set(spec.unsupported_backends)


def test_reentrant_checkpointing_gives_the_same_update(tmp_path):
    """The alignment probe runs the layers with full activations under reentrant checkpointing (autograd.grad)."""
    common = dict(max_steps=2, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0)
    plain = make_trainer(tmp_path / "p", **common)
    start = {n: p.detach().clone() for n, p in plain.model.named_parameters()}
    plain.train()
    checkpointed = make_trainer(
        tmp_path / "c", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, **common
    )
    checkpointed.train()
    assert checkpointed.state.log_history[1]["safegrad/alignment_grad_norm"] > 0  # the surgery was active
    expected = dict(plain.model.named_parameters())
    for name, param in checkpointed.model.named_parameters():
        update, reference = param.detach() - start[name], expected[name].detach() - start[name]
        # recomputed vs stored activations: reduction-order differences ≲ 1e-6·max|g| (docs/testing.md, c = 1e-5),
        # plus the rounding of w − lr·g on weights of size |w| (4 eps·|w|)
        atol = 1e-5 * float(reference.abs().max()) + 4 * FP32_EPS * float(start[name].abs().max())
        torch.testing.assert_close(update, reference, rtol=1e-5, atol=atol, msg=name)
