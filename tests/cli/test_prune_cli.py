"""`trl-safety prune`: adapter folders are loaded on their base, repaired, and saved like the Python API does it."""

import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset
from transformers import AutoModelForCausalLM

from trl_safety import AntidoteConfig, SafeLoRAConfig, antidote_prune, build_aligned_model, safelora_project
from trl_safety.cli.main import main


def save_model(path, seed=0):
    build_model("llama", seed=seed).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def save_adapter(model_dir, path, seed, r=4):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return str(path)


def assert_same_adapter(saved_dir, model):
    saved = load_file(f"{saved_dir}/adapter_model.safetensors")
    reference = get_peft_model_state_dict(model)
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)


def test_prune_antidote_on_an_adapter_folder(tmp_path):
    model_dir = save_model(tmp_path / "model")
    adapter_dir = save_adapter(model_dir, tmp_path / "adapter", seed=1)
    harmful = tmp_path / "harmful.jsonl"
    prompt_completion_dataset(5, seed=2).to_json(str(harmful))
    out = tmp_path / "out"

    argv = [
        "prune",
        "--defense",
        "antidote",
        "--model_name_or_path",
        adapter_dir,
        "--harmful_dataset_name",
        str(harmful),
    ]
    argv += ["--prune_ratio", "0.25", "--output_dir", str(out), "--device", "cpu"]
    assert main(argv) == 0

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    antidote_prune(
        reference,
        prompt_completion_dataset(5, seed=2),
        AntidoteConfig(prune_ratio=0.25),
        processing_class=build_tokenizer(),
    )
    assert_same_adapter(out, reference)
    stats = json.loads((out / "antidote_mask_stats.json").read_text())
    assert stats["prune_target"] == "adapter" and stats["pruned_fraction"] == 0.25
    info = json.loads((out / "defense_config.json").read_text())
    assert info["defense"] == "antidote" and info["is_adapter"] and info["base_model"] == model_dir
    assert info["hyperparameters"]["prune_ratio"] == 0.25
    assert "Antidote" in (out / "README.md").read_text()


def test_prune_safelora_with_an_alignment_adapter(tmp_path):
    base_dir = save_model(tmp_path / "base")
    alignment_dir = save_adapter(base_dir, tmp_path / "alignment", seed=3, r=2)
    aligned = build_aligned_model(base_dir, alignment_dir)
    aligned.save_pretrained(tmp_path / "aligned")
    finetuned_dir = save_adapter(str(tmp_path / "aligned"), tmp_path / "finetuned", seed=4)
    out = tmp_path / "out"

    argv = ["prune", "--defense", "safelora", "--model_name_or_path", finetuned_dir, "--base_model", base_dir]
    argv += ["--aligned_model", alignment_dir, "--num_proj_layers", "3", "--output_dir", str(out), "--device", "cpu"]
    assert main(argv) == 0

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "aligned"), finetuned_dir)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(reference).items()}
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    safelora_project(reference, SafeLoRAConfig(num_proj_layers=3), base_model=base, aligned_model=aligned)
    assert_same_adapter(out, reference)
    saved = load_file(f"{out}/adapter_model.safetensors")
    assert sum(not torch.equal(saved[k], before[k]) for k in saved) == 3
    assert json.loads((out / "safelora_stats.json").read_text())["num_projected"] == 3


def test_prune_needs_a_post_fine_tuning_defense(capsys):
    assert main(["prune", "--model", "x", "--output_dir", "y"]) == 2
    assert "antidote" in capsys.readouterr().err
    assert main(["prune", "--help"]) == 0
