"""The defense-trainer mixin on a minimal stateful defense defined here."""

import json
import os
from dataclasses import dataclass, field

import pytest
import torch
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, text_dataset, tiny_config
from trl import SFTConfig, SFTTrainer

from trl_safety.core import DefenseTrainerMixin, HarmfulDataArguments, lm_loss


@dataclass
class CountingConfig(HarmfulDataArguments, SFTConfig):
    counting_weight: float = field(default=0.0, metadata={"help": "unused strength"})


class CountingTrainer(DefenseTrainerMixin, SFTTrainer):
    """Draws a harmful batch each step (logged) and counts steps: enough state to test resume."""

    defense_name = "counting"
    stage = "alignment"
    config_class = CountingConfig
    extra_datasets = ("harmful",)
    unsupported_backends = {"zero3": "it is a test defense."}
    _name = "Counting"
    _tag_names = ["trl", "sft", "trl-safety", "counting"]
    _paper = {"title": "A Counting Defense", "id": "2401.00001", "citation": "@article{counting}"}

    def setup_defense(self):
        self.harmful_batches = self.cycling_batches("harmful", batch_size=3)
        self.steps_seen = 0
        self.harmful_losses = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        with torch.no_grad():
            loss = lm_loss(self.accelerator.unwrap_model(model), next(self.harmful_batches))
        self.harmful_losses.append(loss.item())
        self.log_metric("harmful_loss", loss)
        self.steps_seen += 1
        return super().training_step(model, inputs, num_items_in_batch)

    def defense_state_dict(self):
        return {"steps_seen": self.steps_seen, "harmful_batches": self.harmful_batches.state_dict()}

    def load_defense_state_dict(self, state):
        self.steps_seen = state["steps_seen"]
        self.harmful_batches.load_state_dict(state["harmful_batches"])


class OtherTrainer(CountingTrainer):
    defense_name = "other"


def _trainer(tmp_path, cls=CountingTrainer, args=None, **kwargs):
    args = args or tiny_config(tmp_path, CountingConfig, save_strategy="steps", save_steps=2, max_steps=4)
    kwargs.setdefault("harmful_dataset", prompt_completion_dataset(7, seed=1))
    return cls(
        build_model("llama"),
        args,
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
        **kwargs,
    )


def test_plain_sft_config_is_upgraded(tmp_path):
    args = tiny_config(tmp_path, SFTConfig, eos_token="<|im_end|>")
    trainer = _trainer(tmp_path, args=args)
    assert isinstance(trainer.args, CountingConfig)
    assert trainer.args.eos_token == "<|im_end|>"
    assert trainer.args.learning_rate == args.learning_rate


def test_extra_dataset_is_prepared_with_trl(tmp_path):
    trainer = _trainer(tmp_path)
    assert {"input_ids", "labels"} <= set(trainer.harmful_dataset.column_names)
    assert len(trainer.harmful_dataset) == 7


def test_missing_and_bad_extra_datasets_fail_early(tmp_path):
    with pytest.raises(ValueError, match="needs a harmful dataset: pass `harmful_dataset=`"):
        _trainer(tmp_path, harmful_dataset=None)
    from datasets import Dataset

    with pytest.raises(ValueError, match="The harmful dataset is empty"):
        _trainer(tmp_path, harmful_dataset=Dataset.from_dict({"text": []}))
    with pytest.raises(ValueError, match="columns \\['question'\\]"):
        _trainer(tmp_path, harmful_dataset=Dataset.from_dict({"question": ["x"]}))
    with pytest.raises(ValueError, match="does not use a alignment dataset"):
        _trainer(tmp_path, alignment_dataset=text_dataset())


def test_offline_hub_dataset_error_names_the_dataset(tmp_path):
    args = tiny_config(tmp_path, CountingConfig, harmful_dataset_name="some-org/not-cached-dataset")
    with pytest.raises(
        RuntimeError, match="Could not load dataset 'some-org/not-cached-dataset'.*pass the local path"
    ):
        _trainer(tmp_path, args=args, harmful_dataset=None)


def test_extra_dataset_from_local_file(tmp_path):
    path = tmp_path / "harmful.jsonl"
    prompt_completion_dataset(5, seed=3).to_json(str(path))
    args = tiny_config(tmp_path, CountingConfig, harmful_dataset_name=str(path), harmful_num_samples=4)
    trainer = _trainer(tmp_path, args=args, harmful_dataset=None)
    assert len(trainer.harmful_dataset) == 4


def test_defense_state_round_trips_through_checkpoint(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()
    assert os.path.exists(tmp_path / "full" / "checkpoint-2" / "defense_state.json")
    assert os.path.exists(tmp_path / "full" / "checkpoint-2" / "defense_state.safetensors")

    resumed = _trainer(tmp_path / "full")  # same output dir: resume from its checkpoint-2
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.steps_seen == 4
    assert resumed.harmful_batches.state_dict() == full.harmful_batches.state_dict()
    # The resumed run drew exactly the harmful batches the uninterrupted run drew in steps 3-4
    assert resumed.harmful_losses == pytest.approx(full.harmful_losses[2:], abs=0)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_checkpoint_of_another_defense_is_refused(tmp_path):
    _trainer(tmp_path).train()
    other = _trainer(tmp_path, cls=OtherTrainer)
    with pytest.raises(ValueError, match="written by defense 'counting', not 'other'"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # A plain SFT checkpoint has no defense state to restore
    sft_dir = tmp_path / "sft"
    SFTTrainer(
        build_model("llama"),
        tiny_config(sft_dir, save_strategy="steps", save_steps=2),
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
    ).train()
    with pytest.raises(ValueError, match="has no defense_state.json"):
        _trainer(tmp_path / "x").train(resume_from_checkpoint=str(sft_dir / "checkpoint-2"))


def test_lora_run_writes_defense_config_and_card(tmp_path):
    trainer = _trainer(
        tmp_path,
        args=tiny_config(tmp_path, CountingConfig, max_steps=1, counting_weight=0.5),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model()
    info = json.loads((tmp_path / "defense_config.json").read_text())
    assert info["defense"] == "counting"
    assert info["is_adapter"] is True
    assert info["base_model"] == "trl-safety-testing/tiny-llama"
    assert info["hyperparameters"]["counting_weight"] == 0.5
    assert (tmp_path / "adapter_model.safetensors").exists()
    # The user's own `save_model` writes the card (checkpoints and pushes write theirs through TRL's path)
    card = (tmp_path / "README.md").read_text()
    assert "base_model: trl-safety-testing/tiny-llama" in card
    assert "library_name: peft" in card
    assert "Defense | Counting (`counting`)" in card
    assert "https://huggingface.co/papers/2401.00001" in card
    assert "counting_weight" in card


def test_log_metric_prefixes_the_defense_name_and_refuses_a_slash(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model.train()
    trainer.log_metric("probe", torch.tensor(2.0))
    trainer.log_metric("probe", 4.0)
    trainer.model.eval()
    trainer.log_metric("probe", 1.0)  # the model's mode picks the buffer
    trainer.log_metric("phase", 1.0, mode="train")  # unless `mode` is given
    with pytest.raises(ValueError, match="bare metric name"):
        trainer.log_metric("counting/probe", 1.0)  # the prefix would be added twice
    trainer.model.train()
    trainer.log({"loss": 0.5})
    logged = trainer.state.log_history[-1]
    # SFTTrainer averages a buffer over the logging interval: (2 + 4) / 2
    assert logged["counting/probe"] == 3.0 and logged["counting/phase"] == 1.0
    assert not any(key in logged for key in ("probe", "phase", "counting/counting/probe"))
    trainer.model.eval()
    trainer.log({"eval_loss": 0.5})
    assert trainer.state.log_history[-1]["eval_counting/probe"] == 1.0  # TRL prefixes eval metrics with `eval_`
