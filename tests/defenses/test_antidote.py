"""Antidote: pruned weights equal an independent Wanda computation (per-row top-α of |W|·‖X‖)."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from testing_utils import (
    build_model,
    build_tokenizer,
    conversational_dataset,
    prompt_completion_dataset,
    tiny_config,
)
from transformers import TrainerCallback
from trl import SFTTrainer

from trl_safety import ANTIDOTE_STATS_NAME, AntidoteCallback, AntidoteConfig, antidote_prune
from trl_safety.registry import get_defense


QKV = ("q_proj", "k_proj", "v_proj")


def lora_model(targets=QKV, seed=0, dropout=0.1):
    model = build_model("llama", seed=seed)
    torch.manual_seed(seed + 1)
    # init_lora_weights=False: random B, so no score ties; dropout > 0 checks the calibration runs in eval mode
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(model, config)


def token_ids_like_sft(dataset, tokenizer):
    """The full prompt+answer sequence, tokenized as SFT training sees it (written out here, not imported)."""
    ids = []
    for example in dataset:
        if "messages" in example:
            ids.append(
                tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True)["input_ids"]
            )
        else:
            ids.append(tokenizer(example["prompt"] + example["completion"] + tokenizer.eos_token)["input_ids"])
    return ids


@torch.no_grad()
def captured_inputs(model, modules, sequences):
    """Inputs of each module over all calibration samples, one forward per sample, in eval mode."""
    captured = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(lambda _m, inputs, _o, name=name: captured[name].append(inputs[0][0].clone()))
        for name, module in modules.items()
    ]
    was_training = model.training
    model.eval()
    for ids in sequences:
        model(input_ids=torch.tensor([ids]))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return captured


def expected_wanda(weight, inputs, ratio):
    """Zero the top-α of each row of |W|·‖X‖, ‖X_j‖ = sqrt(mean over samples of Σ_tokens x_j²)."""
    squares = torch.stack([(x.double() ** 2).sum(dim=0) for x in inputs]).sum(dim=0)
    norm = torch.sqrt(squares / len(inputs)).float()
    return zero_row_top(weight, weight.abs() * norm, ratio)


def zero_row_top(weight, scores, ratio):
    cols = weight.shape[1]
    k = cols - int(cols * (1 - ratio))
    expected = weight.detach().clone()
    if k:
        expected.scatter_(1, scores.topk(k, dim=1).indices, 0.0)
    return expected


def lora_factors(model):
    factors = {}
    for name, module in model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            factors[name] = module
    return factors


@pytest.mark.parametrize("data_format", ["prompt_completion", "conversational"])
def test_lora_factors_match_independent_wanda(data_format):
    tokenizer = build_tokenizer()
    dataset = (prompt_completion_dataset if data_format == "prompt_completion" else conversational_dataset)(5)
    model = lora_model()
    model.train()
    factors = lora_factors(model)
    assert len(factors) == 12  # A and B in q, k, v of 2 layers
    inputs = captured_inputs(model, factors, token_ids_like_sft(dataset, tokenizer))
    expected = {name: expected_wanda(module.weight, inputs[name], 0.25) for name, module in factors.items()}
    base_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}

    antidote_prune(model, dataset, AntidoteConfig(prune_ratio=0.25), processing_class=tokenizer)

    for name, module in factors.items():
        assert torch.equal(module.weight, expected[name]), name
        assert (module.weight == 0).sum() == module.weight.shape[0] * (module.weight.shape[1] // 4)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), name
    assert model.training and model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout.default.training


def test_full_weights_match_independent_wanda(tmp_path):
    tokenizer = build_tokenizer()
    dataset = prompt_completion_dataset(4, seed=3)
    model = build_model("qwen2", seed=1)
    targets = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))}
    inputs = captured_inputs(model, targets, token_ids_like_sft(dataset, tokenizer))
    expected = {n: expected_wanda(m.weight, inputs[n], 0.1) for n, m in targets.items()}
    before = {n: p.clone() for n, p in model.named_parameters()}

    config = AntidoteConfig(prune_ratio=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    antidote_prune(model, dataset, config, processing_class=tokenizer, output_dir=str(tmp_path))

    for name, module in targets.items():
        assert torch.equal(module.weight, expected[name]), name
    for name, param in model.named_parameters():
        if not any(name.startswith(target) for target in targets):
            assert torch.equal(param, before[name]), name  # k_proj, o_proj, mlp up/gate, biases, embeddings
    stats = json.loads((tmp_path / ANTIDOTE_STATS_NAME).read_text())
    assert stats["prune_target"] == "weights" and stats["calibration"]["samples"] == 4
    expected_counts = {
        f"{n}.weight": int((expected[n] == 0).sum() - (before[f"{n}.weight"] == 0).sum()) for n in targets
    }
    assert {n: s["pruned"] for n, s in stats["modules"].items()} == expected_counts
    # per row: cols - int(cols * 0.9): 32 -> 4 (q/v, 32 columns), 64 -> 7 (down_proj, 64 columns)
    assert stats["modules"]["model.layers.0.mlp.down_proj.weight"]["pruned"] == 32 * 7
    assert stats["total_pruned"] == sum(expected_counts.values())


def test_batched_calibration_ignores_padding():
    tokenizer = build_tokenizer()
    dataset = prompt_completion_dataset(5, seed=7)
    one, three = lora_model(), lora_model()
    antidote_prune(one, dataset, AntidoteConfig(prune_ratio=0.3), processing_class=tokenizer)
    antidote_prune(
        three, dataset, AntidoteConfig(prune_ratio=0.3, calibration_batch_size=3), processing_class=tokenizer
    )
    for (name, p1), (_, p3) in zip(one.named_parameters(), three.named_parameters()):
        assert torch.equal(p1 == 0, p3 == 0), name


def test_prune_ratio_zero_is_identity():
    model = lora_model()
    before = copy.deepcopy(model.state_dict())
    antidote_prune(
        model, prompt_completion_dataset(3), AntidoteConfig(prune_ratio=0.0), processing_class=build_tokenizer()
    )
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_magnitude_and_random_variants_need_no_data():
    model = lora_model()
    factors = lora_factors(model)
    expected = {n: zero_row_top(m.weight, m.weight.abs(), 0.2) for n, m in factors.items()}
    antidote_prune(model, None, AntidoteConfig(prune_ratio=0.2, variant="magnitude"))
    assert all(torch.equal(m.weight, expected[n]) for n, m in factors.items())

    def random_zeros(seed):
        model = lora_model()
        antidote_prune(model, None, AntidoteConfig(prune_ratio=0.25, variant="random", seed=seed))
        return {n: m.weight == 0 for n, m in lora_factors(model).items()}

    first, again, other = random_zeros(0), random_zeros(0), random_zeros(1)
    for name, zeros in first.items():
        assert torch.equal(zeros, again[name])
        cols = zeros.shape[1]
        assert (zeros.sum(dim=1) == cols - int(cols * 0.75)).all()
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_adapter_mode_skips_modules_without_lora_and_registry_entry_point():
    tokenizer = build_tokenizer()
    dataset = prompt_completion_dataset(3)
    model = lora_model(targets=("q_proj",))  # the default target_modules also name k/v, which carry no adapter
    clone = copy.deepcopy(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    antidote_prune(model, dataset, AntidoteConfig(), processing_class=tokenizer)
    spec = get_defense("antidote")
    assert spec.stage == "post-fine-tuning" and spec.trainer_class is None
    spec.post_hoc(clone, AntidoteConfig(), harmful_dataset=dataset, processing_class=tokenizer, base_model=None)
    for (name, p), (_, q) in zip(model.named_parameters(), clone.named_parameters()):
        assert torch.equal(p, q), name
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == 4 and all("q_proj.lora_" in n for n in changed)


def test_clear_errors():
    with pytest.raises(ValueError, match="prune_ratio"):
        AntidoteConfig(prune_ratio=1.5)
    with pytest.raises(ValueError, match="variant"):
        AntidoteConfig(variant="sparsegpt")
    with pytest.raises(ValueError, match="harmful calibration data"):
        antidote_prune(lora_model(), None, AntidoteConfig())
    with pytest.raises(ValueError, match="No module"):
        antidote_prune(lora_model(), None, AntidoteConfig(variant="magnitude", target_modules=["nope_proj"]))
    with pytest.raises(ValueError, match="carries a LoRA adapter"):
        antidote_prune(lora_model(targets=("o_proj",)), None, AntidoteConfig(variant="magnitude"))
    with pytest.raises(ValueError, match="tokenizer"):
        antidote_prune(lora_model(), prompt_completion_dataset(2), AntidoteConfig())


class SnapshotAtTrainEnd(TrainerCallback):
    """Placed before AntidoteCallback: keeps the adapter as training left it."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_callback_saves_the_pruned_final_model(tmp_path):
    tokenizer = build_tokenizer()
    harmful = prompt_completion_dataset(4, seed=11)
    config = AntidoteConfig(prune_ratio=0.2)
    snapshot = SnapshotAtTrainEnd()
    trainer = SFTTrainer(
        model=build_model("llama"),
        args=tiny_config(tmp_path),
        train_dataset=prompt_completion_dataset(8),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=list(QKV), lora_dropout=0.0),
        callbacks=[snapshot, AntidoteCallback(harmful, config)],
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert (tmp_path / ANTIDOTE_STATS_NAME).exists()

    # Independently: the final (unpruned) adapter, pruned by antidote_prune, equals what was saved
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if name in snapshot.adapter:
                param.copy_(snapshot.adapter[name])
    antidote_prune(trainer.model, harmful, config, processing_class=tokenizer)
    reference = get_peft_model_state_dict(trainer.model)
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    assert sum(int((v == 0).sum()) for v in saved.values()) > 0
