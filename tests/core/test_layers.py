import pytest
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from testing_utils import build_model

from trl_safety.core import find_modules, get_attention_modules, get_decoder_layers, unwrap_model


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("use_lora", [False, True])
def test_decoder_layers_and_attention_found_structurally(arch, use_lora):
    model = build_model(arch, layers=3)
    expected_layers = model.model.layers
    expected_attention = [layer.self_attn for layer in expected_layers]
    if use_lora:
        model = _lora(model)
    layers = get_decoder_layers(model)
    assert layers is expected_layers
    assert len(layers) == 3
    attention = get_attention_modules(model)
    assert all(a is e for a, e in zip(attention, expected_attention, strict=True))


def test_unwrap_model_strips_peft(arch):
    model = build_model(arch)
    assert unwrap_model(_lora(model)) is model


def test_layers_path_override_and_errors():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.h = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    model = Custom()
    with pytest.raises(ValueError, match="Could not locate the decoder layers of Custom"):
        get_decoder_layers(model)
    assert get_decoder_layers(model, layers_path="transformer.h") is model.transformer.h
    with pytest.raises(ValueError, match="does not resolve on Custom"):
        get_decoder_layers(model, layers_path="transformer.blocks")
    with pytest.raises(ValueError, match="has no attention submodule `self_attn`"):
        get_attention_modules(model, layers_path="transformer.h")


def test_find_modules_by_suffix_and_regex():
    model = _lora(build_model("llama", layers=2))
    by_suffix = find_modules(model, ["q_proj"])
    assert [name for name, _ in by_suffix] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    by_regex = find_modules(model, r".*\.v_proj\.lora_[AB]\.default", nn.Linear)
    assert len(by_regex) == 4
    with pytest.raises(ValueError, match="No module of LlamaForCausalLM matches"):
        find_modules(model, ["nonexistent"])


def test_is_peft_model_is_false_after_merge_and_unload():
    """A merged model is a plain model again, though under peft 0.18 it keeps a stale `peft_config` attribute (the
    bench then took it for an adapter and fine-tuned a model with nothing trainable)."""
    from trl_safety.core.layers import is_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(build_model("llama"), lora)
    assert is_peft_model(peft_model)
    merged = peft_model.merge_and_unload()
    assert not is_peft_model(merged)
    assert is_peft_model(get_peft_model(merged, lora))
