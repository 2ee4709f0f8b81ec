"""T-Vaccine: layer scores, active-layer Vaccine gradient, freezing, checkpointing of inactive layers, resume."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config

from trl_safety import TVaccineConfig, TVaccineTrainer


NUM_LAYERS = 4
LORA = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
    init_lora_weights=False,
)


def make_trainer(
    tmp_path, peft=False, trainer_class=TVaccineTrainer, config_class=TVaccineConfig, harmful_rows=1, **kwargs
):
    kwargs.setdefault("num_active_layers", 2)
    extra = {}
    if trainer_class is TVaccineTrainer:
        extra["harmful_dataset"] = prompt_completion_dataset(harmful_rows, seed=1)
    else:
        for key in ("num_active_layers",):
            kwargs.pop(key)
    return trainer_class(
        model=build_model("llama", hidden=32, layers=NUM_LAYERS, seed=0),
        args=tiny_config(tmp_path, config_class, **kwargs),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(**LORA) if peft else None,
        **extra,
    )


def token_ce(logits, labels, reduction):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")
    return ce / (labels != -100).sum() if reduction == "mean" else ce


def attention_modules(model):
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


def attention_output_grads(model, batch, modules):
    outputs = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0])) for m in modules]
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for h in handles:
        h.remove()
    return torch.autograd.grad(token_ce(logits, batch["labels"], "mean"), outputs)


def harmful_batch(trainer):
    row = trainer.harmful_dataset[0]
    ids = torch.tensor([row["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([row["labels"]])}


def expected_grads(model, batch_list, rho, num_items, active):
    """Vaccine on the active layers' attention outputs only, norm over those layers only."""
    modules = [attention_modules(model)[i] for i in active]
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for batch in batch_list:
        grads = attention_output_grads(model, batch, modules)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))

        def make_add(e):
            return lambda _m, _i, out: (out[0] + e, *out[1:])

        handles = [m.register_forward_hook(make_add(rho * g / (norm + 1e-7))) for m, g in zip(modules, grads)]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for h in handles:
            h.remove()
        for t, g in zip(total, torch.autograd.grad(token_ce(logits, batch["labels"], "sum") / num_items, params)):
            t += g
    return total


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_gc", "gc"])
@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_scores_freezing_and_gradient(tmp_path, peft, ga, checkpointing):
    rho = 0.5
    trainer = make_trainer(
        tmp_path,
        peft=peft,
        rho=rho,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )
    model = trainer.model
    if checkpointing:  # what Trainer.train() does before the first step
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=trainer.args.activation_checkpointing_kwargs
        )
    loader = iter(trainer.get_train_dataloader())
    batch_list = [trainer._prepare_inputs(next(loader)) for _ in range(ga)]
    num_items = trainer._get_num_items_in_batch(batch_list, batch_list[0]["input_ids"].device)
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}

    # Expected layer probabilities: ‖∂h/∂e_l‖ on the (single) harmful example, normalised
    scores = torch.stack(
        [g.norm() for g in attention_output_grads(model, harmful_batch(trainer), attention_modules(model))]
    )

    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = ga
    for batch in batch_list:
        trainer.training_step(model, batch, num_items)
    # gradient norms from the package's pass vs this one (docs/testing.md): observed ≤ 1.7e-7 relative, 60× margin
    torch.testing.assert_close(trainer._probabilities.float(), scores / scores.sum(), rtol=1e-5, atol=1e-7)
    active = trainer._active
    assert len(active) == 2 and active == sorted(set(active))

    # Only the inactive layers' attention parameters are frozen; MLP parameters train everywhere (official behaviour)
    frozen = {n for n in trainable_before if not dict(model.named_parameters())[n].requires_grad}
    inactive_attention = {
        n for n in trainable_before if ".self_attn." in n and int(n.split(".layers.")[1].split(".")[0]) not in active
    }
    assert frozen == inactive_attention and frozen
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None, name
    # Inactive layers run under activation checkpointing, active ones as configured
    for index, layer in enumerate(trainer._layers):
        assert layer.gradient_checkpointing == (checkpointing or index not in active)

    expected = expected_grads(model, batch_list, rho, num_items, active)
    actual = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected):
        # package hooks + checkpointed inactive layers vs the explicit reference (docs/testing.md): observed
        # ≤ 1.8e-8 abs (≤ 8e-7·max), 8× below the tolerance
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)

    trainer._restore_layers()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before


def test_freeze_mlp_freezes_whole_inactive_layers(tmp_path):
    trainer = make_trainer(tmp_path, rho=0.5, freeze_mlp=True)
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.training_step(model, batch, trainer._get_num_items_in_batch([batch], batch["input_ids"].device))
    for name, param in model.named_parameters():
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert param.requires_grad == (layer in trainer._active), name
            assert (param.grad is not None) == (layer in trainer._active), name
        else:
            assert param.requires_grad and param.grad is not None, name


def test_inactive_layers_store_no_activations(tmp_path):
    """With checkpointing of inactive layers, the forward keeps fewer tensors for backward."""

    def saved_tensors(trainer):
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer._prepare_step(trainer.model)
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        trainer.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()
        return count[0]

    with_checkpointing = saved_tensors(make_trainer(tmp_path / "a", rho=0.5))
    without = saved_tensors(make_trainer(tmp_path / "b", rho=0.5, checkpoint_inactive_layers=False))
    assert with_checkpointing < without


def test_sampling_follows_scores(tmp_path):
    trainer = make_trainer(tmp_path, rho=0.5)
    trainer._probabilities = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert all(trainer.sample_layers() == [0, 1] for _ in range(20))
    trainer._probabilities = torch.tensor([0.97, 0.01, 0.01, 0.01])
    draws = [trainer.sample_layers() for _ in range(200)]
    assert sum(0 in d for d in draws) > 190  # layer 0 is almost always one of the two


def test_too_many_active_layers_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="num_active_layers=5.*4 decoder layers"):
        make_trainer(tmp_path, num_active_layers=5)


def test_resume_equals_uninterrupted(tmp_path):
    """Train 4 steps (checkpoint at 2) == resume from checkpoint 2 and train 2 more; sampler state included."""
    common = dict(
        rho=0.5,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        resample_interval=1,
        rescore_interval=2,
        per_device_train_batch_size=2,
        harmful_rows=3,
        lr_scheduler_type="constant",
    )
    full = make_trainer(tmp_path / "run", **common)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert os.path.exists(tmp_path / "run" / "checkpoint-2" / "defense_state.json")
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert full._active == resumed._active
    assert torch.equal(full._probabilities, resumed._probabilities)
    assert torch.equal(full._generator.get_state(), resumed._generator.get_state())
    assert full._harmful_batches.state_dict() == resumed._harmful_batches.state_dict()


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_train_and_save(tmp_path, peft):
    trainer = make_trainer(tmp_path, peft=peft, rho=3.0, max_steps=3, resample_interval=1)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "t-vaccine/unperturbed_loss" in entry]
    assert len(logged) == 3 and "t-vaccine/harmful_loss" in trainer.state.log_history[0]
    # After training every parameter is trainable again and checkpointing flags are back to the user's
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora" in n or not peft)
    assert not any(layer.gradient_checkpointing for layer in trainer._layers)
    trainer.save_model()
    trainer.create_model_card()
    card = open(os.path.join(tmp_path, "README.md")).read()
    assert "T-Vaccine" in card and "2410.09760" in card


def test_ddp_finds_unused_parameters(tmp_path):
    assert tiny_config(tmp_path, TVaccineConfig).ddp_find_unused_parameters is True
    assert tiny_config(tmp_path, TVaccineConfig, ddp_find_unused_parameters=False).ddp_find_unused_parameters is False


def test_deepspeed_refused():
    assert {"zero1", "zero2", "zero3"} <= set(TVaccineTrainer.unsupported_backends)
    from trl_safety import get_defense

    assert "zero3" in get_defense("t-vaccine").unsupported_backends


@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant", "reentrant"])
def test_rescoring_while_inactive_layers_are_checkpointed(tmp_path, checkpointing):
    """Re-scoring after step 0 runs while the inactive layers are checkpointed with frozen adapters (a past bug)."""
    # Attention-only adapters: an inactive layer then has no trainable parameter at all
    trainer = TVaccineTrainer(
        model=build_model("llama", hidden=32, layers=NUM_LAYERS, seed=0),
        args=tiny_config(
            tmp_path,
            TVaccineConfig,
            gradient_checkpointing=checkpointing != "off",
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"},
            rho=3.0,
            max_steps=3,
            num_active_layers=1,
            rescore_interval=1,
            resample_interval=1,
            harmful_batch_size=2,
            gradient_accumulation_steps=4,
            per_device_train_batch_size=2,
            bf16=True,  # CPU bf16 autocast, as `use_cpu=True` trains by default
        ),
        train_dataset=prompt_completion_dataset(24),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        harmful_dataset=prompt_completion_dataset(4, seed=1),
    )
    trainer.train()
    scored = [entry for entry in trainer.state.log_history if "t-vaccine/harmful_loss" in entry]
    assert len(scored) == 3  # one scoring pass per step, each after a step that checkpointed inactive layers
