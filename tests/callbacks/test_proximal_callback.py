import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from testing_utils import WORDS, build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTTrainer

from trl_safety import LisaConfig, LisaTrainer
from trl_safety.callbacks import ProximalCallback


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


class GradRecorder(TrainerCallback):
    """Weights at each step start, gradients right before the optimizer, and the proximal callback's value."""

    def __init__(self, proximal=None):
        self.proximal = proximal
        self.weights, self.grads, self.values = [], [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_step_end(self, args, state, control, **kwargs):
        if self.proximal is not None:
            self.values.append(self.proximal.last_value)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_with_callback_equals_lisa_without_alignment(tmp_path, mode):
    # 6 samples, batch 2, GA 2: every second step is the epoch's 1-micro-batch remainder, so the per-backward share
    # of the term (1/2, then 1/1) is exercised too
    common = dict(
        max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=2e-2, seed=3
    )
    peft_config = lora_config() if mode == "lora" else None
    callback = ProximalCallback(rho=3.0, warmup_ratio=0.25)
    sft = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "sft", **common),
        train_dataset=prompt_completion_dataset(6),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
        callbacks=[callback],
    )
    sft.train()
    assert callback.term is None  # hooks removed at train end
    assert all(not p._backward_hooks for p in sft.model.parameters())

    lisa = LisaTrainer(
        build_model(seed=0),
        tiny_config(
            tmp_path / "lisa",
            LisaConfig,
            rho=3.0,
            alignment_steps=0,
            finetune_steps=10,
            proximal_warmup_ratio=0.25,
            **common,
        ),
        train_dataset=prompt_completion_dataset(6),
        alignment_dataset=prompt_completion_dataset(4, seed=5),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    lisa.train()
    plain = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "plain", **common),
        train_dataset=prompt_completion_dataset(6),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    plain.train()

    lisa_params, plain_params = dict(lisa.model.named_parameters()), dict(plain.model.named_parameters())
    differs = False
    for name, param in sft.model.named_parameters():
        assert torch.equal(param, lisa_params[name]), name
        differs |= not torch.equal(param, plain_params[name])
    assert differs  # the term changed the update


def make_preference_dataset(n=8, seed=0):
    prompts = prompt_completion_dataset(n, seed=seed)["prompt"]
    chosen = [" " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3)) for i in range(n)]
    rejected = [" " + " ".join(WORDS[(3 * i + k + 7) % len(WORDS)] for k in range(2)) for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})


def dpo_trainer(output_dir, callbacks):
    args = DPOConfig(
        output_dir=str(output_dir),
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=1e-2,
        max_grad_norm=0.0,  # gradients are read before the optimizer, after clipping
        max_length=32,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return DPOTrainer(
        build_model(seed=0),
        ref_model=build_model(seed=0),  # given, so TRL does not look the model id up on the Hub
        args=args,
        train_dataset=make_preference_dataset(),
        processing_class=build_tokenizer(),
        callbacks=callbacks,
    )


def test_dpo_gradient_contribution_is_rho_times_distance_to_saved_anchor(tmp_path):
    # The anchor: a saved full checkpoint that differs from the model being trained
    anchor_model = build_model(seed=0)
    with torch.no_grad():
        for param in anchor_model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    anchor_model.save_pretrained(tmp_path / "aligned")
    anchor = {n: p.detach().clone() for n, p in anchor_model.named_parameters()}

    rho = 0.5
    proximal = ProximalCallback(rho=rho, anchor=str(tmp_path / "aligned"))
    with_term = GradRecorder(proximal)
    dpo_trainer(tmp_path / "with", [proximal, with_term]).train()
    without_term = GradRecorder()
    dpo_trainer(tmp_path / "without", [without_term]).train()

    weights = with_term.weights[0]
    for name, value in without_term.weights[0].items():
        assert torch.equal(weights[name], value)  # same starting point
    checked = 0
    for name, grad in with_term.grads[0].items():
        expected = without_term.grads[0][name] + rho * (weights[name] - anchor[name])
        # the same DPO gradient plus ρ(w − anchor), added by the callback's hook vs here: rounding of one
        # multiply-add, relative errors large only where the two cancel; observed ≤ 7.5e-9 abs
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7, msg=name)
        checked += 1
    assert checked == len(anchor)
    manual = sum(0.5 * rho * ((weights[n] - anchor[n]) ** 2).sum() for n in anchor)
    # a sum of squares reduced in another order: observed ≤ 2e-7 relative
    assert proximal.last_value == pytest.approx(float(manual), rel=1e-5)


def test_adapter_anchor_and_reanchoring(tmp_path):
    """Anchor read from a saved adapter; re-anchoring every 2 steps puts the anchor at that step's weights."""
    base = build_model(seed=0)
    peft_model = get_peft_model(base, lora_config())
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    rho = 2.0
    proximal = ProximalCallback(rho=rho, anchor=str(tmp_path / "adapter"), reanchor_steps=2)
    recorder = GradRecorder(proximal)
    trainer = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "run", max_steps=4, per_device_train_batch_size=4),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=lora_config(),
        callbacks=[proximal, recorder],
    )
    trainer.train()
    anchors = [saved, saved, recorder.weights[2], recorder.weights[2]]
    for step, anchor in enumerate(anchors):
        weights = recorder.weights[step]
        manual = sum(0.5 * rho * ((weights[n] - anchor[n]) ** 2).sum() for n in anchor)
        # as above (observed ≤ 7.4e-8 relative); abs=1e-12 only for the step where it is exactly 0
        assert recorder.values[step] == pytest.approx(float(manual), rel=1e-5, abs=1e-12), step
    assert recorder.values[0] > 0 and recorder.values[2] == 0.0


def test_bad_anchor_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="rho"):
        ProximalCallback(rho=-1.0)
    with pytest.raises(ValueError, match="reanchor_steps"):
        ProximalCallback(reanchor_steps=0)
    other = build_model(hidden=64, seed=0)  # different shapes
    other.save_pretrained(tmp_path / "other")
    trainer = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "run"),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        callbacks=[ProximalCallback(anchor=str(tmp_path / "other"))],
    )
    with pytest.raises(ValueError, match="shape"):
        trainer.train()


class LogRecorder(TrainerCallback):
    """Stands in for a `report_to` integration: registered before the proximal callback, as integrations are."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def _logged(entries):
    return [(e["step"], e["proximal_term"]) for e in entries if "proximal_term" in e]


def _expected_means(values, logging_steps):
    """Mean of the per-step values over each logging interval, keyed by the step the interval ends at."""
    return [
        (end, sum(values[end - logging_steps : end]) / logging_steps)
        for end in range(logging_steps, len(values) + 1, logging_steps)
    ]


@pytest.mark.parametrize("give_trainer", [True, False])
def test_term_reaches_the_sft_logs(tmp_path, give_trainer):
    integration = LogRecorder()
    proximal = ProximalCallback(rho=2.0, reanchor_steps=3)
    values = GradRecorder(proximal)
    trainer = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=2, learning_rate=5e-2),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        callbacks=[integration, proximal, values],
    )
    if give_trainer:
        proximal.trainer = trainer
    trainer.train()
    assert values.values[1] > 0  # a real, moving value (the anchor is the initial weights until step 3)
    # the values the callback applied, averaged as TRL averages its metrics: the same floats summed in the same order
    # (TRL's `sum(val) / len(val)` and the test's), so exact
    expected = _expected_means(values.values, 2)
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert _logged(history) == expected and len(history) == 2
    if give_trainer:  # in the same entry as the loss, and it reached the integration
        assert _logged(integration.logs) == expected
        assert all("loss" in e for e in integration.logs if "proximal_term" in e)


def test_term_reaches_a_plain_trainer_integration(tmp_path):
    """On a transformers `Trainer` (no TRL metric buffer) the term is logged right after each training log."""
    from transformers import Trainer, TrainingArguments

    tokenizer = build_tokenizer()
    rows = [tokenizer(p + c)["input_ids"] for p, c in zip(*prompt_completion_dataset(8)[:].values())]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    integration = LogRecorder()
    proximal = ProximalCallback(rho=2.0)
    values = GradRecorder(proximal)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=1,
        max_steps=4,
        logging_steps=2,
        learning_rate=5e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(build_model(seed=0), args, train_dataset=dataset, callbacks=[integration, proximal, values])
    proximal.trainer = trainer
    trainer.train()
    expected = _expected_means(values.values, 2)
    assert _logged(integration.logs) == expected and expected[1][1] > 0
    assert _logged(trainer.state.log_history) == expected
    # the regular loss logs still happen at the same steps
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
