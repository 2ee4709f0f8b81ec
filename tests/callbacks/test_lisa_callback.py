import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from testing_utils import WORDS, build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTTrainer

from trl_safety import LisaConfig, LisaTrainer
from trl_safety.callbacks import LisaCallback


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def alignment_dataset(n=8):
    prompts = prompt_completion_dataset(n, seed=1)["prompt"]
    return Dataset.from_dict({"prompt": prompts, "completion": [" sorry cannot help"] * n})


def preference_dataset(n=4):
    prompts = prompt_completion_dataset(n, seed=0)["prompt"]
    chosen = [" " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3)) for i in range(n)]
    rejected = [" " + " ".join(WORDS[(3 * i + k + 7) % len(WORDS)] for k in range(2)) for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StepWeights(TrainerCallback):
    """Weights at each host step's start (added after the Lisa callback: after that step's alignment block)."""

    def __init__(self):
        self.weights = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(weights(model))


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_host_equals_lisa_trainer(tmp_path, mode, ga):
    """K1=K2=2: LisaTrainer's 8 steps a a u u a a u u == SFTTrainer's 4 steps + the callback's 4 alignment steps.

    Every user step sees all 4 user rows (one epoch per step), so both runs train on the same batches although
    LisaTrainer draws and discards user batches during its alignment steps; the alignment loaders are the same
    seeded permutation. Constant LR: the same learning rate at every step although only LisaTrainer's scheduler
    advances on alignment steps. The warm-up (ratio 0.25 of 8: steps 0-2) bites in both.
    """
    common = dict(
        per_device_train_batch_size=4 // ga,
        gradient_accumulation_steps=ga,
        lr_scheduler_type="constant",
        learning_rate=2e-2,
        seed=3,
    )
    lisa_args = dict(rho=3.0, alignment_steps=2, finetune_steps=2, proximal_warmup_ratio=0.25)
    peft_config = lora_config() if mode == "lora" else None

    torch.manual_seed(0)  # the LoRA factors' initialisation
    lisa = LisaTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "lisa", LisaConfig, max_steps=8, **lisa_args, **common),
        train_dataset=prompt_completion_dataset(4),
        alignment_dataset=alignment_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    lisa.train()

    torch.manual_seed(0)
    host = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "cb", max_steps=4, **common),
        train_dataset=prompt_completion_dataset(4),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    callback = LisaCallback(host, alignment_dataset(8), **lisa_args)
    host.add_callback(callback)
    initial = weights(host.model)
    host.train()
    assert callback.term is None and all(not p._backward_hooks for p in host.model.parameters())

    torch.manual_seed(0)
    plain = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "plain", max_steps=4, **common),
        train_dataset=prompt_completion_dataset(4),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    plain.train()
    expected, plain_params = dict(lisa.model.named_parameters()), dict(plain.model.named_parameters())
    moved = 0.0
    for name, param in host.model.named_parameters():
        if not param.requires_grad:
            continue
        # the same updates, computed with other kernels: the callback's NLL sum vs the model's own loss, micro-batches
        # padded to other lengths (GA 2), gradient sums in another order; Adam divides by √v, which amplifies the
        # rounding over 8 steps. Observed max abs: full 1.1e-6 (GA 1) / 3.2e-6 (GA 2), LoRA ≤ 2.6e-7. 3e-5 leaves
        # ~10× margin and stays > 30× below the change the alignment steps make (distance to plain SFT > 1e-3).
        torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=3e-5, msg=name)
        moved = max(moved, float((param - plain_params[name]).abs().max()))
        assert not torch.equal(param, initial[name]), name
    assert moved > 1e-3  # the alignment steps changed the result
    logged = [log["lisa/alignment_loss"] for log in host.state.log_history if "lisa/alignment_loss" in log]
    # logged with host steps 0 and 2 (each the mean of its block's 2 steps): LisaTrainer's loss of steps 0-1, 4-5
    lisa_losses = [log["loss"] for log in lisa.state.log_history if "loss" in log]
    expected_losses = [sum(lisa_losses[0:2]) / 2, sum(lisa_losses[4:6]) / 2]
    assert logged == pytest.approx(expected_losses, abs=1e-4)  # Trainer rounds the logged loss to 4 decimals


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_is_bit_exact(tmp_path, mode):
    """6 host steps straight == 3 steps, checkpoint (mid fine-tuning state), resume, 3 more."""

    def make(output_dir, resume=None):
        torch.manual_seed(0)
        trainer = SFTTrainer(
            build_model(seed=0),
            tiny_config(
                output_dir,
                max_steps=6,
                per_device_train_batch_size=2,
                gradient_accumulation_steps=2,
                save_strategy="steps",
                save_steps=3,
                learning_rate=2e-2,
                resume_from_checkpoint=resume,
            ),
            train_dataset=prompt_completion_dataset(6),
            processing_class=build_tokenizer(),
            peft_config=lora_config() if mode == "lora" else None,
        )
        trainer.add_callback(
            LisaCallback(
                trainer, alignment_dataset(5), rho=2.0, alignment_steps=2, finetune_steps=2, proximal_warmup_ratio=0.2
            )
        )
        return trainer

    straight = make(tmp_path / "a")
    straight.train()
    checkpoint = str(tmp_path / "a" / "checkpoint-3")
    resumed = make(tmp_path / "b", resume=checkpoint)
    resumed.train(resume_from_checkpoint=checkpoint)
    params = dict(resumed.model.named_parameters())
    for name, param in straight.model.named_parameters():
        assert torch.equal(param, params[name]), name

    # Without the saved state the resume is refused, not silently restarted with fresh anchors
    missing = make(tmp_path / "c")
    with pytest.raises(ValueError, match="lisa_callback"):
        missing.train(resume_from_checkpoint=_copy_without_state(checkpoint))


def _copy_without_state(checkpoint):
    import os
    import shutil

    target = checkpoint + "-nostate"
    shutil.copytree(checkpoint, target)
    shutil.rmtree(os.path.join(target, "lisa_callback"))
    return target


def test_dpo_host_alignment_step_is_the_sft_gradient(tmp_path):
    """On DPOTrainer: the first optimizer step is an alignment step, w1 = w0 − lr·∇CE(alignment data) (SGD; the
    proximal term is 0 at the anchor); the next DPO steps run, and the alignment block recurs before host step 2."""
    args = DPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_length=32,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    tokenizer = build_tokenizer()
    trainer = DPOTrainer(
        build_model(seed=0),
        ref_model=build_model(seed=0),
        args=args,
        train_dataset=preference_dataset(4),
        processing_class=tokenizer,
    )
    aligned = alignment_dataset(4)  # one batch: the whole alignment set (its order does not change the mean loss)
    callback = LisaCallback(trainer, aligned, rho=0.5, alignment_steps=1, finetune_steps=2, proximal_warmup_ratio=0.0)
    trainer.add_callback(callback)
    recorder = StepWeights()
    trainer.add_callback(recorder)
    reference = build_model(seed=0)  # the same initial weights (a deep copy would share TRL's patched forward)
    w0 = weights(trainer.model)
    trainer.train()

    # Independent SFT loss: prompt tokens masked, completion + EOS trained, mean over the completion tokens
    total, loss = 0, 0.0
    for prompt, completion in zip(aligned["prompt"], aligned["completion"]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        logits = reference(input_ids=torch.tensor([ids])).logits[0, len(prompt_ids) - 1 : -1]
        loss = loss + F.cross_entropy(logits.float(), torch.tensor(ids[len(prompt_ids) :]), reduction="sum")
        total += len(ids) - len(prompt_ids)
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(loss / total, [params[n] for n in w0], allow_unused=True)
    for (name, start), grad in zip(w0.items(), grads):
        grad = torch.zeros_like(start) if grad is None else grad  # a parameter the loss does not reach
        # batched and padded forward vs one row at a time, CE summed in another order: observed 4.7e-9 abs
        torch.testing.assert_close(recorder.weights[0][name], start - 0.1 * grad, rtol=1e-5, atol=1e-6, msg=name)
    # host steps 0 and 1 are DPO steps, then a second alignment block before host step 2
    logged = [log["lisa/alignment_loss"] for log in trainer.state.log_history if "lisa/alignment_loss" in log]
    assert len(logged) == 2 and logged[0] == pytest.approx(float(loss / total), rel=1e-5)
    assert [w for w in recorder.weights[1] if not torch.equal(recorder.weights[1][w], recorder.weights[0][w])]
    proximal = [log["lisa/proximal_term"] for log in trainer.state.log_history if "lisa/proximal_term" in log]
    # 0 at the first step of each state (its anchor is the weights it starts from), then the DPO step 1 is pulled
    assert proximal[0] == 0.0 and proximal[1] > 0 and proximal[2] == 0.0


def test_grpo_host_runs(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    prompts = Dataset.from_dict({"prompt": prompt_completion_dataset(8)["prompt"]})
    trainer = GRPOTrainer(
        build_model(seed=0), reward_funcs=reward, args=args, train_dataset=prompts, processing_class=build_tokenizer()
    )
    callback = LisaCallback(trainer, alignment_dataset(4), rho=1.0, alignment_steps=1, finetune_steps=2)
    trainer.add_callback(callback)
    recorder = StepWeights()
    trainer.add_callback(recorder)
    w0 = weights(trainer.model)
    trainer.train()
    logged = [log["lisa/alignment_loss"] for log in trainer.state.log_history if "lisa/alignment_loss" in log]
    assert len(logged) == 2 and all(v > 0 for v in logged)
    assert any(not torch.equal(recorder.weights[0][n], w0[n]) for n in w0)  # the alignment step moved the weights


def test_refusals_and_arguments(tmp_path):
    host = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path),
        train_dataset=prompt_completion_dataset(4),
        processing_class=build_tokenizer(),
    )
    with pytest.raises(ValueError, match="finetune_steps"):
        LisaCallback(host, alignment_dataset(), finetune_steps=0)
    with pytest.raises(ValueError, match="rho"):
        LisaCallback(host, alignment_dataset(), rho=-1.0)
    with pytest.raises(ValueError, match="alignment dataset is empty"):
        LisaCallback(host, alignment_dataset().select([]))
    with pytest.raises(ValueError, match="question"):
        LisaCallback(host, Dataset.from_dict({"question": ["q"]}))
    lisa = LisaTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "lisa", LisaConfig),
        train_dataset=prompt_completion_dataset(4),
        alignment_dataset=alignment_dataset(),
        processing_class=build_tokenizer(),
    )
    lisa.add_callback(LisaCallback(lisa, alignment_dataset()))
    with pytest.raises(NotImplementedError, match="LisaTrainer"):
        lisa.train()


def other_host(kind, tmp_path):
    """A plain Trainer (with a tokenizer), KTO, ORPO or RLOO trainer on the tiny model (the support table's rows)."""
    from transformers import Trainer, TrainingArguments
    from trl import KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", max_steps=3)
    common.update(per_device_train_batch_size=2, disable_tqdm=True, logging_steps=1)
    rows, tokenizer = prompt_completion_dataset(4), build_tokenizer()
    if kind == "trainer":
        ids = [tokenizer(p + c)["input_ids"] for p, c in zip(rows["prompt"], rows["completion"])]
        data = Dataset.from_dict({"input_ids": ids, "labels": ids})
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
        return Trainer(
            build_model(seed=0), TrainingArguments(**common), collator, data, processing_class=tokenizer
        )  # fmt: skip
    if kind == "kto":
        data = Dataset.from_dict({**rows.to_dict(), "label": [True, False, True, False]})
        return KTOTrainer(
            build_model(seed=0), ref_model=build_model(seed=0), args=KTOConfig(**common), train_dataset=data,
            processing_class=tokenizer,
        )  # fmt: skip
    if kind == "orpo":
        return ORPOTrainer(
            build_model(seed=0), args=ORPOConfig(**common), train_dataset=preference_dataset(),
            processing_class=tokenizer,
        )  # fmt: skip
    return RLOOTrainer(
        build_model(seed=0),
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=RLOOConfig(**common, num_generations=2, max_completion_length=4, beta=0.0),
        train_dataset=Dataset.from_dict({"prompt": rows["prompt"]}),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("kind", ["trainer", "kto", "orpo", "rloo"])
def test_other_hosts_run_the_alignment_steps(tmp_path, kind):
    """K1=1, K2=2 over 3 host steps: two alignment blocks (before host steps 0 and 2), logged, and they move the
    weights; on a plain Trainer (no TRL metric buffer) the values are logged right after the training logs."""
    trainer = other_host(kind, tmp_path)
    trainer.add_callback(LisaCallback(trainer, alignment_dataset(4), rho=1.0, alignment_steps=1, finetune_steps=2))
    recorder = StepWeights()
    trainer.add_callback(recorder)
    w0 = weights(trainer.model)
    trainer.train()
    logged = [log["lisa/alignment_loss"] for log in trainer.state.log_history if "lisa/alignment_loss" in log]
    assert len(logged) == 2 and all(v > 0 for v in logged)
    assert any(not torch.equal(recorder.weights[0][n], w0[n]) for n in w0)
