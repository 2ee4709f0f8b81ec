import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from transformers import TrainerCallback

from trl_safety import LisaConfig, LisaTrainer
from trl_safety.core.state_io import load_defense_state
from trl_safety.registry import get_defense


def alignment_dataset(n=8):
    prompts = prompt_completion_dataset(n, seed=1)["prompt"]
    return Dataset.from_dict({"prompt": prompts, "completion": [" sorry cannot help"] * n})


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


class Recorder(TrainerCallback):
    """Weights at the start of every optimizer step and the gradient right before the optimizer uses it."""

    def __init__(self):
        self.weights, self.grads = [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def record_inputs(trainer):
    """Wrap `training_step` to keep the micro-batches it receives (grouped per optimizer step by the test)."""
    seen = []
    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = training_step
    return seen


def rows(dataset):
    return {tuple(ids) for ids in dataset["input_ids"]}


def batch_rows(batch):
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def reference_ce_grads(reference, weights, micro_batches):
    """∇ of Σ_mb Σ_t CE / (number of target tokens of the whole step), from the full logits (SFT's GA convention)."""
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    trainable = {n: params[n] for n in weights}
    total_tokens = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches)
    loss = 0.0
    for mb in micro_batches:
        logits = reference(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, :-1]
        loss = loss + F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), mb["labels"][:, 1:].reshape(-1), reduction="sum"
        )
    grads = torch.autograd.grad(loss / total_tokens, list(trainable.values()))
    return dict(zip(trainable, grads))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_phases_batches_and_proximal_gradient(tmp_path, mode):
    """K1=K2=2, GA=2: phases a,a,u,u,a,a; alignment steps consume alignment batches; grad = CE grad + ρ(w − anchor)."""
    k1 = k2 = 2
    rho, max_steps, warmup = 0.7, 6, 0.2  # proximal off for steps 0 and 1 (≤ 1.2)
    model = build_model(hidden=32, layers=2, seed=0)
    if mode == "lora":
        model = get_peft_model(model, lora_config())
    reference = copy.deepcopy(model)
    recorder = Recorder()
    args = tiny_config(
        tmp_path,
        LisaConfig,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        optim="sgd",
        learning_rate=0.05,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        rho=rho,
        alignment_steps=k1,
        finetune_steps=k2,
        proximal_warmup_ratio=warmup,
    )
    trainer = LisaTrainer(
        model,
        args,
        train_dataset=prompt_completion_dataset(8),
        alignment_dataset=alignment_dataset(8),
        processing_class=build_tokenizer(),
        callbacks=[recorder],
    )
    seen = record_inputs(trainer)
    trainer.train()

    # Phase sequence, as logged and as derived from the batches actually trained on
    phases = [log["lisa/alignment_phase"] for log in trainer.state.log_history if "lisa/alignment_phase" in log]
    assert phases == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    align_rows, user_rows = rows(trainer.alignment_dataset), rows(trainer.train_dataset)
    assert not align_rows & user_rows
    steps = [seen[2 * s : 2 * s + 2] for s in range(max_steps)]
    for s, micro_batches in enumerate(steps):
        expected = align_rows if phases[s] == 1.0 else user_rows
        for mb in micro_batches:
            assert set(batch_rows(mb)) <= expected, f"step {s} trained on the wrong data"
    # The 4 alignment micro-batches of steps 0-1 are one full pass over the 8 alignment samples
    first_pass = [r for mb in steps[0] + steps[1] for r in batch_rows(mb)]
    assert sorted(first_pass) == sorted(tuple(ids) for ids in trainer.alignment_dataset["input_ids"])

    # Gradient of every step against an independent computation; the anchor is the weights at the start of the
    # current state (the snapshot taken when the other state ended), the initial weights for the first state
    for s in range(max_steps):
        block_start = s - s % (k1 + k2) + (0 if s % (k1 + k2) < k1 else k1)
        anchor = recorder.weights[block_start]
        expected = reference_ce_grads(reference, recorder.weights[s], steps[s])
        for name, grad in expected.items():
            if s > warmup * max_steps:
                grad = grad + rho * (recorder.weights[s][name] - anchor[name])
            # package (SFT loss + proximal gradient hooks) vs reference CE + ρ(w − anchor) (docs/testing.md): the
            # error scales with the tensor's largest entry (observed ≤ 3.5e-7·max; with MKL's AVX2 GEMM the fixed
            # atol=1e-7 was within 4× of failing). 1e-5·max stays > 1000× below the proximal term (≥ 1.4e-2·max).
            atol = max(1e-7, 1e-5 * float(grad.abs().max()))
            torch.testing.assert_close(recorder.grads[s][name], grad, rtol=1e-5, atol=atol, msg=f"step {s} {name}")
    # The proximal term did act: some step's weights are away from their anchor
    assert any((recorder.weights[s][n] - recorder.weights[s - 1][n]).abs().max() > 0 for s in (3, 5) for n in expected)
    proximal = [log["lisa/proximal_term"] for log in trainer.state.log_history if "lisa/proximal_term" in log]
    assert proximal[0] == 0.0 and proximal[1] == 0.0 and proximal[3] > 0.0
    # Its logged value is ρ/2‖w − anchor‖² at the step's weights
    anchor = recorder.weights[2]
    manual = sum(0.5 * rho * ((recorder.weights[3][n] - anchor[n]) ** 2).sum() for n in anchor)
    # a sum of squares reduced in another order: observed ≤ 1e-7 relative
    assert proximal[3] == pytest.approx(float(manual), rel=1e-5)
    # Hooks are removed after training
    assert all(not p._backward_hooks for p in trainer.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_is_bit_exact(tmp_path, mode):
    """Train 6 steps == train 3, checkpoint (mid fine-tuning state), resume, train 3 more."""

    def make(output_dir):
        model = build_model(seed=0)
        args = tiny_config(
            output_dir,
            LisaConfig,
            max_steps=6,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            save_strategy="steps",
            save_steps=3,
            rho=2.0,
            alignment_steps=2,
            finetune_steps=2,
            proximal_warmup_ratio=0.2,
            learning_rate=2e-2,
        )
        return LisaTrainer(
            model,
            args,
            train_dataset=prompt_completion_dataset(6),
            alignment_dataset=alignment_dataset(5),
            processing_class=build_tokenizer(),
            peft_config=lora_config() if mode == "lora" else None,
        )

    straight = make(tmp_path / "a")
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    defense, state = load_defense_state(str(checkpoint))
    assert defense == "lisa" and state["phase"] == "finetune"
    assert state["alignment_batches"]["position"] > 0

    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_params = dict(resumed.model.named_parameters())
    for name, param in straight.model.named_parameters():
        assert torch.equal(param, resumed_params[name]), name
    # The restored log history holds steps 1-3; the resumed run logged steps 4-6
    phases = [log["lisa/alignment_phase"] for log in resumed.state.log_history if "lisa/alignment_phase" in log]
    assert phases == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_train_save_and_card(tmp_path, mode):
    trainer = LisaTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, LisaConfig, max_steps=3, alignment_steps=1, finetune_steps=1, proximal_warmup_ratio=0.0),
        train_dataset=prompt_completion_dataset(8),
        alignment_dataset=alignment_dataset(),
        processing_class=build_tokenizer(),
        peft_config=lora_config() if mode == "lora" else None,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) != param.requires_grad, name
    trainer.save_model()
    with open(os.path.join(tmp_path, "defense_config.json")) as f:
        info = json.load(f)
    assert info["defense"] == "lisa" and info["stage"] == "fine-tuning"
    assert info["hyperparameters"]["rho"] == 1.0
    trainer.create_model_card()
    with open(os.path.join(tmp_path, "README.md")) as f:
        card = f.read()
    assert "Lisa" in card and "2405.18641" in card
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    assert os.path.exists(os.path.join(tmp_path, weights))


def test_plain_sft_config_is_upgraded_and_registered(tmp_path):
    spec = get_defense("lisa")
    assert spec.trainer_class is LisaTrainer and spec.stage == "fine-tuning"
    trainer = LisaTrainer(
        build_model(seed=0),
        tiny_config(tmp_path),  # a plain SFTConfig
        train_dataset=prompt_completion_dataset(8),
        alignment_dataset=alignment_dataset(),
        processing_class=build_tokenizer(),
    )
    assert isinstance(trainer.args, LisaConfig) and trainer.args.alignment_steps == 100


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": -1.0}, "rho"),
        ({"alignment_steps": -1}, "alignment_steps"),
        ({"alignment_steps": 0, "finetune_steps": 0}, "both be 0"),
        ({"proximal_warmup_ratio": 1.5}, "proximal_warmup_ratio"),
    ],
)
def test_config_validation(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, LisaConfig, **kwargs)


def test_missing_alignment_dataset(tmp_path):
    with pytest.raises(ValueError, match="alignment dataset"):
        LisaTrainer(
            build_model(seed=0),
            tiny_config(tmp_path, LisaConfig),
            train_dataset=prompt_completion_dataset(8),
            processing_class=build_tokenizer(),
        )


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_update(tmp_path, reentrant):
    def run(output_dir, **kwargs):
        trainer = LisaTrainer(
            build_model(seed=0),
            tiny_config(
                output_dir,
                LisaConfig,
                max_steps=4,
                alignment_steps=1,
                finetune_steps=1,
                proximal_warmup_ratio=0.0,
                rho=2.0,
                **kwargs,
            ),
            train_dataset=prompt_completion_dataset(8),
            alignment_dataset=alignment_dataset(),
            processing_class=build_tokenizer(),
            peft_config=lora_config(),
        )
        trainer.train()
        return dict(trainer.model.named_parameters())

    plain = run(tmp_path / "plain")
    checkpointed = run(
        tmp_path / "gc",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    for name, param in checkpointed.items():
        # checkpointed recompute vs one graph: may reorder gradient sums (docs/testing.md); observed equal
        torch.testing.assert_close(param, plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "schedule, warns",
    [
        ({"max_steps": 2, "alignment_steps": 2}, True),  # both steps are alignment steps
        ({"max_steps": -1, "num_train_epochs": 1, "alignment_steps": 3}, True),  # 8 rows / batch 4 = 2 steps ≤ 3
        ({"max_steps": 3, "alignment_steps": 2}, False),  # step 2 trains on the user's data
    ],
)
def test_warns_when_the_schedule_never_reaches_the_user_data(tmp_path, caplog, schedule, warns):
    trainer = LisaTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, LisaConfig, finetune_steps=5, **schedule),
        train_dataset=prompt_completion_dataset(8),
        alignment_dataset=alignment_dataset(),
        processing_class=build_tokenizer(),
    )
    with caplog.at_level("WARNING", logger="trl_safety.defenses.lisa.lisa_trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "no step trains on `train_dataset`" in r.getMessage()]
    assert len(warnings) == (1 if warns else 0)  # once per run, not once per step
    phases = [log["lisa/alignment_phase"] for log in trainer.state.log_history if "lisa/alignment_phase" in log]
    assert (0.0 not in phases) == warns  # the warning says exactly when no fine-tuning step ran
