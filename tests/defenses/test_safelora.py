"""SafeLoRA: the projection and the layer selection equal an independent computation of the spec's formulas."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from transformers import TrainerCallback
from trl import SFTTrainer

from trl_safety import SAFELORA_STATS_NAME, SafeLoRACallback, SafeLoRAConfig, build_aligned_model, safelora_project
from trl_safety.registry import get_defense


QKV = ["q_proj", "k_proj", "v_proj"]


def perturbed(model, modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=5):
    """A stand-in "aligned" model: the base plus a full-rank update of different size on every module."""
    aligned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.endswith(tuple(modules)):
                scale = 0.01 + 0.05 * torch.rand((), generator=generator)
                module.weight += scale * torch.randn(module.weight.shape, generator=generator)
    return aligned


def setup(seed=0):
    base = build_model("llama", seed=seed)
    aligned = perturbed(base)
    torch.manual_seed(seed + 1)
    model = get_peft_model(copy.deepcopy(aligned), LoraConfig(r=4, target_modules=QKV, init_lora_weights=False))
    return base, aligned, model


def lora_layers(model):
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def reference(base, aligned, model):
    """cos(flatten(C·B·A), flatten(B·A)) and C·B per module, C = V Vᵀ/‖V‖_F, in float64."""
    base_modules, aligned_modules = dict(base.named_modules()), dict(aligned.named_modules())
    result = {}
    for name, module in lora_layers(model).items():
        v = (aligned_modules[name].weight - base_modules[name].weight).double()
        c = v @ v.T / torch.norm(v)
        a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
        cos = F.cosine_similarity((c @ b @ a).reshape(1, -1), (b @ a).reshape(1, -1)).item()
        result[name] = (cos, c @ b)
    return result


def assert_projected(model, before, expected, selected):
    for name, module in lora_layers(model).items():
        b = module.lora_B["default"].weight
        assert torch.equal(module.lora_A["default"].weight, before[name][0]), name
        if name in selected:
            # package projection vs the float64 reference (docs/testing.md): fp32 rounding, observed ≤ 2.2e-8 abs
            torch.testing.assert_close(b, expected[name][1].float(), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(b, before[name][1]), name


def factors(model):
    return {
        n: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone())
        for n, m in lora_layers(model).items()
    }


def test_threshold_mode_matches_independent_projection(tmp_path):
    base, aligned, model = setup()
    expected = reference(base, aligned, model)
    cosines = sorted(cos for cos, _ in expected.values())
    assert len(cosines) == 6 and cosines[0] < cosines[-1]
    threshold = (cosines[2] + cosines[3]) / 2
    before = factors(model)

    config = SafeLoRAConfig(select_layers_type="threshold", threshold=threshold)
    safelora_project(model, config, base_model=base, aligned_model=aligned, output_dir=str(tmp_path))

    selected = {name for name, (cos, _) in expected.items() if cos <= threshold}
    assert len(selected) == 3
    assert_projected(model, before, expected, selected)
    stats = json.loads((tmp_path / SAFELORA_STATS_NAME).read_text())
    assert stats["num_projected"] == 3
    for name, (cos, _) in expected.items():
        # package cosine vs float64 reference: observed ≤ 9e-8 relative
        assert stats["modules"][f"{name}.default"]["cosine"] == pytest.approx(cos, rel=1e-5)
        assert stats["modules"][f"{name}.default"]["projected"] == (name in selected)


@pytest.mark.parametrize("k", [1, 2, 5, 100])
def test_number_mode_projects_exactly_the_lowest_k(k):
    base, aligned, model = setup(seed=k)
    expected = reference(base, aligned, model)  # on the unmodified adapter
    before = factors(model)
    safelora_project(model, SafeLoRAConfig(num_proj_layers=k), base_model=base, aligned_model=aligned)
    lowest = set(sorted(expected, key=lambda name: expected[name][0])[:k])
    assert len(lowest) == min(k, 6)
    assert_projected(model, before, expected, lowest)


@pytest.mark.parametrize("config", [SafeLoRAConfig(num_proj_layers=0), SafeLoRAConfig("threshold", threshold=-1.0)])
def test_strength_zero_is_identity(config):
    base, aligned, model = setup()
    before = copy.deepcopy(model.state_dict())
    safelora_project(model, config, base_model=base, aligned_model=aligned)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_modules_unchanged_by_alignment_are_never_projected():
    base = build_model("llama")
    aligned = perturbed(base, modules=("q_proj",))
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(aligned), LoraConfig(r=4, target_modules=QKV, init_lora_weights=False))
    before = factors(model)
    safelora_project(model, SafeLoRAConfig("threshold", threshold=1.0), base_model=base, aligned_model=aligned)
    changed = {n for n, m in lora_layers(model).items() if not torch.equal(m.lora_B["default"].weight, before[n][1])}
    assert changed == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


def test_exact_projection_on_an_alignment_adapter(tmp_path):
    base = build_model("llama")
    torch.manual_seed(3)
    alignment = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, lora_alpha=16, target_modules=QKV, init_lora_weights=False)
    )
    alignment.save_pretrained(tmp_path / "alignment")
    aligned = build_aligned_model(base, str(tmp_path / "alignment"))
    torch.manual_seed(4)
    model = get_peft_model(copy.deepcopy(aligned), LoraConfig(r=4, target_modules=QKV, init_lora_weights=False))
    before = factors(model)
    base_modules, aligned_modules = dict(base.named_modules()), dict(aligned.named_modules())
    for name, module in lora_layers(alignment).items():
        a_al, b_al = module.lora_A["default"].weight, module.lora_B["default"].weight
        # aligned = base + merged alignment adapter, W + (alpha/r)·B·A; PEFT's merge vs this expression may round
        # differently: fp32 defaults (rtol 1.3e-6, atol 1e-5), observed equal
        torch.testing.assert_close(aligned_modules[name].weight, base_modules[name].weight + 8.0 * b_al @ a_al)

    safelora_project(
        model,
        SafeLoRAConfig("threshold", threshold=1.0, projection="exact"),
        base_model=base,
        aligned_model=str(tmp_path / "alignment"),  # an adapter folder: merged onto its recorded base
    )
    adapters = lora_layers(alignment)
    for name, module in lora_layers(model).items():
        # V = (alpha/r)·B_al·A_al has the column space of B_al: the exact projection is Q Qᵀ, Q an orthonormal basis
        q, _ = torch.linalg.qr(adapters[name].lora_B["default"].weight.double())
        expected_b = (q @ q.T @ before[name][1].double()).float()
        # package projection (its own QR) vs float64 Q Qᵀ: observed ≤ 6e-8 abs on entries ≤ 0.4
        torch.testing.assert_close(module.lora_B["default"].weight, expected_b, rtol=1e-4, atol=1e-5)
        assert torch.equal(module.lora_A["default"].weight, before[name][0])


def test_registry_entry_point_and_errors():
    base, aligned, model = setup()
    clone = copy.deepcopy(model)
    config = SafeLoRAConfig(num_proj_layers=3)
    safelora_project(model, config, base_model=base, aligned_model=aligned)
    spec = get_defense("safelora")
    assert spec.stage == "post-fine-tuning" and spec.trainer_class is None
    spec.post_hoc(clone, config, harmful_dataset=None, processing_class=None, base_model=base, aligned_model=aligned)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clone.parameters()))

    with pytest.raises(ValueError, match="no active LoRA adapter"):
        safelora_project(base, config, base_model=base, aligned_model=aligned)
    with pytest.raises(ValueError, match="needs the aligned model"):
        safelora_project(model, config, base_model=base)
    with pytest.raises(ValueError, match="threshold"):
        SafeLoRAConfig(threshold=2.0)
    with pytest.raises(ValueError, match="num_proj_layers"):
        SafeLoRAConfig(num_proj_layers=-1)
    with pytest.raises(ValueError, match="select_layers_type"):
        SafeLoRAConfig(select_layers_type="auto")


class SnapshotAtTrainEnd(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_callback_saves_the_projected_final_adapter(tmp_path):
    base = build_model("llama")
    aligned = perturbed(base)
    config = SafeLoRAConfig(num_proj_layers=2)
    snapshot = SnapshotAtTrainEnd()
    trainer = SFTTrainer(
        model=copy.deepcopy(aligned),
        args=tiny_config(tmp_path),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=QKV),
        callbacks=[snapshot, SafeLoRACallback(config, base_model=base, aligned_model=aligned)],
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / SAFELORA_STATS_NAME).read_text())["num_projected"] == 2

    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if name in snapshot.adapter:
                param.copy_(snapshot.adapter[name])
    unprojected = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    safelora_project(trainer.model, config, base_model=base, aligned_model=aligned)
    reference_state = get_peft_model_state_dict(trainer.model)
    assert saved.keys() == reference_state.keys()
    assert all(torch.equal(saved[k], reference_state[k]) for k in saved)
    assert sum(not torch.equal(saved[k], unprojected[k]) for k in saved) == 2  # two lora_B matrices projected
