import torch
from peft import LoraConfig, get_peft_model
from testing_utils import build_model

from trl_safety.core import ParameterSnapshot, trainable_parameters


def test_trainable_parameters_are_lora_factors_under_peft():
    model = get_peft_model(build_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj"]))
    names = list(trainable_parameters(model))
    assert names and all("lora_" in name for name in names)


def test_snapshot_restore_is_bit_exact_in_bf16():
    model = build_model("llama").to(torch.bfloat16)
    params = trainable_parameters(model)
    original = {n: p.detach().clone() for n, p in params.items()}
    snapshot = ParameterSnapshot(params)
    step = {n: torch.randn_like(p) * 1e-3 for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.sub_(step[n])
        # Undoing the step arithmetically is not exact in bf16 (this is why snapshots exist)
        for n, p in params.items():
            p.add_(step[n])
    assert any(not torch.equal(p, original[n]) for n, p in params.items())
    snapshot.restore()
    assert all(torch.equal(p, original[n]) for n, p in params.items())


def test_snapshot_state_dict_round_trip_and_distance():
    model = build_model("llama")
    params = trainable_parameters(model)
    snapshot = ParameterSnapshot(params)
    state = snapshot.state_dict()
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    expected = sum(p.numel() for p in params.values())
    # Σ((p + 1) − p)² vs the count: each term is 1 only up to the rounding of p + 1, then a long sum; fp32 defaults
    # (rtol 1.3e-6 on ≈5e4, i.e. ±0.06) cover that, observed equal; a missing tensor (≥ 32 entries) is off by ≥ 32
    torch.testing.assert_close(snapshot.squared_distance(), torch.tensor(float(expected)))
    other = ParameterSnapshot(params)  # taken from the moved weights
    other.load_state_dict(state)
    other.restore()
    assert all(torch.equal(params[n], state[n]) for n in params)
