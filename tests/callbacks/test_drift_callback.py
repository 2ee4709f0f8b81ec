"""EmbeddingDriftCallback: logged drift equals an independent per-prompt computation from the weights at that step."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from transformers import TrainerCallback
from trl import SFTTrainer

from trl_safety.callbacks import EmbeddingDriftCallback


PROMPTS = [
    "Explain how to do placeholder item",
    "tell me a story about the cat",
    "how can you make a dog",
    "write",
]


class SnapshotCallback(TrainerCallback):
    """Rebuilds the model as it was after every optimizer step (the weights the drift callback measured).

    A state-dict copy loaded into a fresh model: `copy.deepcopy` of a trained model would keep accelerate's forward
    wrapper, which still calls the original model.
    """

    def __init__(self, factory):
        self.factory = factory
        self.models = {}

    def _snapshot(self, state, model):
        fresh = self.factory()
        fresh.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        self.models[state.global_step] = fresh

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._snapshot(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._snapshot(state, model)


class LogRecorder(TrainerCallback):
    """Stands in for a `report_to` integration: those receive values through `on_log`, like this one."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


@torch.no_grad()
def manual_drift(model0, model1, tokenizer, prompts, attr=None):
    """Plain forward hooks, one unpadded prompt at a time: mean over tokens of ‖h1 − h0‖₂ per layer."""

    def states(model, ids):
        layers = _decoder_layers(model)
        modules = [getattr(layer, attr) if attr else layer for layer in layers]
        out = [None] * len(modules)
        handles = [
            m.register_forward_hook(lambda _m, _i, o, k=k: out.__setitem__(k, o[0] if isinstance(o, tuple) else o))
            for k, m in enumerate(modules)
        ]
        was_training = model.training
        model.eval()
        model(input_ids=ids)
        model.train(was_training)
        for h in handles:
            h.remove()
        return [o[0] for o in out]  # [T, d]

    per_layer = None
    count = 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        h0, h1 = states(model0, ids), states(model1, ids)
        norms = [torch.linalg.vector_norm(a.double() - b.double(), dim=-1).sum() for a, b in zip(h1, h0)]
        per_layer = norms if per_layer is None else [p + n for p, n in zip(per_layer, norms)]
        count += ids.shape[1]
    per_layer = [float(p / count) for p in per_layer]
    return per_layer, sum(per_layer) / len(per_layer)


def _drift_entries(log_history):
    return {entry["step"]: entry for entry in log_history if "embedding_drift" in entry}


def _train(tmp_path, model, callbacks_fn, peft_config=None, **config):
    tokenizer = build_tokenizer()
    args = tiny_config(tmp_path, max_steps=4, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", **config)
    trainer = SFTTrainer(
        model,
        args,
        train_dataset=prompt_completion_dataset(8),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    for callback in callbacks_fn(trainer):
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def test_zero_at_start_then_matches_manual_computation(tmp_path):
    tokenizer = build_tokenizer()
    snapshots, recorder = SnapshotCallback(lambda: build_model("llama", layers=3)), LogRecorder()
    drift = {}

    def callbacks(trainer):
        drift["cb"] = EmbeddingDriftCallback(
            PROMPTS, processing_class=tokenizer, every_n_steps=2, trainer=trainer, batch_size=3
        )
        return [drift["cb"], snapshots, recorder]

    trainer = _train(tmp_path, build_model("llama", layers=3), callbacks)
    entries = _drift_entries(trainer.state.log_history)
    assert sorted(entries) == [0, 2, 4]
    # Step 0: the reference measured against itself, exactly zero
    assert entries[0]["embedding_drift"] == 0.0
    assert all(entries[0][f"embedding_drift/layer_{i}"] == 0.0 for i in range(3))
    for step in (2, 4):
        per_layer, overall = manual_drift(snapshots.models[0], snapshots.models[step], tokenizer, PROMPTS)
        assert overall > 1e-3  # SGD with lr 0.5 moved the weights
        # callback (batches of 3, padded) vs one unpadded prompt at a time (docs/testing.md): fp32 hidden states,
        # norms summed in float64; observed ≤ 3e-16 relative here, rel 1e-5 leaves room for fp32 hidden-state noise
        for i, expected in enumerate(per_layer):
            assert entries[step][f"embedding_drift/layer_{i}"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert entries[step]["embedding_drift"] == pytest.approx(overall, rel=1e-5, abs=1e-7)
    # Drift grows with training on this run, and reached report_to integrations through on_log
    assert entries[4]["embedding_drift"] > entries[2]["embedding_drift"]
    logged = {step for step, logs in recorder.logs if "embedding_drift" in logs}
    assert logged == {0, 2, 4}
    assert [step for step, _ in drift["cb"].history] == [0, 2, 4]
    # The regular training loss is still logged at every step, unaffected by the extra log calls
    assert sum("loss" in entry for entry in trainer.state.log_history) == 4


def test_lora_with_dropout_selected_layers_and_attention_position(tmp_path):
    """PEFT model with gradient checkpointing, LoRA dropout 0.5 (drift is only deterministic if measured in eval
    mode), last layer only, attention outputs."""
    tokenizer = build_tokenizer()
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj", "o_proj"])

    def factory():
        return get_peft_model(build_model("llama", layers=2), copy.deepcopy(peft_config))

    snapshots = SnapshotCallback(factory)
    dataset = prompt_completion_dataset(3, seed=5)  # conversational-free dataset input with a "prompt" column
    prompts = dataset["prompt"]
    drift = {}

    def callbacks(trainer):
        drift["cb"] = EmbeddingDriftCallback(
            dataset, every_n_steps=4, layers=[-1], trainer=trainer, position="attention"
        )
        return [drift["cb"], snapshots]

    trainer = _train(tmp_path, factory(), callbacks, gradient_checkpointing=True)
    assert hasattr(trainer.model, "peft_config")
    entries = _drift_entries(trainer.state.log_history)
    assert sorted(entries) == [0, 4]
    assert set(entries[4]) >= {"embedding_drift", "embedding_drift/layer_1"}
    assert "embedding_drift/layer_0" not in entries[4]
    assert entries[0]["embedding_drift"] == 0.0
    per_layer, _ = manual_drift(snapshots.models[0], snapshots.models[4], tokenizer, prompts, attr="self_attn")
    assert per_layer[1] > 1e-4
    # batched callback vs unpadded hooks, on a drift ≈0.03 (docs/testing.md): observed ≤ 6e-9 relative
    assert entries[4]["embedding_drift/layer_1"] == pytest.approx(per_layer[1], rel=1e-5, abs=1e-7)
    assert entries[4]["embedding_drift"] == entries[4]["embedding_drift/layer_1"]


def test_measurement_restores_module_modes_and_leaves_grads(tmp_path):
    tokenizer = build_tokenizer()
    model = get_peft_model(build_model("qwen2"), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1))
    model.train()
    frozen = _decoder_layers(model)[0].mlp
    frozen.eval()  # a module deliberately in eval must stay so
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    callback = EmbeddingDriftCallback(
        [[{"role": "user", "content": "tell me about the moon"}]], processing_class=tokenizer, every_n_steps=1
    )
    args = tiny_config(tmp_path)
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    assert model.training and not frozen.training
    assert all(p.grad is None or torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    # Without a trainer the values still land in the log history
    assert state.log_history == [
        {"embedding_drift": 0.0, "embedding_drift/layer_0": 0.0, "embedding_drift/layer_1": 0.0, "step": 0}
    ]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    state.global_step = 1
    callback.on_step_end(args, state, TrainerControl(), model=model)
    assert state.log_history[-1]["step"] == 1 and state.log_history[-1]["embedding_drift"] > 0
    assert model.training and not frozen.training


def test_padding_does_not_change_the_value(tmp_path):
    """Batch sizes 1 and 4 give the same drift: padding is masked and does not leak into real tokens."""
    tokenizer = build_tokenizer()
    model = build_model("mistral")
    values = []
    for batch_size in (1, 4):
        callback = EmbeddingDriftCallback(PROMPTS, processing_class=tokenizer, batch_size=batch_size)
        from transformers import TrainerControl, TrainerState

        callback.on_train_begin(tiny_config(tmp_path), TrainerState(), TrainerControl(), model=model)
        moved = copy.deepcopy(model)
        with torch.no_grad():
            moved.model.layers[0].self_attn.o_proj.weight.mul_(1.5)
        values.append(callback.compute_drift(moved, "cpu"))
    assert values[0]["embedding_drift"] > 0
    for key in values[0]:
        # batch 1 vs 4, i.e. unpadded vs padded forwards (docs/testing.md): observed ≤ 1e-8 relative, 100× margin;
        # a padding token leaking into the mean moves it by far more
        assert values[1][key] == pytest.approx(values[0][key], rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        EmbeddingDriftCallback(PROMPTS, every_n_steps=0)
    with pytest.raises(ValueError, match="position"):
        EmbeddingDriftCallback(PROMPTS, position="mlp")
    with pytest.raises(ValueError, match="at least one prompt"):
        EmbeddingDriftCallback([])
    with pytest.raises(ValueError, match="columns"):
        from datasets import Dataset

        EmbeddingDriftCallback(Dataset.from_dict({"question": ["a"]}))
    callback = EmbeddingDriftCallback(PROMPTS, processing_class=build_tokenizer(), layers=[5])
    from transformers import TrainerControl, TrainerState

    with pytest.raises(ValueError, match="decoder layers"):
        callback.on_train_begin(tiny_config("/tmp/unused"), TrainerState(), TrainerControl(), model=build_model())
