import pytest
import torch
from testing_utils import build_model

from trl_safety.core import add_to_outputs, capture_outputs, get_attention_modules, gradient_checkpointing_disabled


def _hook_count(modules):
    return sum(len(m._forward_hooks) for m in modules)


def test_capture_records_attention_outputs():
    model = build_model("llama")
    attention = get_attention_modules(model)
    ids = torch.randint(0, 100, (2, 5))
    with capture_outputs(attention) as captured:
        model(input_ids=ids)
    assert [c.shape for c in captured] == [torch.Size([2, 5, 32])] * 2
    assert _hook_count(attention) == 0


def test_add_to_outputs_changes_the_forward_by_the_delta():
    model = build_model("llama")
    attention = get_attention_modules(model)
    ids = torch.randint(0, 100, (1, 4))
    deltas = [torch.zeros(1, 4, 32), torch.full((1, 4, 32), 0.5)]
    with capture_outputs(attention) as clean:
        model(input_ids=ids)
    # Capture is registered after the perturbation, so it sees the perturbed output
    with add_to_outputs(attention, deltas), capture_outputs(attention) as perturbed:
        model(input_ids=ids)
    # Exact (docs/testing.md): the same forward on the same input, and adding 0 or 0.5 is one correctly rounded
    # fp32 op on every kernel
    torch.testing.assert_close(perturbed[0], clean[0], rtol=0, atol=0)
    # Layer 1's input changed through layer 0? No: delta 0 on layer 0, so layer 1's own output moves by exactly 0.5
    torch.testing.assert_close(perturbed[1], clean[1] + 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("context", ["capture", "add"])
def test_hooks_removed_after_exception(context):
    model = build_model("llama")
    attention = get_attention_modules(model)
    ids = torch.randint(0, 100, (1, 4))
    with pytest.raises(RuntimeError):
        if context == "capture":
            with capture_outputs(attention):
                model(input_ids=ids)
                raise RuntimeError("boom")
        else:
            # A perturbation of the wrong shape raises inside the forward hook
            with add_to_outputs(attention, [torch.zeros(1, 3, 32)] * 2):
                model(input_ids=ids)
    assert _hook_count(attention) == 0
    assert all(len(m._forward_pre_hooks) == 0 for m in attention)


def test_gradient_checkpointing_disabled_restores_flags():
    model = build_model("llama")
    model.gradient_checkpointing_enable()
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    with pytest.raises(ValueError), gradient_checkpointing_disabled(layers):
        assert not any(layer.gradient_checkpointing for layer in layers)
        raise ValueError
    assert all(layer.gradient_checkpointing for layer in layers)
