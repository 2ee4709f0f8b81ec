"""`VaccineCallback`: on `SFTTrainer` it is `VaccineTrainer` (same gradients, bit for bit); elsewhere it refuses."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from trl_safety import VaccineConfig, VaccineTrainer
from trl_safety.callbacks import VaccineCallback


CHECKPOINTING = {
    "off": dict(gradient_checkpointing=False),
    "non_reentrant": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
}


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


class GradRecorder(TrainerCallback):
    """The accumulated gradient of every trainable parameter right before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def run(tmp_path, trainer_class, config_class, callbacks, peft, **kwargs):
    recorder = GradRecorder()
    common = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, seed=1, **kwargs)
    trainer = trainer_class(
        build_model(seed=0),
        tiny_config(tmp_path, config_class, **common),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=lora_config() if peft else None,
        callbacks=[*callbacks, recorder],
    )
    trainer.train()
    return trainer, recorder.grads


@pytest.mark.parametrize("checkpointing", sorted(CHECKPOINTING))
@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_sft_with_callback_gives_vaccine_trainer_gradients(tmp_path, peft, ga, checkpointing):
    rho = 0.5
    kwargs = dict(gradient_accumulation_steps=ga, **CHECKPOINTING[checkpointing])
    callback = VaccineCallback(rho=rho)
    trainer, with_callback = run(tmp_path / "cb", SFTTrainer, SFTConfig, [callback], peft, **kwargs)
    _, vaccine = run(tmp_path / "vaccine", VaccineTrainer, VaccineConfig, [], peft, rho=rho, **kwargs)
    _, plain = run(tmp_path / "sft", SFTTrainer, SFTConfig, [], peft, **kwargs)
    assert len(with_callback) == len(vaccine) == 2
    for step, (actual, expected, unperturbed) in enumerate(zip(with_callback, vaccine, plain)):
        assert actual.keys() == expected.keys() and actual
        for name in actual:
            # The same kernels on the same inputs, in the same order (docs/testing.md): exact
            assert torch.equal(actual[name], expected[name]), (step, name)
        # ... and the perturbation is not negligible, so the comparison can fail
        # (relative to the largest gradient entry: LoRA's A factors have zero gradient while B is still zero)
        scale = max(unperturbed[n].abs().max() for n in actual)
        assert max((actual[n] - unperturbed[n]).abs().max() for n in actual) > 1e-3 * scale, step
    # Hooks are gone after training: a forward is plain again
    assert callback._handle is None and not trainer.model._forward_pre_hooks
    for module in callback._modules:
        assert not module._forward_hooks


def test_evaluation_is_not_perturbed(tmp_path):
    probe = []

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
            with torch.no_grad():
                probe.append(model(**batch).loss)

    # Mid-training, between steps (hooks of the last micro-batch closed), equal to the loss with no callback at all
    trainer = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, max_steps=1, per_device_train_batch_size=2, learning_rate=0.0),
        train_dataset=prompt_completion_dataset(4),
        processing_class=build_tokenizer(),
        callbacks=[VaccineCallback(rho=4.0), Evaluate()],
    )
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        reference = build_model(seed=0)(**batch).loss
    assert torch.equal(probe[0], reference)


def test_plain_trainer_is_supported_and_perturbed(tmp_path):
    tokenizer = build_tokenizer()
    rows = prompt_completion_dataset(4)
    encoded = [tokenizer(p + c)["input_ids"] for p, c in zip(rows["prompt"], rows["completion"])]
    width = min(len(ids) for ids in encoded)
    data = Dataset.from_dict(
        {"input_ids": [ids[:width] for ids in encoded], "labels": [ids[:width] for ids in encoded]}
    )
    args = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-2,
    )
    grads = []
    for callbacks in ([VaccineCallback(rho=1.0)], []):
        recorder = GradRecorder()
        Trainer(
            build_model(seed=0), TrainingArguments(**args), train_dataset=data, callbacks=[*callbacks, recorder]
        ).train()
        grads.append(recorder.grads[0])
    diff = max((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max() for n in grads[0])
    assert diff > 1e-3


def preference_dataset(n=4):
    rows = prompt_completion_dataset(2 * n)
    return Dataset.from_dict(
        {"prompt": rows["prompt"][:n], "chosen": rows["completion"][:n], "rejected": rows["completion"][n:]}
    )


def test_refused_on_dpo(tmp_path):
    trainer = DPOTrainer(
        build_model(seed=0),
        ref_model=build_model(seed=0),  # given, so TRL does not look the model id up on the Hub
        args=tiny_config(tmp_path, DPOConfig, max_steps=1, per_device_train_batch_size=2),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        callbacks=[VaccineCallback(rho=1.0)],
    )
    with pytest.raises(ValueError, match=r"DPOTrainer .*probe pass would need"):
        trainer.train()


def grpo_trainer(tmp_path, callbacks):
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        beta=0.0,  # no reference model
        disable_tqdm=True,
    )
    return GRPOTrainer(
        build_model(seed=0),
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompt_completion_dataset(4)["prompt"]}),
        processing_class=build_tokenizer(),
        callbacks=callbacks,
    )


def test_refused_on_grpo_with_the_trainer(tmp_path):
    callback = VaccineCallback(rho=1.0)
    trainer = grpo_trainer(tmp_path, [callback])
    callback.trainer = trainer
    with pytest.raises(ValueError, match=r"GRPOTrainer computes its loss in its own `compute_loss`"):
        trainer.train()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="rho"):
        VaccineCallback(rho=-1.0)
    with pytest.raises(ValueError, match="target_modules"):
        VaccineCallback(target_modules=[])


def other_trainer(kind, tmp_path, callbacks):
    """A KTO, ORPO or RLOO trainer on the tiny model (the rows of docs/callbacks.md's support table)."""
    from trl import KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", max_steps=1)
    common.update(per_device_train_batch_size=2, disable_tqdm=True)
    rows = prompt_completion_dataset(4)
    if kind == "kto":
        data = Dataset.from_dict({**rows.to_dict(), "label": [True, False, True, False]})
        return KTOTrainer(
            build_model(seed=0), ref_model=build_model(seed=0), args=KTOConfig(**common), train_dataset=data,
            processing_class=build_tokenizer(), callbacks=callbacks,
        )  # fmt: skip
    if kind == "orpo":
        return ORPOTrainer(
            build_model(seed=0), args=ORPOConfig(**common), train_dataset=preference_dataset(),
            processing_class=build_tokenizer(), callbacks=callbacks,
        )  # fmt: skip
    return RLOOTrainer(
        build_model(seed=0),
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=RLOOConfig(**common, num_generations=2, max_completion_length=4, beta=0.0),
        train_dataset=Dataset.from_dict({"prompt": rows["prompt"]}),
        processing_class=build_tokenizer(),
        callbacks=callbacks,
    )


@pytest.mark.parametrize("kind, name", [("kto", "KTOTrainer"), ("orpo", "ORPOTrainer"), ("rloo", "RLOOTrainer")])
def test_refused_on_other_preference_and_rl_trainers(tmp_path, kind, name):
    callback = VaccineCallback(rho=1.0)
    trainer = other_trainer(kind, tmp_path, [callback])
    with pytest.raises(ValueError, match=rf"{name} \(config"):  # recognised from the config class alone
        trainer.train()
    callback.trainer = trainer
    with pytest.raises(ValueError, match=rf"{name} computes its loss in its own `compute_loss`"):
        trainer.train()
