"""`AntibodyWeighting`: on a stock `SFTTrainer` it trains as `AntibodyTrainer` (bit for bit); elsewhere it refuses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, text_dataset, tiny_config
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from trl_safety import AntibodyConfig, AntibodyTrainer
from trl_safety.callbacks import AntibodyWeighting


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def flagged_dataset(n=8, seed=0):
    dataset = prompt_completion_dataset(n, seed)
    return dataset.add_column("is_harmful", [i % 3 == 0 for i in range(n)])


class Recorder(TrainerCallback):
    """Accumulated gradients before each optimizer step, and the training losses logged."""

    def __init__(self):
        self.grads, self.losses = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def sft_with_weighting(tmp_path, temperature, peft=False, dataset=None, **kwargs):
    recorder = Recorder()
    trainer = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, SFTConfig, **kwargs),
        train_dataset=dataset if dataset is not None else flagged_dataset(),
        processing_class=build_tokenizer(),
        peft_config=lora_config() if peft else None,
        callbacks=[recorder],
    )
    return trainer, AntibodyWeighting(trainer, temperature=temperature), recorder


def antibody_trainer(tmp_path, temperature, peft=False, **kwargs):
    recorder = Recorder()
    trainer = AntibodyTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, AntibodyConfig, temperature=temperature, **kwargs),
        train_dataset=flagged_dataset(),
        processing_class=build_tokenizer(),
        peft_config=lora_config() if peft else None,
        callbacks=[recorder],
    )
    return trainer, recorder


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_equals_antibody_trainer(tmp_path, peft, ga):
    common = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=ga, seed=2, logging_steps=1)
    trainer, weighting, with_callback = sft_with_weighting(tmp_path / "cb", 0.1, peft, **common)
    trainer.train()
    reference, antibody = antibody_trainer(tmp_path / "ab", 0.1, peft, **common)
    reference.train()
    assert len(with_callback.grads) == len(antibody.grads) == 2
    for step, (actual, expected) in enumerate(zip(with_callback.grads, antibody.grads)):
        assert actual.keys() == expected.keys() and actual
        for name in actual:
            # The same fused-head kernels on the same batches, in the same order (docs/testing.md): exact
            assert torch.equal(actual[name], expected[name]), (step, name)
    assert with_callback.losses == antibody.losses
    # TRL's token metrics are untouched and the callback's own values are logged in its namespace
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert [log.get(key) for log in trainer.state.log_history] == [
            log.get(key) for log in reference.state.log_history
        ]
    logged = [log for log in trainer.state.log_history if "antibody_weighting/weight_entropy" in log]
    assert len(logged) == 2 and all("antibody_weighting/harmful_weight_share" in log for log in logged)
    assert not trainer.model._forward_hooks and not trainer.model._forward_pre_hooks  # removed at train end


def per_sample_ce(model, input_ids, attention_mask, labels):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return ce.sum(-1), (targets != -100).sum(-1)


def test_gradient_matches_independent_computation(tmp_path):
    temperature = 0.05  # small, so the weights are far from uniform on an untrained model
    trainer, weighting, recorder = sft_with_weighting(
        tmp_path,
        temperature,
        dataset=flagged_dataset(4),
        max_steps=1,
        per_device_train_batch_size=4,
        max_grad_norm=0.0,
    )
    # One batch holds all 4 rows; the loss does not depend on their order
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"refusal_input_ids", "refusal_labels", "is_harmful"} <= set(batch)
    trainer.train()

    reference = build_model(seed=0)
    with torch.no_grad():
        s_r, n_r = per_sample_ce(
            reference, batch["refusal_input_ids"], batch["refusal_attention_mask"], batch["refusal_labels"]
        )
    s, n = per_sample_ce(reference, batch["input_ids"], batch["attention_mask"], batch["labels"])
    weights = torch.softmax((s_r / n_r - s.detach() / n) / temperature, dim=0)
    assert weights.max() / weights.min() > 1.5  # really weighted
    loss = (weights * s).sum() / (weights * n).sum()
    params = dict(reference.named_parameters())
    expected = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name, actual in recorder.grads[0].items():
        # Fused LM head vs full logits, amplified by 1/τ in the weights: the bound and its derivation are those of
        # tests/defenses/test_antibody.py (≈1e-5 relative to the largest entry at τ = 0.05; 2e-5·max is 2× that)
        atol = max(1e-7, 2e-5 * float(expected[name].abs().max()))
        torch.testing.assert_close(actual, expected[name], rtol=1e-5, atol=atol, msg=name)
    probabilities = weighting.last_weights / weighting.last_weights.sum()
    # same weights up to the fused-vs-full path error amplified by 1/τ (see above)
    torch.testing.assert_close(probabilities, weights, rtol=1e-4, atol=1e-6)


def test_uniform_weights_are_plain_sft(tmp_path):
    common = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=2)
    trainer, _, weighted = sft_with_weighting(tmp_path / "cb", math.inf, **common)
    trainer.train()
    plain = Recorder()
    SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "sft", **common),
        train_dataset=flagged_dataset(),
        processing_class=build_tokenizer(),
        callbacks=[plain],
    ).train()
    for actual, expected in zip(weighted.grads, plain.grads, strict=True):
        for name in actual:
            assert torch.equal(actual[name], expected[name]), name


def test_evaluation_is_unweighted(tmp_path):
    trainer, weighting, _ = sft_with_weighting(tmp_path, 0.05, max_steps=1, per_device_train_batch_size=4)
    trainer.train()
    weighting.last_weights = None
    metrics = trainer.evaluate(prompt_completion_dataset(4, seed=3))
    assert weighting.last_weights is None and math.isfinite(metrics["eval_loss"])


def preference_dataset(n=4):
    rows = prompt_completion_dataset(2 * n)
    return Dataset.from_dict(
        {"prompt": rows["prompt"][:n], "chosen": rows["completion"][:n], "rejected": rows["completion"][n:]}
    )


def test_refused_on_dpo(tmp_path):
    trainer = DPOTrainer(
        build_model(seed=0),
        ref_model=build_model(seed=0),
        args=tiny_config(tmp_path, DPOConfig, max_steps=1),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
    )
    with pytest.raises(ValueError, match="needs an SFTTrainer, got DPOTrainer"):
        AntibodyWeighting(trainer)


@pytest.mark.parametrize(
    "kwargs, dataset, message",
    [
        (dict(packing=True), None, "packing"),
        (dict(padding_free=True, max_length=None), None, "padding_free"),
        (dict(loss_type="dft"), None, "loss_type"),
        (dict(label_smoothing_factor=0.1), None, "label_smoothing_factor"),
        ({}, text_dataset(4), "prompt/completion"),
    ],
)
def test_unsupported_setups_are_refused(tmp_path, kwargs, dataset, message):
    trainer = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, **kwargs),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(4),
        processing_class=build_tokenizer(),
    )
    with pytest.raises(ValueError, match=message):
        AntibodyWeighting(trainer)


def test_compute_loss_func_is_refused(tmp_path):
    trainer = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path),
        train_dataset=prompt_completion_dataset(4),
        processing_class=build_tokenizer(),
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
    )
    with pytest.raises(ValueError, match="compute_loss_func"):
        AntibodyWeighting(trainer)
    with pytest.raises(ValueError, match="temperature"):
        AntibodyWeighting(trainer, temperature=0.0)


@pytest.mark.parametrize("kind, name", [("kto", "KTOTrainer"), ("orpo", "ORPOTrainer"), ("rloo", "RLOOTrainer")])
def test_refused_on_other_preference_and_rl_trainers(tmp_path, kind, name):
    from test_vaccine_callback import other_trainer

    with pytest.raises(ValueError, match=f"needs an SFTTrainer, got {name}"):
        AntibodyWeighting(other_trainer(kind, tmp_path, []))


def test_refused_on_grpo_and_plain_trainer(tmp_path):
    from test_vaccine_callback import grpo_trainer
    from transformers import Trainer, TrainingArguments

    with pytest.raises(ValueError, match="needs an SFTTrainer, got GRPOTrainer"):
        AntibodyWeighting(grpo_trainer(tmp_path / "grpo", []))
    plain = Trainer(build_model(seed=0), TrainingArguments(str(tmp_path / "plain"), use_cpu=True, report_to="none"))
    with pytest.raises(ValueError, match="needs an SFTTrainer, got Trainer"):
        AntibodyWeighting(plain)
