import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from testing_utils import (
    TINY_LORA,
    build_model,
    build_tokenizer,
    enable_checkpointing,
    prompt_completion_dataset,
    run_training_steps,
    tiny_config,
)
from trl import SFTTrainer

from trl_safety import TokenConstrainedConfig, TokenConstrainedTrainer
from trl_safety.core.hooks import gradient_checkpointing_disabled
from trl_safety.core.layers import get_decoder_layers
from trl_safety.defenses.token_constrained.token_constrained_trainer import (
    constrained_token_weights,
    position_betas,
)
from trl_safety.registry import get_defense


def make_trainer(tmp_path, lora=False, dataset=None, **kwargs):
    return TokenConstrainedTrainer(
        build_model(seed=0),
        tiny_config(tmp_path, TokenConstrainedConfig, **kwargs),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(task_type="CAUSAL_LM", **TINY_LORA) if lora else None,
    )


def test_registered():
    spec = get_defense("token-constrained")
    assert spec.stage == "fine-tuning" and spec.trainer_class is TokenConstrainedTrainer
    assert spec.neutral_overrides == {"beta": 0.0}


def test_position_betas_follow_the_official_schedule():
    # 3 prompt tokens (masked), 7 supervised tokens, 2 padding positions (masked)
    mask = torch.tensor([[False] * 3 + [True] * 7 + [False] * 2])
    betas = position_betas(mask, beta=0.1, bias_factor=20.0, first_factor=5.0, length=5)
    expected = [0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1]
    torch.testing.assert_close(betas[mask], torch.tensor(expected), rtol=1e-6, atol=0)  # 0.1·20 in fp32
    # a second row starting its answer at the first position counts from there
    mask = torch.tensor([[True, True, False], [False, False, True]])
    betas = position_betas(mask, beta=1.0, bias_factor=3.0, first_factor=2.0, length=2)
    assert betas[mask].tolist() == [2.0, 3.0, 2.0]


def test_weight_gradient_matches_the_closed_form():
    # one token: the gradient of w·(−log softmax(z)_y) w.r.t. z is 2σ(−β(log softmax(z)_y − c))·(softmax(z) − e_y)
    torch.manual_seed(0)
    z = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y, c, beta = 4, -1.7, 2.0
    log_prob = torch.log_softmax(z, -1)[y]
    w = constrained_token_weights(log_prob.view(1), torch.tensor([c], dtype=torch.float64), torch.tensor([beta]), 0.0)
    (-(w * log_prob)).sum().backward()
    with torch.no_grad():
        expected = (
            2
            * torch.sigmoid(-beta * (torch.log_softmax(z, -1)[y] - c))
            * (torch.softmax(z, -1) - F.one_hot(torch.tensor(y), 11).double())
        )
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-14)  # fp64, same formula


def test_min_weight_floor():
    w = constrained_token_weights(torch.tensor([0.0]), torch.tensor([-100.0]), torch.tensor([2.0]), 1e-3)
    assert w.item() == pytest.approx(1e-3)


def paper_loss_gradient(trainer, reference, batches, params, num_items, sft=False):
    """∇ of Σ −(2/βₜ) log σ(βₜΔₜ) / N (the paper's loss value), from the full logits of policy and reference; with
    `sft`, ∇ of plain SFT's Σ −log π / N instead."""
    args = trainer.args
    total = 0.0
    policy = trainer.accelerator.unwrap_model(trainer.model)
    for batch in batches:
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        # autograd.grad cannot differentiate through reentrant checkpointing; the values are the same without it
        with gradient_checkpointing_disabled(get_decoder_layers(policy)):
            logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        with torch.no_grad():
            ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ref = torch.log_softmax(ref_logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        # position t of each supervised token, counted by hand
        betas = torch.zeros_like(log_probs)
        for row in range(mask.shape[0]):
            t = 0
            for col in range(mask.shape[1]):
                if mask[row, col]:
                    t += 1
                    factor = args.first_token_bias_factor if t == 1 else (args.bias_factor if t <= 5 else 1.0)
                    betas[row, col] = args.beta * factor
        if sft:
            total = total - log_probs[mask].sum()
            continue
        delta = log_probs - ref
        assert (2 * torch.sigmoid(-betas * delta.detach()))[mask].min() > args.min_weight  # the floor never binds
        total = total + (-(2 / betas[mask]) * F.logsigmoid(betas[mask] * delta[mask])).sum()
    return [g.detach() for g in torch.autograd.grad(total / num_items, params)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant", "reentrant"])
def test_gradient_matches_the_paper_loss(tmp_path, lora, ga, checkpointing):
    if checkpointing == "reentrant" and (ga == 2 or not lora):
        pytest.skip("one reentrant case (LoRA, GA 1) is enough")
    trainer = make_trainer(tmp_path, lora=lora, per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga)
    enable_checkpointing(trainer, checkpointing)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    # move the policy away from the starting model, so the weights are not all 1
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=generator) * (p.abs().mean() + 0.05))
    reference = build_model(seed=0)  # the starting model (for LoRA: the base without adapter)
    batches, actual = run_training_steps(trainer, ga)
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    expected = paper_loss_gradient(trainer, reference, batches, params, num_items)

    for a, e in zip(actual, expected):
        # fused LM head vs full logits (docs/testing.md): log-probs differ by ~1e-6, the weights 2σ(−βΔ) carry that
        # times β/2 ≤ 1; the gradient sums such terms, so 1e-5 of its largest entry bounds the difference
        torch.testing.assert_close(a, e, rtol=1e-5, atol=max(1e-7, 1e-5 * float(e.abs().max())))
    # teeth: plain SFT's gradient on the same batches differs from the constrained one far beyond that tolerance
    plain = paper_loss_gradient(trainer, reference, batches, params, num_items, sft=True)
    assert max(float((a - p).abs().max() / p.abs().max()) for a, p in zip(actual, plain)) > 1e-2


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_first_step_is_sft(tmp_path, lora):
    # reference = the starting weights: Δ = 0 exactly (same kernel, same weights), so w = 1 and the update is SFT's
    trainer = make_trainer(tmp_path / "tc", lora=lora, max_steps=1)
    sft = SFTTrainer(
        build_model(seed=0),
        tiny_config(tmp_path / "sft", max_steps=1),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(task_type="CAUSAL_LM", **TINY_LORA) if lora else None,
    )
    trainer.train()
    sft.train()
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), sft.model.named_parameters()):
        assert torch.equal(a, b), name
    assert trainer.reference_mode == ("adapter_off" if lora else "copy")


def test_training_changes_weights_and_keeps_reference_frozen(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, learning_rate=5e-2)
    initial = build_model(seed=0)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "token-constrained/mean_weight" in entry]
    assert len(logged) == 3 and logged[-1]["token-constrained/mean_weight"] != 1.0
    assert "entropy" in logged[-1] and "mean_token_accuracy" in logged[-1]
    for (name, p), (_, q) in zip(trainer._reference.named_parameters(), initial.named_parameters()):
        assert torch.equal(p, q), name
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), initial.named_parameters()):
        assert not torch.equal(p, q), name


def test_strength_zero_builds_no_reference(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.0)
    assert trainer.reference_mode is None and trainer._reference is None


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="reference_mode"):
        TokenConstrainedConfig(output_dir=str(tmp_path), reference_mode="frozen")
    with pytest.raises(ValueError, match="beta"):
        TokenConstrainedConfig(output_dir=str(tmp_path), beta=-1.0)
    with pytest.raises(ValueError, match="reference_mode='copy'"):
        make_trainer(tmp_path, reference_mode="adapter_off")
    with pytest.raises(ValueError, match="packing"):
        make_trainer(tmp_path, packing=True)


def test_adapter_off_refuses_a_non_zero_adapter(tmp_path):
    from peft import get_peft_model

    model = get_peft_model(
        build_model(seed=0), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **TINY_LORA)
    )
    with pytest.raises(ValueError, match="does not start at zero"):
        TokenConstrainedTrainer(
            model,
            tiny_config(tmp_path, TokenConstrainedConfig, reference_mode="adapter_off"),
            train_dataset=prompt_completion_dataset(8),
            processing_class=build_tokenizer(),
        )
    # the copy mode takes that non-zero adapter as the reference: the first step is then plain SFT's
    trainer = TokenConstrainedTrainer(
        model,
        tiny_config(tmp_path, TokenConstrainedConfig, reference_mode="copy"),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
    )
    batches, _ = run_training_steps(trainer, 1)
    assert trainer.reference_mode == "copy"
    assert compat_mean_weight(trainer) == 1.0


def compat_mean_weight(trainer):
    from trl_safety import compat

    return compat.metrics_buffer(trainer, "train")["token-constrained/mean_weight"][-1]


def test_reference_copy_follows_the_live_model(tmp_path):
    # DeepSpeed moves and casts the model only when training starts, after the copy was made
    trainer = make_trainer(tmp_path)
    trainer._reference.double()
    run_training_steps(trainer, 1)
    assert next(trainer._reference.parameters()).dtype == torch.float32
