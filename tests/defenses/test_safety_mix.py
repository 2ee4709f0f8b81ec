import json
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config

from trl_safety import SafetyMixConfig, SafetyMixTrainer
from trl_safety.registry import get_defense


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def alignment_dataset(n=8):
    prompts = prompt_completion_dataset(n, seed=1)["prompt"]
    return Dataset.from_dict({"prompt": prompts, "completion": [" sorry cannot help"] * n})


def make_trainer(output_dir, peft_config=None, **kwargs):
    return SafetyMixTrainer(
        build_model(seed=0),
        tiny_config(output_dir, SafetyMixConfig, **kwargs),
        train_dataset=prompt_completion_dataset(8),
        alignment_dataset=alignment_dataset(),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )


class RecordingBatches:
    """Test instrumentation: remembers the safety batches the trainer draws."""

    def __init__(self, inner):
        self.inner, self.drawn = inner, []

    def __next__(self):
        batch = next(self.inner)
        self.drawn.append(batch)
        return batch

    def state_dict(self):
        return self.inner.state_dict()


def summed_ce(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum", ignore_index=-100), (
        targets != -100
    ).sum()


def test_gradient_is_user_ce_plus_lambda_safety_ce(tmp_path):
    weight = 0.7
    trainer = make_trainer(tmp_path, safety_weight=weight, safety_batch_size=3, per_device_train_batch_size=4)
    trainer._safety_batches = RecordingBatches(trainer._safety_batches)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    num_items = trainer._get_num_items_in_batch([batch], batch["input_ids"].device)
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 2  # this micro-batch is one of two
    loss = trainer.training_step(trainer.model, dict(batch), num_items)

    [safety] = trainer._safety_batches.drawn
    assert len(safety["input_ids"]) == 3
    alignment_rows = {tuple(ids) for ids in trainer.alignment_dataset["input_ids"]}
    for ids, mask in zip(safety["input_ids"], safety["attention_mask"]):
        assert tuple(ids[mask.bool()].tolist()) in alignment_rows

    reference = build_model(seed=0)
    params = dict(reference.named_parameters())
    user_sum, _ = summed_ce(reference, batch)
    safety_sum, safety_count = summed_ce(reference, safety)
    # SFT's micro-batch loss is already GA-scaled (normalised by the step's token count); the safety mean gets 1/GA
    expected = user_sum / num_items + weight * (safety_sum / safety_count) / 2
    # package (SFTTrainer's fused LM head) vs full logits (docs/testing.md): loss ≈8, observed ≤ 1.2e-7 relative
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    for name, value in zip(params, torch.autograd.grad(expected, list(params.values()))):
        # fp32 summation-order noise, relative to the tensor's largest entry (observed ≤ 0.2e-6·max, 20× margin)
        atol = max(1e-7, 4e-6 * float(value.abs().max()))
        torch.testing.assert_close(trainer.model.get_parameter(name).grad, value, rtol=1e-5, atol=atol, msg=name)
    # the logged safety mean vs the reference's, same fp32 error as the loss above (observed equal)
    assert trainer._metrics["train"]["safety-mix/safety_loss"][-1] == pytest.approx(
        float((safety_sum / safety_count).detach()), rel=1e-5
    )


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_train_save_card_and_resume(tmp_path, mode):
    peft_config = lora_config() if mode == "lora" else None
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, safety_batch_size=3)
    straight = make_trainer(tmp_path / "a", peft_config=peft_config, **common)
    before = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    straight.train()
    for name, param in straight.model.named_parameters():
        assert torch.equal(param, before[name]) != param.requires_grad, name
    assert "safety-mix/safety_loss" in straight.state.log_history[0]

    resumed = make_trainer(tmp_path / "b", peft_config=peft_config, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    resumed_params = dict(resumed.model.named_parameters())
    for name, param in straight.model.named_parameters():
        assert torch.equal(param, resumed_params[name]), name

    straight.save_model()
    with open(os.path.join(tmp_path / "a", "defense_config.json")) as f:
        info = json.load(f)
    assert info["defense"] == "safety-mix" and info["hyperparameters"]["safety_weight"] == 1.0
    straight.create_model_card()
    with open(os.path.join(tmp_path / "a", "README.md")) as f:
        assert "Vlguard" in f.read()
    assert get_defense("safety-mix").trainer_class is SafetyMixTrainer


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="safety_weight"):
        tiny_config(tmp_path, SafetyMixConfig, safety_weight=-0.1)
    with pytest.raises(ValueError, match="safety_batch_size"):
        tiny_config(tmp_path, SafetyMixConfig, safety_batch_size=0)
