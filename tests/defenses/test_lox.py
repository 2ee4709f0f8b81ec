"""LoX: W_LoX = W_aligned + α·Proj_k(W_aligned − W_base), checked against closed forms and an SVD written here."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from testing_utils import TINY_LORA, build_model, build_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

from trl_safety import LoXCallback, LoXConfig, extrapolate_lora_factors, lox_extrapolate
from trl_safety.cli.main import main
from trl_safety.registry import get_defense


class OneMatrix(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        self.norm = nn.LayerNorm(weight.shape[1], dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)


def oracle(delta: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """α·Proj_k(Δ) from this test's own fp64 SVD (k = 0: the whole Δ)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = len(s) if rank == 0 else min(rank, len(s))
    return alpha * (u[:, :k] @ torch.diag(s[:k]) @ vh[:k])


def orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


# ----------------------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize(("rank", "expected"), [(1, [4.5, 1.0]), (0, [4.5, 1.5]), (2, [4.5, 1.5])])
def test_diagonal_closed_form(rank, expected):
    aligned = OneMatrix(torch.diag(torch.tensor([3.0, 1.0])))
    base = OneMatrix(torch.zeros(2, 2))
    norm_before = aligned.norm.weight.clone()
    lox_extrapolate(aligned, LoXConfig(rank=rank, alpha=0.5), base_model=base)
    # exact: an SVD of a diagonal matrix and 3 + 0.5·3 are exact in fp32
    torch.testing.assert_close(aligned.proj.weight, torch.diag(torch.tensor(expected)), rtol=0, atol=1e-6)
    assert torch.equal(aligned.norm.weight, norm_before)  # 1-D tensors untouched


def test_non_diagonal_update_adds_alpha_times_the_top_k_subspace():
    u, v = orthonormal(8, 4, 0), orthonormal(6, 4, 1)
    sigma = torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    delta = u @ torch.diag(sigma) @ v.T
    w_base = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    aligned, base = OneMatrix(w_base + delta), OneMatrix(w_base)
    before = aligned.proj.weight.detach().clone()
    lox_extrapolate(aligned, LoXConfig(rank=2, alpha=0.7), base_model=base)
    expected = 0.7 * u[:, :2] @ torch.diag(sigma[:2]) @ v[:, :2].T
    # fp64 weights are computed in fp64: only SVD rounding (σ_max·n·eps ≈ 1e-14) separates the two
    torch.testing.assert_close(aligned.proj.weight - before, expected, rtol=0, atol=1e-12)
    # the update is not negligible: the rest of Δ (σ = 1, 0.5) was left out, unlike full-rank extrapolation
    assert (expected - 0.7 * delta).norm() > 0.5


# ----------------------------------------------------------------------------------------------- LoRA path
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_factored_lora_update_equals_the_dense_svd(rank):
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(64, 8, dtype=torch.float64, generator=g), torch.randn(8, 64, dtype=torch.float64, generator=g)
    scaling, alpha = 2.0, 0.5
    new_a, new_b, ratio = extrapolate_lora_factors(a, b, scaling, rank, alpha)
    delta = scaling * b @ a
    expected = delta + oracle(delta, rank, alpha)
    torch.testing.assert_close(scaling * new_b @ new_a, expected, rtol=0, atol=1e-10)
    assert new_a.shape == a.shape and new_b.shape == b.shape  # still a rank-r adapter
    # diagnostics: the top-k left subspace is kept, and R_align rises as the closed form says
    s = torch.linalg.svdvals(delta)
    s_k, s_rest = s[:rank].square().sum(), s[rank:].square().sum()
    assert ratio == pytest.approx((s_k / (s_k + s_rest)).sqrt().item(), rel=1e-12)
    u_old = torch.linalg.svd(delta)[0][:, :rank]
    u_new, s_new, _ = torch.linalg.svd(expected)
    torch.testing.assert_close(u_new[:, :rank] @ u_new[:, :rank].T, u_old @ u_old.T, rtol=0, atol=1e-10)
    r_new = (s_new[:rank].square().sum() / s_new.square().sum()).sqrt()
    r_formula = ((1 + alpha) ** 2 * s_k / ((1 + alpha) ** 2 * s_k + s_rest)).sqrt()
    torch.testing.assert_close(r_new, r_formula, rtol=1e-10, atol=0)


@pytest.mark.parametrize("rank", [0, 8, 20])
def test_full_rank_scales_b_only(rank):
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
    new_a, new_b, _ = extrapolate_lora_factors(a, b, 2.0, rank, 0.5)
    assert new_a is a and torch.equal(new_b, 1.5 * b)


def lora_model(seed=3):
    model = build_model("llama", seed=0)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(**TINY_LORA, init_lora_weights=False))


def lora_deltas(model):
    return {
        name: (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().double()
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }


def test_adapter_model_is_extrapolated_per_module(tmp_path):
    model = lora_model()
    before = lora_deltas(model)
    dense_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    lox_extrapolate(model, LoXConfig(rank=2, alpha=1.0), output_dir=str(tmp_path))
    after = lora_deltas(model)
    assert len(before) == 4  # q_proj, v_proj × 2 layers
    for name, delta in before.items():
        # fp32 factors against an fp64 oracle: QR + 4×4 SVD in fp32 err by ≈ r·eps·‖Δ‖ per entry; 1e-5·‖Δ‖ bounds it
        torch.testing.assert_close(after[name], delta + oracle(delta, 2, 1.0), rtol=0, atol=1e-5 * delta.norm().item())
        assert (after[name] - delta).norm() > 0.1 * delta.norm()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, dense_before[name]), name  # the base weights are not touched
    stats = json.loads((tmp_path / "lox_stats.json").read_text())
    assert stats["form"] == "adapter" and stats["num_modules"] == 4


# ----------------------------------------------------------------------------------------------- dense path
def test_dense_model_extrapolates_every_2d_weight_in_fp32():
    base = build_model("llama", seed=0).to(torch.bfloat16)
    aligned = build_model("llama", seed=0).to(torch.bfloat16)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    aligned_before = {n: p.clone() for n, p in aligned.named_parameters()}
    base_params = dict(base.named_parameters())
    lox_extrapolate(aligned, LoXConfig(rank=0, alpha=0.5), base_model=base)
    official_differs = 0
    for name, param in aligned.named_parameters():
        w, w0 = aligned_before[name], base_params[name]
        if param.dim() == 2:  # embeddings and LM head included, as the official code does
            expected = (w.float() + 0.5 * (w.float() - w0.float())).to(torch.bfloat16)
            assert torch.equal(param, expected), name
            official_differs += not torch.equal(param, w + 0.5 * (w - w0))  # the official bf16 arithmetic
        else:
            assert torch.equal(param, w), name
    assert official_differs > 0  # fp32 makes a difference here
    assert not torch.equal(aligned.lm_head.weight, aligned_before["lm_head.weight"])


def test_target_modules_restrict_the_dense_edit():
    base, aligned = build_model("llama", seed=0), build_model("llama", seed=1)
    before = {n: p.clone() for n, p in aligned.named_parameters()}
    lox_extrapolate(aligned, LoXConfig(alpha=1.0, target_modules=["q_proj"]), base_model=base)
    changed = {n for n, p in aligned.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="base_model"):
        lox_extrapolate(build_model("llama", seed=1), LoXConfig())
    with pytest.raises(ValueError, match="target_modules"):
        lox_extrapolate(lora_model(), LoXConfig(target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="rank"):
        LoXConfig(rank=-1)
    with pytest.raises(ValueError, match="alpha"):
        LoXConfig(alpha=-0.5)
    with pytest.raises(ValueError, match="base model has no weight"):
        lox_extrapolate(build_model("llama", seed=1), LoXConfig(), base_model=build_model("llama", hidden=16))


def test_alpha_zero_writes_nothing(tmp_path):
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lox_extrapolate(model, LoXConfig(alpha=0.0), output_dir=str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "lox_stats.json").exists()


# ----------------------------------------------------------------------------------------------- entry points
def test_callback_applies_lox_at_the_end_of_alignment(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model, reference = lora_model(), lora_model()
    lox_extrapolate(reference, LoXConfig(rank=1, alpha=0.5))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    LoXCallback(LoXConfig(rank=1, alpha=0.5)).on_train_end(args, TrainerState(), TrainerControl(), model=model)
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert (tmp_path / "lox_stats.json").exists()


def test_registry_entry():
    spec = get_defense("lox")
    assert spec.stage == "alignment" and spec.trainer_class is None and spec.config_class is LoXConfig
    assert spec.neutral_overrides == {"alpha": 0.0}


def test_prune_cli_on_an_alignment_adapter_and_a_dense_model(tmp_path):
    base_dir = tmp_path / "base"
    build_model("llama", seed=0).save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    adapter_dir = tmp_path / "alignment"
    lora_model().save_pretrained(adapter_dir)
    argv = ["prune", "--defense", "lox", "--model_name_or_path", str(adapter_dir), "--rank", "2", "--alpha", "0.5"]
    assert (
        main([*argv, "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--adapter_base_model", str(base_dir)])
        == 0
    )
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    lox_extrapolate(reference, LoXConfig(rank=2, alpha=0.5))
    saved = load_file(f"{tmp_path}/out/adapter_model.safetensors")
    expected = get_peft_model_state_dict(reference)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    info = json.loads((tmp_path / "out" / "defense_config.json").read_text())
    assert info["defense"] == "lox" and info["stage"] == "alignment" and info["hyperparameters"]["rank"] == 2

    dense_dir = tmp_path / "aligned"
    build_model("llama", seed=1).save_pretrained(dense_dir)
    argv = ["prune", "--defense", "lox", "--model_name_or_path", str(dense_dir), "--base_model", str(base_dir)]
    assert main([*argv, "--output_dir", str(tmp_path / "dense"), "--device", "cpu"]) == 0
    reference = build_model("llama", seed=1)
    lox_extrapolate(reference, LoXConfig(), base_model=build_model("llama", seed=0))
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in out.state_dict().items())


def test_align_command_points_to_prune(capsys):
    assert main(["align", "--defense", "lox", "--model_name_or_path", "x", "--output_dir", "y"]) == 2
    assert "trl-safety prune" in capsys.readouterr().err


def test_lowrank_svd_is_close_to_the_exact_one():
    """The randomized SVD is exact up to rounding on an update of rank ≤ its sketch, approximate beyond."""
    u, v = orthonormal(40, 12, 5), orthonormal(30, 12, 6)
    sigma = torch.tensor([9.0, 7.0, 5.0, 4.0] + [1e-3] * 8, dtype=torch.float64)
    w_base = torch.zeros(40, 30, dtype=torch.float64)
    results = {}
    for svd in ("exact", "lowrank"):
        aligned, base = OneMatrix(w_base + u @ torch.diag(sigma) @ v.T), OneMatrix(w_base)
        lox_extrapolate(aligned, LoXConfig(rank=2, alpha=1.0, svd=svd), base_model=base)
        results[svd] = aligned.proj.weight.detach()
    # rank 12 ≤ q = 12 columns: the sketch spans Δ's column space, so only fp64 rounding separates them
    torch.testing.assert_close(results["lowrank"], results["exact"], rtol=0, atol=1e-10)
    expected = u @ torch.diag(sigma) @ v.T + u[:, :2] @ torch.diag(sigma[:2]) @ v[:, :2].T
    torch.testing.assert_close(results["exact"], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="svd"):
        LoXConfig(svd="random")
