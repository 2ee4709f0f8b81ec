"""Antibody (alignment stage): gradient and adaptive λ against an explicit reference, refusal view, strength zero,
end-to-end training and resume of the λ EMA."""

import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import (
    TINY_LORA,
    build_model,
    build_tokenizer,
    conversational_dataset,
    enable_checkpointing,
    grads_of,
    prompt_completion_dataset,
    run_training_steps,
    text_dataset,
    tiny_config,
    token_nll,
    trainable_snapshot,
)
from trl import SFTConfig, SFTTrainer

from trl_safety.core.layers import unwrap_model
from trl_safety.data.refusals import refusal_pool
from trl_safety.defenses.antibody_align import AntibodyAlignConfig, AntibodyAlignTrainer
from trl_safety.registry import get_defense


HARMFUL_BS = 4


def harmful_data():
    return prompt_completion_dataset(HARMFUL_BS, seed=1)


def make_trainer(tmp_path, peft=False, checkpointing="off", ga=1, plain_sft=False, harmful=None, **overrides):
    kwargs = dict(gradient_accumulation_steps=ga, gradient_checkpointing=checkpointing != "off")
    if checkpointing != "off":
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": checkpointing == "reentrant"}
    kwargs.update(overrides)
    extra = {}
    if plain_sft:
        trainer_class, config = SFTTrainer, tiny_config(tmp_path, SFTConfig, **kwargs)
    else:
        kwargs.setdefault("harmful_batch_size", HARMFUL_BS)
        trainer_class, config = AntibodyAlignTrainer, tiny_config(tmp_path, AntibodyAlignConfig, **kwargs)
        extra["harmful_dataset"] = harmful if harmful is not None else harmful_data()
    trainer = trainer_class(
        build_model("llama", hidden=32, layers=2, seed=0),
        args=config,
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(**TINY_LORA) if peft else None,
        **extra,
    )
    return enable_checkpointing(trainer, checkpointing)


# ------------------------------------------------------------------------------- independent reference (spec math)


def collate(trainer, dataset):
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
    return trainer._prepare_inputs(trainer.data_collator(rows))


def reference_batches(trainer):
    """The harmful batch and its refusal view (same prompts, pool sentence i for row i), tokenized by TRL."""
    raw = harmful_data()
    pool = refusal_pool()
    refusal = Dataset.from_dict(
        {"prompt": raw["prompt"], "completion": [" " + pool[i % len(pool)] for i in range(len(raw))]}
    )
    prepared = trainer._prepare_dataset(refusal, trainer.processing_class, trainer.args, False, None, "ref")
    harmful = trainer._prepare_dataset(raw, trainer.processing_class, trainer.args, False, None, "harm")
    return collate(trainer, harmful), collate(trainer, prepared)


def antibody_reference(trainer, batches, alpha, eta, momentum, lambda2, fixed_lambda=None):
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    ga = len(batches)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    hb, rb = reference_batches(trainer)
    expected = [torch.zeros_like(p) for p in params]
    lam = None
    for batch in batches:
        g_a = grads_of(token_nll(model, batch, "sum") / num_items, params)
        g_h = grads_of(token_nll(model, hb, "mean"), params)
        norm = torch.sqrt(sum((g**2).sum() for g in g_h))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, g_h):
                p -= alpha * g / (norm + 1e-7)
        g_p = grads_of(token_nll(model, hb, "mean"), params)
        g_r = grads_of(token_nll(model, rb, "mean"), params)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        g_d = [h - p for h, p in zip(g_h, g_p)]
        if fixed_lambda is None:
            a = torch.cat([g.flatten() for g in g_a])
            d = torch.cat([g.flatten() for g in g_d])
            cos = (a @ d / (a.norm() * d.norm())).item()
            raw = max(0.0, eta - cos)
            lam = raw if lam is None else momentum * lam + (1 - momentum) * raw
        else:
            lam = fixed_lambda
        for e, a_, d_, r_ in zip(expected, g_a, g_d, g_r):
            e += a_ + (lam * d_ + lambda2 * r_) / ga
    return expected, lam


def assert_close(actual, expected):
    flat_a = torch.cat([a.flatten() for a in actual])
    flat_e = torch.cat([e.flatten() for e in expected])
    # One backward per term vs the package's combined passes (docs/testing.md); λ ≈ 5 multiplies a difference of two
    # harmful gradients (as in test_booster): observed ≤ 8.6e-7 relative in norm (bound 1e-5) and ≤ 1.5e-6·max per
    # element, which the fixed atol=1e-6 passed with 5× margin only; per element, 1e-5 relative to the largest entry.
    relative = ((flat_a - flat_e).norm() / flat_e.norm()).item()
    assert relative <= 1e-5, relative
    torch.testing.assert_close(flat_a, flat_e, rtol=1e-5, atol=1e-5 * float(flat_e.abs().max()))


HP = dict(alpha=0.1, eta_lbd=5.0, ema_momentum=0.5, lambda2=0.5)


@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant"])
@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_gradient_matches_reference(tmp_path, peft, ga, checkpointing):
    trainer = make_trainer(tmp_path, peft=peft, checkpointing=checkpointing, ga=ga, **HP)
    batches, actual = run_training_steps(trainer, ga)
    expected, lam = antibody_reference(trainer, batches, 0.1, 5.0, 0.5, 0.5)
    assert_close(actual, expected)
    # λ = η − cos: the cosine of two flattened gradients (~1e-6 noise) on λ ≈ 5, observed ≤ 3e-8 relative
    assert trainer.lambda_ema == pytest.approx(lam, rel=1e-5)
    plain, _ = antibody_reference(trainer, batches, 0.1, 5.0, 0.5, 0.0, fixed_lambda=0.0)
    diff = torch.cat([(e - p).flatten() for e, p in zip(expected, plain)]).norm()
    assert diff > 1e-3 * torch.cat([p.flatten() for p in plain]).norm()


def test_reentrant_checkpointing(tmp_path):
    trainer = make_trainer(tmp_path, peft=True, checkpointing="reentrant", **HP)
    batches, actual = run_training_steps(trainer, 1)
    unwrap_model(trainer.model).gradient_checkpointing_disable()
    expected, _ = antibody_reference(trainer, batches, 0.1, 5.0, 0.5, 0.5)
    assert_close(actual, expected)


def test_fixed_lambda_is_booster_plus_refusal(tmp_path):
    trainer = make_trainer(tmp_path, ga=2, fixed_lambda=3.0, **HP)
    batches, actual = run_training_steps(trainer, 2)
    expected, _ = antibody_reference(trainer, batches, 0.1, 5.0, 0.5, 0.5, fixed_lambda=3.0)
    assert_close(actual, expected)
    assert trainer.lambda_ema is None


def test_refusal_view_is_aligned_with_harmful_rows(tmp_path):
    trainer = make_trainer(tmp_path)
    pool = refusal_pool()
    assert len(pool) >= 100 and len(set(pool)) == len(pool)
    assert list(trainer.refusal_dataset["prompt"]) == list(trainer.harmful_dataset["prompt"])
    eos = trainer.processing_class.eos_token  # TRL appends EOS to standard completions
    assert list(trainer.refusal_dataset["completion"]) == [" " + pool[i] + eos for i in range(HARMFUL_BS)]
    messages = make_trainer(tmp_path / "m", harmful=conversational_dataset(HARMFUL_BS, seed=1))
    last = [m[-1] for m in messages.refusal_dataset["messages"]]
    assert [t["content"] for t in last] == pool[:HARMFUL_BS] and all(t["role"] == "assistant" for t in last)
    with pytest.raises(ValueError, match="prompt"):
        make_trainer(tmp_path / "t", harmful=text_dataset(4))


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_train_save_and_card(tmp_path, peft):
    trainer = make_trainer(tmp_path, peft=peft, max_steps=3)
    before = trainable_snapshot(trainer.model)
    trainer.train()
    after = trainable_snapshot(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {
        "antibody-align/harmful_loss",
        "antibody-align/harmful_loss_after_step",
        "antibody-align/refusal_loss_after_step",
        "antibody-align/lambda",
        "antibody-align/cosine",
    } <= logged
    lambdas = [e["antibody-align/lambda"] for e in trainer.state.log_history if "antibody-align/lambda" in e]
    assert all(4.0 <= v <= 6.0 for v in lambdas)  # η_λ=5 keeps λ in [4, 6]
    trainer.save_model()
    trainer.create_model_card()
    card = open(os.path.join(tmp_path, "README.md")).read()
    assert "Antibody" in card and "2603.00498" in card


def test_resume_restores_lambda_ema(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, **HP)
    straight = make_trainer(tmp_path / "a", **common)
    straight.train()
    resumed = make_trainer(tmp_path / "b", **common)
    resumed.load_defense_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.lambda_ema is not None
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.lambda_ema == straight.lambda_ema
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_config_and_registry():
    with pytest.raises(ValueError, match="ema_momentum"):
        AntibodyAlignConfig(output_dir="x", ema_momentum=1.5, bf16=False)
    with pytest.raises(ValueError, match="lambda2"):
        AntibodyAlignConfig(output_dir="x", lambda2=-0.1, bf16=False)
    spec = get_defense("antibody-align")
    assert spec.trainer_class is AntibodyAlignTrainer and spec.stage == "alignment"
