"""AsFT: the anchoring penalty against the spec's oracle (docs/asft.md), computed independently here.

Oracle: R = ‖(I − Ĉ)·ΔW‖_F², Ĉ = V·Vᵀ/‖V‖_F (approximate) or the orthogonal projector onto col(V) (exact); the 2×2
closed form gives R = 2 and R = 1; the trace form equals the dense product; the gradients are
∂R/∂B = 2·MᵀM·B·A·Aᵀ and ∂R/∂A = 2·(MB)ᵀ(MB)·A (LoRA), ∂R/∂W = 2·MᵀM·(W − W_start) (full fine-tuning).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import (
    TINY_LORA,
    build_model,
    build_tokenizer,
    grads_of,
    prompt_completion_dataset,
    run_training_steps,
    tiny_config,
    token_nll,
)

from trl_safety.core.layers import unwrap_model
from trl_safety.defenses.asft import AsFTConfig, AsFTTrainer, dense_penalty, lora_penalty
from trl_safety.defenses.safegrad import SafeGradTrainer
from trl_safety.defenses.safelora.safelora_project import alignment_factor
from trl_safety.registry import get_defense


LAMBDA = 3.0


def dense_c(v: torch.Tensor, projection: str) -> torch.Tensor:
    """Ĉ as the spec defines it, dense (d_out × d_out)."""
    if projection == "approximate":
        return v @ v.T / torch.linalg.matrix_norm(v)
    return v @ torch.linalg.pinv(v.T @ v) @ v.T  # V(VᵀV)⁺Vᵀ: the orthogonal projector onto col(V)


# ------------------------------------------------------------------------------------------------ the formula
@pytest.mark.parametrize("projection, expected", [("approximate", 2.0), ("exact", 1.0)])
def test_two_by_two_closed_form(projection, expected):
    # V = diag(2, 0): ‖V‖_F = 2, Ĉ = diag(2, 0), I − Ĉ = diag(−1, 1); B·A = [[1, 0], [1, 0]]
    base = torch.zeros(2, 2, dtype=torch.float64)
    aligned = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    factor, norm = alignment_factor(base, aligned, projection)
    assert lora_penalty(b, a, factor.double(), norm.double()).item() == pytest.approx(expected, abs=1e-12)
    assert dense_penalty(b @ a, factor.double(), norm.double()).item() == pytest.approx(expected, abs=1e-12)


def random_case(seed=0, d_out=64, d_in=48, r=4, v_rank=None):
    g = torch.Generator().manual_seed(seed)
    if v_rank is None:
        v = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    else:  # aligned = base + a merged low-rank alignment adapter
        v = torch.randn(d_out, v_rank, generator=g, dtype=torch.float64) @ torch.randn(
            v_rank, d_in, generator=g, dtype=torch.float64
        )
    base = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return base, base + v, v, b, a


@pytest.mark.parametrize("v_rank", [None, 3], ids=["full-rank-V", "low-rank-V"])
@pytest.mark.parametrize("projection", ["approximate", "exact"])
def test_trace_form_equals_the_dense_form(projection, v_rank):
    # d_in < d_out: a full-rank V spans 48 of 64 dimensions (the exact projector is not the identity)
    base, aligned, v, b, a = random_case(d_out=64, d_in=48, v_rank=v_rank)
    factor, norm = alignment_factor(base, aligned, projection)
    m = torch.eye(64, dtype=torch.float64) - dense_c(v, projection)
    expected = (m @ b @ a).pow(2).sum()
    # fp64, the same quantity by two summation orders: agreement to ~1e-14 relative; 1e-10 leaves a wide margin
    torch.testing.assert_close(lora_penalty(b, a, factor, norm), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(dense_penalty(b @ a, factor, norm), expected, rtol=1e-10, atol=0)
    if v_rank is not None and projection == "exact":
        assert factor.shape == (64, v_rank)  # the factor, never the 64×64 matrix


@pytest.mark.parametrize("projection", ["approximate", "exact"])
def test_autograd_gradients_match_the_analytic_ones(projection):
    base, aligned, v, b0, a0 = random_case(d_out=64, d_in=40, v_rank=5)
    factor, norm = alignment_factor(base, aligned, projection)
    b, a = b0.clone().requires_grad_(), a0.clone().requires_grad_()
    grad_b, grad_a = torch.autograd.grad(lora_penalty(b, a, factor, norm), [b, a])
    m = torch.eye(64, dtype=torch.float64) - dense_c(v, projection)
    mb = m @ b0
    torch.testing.assert_close(grad_b, 2 * m.T @ m @ b0 @ a0 @ a0.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_a, 2 * mb.T @ mb @ a0, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the trainer
def make_trainer(tmp_path, peft=False, ga=1, batch=4, base=None, train=None, **overrides):
    values = dict(asft_lambda=LAMBDA, per_device_train_batch_size=batch, gradient_accumulation_steps=ga)
    values.update(overrides)
    kwargs = {"base_model": build_model("llama", seed=1) if base is None else base}
    if base is False:
        kwargs = {}
    return AsFTTrainer(
        build_model("llama", seed=0),
        args=tiny_config(tmp_path, AsFTConfig, **values),
        train_dataset=train if train is not None else prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(**TINY_LORA) if peft else None,
        **kwargs,
    )


def move_off_start(trainer, seed=3):
    """Give the update a non-zero value after set-up (B = 0 at LoRA's start, W = W_start under full FT: R = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and ("lora_B" in name or name.endswith("proj.weight")):
                param.add_(0.05 * torch.randn(param.shape, generator=g))


def expected_gradients(trainer, batches, starts, base_model, lam, peft):
    """CE gradient of the accumulated step, and λ·∂R (once per step) from the dense M = I − V·Vᵀ/‖V‖_F."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(params)}
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    ce = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for c, g in zip(ce, grads_of(token_nll(model, batch, "sum") / num_items, params)):
            c += g
    penalty = [torch.zeros_like(p) for p in params]
    base_modules = dict(base_model.named_modules())

    def m_of(v):
        return torch.eye(v.shape[0]) - v @ v.T / torch.linalg.matrix_norm(v)

    for name, module in unwrap_model(model).named_modules():
        if peft and hasattr(module, "lora_A") and "default" in module.lora_A:
            m = m_of(module.base_layer.weight.detach() - base_modules[name].weight.detach())
            b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
            penalty[index[id(b)]] += 2 * m.T @ m @ b.detach() @ a.detach() @ a.detach().T
            mb = m @ b.detach()
            penalty[index[id(a)]] += 2 * mb.T @ mb @ a.detach()
        elif not peft and isinstance(module, torch.nn.Linear) and name != "lm_head":
            m = m_of(starts[name] - base_modules[name].weight.detach())
            penalty[index[id(module.weight)]] += 2 * m.T @ m @ (module.weight.detach() - starts[name])
    penalty = [lam * p for p in penalty]
    return [c + p for c, p in zip(ce, penalty)], penalty, ce


def assert_close(actual, expected):
    flat_a = torch.cat([a.flatten() for a in actual])
    flat_e = torch.cat([e.flatten() for e in expected])
    # One backward of CE + penalty vs separate autograd (CE) and dense analytic (penalty) terms in fp32
    # (docs/testing.md): other reduction orders, ≲ 1e-6 relative to the largest entry; 1e-5 keeps a 10× margin
    torch.testing.assert_close(flat_a, flat_e, rtol=1e-5, atol=1e-5 * float(flat_e.abs().max()))


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_step_gradient_is_ce_plus_lambda_times_the_analytic_penalty_gradient(tmp_path, peft, ga):
    base = build_model("llama", seed=1)
    trainer = make_trainer(tmp_path, peft=peft, ga=ga, batch=4 // ga, base=base)
    linears = unwrap_model(trainer.model).named_modules()
    starts = {n: m.weight.detach().clone() for n, m in linears if isinstance(m, torch.nn.Linear)}
    move_off_start(trainer)
    batches, actual = run_training_steps(trainer, ga)
    expected, penalty, ce = expected_gradients(trainer, batches, starts, base, LAMBDA, peft)
    assert_close(actual, expected)
    # teeth: the penalty term is not negligible, so a doubled (official GA bug) or missing term would show
    size = torch.cat([p.flatten() for p in penalty]).norm()
    assert size > 1e-2 * torch.cat([c.flatten() for c in ce]).norm()
    wrong = [e + (ga - 1) * p for e, p in zip(expected, penalty)] if ga > 1 else [c for c in ce]
    diff = torch.cat([(a - w).flatten() for a, w in zip(actual, wrong)]).norm()
    assert diff > 1e-3 * torch.cat([e.flatten() for e in expected]).norm()


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_one_sgd_step_moves_by_the_reference_gradient(tmp_path, peft):
    """A real `train()` step of plain SGD: Δθ = −lr·(∇CE + λ·∂R), on the one batch holding all 8 rows."""
    base = build_model("llama", seed=1)
    sgd = dict(optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
    trainer = make_trainer(tmp_path, peft=peft, batch=8, base=base, max_steps=1, **sgd)
    linears = unwrap_model(trainer.model).named_modules()
    starts = {n: m.weight.detach().clone() for n, m in linears if isinstance(m, torch.nn.Linear)}
    move_off_start(trainer)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    expected, _, _ = expected_gradients(trainer, [batch], starts, base, LAMBDA, peft)
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    after = [p.detach() for p in trainer.model.parameters() if p.requires_grad]
    # the batch's row order differs from the loader's (a reduction order: docs/testing.md), and w − lr·g rounds on
    # weights of size |w|: 1e-5 of the largest update plus 4 eps·|w|
    for b, a, e in zip(before, after, expected):
        atol = 1e-5 * 0.1 * float(e.abs().max()) + 4 * torch.finfo(torch.float32).eps * float(b.abs().max())
        torch.testing.assert_close(a - b, -0.1 * e, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_ga2_on_identical_micro_batches_counts_the_penalty_once(tmp_path, peft):
    row = prompt_completion_dataset(1)[0]
    train = Dataset.from_dict({"prompt": [row["prompt"]] * 8, "completion": [row["completion"]] * 8})
    grads = []
    for ga in (1, 2):
        trainer = make_trainer(tmp_path / f"ga{ga}", peft=peft, ga=ga, batch=2 // ga, train=train)
        move_off_start(trainer)
        grads.append(run_training_steps(trainer, ga)[1])
        penalty = trainer.penalty().item()
    assert penalty > 0
    assert_close(grads[1], grads[0])


def test_the_penalty_is_logged_and_lambda_zero_skips_it(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    logged = [entry["asft/penalty"] for entry in trainer.state.log_history if "asft/penalty" in entry]
    assert len(logged) == 2 and logged[0] == 0.0 and logged[1] > 0  # W = W_start at the first step
    neutral = make_trainer(tmp_path / "zero", asft_lambda=0.0)
    assert neutral._targets == []  # no alignment factor is computed at strength zero


def test_scale_by_lora_scaling_multiplies_the_penalty_by_s_squared(tmp_path):
    plain = make_trainer(tmp_path / "plain", peft=True)
    scaled = make_trainer(tmp_path / "scaled", peft=True, scale_by_lora_scaling=True)
    for trainer in (plain, scaled):
        move_off_start(trainer)
    s = TINY_LORA["lora_alpha"] / TINY_LORA["r"]
    torch.testing.assert_close(scaled.penalty(), s**2 * plain.penalty(), rtol=1e-6, atol=0)  # fp32 rounding only


def test_targets_default_to_the_lora_modules_or_every_linear_but_the_head(tmp_path):
    lora = make_trainer(tmp_path / "lora", peft=True)
    assert {t.name.rsplit(".", 1)[-1] for t in lora._targets} == set(TINY_LORA["target_modules"])
    full = make_trainer(tmp_path / "full")
    names = {t.name.rsplit(".", 1)[-1] for t in full._targets}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    only_v = make_trainer(tmp_path / "v", target_modules=["v_proj"])
    assert {t.name.rsplit(".", 1)[-1] for t in only_v._targets} == {"v_proj"}


def test_modules_are_paired_by_name_not_by_order(tmp_path):
    base = build_model("llama", seed=1)
    shuffled = build_model("llama", seed=1)
    for layer in unwrap_model(shuffled).model.layers:  # same weights, submodules registered in another order
        children = layer.self_attn._modules
        reordered = list(children.items())[::-1]
        children.clear()
        children.update(reordered)
    assert [n for n, _ in base.named_parameters()] != [n for n, _ in shuffled.named_parameters()]
    one = make_trainer(tmp_path / "a", peft=True, base=base)
    two = make_trainer(tmp_path / "b", peft=True, base=shuffled)
    assert [t.name for t in one._targets] == [t.name for t in two._targets]
    for x, y in zip(one._targets, two._targets):
        assert torch.equal(x.factor, y.factor) and torch.equal(x.norm, y.norm), x.name
    # the q and v factors differ, so pairing by position in a reordered model would have mixed them up
    assert not torch.equal(one._targets[0].factor, one._targets[1].factor)


# ------------------------------------------------------------------------------------------- the base model input
def test_the_base_model_is_required_one_way_only(tmp_path):
    with pytest.raises(ValueError, match=r"`base_model=`.*`base_model_name_or_path`"):
        make_trainer(tmp_path, base=False)
    with pytest.raises(ValueError, match="both `base_model=` and `base_model_name_or_path`"):
        make_trainer(tmp_path, base_model_name_or_path=str(tmp_path))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=r"cannot load the base model .*no-such-model.*`base_model_name_or_path`"):
        make_trainer(tmp_path, base=False, base_model_name_or_path=missing)
    with pytest.raises(ValueError, match="does not use a base model"):
        SafeGradTrainer(
            build_model("llama", seed=0),
            args=tiny_config(tmp_path, get_defense("safegrad").config_class),
            train_dataset=prompt_completion_dataset(8),
            processing_class=build_tokenizer(),
            alignment_dataset=prompt_completion_dataset(4, seed=1),
            base_model=build_model("llama", seed=1),
        )


def test_a_base_model_folder_gives_the_same_factors_and_is_freed(tmp_path):
    base = build_model("llama", seed=1)
    base.save_pretrained(tmp_path / "base")
    by_object = make_trainer(tmp_path / "a", peft=True, base=base)
    by_name = make_trainer(tmp_path / "b", peft=True, base=False, base_model_name_or_path=str(tmp_path / "base"))
    for x, y in zip(by_object._targets, by_name._targets):
        assert torch.equal(x.factor, y.factor), x.name
    assert by_name.raw_extra_models == {}  # only the factors are kept
