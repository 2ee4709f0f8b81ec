"""Panacea: gradient against an explicit multi-backward reference, the post-training ε, strength zero, resume."""

import json
import os

import pytest
import torch
from peft import LoraConfig
from testing_utils import (
    TINY_LORA,
    build_model,
    build_tokenizer,
    enable_checkpointing,
    grads_of,
    prompt_completion_dataset,
    run_training_steps,
    tiny_config,
    token_nll,
)
from trl import SFTConfig, SFTTrainer

from trl_safety.core.layers import unwrap_model
from trl_safety.defenses.panacea import PanaceaConfig, PanaceaTrainer
from trl_safety.registry import get_defense


HARMFUL_BS = 4


def make_trainer(tmp_path, peft=False, checkpointing="off", ga=1, plain_sft=False, **overrides):
    kwargs = dict(gradient_accumulation_steps=ga, gradient_checkpointing=checkpointing != "off")
    if checkpointing != "off":
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": checkpointing == "reentrant"}
    kwargs.update(overrides)
    extra = {}
    if plain_sft:
        trainer_class, config = SFTTrainer, tiny_config(tmp_path, SFTConfig, **kwargs)
    else:
        kwargs.setdefault("harmful_batch_size", HARMFUL_BS)
        trainer_class, config = PanaceaTrainer, tiny_config(tmp_path, PanaceaConfig, **kwargs)
        extra["harmful_dataset"] = prompt_completion_dataset(HARMFUL_BS, seed=1)
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


def harmful_batch(trainer):
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.harmful_dataset]
    return trainer._prepare_inputs(trainer.data_collator(rows))


def panacea_reference(trainer, batches, lamb, rho, clamp):
    """∇g − λ(∇min(h(w+ε), c) − ∇h(w)) per micro-step (extra term ÷GA), ε = ρ·∇h/‖∇h‖; also returns ε."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    ga = len(batches)
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    hb = harmful_batch(trainer)
    expected = [torch.zeros_like(p) for p in params]
    for batch in batches:
        g_f = grads_of(token_nll(model, batch, "sum") / num_items, params)
        g_h = grads_of(token_nll(model, hb, "mean"), params)
        norm = torch.sqrt(sum((g**2).sum() for g in g_h))
        eps = [rho * g / (norm + 1e-7) for g in g_h]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p += e
        g_p = grads_of(torch.clamp(token_nll(model, hb, "mean"), max=clamp), params)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for e, f, h, q in zip(expected, g_f, g_h, g_p):
            e += f - lamb * (q - h) / ga
    return expected, eps


def assert_close(actual, expected):
    flat_a = torch.cat([a.flatten() for a in actual])
    flat_e = torch.cat([e.flatten() for e in expected])
    # One backward per term vs the package's combined passes (docs/testing.md); λ = 2: observed ≤ 2.7e-7 relative in
    # norm and ≤ 1.2e-7 per element (≥ 8× below atol on gradients and on ε, whose largest entries are ≈ 0.5)
    relative = ((flat_a - flat_e).norm() / flat_e.norm()).item()
    assert relative <= 1e-5, relative
    torch.testing.assert_close(flat_a, flat_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant"])
@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_gradient_matches_reference(tmp_path, peft, ga, checkpointing):
    # clamp 100: the perturbed harmful loss (≈6 on a random model) stays below it, so its gradient is live
    lamb, rho, clamp = 2.0, 1.0, 100.0
    trainer = make_trainer(
        tmp_path, peft=peft, checkpointing=checkpointing, ga=ga, lamb=lamb, rho=rho, harmful_loss_clamp=clamp
    )
    batches, actual = run_training_steps(trainer, ga)
    expected, eps = panacea_reference(trainer, batches, lamb, rho, clamp)
    assert_close(actual, expected)
    assert_close(list(trainer.last_eps.values()), eps)
    plain, _ = panacea_reference(trainer, batches, 0.0, rho, clamp)
    diff = torch.cat([(e - p).flatten() for e, p in zip(expected, plain)]).norm()
    assert diff > 1e-3 * torch.cat([p.flatten() for p in plain]).norm()


def test_clamp_zeroes_the_perturbed_gradient(tmp_path):
    trainer = make_trainer(tmp_path, lamb=2.0, rho=1.0, harmful_loss_clamp=5.0)
    batches, actual = run_training_steps(trainer, 1)
    hb = harmful_batch(trainer)
    assert token_nll(trainer.model, hb, "mean").item() > 5.0  # the clamp is active at w (and, here, at w+ε)
    expected, _ = panacea_reference(trainer, batches, 2.0, 1.0, 5.0)
    assert_close(actual, expected)


def test_reentrant_checkpointing(tmp_path):
    trainer = make_trainer(tmp_path, peft=True, checkpointing="reentrant", lamb=2.0, harmful_loss_clamp=100.0)
    batches, actual = run_training_steps(trainer, 1)
    unwrap_model(trainer.model).gradient_checkpointing_disable()
    expected, _ = panacea_reference(trainer, batches, 2.0, 1.0, 100.0)
    assert_close(actual, expected)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_eps_added_at_train_end_and_saved(tmp_path, peft):
    without = make_trainer(tmp_path / "a", peft=peft, max_steps=3, add_eps=False)
    without.train()
    with_eps = make_trainer(tmp_path / "b", peft=peft, max_steps=3, add_eps=True)
    with_eps.train()
    eps = with_eps.last_eps
    # ‖ε‖ = ρ up to the +1e-7 in ρ·g/(‖g‖ + 1e-7) and fp32 rounding of the norm
    assert abs(torch.sqrt(sum((e**2).sum() for e in eps.values())).item() - 1.0) < 1e-5  # ‖ε‖ = ρ
    for name, p in with_eps.model.named_parameters():
        if p.requires_grad:
            # exact: both runs train identically (add_eps acts after the last step; the weights were observed
            # bit-equal), and w + ε is one correctly rounded fp32 add on every kernel (docs/testing.md)
            torch.testing.assert_close(p, without.model.state_dict()[name] + eps[name], rtol=0, atol=0)
    logged = {k for entry in with_eps.state.log_history for k in entry}
    assert {"panacea/harmful_loss", "panacea/harmful_loss_perturbed", "panacea/harmful_grad_norm"} <= logged
    with_eps.save_model()
    with_eps.create_model_card()
    out = tmp_path / "b"
    assert "Panacea" in open(out / "README.md").read()
    assert json.load(open(out / "defense_config.json"))["stage"] == "fine-tuning"
    saved = ("adapter_model.safetensors",) if peft else ("model.safetensors",)
    assert all(os.path.exists(out / f) for f in saved)
    if not peft:  # the saved weights include ε
        from safetensors.torch import load_file

        state = load_file(out / "model.safetensors")
        name = next(n for n in eps if "q_proj" in n)
        torch.testing.assert_close(state[name], with_eps.model.state_dict()[name], rtol=0, atol=0)


def test_resume_restores_eps_and_loader(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = make_trainer(tmp_path / "a", **common)
    straight.train()
    resumed = make_trainer(tmp_path / "b", **common)
    resumed.load_defense_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.last_eps is not None  # ε of step 2 came back with the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for name in straight.last_eps:
        torch.testing.assert_close(resumed.last_eps[name], straight.last_eps[name], rtol=0, atol=0)
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_config_and_registry():
    with pytest.raises(ValueError, match="rho"):
        PanaceaConfig(output_dir="x", rho=-1.0, bf16=False)
    with pytest.raises(ValueError, match="harmful_loss_clamp"):
        PanaceaConfig(output_dir="x", harmful_loss_clamp=0.0, bf16=False)
    spec = get_defense("panacea")
    assert spec.trainer_class is PanaceaTrainer and spec.stage == "fine-tuning"
    assert "zero3" in spec.unsupported_backends
