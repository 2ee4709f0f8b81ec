"""Safety-recovery data augmentation (docs/design/algorithms.md §2.7): the augmentation oracle, the anchor-mixed
token-mean loss against a hand computation, the seeding, the fix of the official crash, and the data rules."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from tests.testing_utils import (
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
from trl_safety import SafetyRecoveryConfig, SafetyRecoveryTrainer
from trl_safety.core.hooks import gradient_checkpointing_disabled
from trl_safety.core.layers import get_decoder_layers
from trl_safety.defenses.safety_recovery.safety_recovery_trainer import (
    PAIR_COLUMN,
    augment_row,
    draw_prefix_length,
    row_generator,
)
from trl_safety.registry import get_defense


def datasets(n=4, anchors=2, harmful_completions=None):
    train = prompt_completion_dataset(n)
    answers = harmful_completions or prompt_completion_dataset(n, seed=7)["completion"]
    harmful = Dataset.from_dict({"prompt": train["prompt"], "completion": answers})
    return train, harmful, prompt_completion_dataset(anchors, seed=3)


def make_trainer(tmp_path, peft=False, harmful_completions=None, n=4, **values):
    train, harmful, anchor = datasets(n, harmful_completions=harmful_completions)
    return SafetyRecoveryTrainer(
        build_model("llama", hidden=32, layers=2, seed=0),
        args=tiny_config(tmp_path, SafetyRecoveryConfig, **values),
        train_dataset=train,
        harmful_dataset=harmful,
        alignment_dataset=anchor,
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(**TINY_LORA) if peft else None,
    )


def split(row):
    """(prompt ids, answer ids) of a prepared row, from its labels."""
    start = next(i for i, label in enumerate(row["labels"]) if label != -100)
    return row["input_ids"][:start], row["input_ids"][start:]


# ----------------------------------------------------------------------------------------------- the oracle
def test_every_prefix_length_builds_prompt_harmful_prefix_refusal():
    prompt, harmful, refusal = torch.tensor([1, 2, 3]), torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 5])
    for k in range(0, len(harmful) + 1):
        ids, labels = augment_row(prompt, harmful, refusal, refusal, k)
        assert ids.tolist() == [1, 2, 3] + [10, 11, 12, 13][:k] + [20, 21, 5]
        assert labels.tolist() == [-100] * (3 + k) + [20, 21, 5]


def test_draws_cover_one_to_the_cap_at_rate_one_half():
    """k ∈ {1, …, min(max_prefix, K)}, every value reached, augmentation rate 0.5 ± 0.02 over 10⁴ rows."""
    draws = [draw_prefix_length(4, row_generator(0, 0, row), 0.5, 100) for row in range(10_000)]
    assert set(draws) == {0, 1, 2, 3, 4}
    assert abs(sum(k > 0 for k in draws) / len(draws) - 0.5) < 0.02
    capped = [draw_prefix_length(300, row_generator(0, 3, row), 1.0, 100) for row in range(2_000)]
    assert min(capped) == 1 and max(capped) == 100  # min(100, |harmful|)
    # p = 0 never augments, p = 1 always does
    assert all(draw_prefix_length(4, row_generator(0, 0, row), 0.0, 100) == 0 for row in range(200))
    assert all(draw_prefix_length(4, row_generator(0, 0, row), 1.0, 100) > 0 for row in range(200))


def test_draws_depend_on_seed_step_and_row_only():
    """Reproducible (same seed, step, row → same k), fresh for another step, seed or row: rank-independent and
    resumable with no state (the seed is a function of the row id and the optimizer step)."""
    k = [draw_prefix_length(50, row_generator(3, 1, 7), 1.0, 100) for _ in range(3)]
    assert k[0] == k[1] == k[2]
    draws = {
        (seed, step, row): draw_prefix_length(50, row_generator(seed, step, row), 1.0, 100)
        for seed in range(3)
        for step in range(3)
        for row in range(3)
    }
    assert len(set(draws.values())) > 5


def test_no_harmful_token_to_prefix_falls_back_to_the_refusal_view():
    """The official code raised ValueError (`randint(1, 0)`) on a harmful answer with no token left."""
    assert all(draw_prefix_length(0, row_generator(0, 0, row), 1.0, 100) == 0 for row in range(50))


# --------------------------------------------------------------------------------------------- trainer rows
def test_trainer_rows_follow_the_paired_rows(tmp_path):
    trainer = make_trainer(tmp_path, augment_prob=1.0, anchor_batch_size=0, max_prefix_tokens=3)
    eos = build_tokenizer().eos_token_id
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    inputs = dict(batch)
    row_ids = inputs.pop(PAIR_COLUMN)
    harmful = {key[len("harmful_") :]: inputs.pop(key) for key in list(inputs) if key.startswith("harmful_")}
    rebuilt = trainer.augment_batch(inputs, harmful, row_ids)
    train_rows = {row[PAIR_COLUMN]: row for row in trainer.train_dataset}
    harmful_rows = {row[PAIR_COLUMN]: row for row in trainer.harmful_dataset}
    for index, row_id in enumerate(row_ids.tolist()):
        prompt, refusal = split(train_rows[row_id])
        _, answer = split(harmful_rows[row_id])
        assert answer[-1] == eos
        length = int(rebuilt["attention_mask"][index].sum())
        ids = rebuilt["input_ids"][index, :length].tolist()
        labels = rebuilt["labels"][index, :length].tolist()
        k = length - len(prompt) - len(refusal)
        assert 1 <= k <= min(3, len(answer) - 1)  # the closing EOS never enters the prefix by default
        assert ids == prompt + answer[:k] + refusal
        assert labels == [-100] * (len(prompt) + k) + refusal
        assert not rebuilt["attention_mask"][index, length:].any()


def test_one_token_harmful_answer_trains_without_crash(tmp_path):
    """A harmful answer that is only its EOS leaves nothing to prefix: the row keeps its refusal view; with
    `include_eos_in_prefix` the EOS itself is the prefix (the official behaviour)."""
    for include_eos, expected_k in ((False, 0), (True, 1)):
        trainer = make_trainer(
            tmp_path / str(include_eos),
            harmful_completions=[""] * 4,
            augment_prob=1.0,
            anchor_batch_size=0,
            include_eos_in_prefix=include_eos,
        )
        train_rows = {row[PAIR_COLUMN]: row for row in trainer.train_dataset}
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        inputs = dict(batch)
        row_ids = inputs.pop(PAIR_COLUMN)
        harmful = {key[len("harmful_") :]: inputs.pop(key) for key in list(inputs) if key.startswith("harmful_")}
        rebuilt = trainer.augment_batch(inputs, harmful, row_ids)
        for index, row_id in enumerate(row_ids.tolist()):
            prompt, refusal = split(train_rows[row_id])
            assert int(rebuilt["attention_mask"][index].sum()) == len(prompt) + expected_k + len(refusal)
        trainer.train()  # and a whole run goes through


# -------------------------------------------------------------------------------------- the loss by hand
def one_row(ids, labels):
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "labels": torch.tensor([labels]),
    }


def reference_gradients(trainer, batches, params):
    """∇ of the hand-built token mean (safety rows prompt ‖ harmful[0] ‖ refusal plus both anchors per micro-batch)
    and, for the teeth check, ∇ of plain SFT on prompt → refusal."""
    model = trainer.model
    train_rows = {row[PAIR_COLUMN]: row for row in trainer.train_dataset}
    harmful_rows = {row[PAIR_COLUMN]: row for row in trainer.harmful_dataset}
    total, count = 0.0, 0
    sft_total, sft_count = 0.0, 0
    for batch in batches:
        for row_id in batch[PAIR_COLUMN].tolist():
            prompt, refusal = split(train_rows[row_id])
            _, answer = split(harmful_rows[row_id])
            row = one_row(prompt + answer[:1] + refusal, [-100] * (len(prompt) + 1) + refusal)
            total = total + token_nll(model, row, "sum")
            count += len(refusal)
            plain = one_row(prompt + refusal, [-100] * len(prompt) + refusal)
            sft_total = sft_total + token_nll(model, plain, "sum")
            sft_count += len(refusal)
        for anchor in trainer.alignment_dataset:
            total = total + token_nll(model, one_row(anchor["input_ids"], anchor["labels"]), "sum")
            count += sum(label != -100 for label in anchor["labels"][1:])
    return grads_of(total / count, params), grads_of(sft_total / sft_count, params)


@pytest.mark.parametrize(
    ("peft", "ga", "checkpointing"),
    [(False, 1, "off"), (True, 2, "off"), (False, 2, "non-reentrant"), (True, 1, "reentrant")],
    ids=["full-ga1", "lora-ga2", "full-ga2-ckpt", "lora-ga1-reentrant"],
)
def test_gradient_is_one_token_mean_over_safety_and_anchor_tokens(tmp_path, peft, ga, checkpointing):
    """Gradient of (Σ safety-token CE + Σ anchor-token CE) / (N_safety + N_anchor) over the step, built by hand.

    `max_prefix_tokens=1`, `augment_prob=1`: every row is prompt ‖ harmful[0] ‖ refusal; the anchor batch is the
    whole anchor set (2 rows), so every micro-batch adds both anchors, whatever the loader order.
    """
    trainer = make_trainer(
        tmp_path,
        peft=peft,
        per_device_train_batch_size=4 // ga,
        augment_prob=1.0,
        max_prefix_tokens=1,
        anchor_batch_size=2,
    )
    enable_checkpointing(trainer, checkpointing)
    trainer.model.train()
    batches, actual = run_training_steps(trainer, ga)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    # autograd.grad cannot differentiate through reentrant checkpointing; the values are the same without it
    with gradient_checkpointing_disabled(get_decoder_layers(trainer.accelerator.unwrap_model(model))):
        expected, plain_sft = reference_gradients(trainer, batches, params)
    teeth = max(float((e - p).abs().max()) for e, p in zip(expected, plain_sft))
    assert teeth > 1e-3, "the prefixes and anchors must change the gradient"
    for got, want in zip(actual, expected):
        # one batched fused-head forward vs per-row full-logit forwards: fp32 reduction order only
        # (docs/testing.md gradient tolerance, c = 1e-5 relative to the largest entry)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_anchor_loader_advances_once_per_micro_batch_and_is_saved(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2, anchor_batch_size=1
    )
    trainer.train()
    state = trainer.defense_state_dict()["anchor_batches"]
    assert state["epoch"] * 2 + state["position"] == 6  # 3 steps × 2 micro-batches, 2 anchor rows per epoch
    logged = [entry for entry in trainer.state.log_history if "safety-recovery/augmented_fraction" in entry]
    assert logged and all("safety-recovery/anchor_fraction" in entry for entry in logged)


# ---------------------------------------------------------------------------------------------- data rules
def test_refuses_a_train_set_without_prompt_and_completion(tmp_path):
    _, harmful, anchor = datasets()
    text = Dataset.from_dict({"text": ["a b c"] * 4})
    with pytest.raises(ValueError, match="train_dataset.*prompt-completion.*'prompt', 'completion'"):
        SafetyRecoveryTrainer(
            build_model("llama", hidden=32, layers=2),
            args=tiny_config(tmp_path, SafetyRecoveryConfig),
            train_dataset=text,
            harmful_dataset=harmful,
            alignment_dataset=anchor,
            processing_class=build_tokenizer(),
        )


def test_refuses_a_harmful_set_without_completion(tmp_path):
    train, _, anchor = datasets()
    with pytest.raises(ValueError, match="harmful_dataset.*'completion'"):
        SafetyRecoveryTrainer(
            build_model("llama", hidden=32, layers=2),
            args=tiny_config(tmp_path, SafetyRecoveryConfig),
            train_dataset=train,
            harmful_dataset=Dataset.from_dict({"text": ["a b c"] * 4}),
            alignment_dataset=anchor,
            processing_class=build_tokenizer(),
        )


@pytest.mark.parametrize("values", [{"packing": True}, {"padding_free": True}, {"completion_only_loss": False}])
def test_refuses_settings_that_break_the_rows(tmp_path, values):
    field = next(iter(values))
    with pytest.raises(ValueError, match=field):
        make_trainer(tmp_path, **values)


def test_config_ranges_and_registry():
    for field, value in (
        ("augment_prob", 1.5),
        ("augment_prob", -0.1),
        ("max_prefix_tokens", 0),
        ("anchor_batch_size", -1),
    ):
        with pytest.raises(ValueError, match=field):
            SafetyRecoveryConfig(output_dir="x", use_cpu=True, bf16=False, **{field: value})
    spec = get_defense("safety-recovery")
    assert spec.stage == "alignment" and spec.paired_data and spec.trainer_class is SafetyRecoveryTrainer
    config = SafetyRecoveryConfig(output_dir="x", use_cpu=True, bf16=False)
    assert (config.augment_prob, config.max_prefix_tokens, config.anchor_batch_size) == (0.5, 100, 16)
