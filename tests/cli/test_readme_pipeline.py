"""README's command-line pipeline (align → merge → sft) runs as written, and `trl-safety merge` merges exactly.

The README block is read from the README itself; its commands run through `trl_safety.cli.main.main` in a folder
where the names it uses exist: `meta-llama/Llama-2-7b-hf` is a folder holding a tiny Llama, `refusals.jsonl` and
`customer.jsonl` are small prompt/completion files. Only flags that size the run for a CPU are appended (steps,
lengths, precision); the commands' own flags are untouched, so a renamed option or a missing step fails here.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset

from trl_safety.cli.main import main


ROOT = Path(__file__).resolve().parents[2]
# What makes the README's 7B-sized commands a CPU test run; nothing here names a model, a dataset or a defense
SIZING = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32", "--report_to", "none"]
SIZING += ["--save_strategy", "no", "--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false"]


def readme_pipeline() -> list[list[str]]:
    """The `trl-safety` commands of the README's first bash block that runs `trl-safety align` (lines joined)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    block = next(b for b in blocks if "trl-safety align" in b)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("trl-safety ")]


def test_readme_pipeline_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tmp_path / "meta-llama" / "Llama-2-7b-hf"
    build_model("llama").save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    prompt_completion_dataset(8, seed=1).to_json("refusals.jsonl")
    prompt_completion_dataset(8, seed=2).to_json("customer.jsonl")

    commands = readme_pipeline()
    assert [argv[1] for argv in commands] == ["align", "merge", "sft", "defenses"]
    for argv in commands:
        extra = SIZING if argv[1] in ("align", "sft") else []
        assert main([*argv[1:], *extra]) == 0, argv

    assert (tmp_path / "vaccine-aligned" / "adapter_config.json").is_file()
    merged = tmp_path / "vaccine-aligned-merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert not list(merged.glob("*.bin"))  # safetensors only
    assert (tmp_path / "lisa-run" / "model.safetensors").is_file()
    assert (tmp_path / "lisa-run" / "defense_config.json").is_file()


@pytest.fixture
def random_adapter(tmp_path):
    """A tiny Llama and a LoRA adapter with random (non-zero) factors on q/v, saved as folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    build_model("llama").save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return base_dir, tmp_path / "adapter"


def test_merge_adds_the_scaled_lora_product(random_adapter, tmp_path):
    """Each merged weight is W + (alpha / r) · B @ A, computed here from the saved factors."""
    base_dir, adapter_dir = random_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--model_name_or_path", str(adapter_dir), "--output_dir", str(out)]) == 0

    base = load_file(base_dir / "model.safetensors")
    factors = load_file(adapter_dir / "adapter_model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == base.keys()
    scaling = 8 / 4
    changed = 0
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        a_key = next((k for k in factors if k.startswith(f"base_model.model.{module}.lora_A")), None)
        if a_key is None:
            assert torch.equal(merged[name], weight), name  # untouched modules are copied bit for bit
            continue
        b_key = a_key.replace("lora_A", "lora_B")
        expected = weight + scaling * (factors[b_key] @ factors[a_key])
        delta = (expected - weight).abs().max()
        # PEFT forms the same fp32 product but may scale before the matmul: a few ulps of the delta, plus the add's
        # rounding on the weight (4 eps relative). A missing or doubled scaling would be off by the delta, 1e5x atol
        atol = 1e-5 * float(delta)
        torch.testing.assert_close(merged[name], expected, rtol=4 * 1.2e-7, atol=atol)
        assert float(delta) > 1e-3 * float(weight.abs().max())  # the random adapter moves the weight measurably
        changed += 1
    assert changed == 2 * build_model("llama").config.num_hidden_layers
    assert os.path.isfile(out / "tokenizer_config.json")
