import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from testing_utils import (
    build_model,
    build_tokenizer,
    conversational_prompt_completion_dataset,
    prompt_completion_dataset,
    text_dataset,
    tiny_config,
)
from trl import SFTTrainer

from trl_safety import AntibodyConfig, AntibodyTrainer
from trl_safety.data.refusals import assign_refusal
from trl_safety.registry import get_defense


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def flagged_dataset(n=8, seed=0):
    dataset = prompt_completion_dataset(n, seed)
    return dataset.add_column("is_harmful", [i % 3 == 0 for i in range(n)])


def make_trainer(tmp_path, dataset=None, **kwargs):
    return AntibodyTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, AntibodyConfig, **kwargs),
        train_dataset=dataset if dataset is not None else flagged_dataset(),
        processing_class=build_tokenizer(),
    )


def per_sample_ce(model, input_ids, attention_mask, labels):
    """Per-sample summed CE and target-token count, from the full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return ce.sum(-1), (targets != -100).sum(-1)


def expected_loss(reference, batch, temperature):
    """Antibody's loss from the spec: w = softmax((NLL̄_refusal − NLL̄_sample)/τ), L = Σ w S / Σ w N."""
    with torch.no_grad():
        s_r, n_r = per_sample_ce(
            reference, batch["refusal_input_ids"], batch["refusal_attention_mask"], batch["refusal_labels"]
        )
    s, n = per_sample_ce(reference, batch["input_ids"], batch["attention_mask"], batch["labels"])
    weights = torch.softmax((s_r / n_r - s.detach() / n) / temperature, dim=0)
    return (weights * s).sum() / (weights * n).sum(), weights


def assert_grad_close(actual, expected, name):
    # Fused LM head vs full logits (docs/testing.md): the per-sample mean NLLs (≈6) differ by ~5e-7 between the
    # paths, and the weights softmax(ΔNLL/τ) amplify that by 1/τ: ≈1e-5 relative at τ = 0.05 (0.1 in the GA test),
    # which the gradient Σ w·∇S carries relative to its largest entry. 2e-5·max is 2× that bound (observed ≤ 3.8e-6·max
    # on default/avx2/avx512; 4e-6 left no margin); a missing term or a factor 2 is of the order of max itself.
    atol = max(1e-7, 2e-5 * float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=name)


def grads_after_step(trainer, batches, accumulation):
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = accumulation
    losses = []
    # as the training loop: one target-token count for the whole accumulated step
    num_items = trainer._get_num_items_in_batch(batches, batches[0]["input_ids"].device)
    for batch in batches:
        losses.append(trainer.training_step(trainer.model, {k: v.clone() for k, v in batch.items()}, num_items))
    return losses, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_weights_loss_and_gradient_match_independent_computation(tmp_path):
    temperature = 0.05  # small, so the weights are far from uniform on an untrained model
    trainer = make_trainer(tmp_path, temperature=temperature, per_device_train_batch_size=4)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert {"refusal_input_ids", "refusal_labels", "is_harmful"} <= set(batch)
    [loss], grads = grads_after_step(trainer, [batch], accumulation=1)

    reference = build_model(seed=0)
    expected, weights = expected_loss(reference, batch, temperature)
    expected_grads = dict(zip(*zip(*reference.named_parameters()), strict=False))
    values = torch.autograd.grad(expected, list(expected_grads.values()))
    # fused LM head vs full logits on a loss ≈6: observed ≤ 8e-8 relative, 1e-5 is >100× that
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    for (name, _), value in zip(expected_grads.items(), values):
        assert_grad_close(grads[name], value, name)

    assert weights.max() / weights.min() > 1.5  # really weighted
    entropy = -(weights * weights.log()).sum()
    # The weights carry ≈1e-5 relative error between the paths (see assert_grad_close); the entropy weighs them by
    # |log w| + 1 ≈ 3, so up to ~4e-5 relative on H ≈ 0.8, and the share up to ~2e-5: rel 1e-4 (observed ≤ 3.7e-6,
    # 1e-5 was below the bound). A wrong temperature or a uniform weighting moves both by > 1e-2.
    assert trainer._metrics["train"]["antibody/weight_entropy"][-1] == pytest.approx(float(entropy), rel=1e-4)
    share = weights[batch["is_harmful"]].sum()
    assert trainer._metrics["train"]["antibody/harmful_weight_share"][-1] == pytest.approx(float(share), rel=1e-4)


def test_gradient_accumulation(tmp_path):
    """GA=2: each micro-batch's weighted mean counts by its share of the step's target tokens, as SFT counts it."""
    # seed 1: the two micro-batches hold different numbers of target tokens
    trainer = make_trainer(tmp_path, flagged_dataset(seed=1), temperature=0.1, per_device_train_batch_size=4)
    iterator = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(iterator)) for _ in range(2)]
    losses, grads = grads_after_step(trainer, batches, accumulation=2)

    reference = build_model(seed=0)
    params = dict(reference.named_parameters())
    tokens = [int((batch["labels"][:, 1:] != -100).sum()) for batch in batches]
    total = 0.0
    for batch, loss, count in zip(batches, losses, tokens):
        value, _ = expected_loss(reference, batch, 0.1)
        share = count / sum(tokens)
        assert 0 < share < 1 and share != 0.5  # unequal counts: a per-micro-batch mean / 2 would differ
        # fused LM head vs full logits, loss ≈3: observed ≤ 8e-8 relative
        torch.testing.assert_close(loss, value.detach() * share, rtol=1e-5, atol=1e-7)
        total = total + value * share
    for name, value in zip(params, torch.autograd.grad(total, list(params.values()))):
        assert_grad_close(grads[name], value, name)


@pytest.mark.parametrize("temperature", [math.inf, 1e9])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_uniform_weights_equal_sft(tmp_path, temperature, mode):
    common = dict(max_steps=3, per_device_train_batch_size=3)  # 3: weights 1/3 are not exact, the loss still is
    peft_config = lora_config() if mode == "lora" else None
    sft = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "sft", **common),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    sft.train()
    antibody = AntibodyTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "antibody", AntibodyConfig, temperature=temperature, **common),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )
    antibody.train()
    sft_params = dict(sft.model.named_parameters())
    for name, param in antibody.model.named_parameters():
        assert torch.equal(param, sft_params[name]), name
    sft_losses = [log["loss"] for log in sft.state.log_history if "loss" in log]
    assert [log["loss"] for log in antibody.state.log_history if "loss" in log] == sft_losses
    # Uniform weights: entropy log(batch size); the last batch of the epoch holds 8 − 2·3 = 2 samples
    entropies = [
        log["antibody/weight_entropy"] for log in antibody.state.log_history if "antibody/weight_entropy" in log
    ]
    # exact uniform weights: only the fp32 rounding of 1/n and log (a few eps ≈ 1e-7) separates it from log n
    assert entropies == pytest.approx([math.log(3), math.log(3), math.log(2)], rel=1e-6)


def test_refusal_views_are_joined_by_row(tmp_path):
    """A row dropped by TRL (prompt alone fills max_length) does not shift the others' refusal views."""
    dataset = prompt_completion_dataset(6)
    prompts = list(dataset["prompt"])
    prompts[1] = " ".join(["write a story about the cat"] * 20)
    dataset = Dataset.from_dict({"prompt": prompts, "completion": dataset["completion"]})
    trainer = make_trainer(tmp_path, dataset=dataset, max_length=64)
    tokenizer = build_tokenizer()
    rows = trainer.train_dataset["_trl_safety_row"]
    assert 1 not in rows and len(rows) == 5
    for example in trainer.train_dataset:
        row = example["_trl_safety_row"]
        view = trainer.refusal_view.row(row)  # the refusal view the loader joins to this row
        refusal = tokenizer.decode(view["input_ids"])
        sample = tokenizer.decode(example["input_ids"])
        assert refusal.startswith(prompts[row]) and sample.startswith(prompts[row])
        assert assign_refusal(row)[:15] in refusal  # consecutive rows get different openings
        # Loss only on the refusal answer
        answer = [t for t, label in zip(view["input_ids"], view["labels"]) if label != -100]
        assert tokenizer.decode(answer).strip().startswith(assign_refusal(row)[:15])


def test_conversational_and_custom_pool(tmp_path):
    trainer = AntibodyTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, AntibodyConfig, max_steps=1, max_length=64),
        train_dataset=conversational_prompt_completion_dataset(6),
        processing_class=build_tokenizer(),
        refusals=["sorry cannot help", "sorry i refuse"],
    )
    tokenizer = build_tokenizer()
    for example in trainer.train_dataset:
        refusal = tokenizer.decode(trainer.refusal_view.row(example["_trl_safety_row"])["input_ids"])
        assert ["sorry cannot help", "sorry i refuse"][example["_trl_safety_row"] % 2] in refusal
        assert "<|im_start|>assistant" in refusal
    trainer.train()
    assert "antibody/harmful_weight_share" not in trainer.state.log_history[0]  # no flag column


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_train_save_and_card(tmp_path, mode):
    trainer = AntibodyTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, AntibodyConfig, max_steps=2, gradient_accumulation_steps=2),
        train_dataset=flagged_dataset(),
        processing_class=build_tokenizer(),
        peft_config=lora_config() if mode == "lora" else None,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) != param.requires_grad, name
    logs = trainer.state.log_history[0]
    assert (
        0 <= logs["antibody/harmful_weight_share"] <= 1 and 0 < logs["antibody/weight_entropy"] <= math.log(4) + 1e-6
    )
    trainer.save_model()
    with open(os.path.join(tmp_path, "defense_config.json")) as f:
        info = json.load(f)
    assert info["defense"] == "antibody" and info["hyperparameters"]["temperature"] == 1.0
    trainer.create_model_card()
    with open(os.path.join(tmp_path, "README.md")) as f:
        assert "Antibody" in f.read()
    assert get_defense("antibody").trainer_class is AntibodyTrainer


def multi_turn(n=6):
    """`messages` rows with an earlier exchange before the last assistant turn, and the same rows split by hand."""
    pc = prompt_completion_dataset(n, seed=1)
    messages, prompts, completions, flags = [], [], [], []
    for i, (p, c) in enumerate(zip(pc["prompt"], pc["completion"])):
        before = [
            {"role": "user", "content": f"hello {i}"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": p},
        ]
        last = {"role": "assistant", "content": c.strip()}
        messages.append([*before, last])
        prompts.append(before)
        completions.append([last])
        flags.append(i % 2 == 0)
    as_messages = Dataset.from_dict({"messages": messages, "is_harmful": flags})
    as_pc = Dataset.from_dict({"prompt": prompts, "completion": completions, "is_harmful": flags})
    return as_messages, as_pc


def test_messages_data_trains_with_refusal_views_of_the_prompt(tmp_path):
    dataset, by_hand = multi_turn()
    refusals = ["sorry cannot help", "sorry i refuse"]
    trainer = AntibodyTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, AntibodyConfig, max_steps=2, max_length=96),
        train_dataset=dataset,
        processing_class=build_tokenizer(),
        refusals=refusals,
    )
    tokenizer = build_tokenizer()
    assert len(trainer.train_dataset) == len(dataset)
    for example in trainer.train_dataset:
        row = example["_trl_safety_row"]
        view = trainer.refusal_view.row(row)
        # the refusal view: the chat-templated turns before the last assistant turn, then the refusal as that turn
        prompt_text = tokenizer.apply_chat_template(by_hand[row]["prompt"], tokenize=False)
        assert tokenizer.decode(view["input_ids"]).startswith(prompt_text + "<|im_start|>assistant")
        answer = tokenizer.decode([t for t, label in zip(view["input_ids"], view["labels"]) if label != -100])
        assert answer.startswith(refusals[row % 2])
        # the sample's loss is on its last assistant turn only (prompt/completion masking), not on the earlier "hi"
        target = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
        assert target.startswith(by_hand[row]["completion"][0]["content"])
    trainer.train()
    assert all(0 <= log["antibody/harmful_weight_share"] <= 1 for log in trainer.state.log_history if "loss" in log)


def test_messages_data_equals_the_same_rows_as_prompt_completion(tmp_path):
    dataset, by_hand = multi_turn()
    grads, weights = [], []
    for name, data in (("messages", dataset), ("pc", by_hand)):
        trainer = AntibodyTrainer(
            build_model(seed=0),
            tiny_config(
                tmp_path / name, AntibodyConfig, temperature=0.05, max_length=96, per_device_train_batch_size=3
            ),
            train_dataset=data,
            processing_class=build_tokenizer(),
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        grads.append((batch, grads_after_step(trainer, [batch], accumulation=1)))
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (batch_m, (loss_m, grad_m)), (batch_p, (loss_p, grad_p)) = grads
    for key in batch_p:  # the same tokens, masks and refusal views reach the step
        assert torch.equal(batch_m[key], batch_p[key]), key
    # same kernels on the same inputs (docs/testing.md): exact
    assert torch.equal(loss_m[0], loss_p[0])
    for name, grad in grad_p.items():
        assert torch.equal(grad_m[name], grad), name
    for name, value in weights[1].items():
        assert torch.equal(weights[0][name], value), name


@pytest.mark.parametrize("turns", [[("user", "a")], [("user", "a"), ("assistant", "b"), ("user", "c")]])
def test_messages_rows_that_cannot_be_split_are_refused(tmp_path, turns):
    rows = [[{"role": role, "content": text} for role, text in turns]] * 2
    with pytest.raises(ValueError, match="train_dataset row 0"):
        make_trainer(tmp_path, dataset=Dataset.from_dict({"messages": rows}))


@pytest.mark.parametrize(
    "dataset, kwargs, message",
    [
        (text_dataset, {}, r"prompt/completion data \(standard or conversational\) or conversational `messages`"),
        (prompt_completion_dataset, {"packing": True}, "packing"),
        (prompt_completion_dataset, {"padding_free": True}, "padding_free"),
    ],
)
def test_unsupported_inputs_are_refused(tmp_path, dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, dataset=dataset(6), **kwargs)


def test_own_loss_function_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func"):
        AntibodyTrainer(
            build_model(seed=0),
            tiny_config(tmp_path, AntibodyConfig),
            train_dataset=flagged_dataset(),
            processing_class=build_tokenizer(),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss,
        )


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        tiny_config(tmp_path, AntibodyConfig, temperature=0.0)
    assert tiny_config(tmp_path, AntibodyConfig, temperature=math.inf).temperature == math.inf


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    def run(output_dir, **kwargs):
        trainer = AntibodyTrainer(
            build_model(seed=0),
            tiny_config(output_dir, AntibodyConfig, max_steps=2, temperature=0.1, **kwargs),
            train_dataset=flagged_dataset(),
            processing_class=build_tokenizer(),
            peft_config=lora_config(),
        )
        trainer.train()
        return dict(trainer.model.named_parameters())

    plain = run(tmp_path / "plain")
    checkpointed = run(tmp_path / "gc", gradient_checkpointing=True)
    for name, param in checkpointed.items():
        # recomputed forward + checkpointed backward vs one graph: may reorder gradient sums (docs/testing.md);
        # observed equal. LoRA B starts at 0, so its 2-step update (lr 1e-2) is far above atol.
        torch.testing.assert_close(param, plain[name], rtol=1e-5, atol=1e-7, msg=name)
