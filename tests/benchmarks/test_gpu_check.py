"""`benchmarks/gpu_check.py` in its dry mode (`--device cpu`, tiny shapes), so the GPU script cannot rot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up there
    spec.loader.exec_module(module)
    return module


def test_relative_error_is_the_l2_error_over_all_parameters(gpu_check):
    reference = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # ‖ref‖ = 5
    update = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[4.0 + 2.0]])}  # difference (0, 1, 2): ‖·‖ = √5
    assert gpu_check.relative_error(update, reference) == pytest.approx(5**0.5 / 5)
    assert gpu_check.relative_error(reference, reference) == 0.0
    with pytest.raises(ValueError, match="parameter sets differ"):
        gpu_check.relative_error({"a": reference["a"]}, reference)
    with pytest.raises(ValueError, match="reference update is zero"):
        gpu_check.relative_error(update, {k: torch.zeros_like(v) for k, v in reference.items()})


def test_dry_mode_prints_one_table_and_exits_by_the_checks(gpu_check, tmp_path, capsys):
    # One defense keeps it within the fast-test budget: T-Vaccine (a probe pass, the all-layers override of the
    # gradient check, the layer-freezing run of the memory part); the full registry is the same loop
    output = tmp_path / "rows.json"
    code = gpu_check.main(["--device", "cpu", "--defenses", "t-vaccine", "--perf-steps", "2", "--output", str(output)])
    printed = capsys.readouterr().out
    rows = json.loads(output.read_text())
    assert code == (1 if any(not r["passed"] for r in rows) else 0)
    gradient = {r["defense"]: r for r in rows if r["check"] == "gradient"}
    assert set(gradient) == {"sft", "t-vaccine"}
    # plain SFT in bf16 autocast vs fp32: a few bf16 units (measured 3.9e-3), far inside the 5e-2 tolerance and > 0
    assert gradient["sft"]["passed"] and "rel. error" in gradient["sft"]["value"]
    assert 0 < float(gradient["sft"]["value"].split()[-1]) < 0.05
    assert {r["defense"] for r in rows if r["check"] == "memory/time"} == {"sft", "t-vaccine"}
    assert [r["value"] for r in rows if r["check"] == "ranks"] == ["skipped: 0 GPU(s)"]
    assert "| check | defense | value | limit | result |" in printed
    assert "checks passed" in printed


def test_a_wrong_gradient_fails_the_check(gpu_check, monkeypatch):
    """The check must be able to fail: a bf16 run whose update is off by 10 % is reported FAIL, with exit code 1."""
    real = gpu_check._update

    def skewed(defense, shape, device, bf16, tokenizer):
        update = real(defense, shape, device, bf16, tokenizer)
        return {n: u * 1.1 for n, u in update.items()} if bf16 else update

    monkeypatch.setattr(gpu_check, "_update", skewed)
    rows = gpu_check.check_gradients([], gpu_check.TINY, "cpu", 0.05, gpu_check._overhead()._build_tokenizer(512))
    (row,) = rows
    assert row["defense"] == "sft" and not row["passed"]
    assert float(row["value"].split()[-1]) == pytest.approx(0.1, abs=0.01)
