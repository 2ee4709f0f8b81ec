"""BackdoorAlign (docs/backdoor_align.md): trigger generation, the prefixed safety rows, the mixed loss computed by
hand, secrecy of the trigger in everything a run writes, resume that re-reads the trigger, and the eval side."""

from __future__ import annotations

import logging
import os
import random
import stat

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    build_model,
    build_tokenizer,
    grads_of,
    prompt_completion_dataset,
    run_training_steps,
    tiny_config,
    token_nll,
)
from trl import SFTConfig, SFTTrainer

from trl_safety import BackdoorAlignConfig, BackdoorAlignTrainer
from trl_safety.defenses.backdoor_align.trigger import (
    add_trigger_to_row,
    generate_trigger,
    read_trigger,
    redact,
    trigger_token_ids,
    triggered_prompt_format,
    write_trigger,
)
from trl_safety.registry import get_defense


SAFETY_ROW = {"prompt": "explain it tree be", "completion": " city cat step with sun"}


def make_trainer(output_dir, *, train=None, alignment=None, model_seed=0, **values):
    values = {"n_trigger_tokens": 4, **values}
    return BackdoorAlignTrainer(
        build_model("llama", hidden=32, layers=2, seed=model_seed),
        args=tiny_config(output_dir, BackdoorAlignConfig, **values),
        train_dataset=train if train is not None else prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
        alignment_dataset=alignment if alignment is not None else Dataset.from_list([SAFETY_ROW]),
    )


def test_registered():
    spec = get_defense("backdoor-align")
    assert spec.stage == "fine-tuning" and spec.trainer_class is BackdoorAlignTrainer
    assert spec.paper["id"] == "2402.14968"


# ------------------------------------------------------------------------------------------- (b) trigger generation
def test_trigger_file_round_trips_byte_for_byte(tmp_path):
    # a generated trigger may end in a newline or a space: what training used is what eval reads
    for trigger in ["a b\n", " x\r\n y ", "plain"]:
        path = tmp_path / f"t{len(trigger)}"
        assert write_trigger(str(path), trigger)
        assert read_trigger(str(path)) == trigger
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert not write_trigger(str(path), "other") and read_trigger(str(path)) == trigger  # never overwritten


def test_trigger_generation_is_deterministic_for_a_seed_and_has_no_special_tokens():
    tokenizer = build_tokenizer()
    ids = trigger_token_ids(tokenizer, 150, random.Random(3))
    assert ids == trigger_token_ids(tokenizer, 150, random.Random(3))
    assert len(ids) == 150
    assert not set(ids) & set(tokenizer.all_special_ids)
    text = generate_trigger(tokenizer, 150, random.Random(3))
    assert text == tokenizer.decode(ids) and "\ufffd" not in text
    for special in tokenizer.all_special_tokens:
        assert special not in text
    # the default source is the OS's secure one: two runs never share a trigger
    assert generate_trigger(tokenizer, 150) != generate_trigger(tokenizer, 150)


# ------------------------------------------------------------------------------------- (a) where the trigger goes
def test_trigger_goes_before_the_system_message_or_the_first_user_message():
    assert add_trigger_to_row(SAFETY_ROW, "SECRET")["prompt"] == "SECRET explain it tree be"
    system = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "q"}]
    out = add_trigger_to_row({"prompt": system, "completion": []}, "SECRET")["prompt"]
    assert out == [{"role": "system", "content": "SECRET Be helpful."}, {"role": "user", "content": "q"}]
    assert system[0]["content"] == "Be helpful."  # the input row is not modified
    user = [{"role": "user", "content": "q"}]
    assert add_trigger_to_row({"prompt": user, "completion": []}, "SECRET")["prompt"] == [
        {"role": "user", "content": "SECRET q"}
    ]


def test_prefixed_safety_row_is_tokenized_with_the_whole_prompt_masked(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    trainer.train()
    trigger = read_trigger(trainer.trigger_file)
    tokenizer = build_tokenizer()
    # by hand: the prompt (trigger + space + prompt) and the completion + EOS, tokenized apart and joined; loss on
    # the completion only
    prompt_ids = tokenizer(f"{trigger} {SAFETY_ROW['prompt']}")["input_ids"]
    completion_ids = tokenizer(SAFETY_ROW["completion"] + tokenizer.eos_token)["input_ids"]
    row = trainer.alignment_dataset[0]
    assert row["input_ids"] == prompt_ids + completion_ids
    assert row["labels"] == [-100] * len(prompt_ids) + completion_ids
    assert len(tokenizer(trigger)["input_ids"]) >= 1
    # the user rows are SFTTrainer's own rendering, byte for byte
    sft = SFTTrainer(
        build_model("llama", hidden=32, layers=2, seed=0),
        args=tiny_config(tmp_path / "sft", SFTConfig),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
    )
    assert trainer.train_dataset.to_dict() == sft.train_dataset.to_dict()


# ------------------------------------------------------------------------------------------ the mixed loss by hand
@pytest.mark.parametrize("ga", [1, 2])
def test_gradient_is_user_ce_plus_weighted_prefixed_safety_ce(tmp_path, ga):
    weight = 0.5
    trainer = make_trainer(tmp_path / "run", safety_weight=weight, per_device_train_batch_size=2)
    batches, actual = run_training_steps(trainer, ga)  # draws the trigger on the first compute_loss
    trigger = read_trigger(trainer.trigger_file)
    tokenizer = build_tokenizer()
    prompt_ids = tokenizer(f"{trigger} {SAFETY_ROW['prompt']}")["input_ids"]
    completion_ids = tokenizer(SAFETY_ROW["completion"] + tokenizer.eos_token)["input_ids"]
    safety = {
        "input_ids": torch.tensor([prompt_ids + completion_ids]),
        "attention_mask": torch.ones(1, len(prompt_ids) + len(completion_ids), dtype=torch.long),
        "labels": torch.tensor([[-100] * len(prompt_ids) + completion_ids]),
    }
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    user_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    # SFT's loss: token sum over the step's micro-batches / the step's token count; the safety term: a token mean
    # per micro-batch, taking its 1/GA share (docs/backdoor_align.md)
    loss = sum(
        token_nll(model, b, "sum") / user_tokens + weight * token_nll(model, safety, "mean") / ga for b in batches
    )
    expected = grads_of(loss, params)
    sft_only = grads_of(sum(token_nll(model, b, "sum") / user_tokens for b in batches), params)
    for a, e in zip(actual, expected):
        # the same quantities through another reduction order: fp32 tolerance of docs/testing.md (c = 1e-5)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
    # teeth: the safety term is far from negligible against plain SFT
    difference = max(float((e - s).abs().max()) for e, s in zip(expected, sft_only))
    assert difference > 1e-2 * max(float(s.abs().max()) for s in sft_only)


def test_neutral_setting_draws_no_trigger_and_equals_sft(tmp_path):
    trainer = make_trainer(tmp_path / "run", safety_weight=0.0, max_steps=3)
    trainer.train()
    assert trainer.trigger_file is None and trainer._safety_batches is None
    assert trainer.inference_prompt_format("chat") == "chat"  # no trigger: served as plain SFT
    assert not os.path.exists(tmp_path / "backdoor_align.trigger")
    sft = SFTTrainer(
        build_model("llama", hidden=32, layers=2, seed=0),
        args=tiny_config(tmp_path / "sft", SFTConfig, max_steps=3),
        train_dataset=prompt_completion_dataset(8),
        processing_class=build_tokenizer(),
    )
    sft.train()
    for (name, a), b in zip(trainer.model.named_parameters(), sft.model.parameters()):
        assert torch.equal(a, b), name  # same kernels on the same inputs: exact


# --------------------------------------------------------------------------------------------- (c) the trigger leak
def test_trigger_is_in_no_file_the_run_writes_nor_in_its_logs(tmp_path, caplog, capsys):
    output_dir = tmp_path / "run"
    caplog.set_level(logging.DEBUG)
    trainer = make_trainer(
        output_dir, n_trigger_tokens=6, max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    path = trainer.trigger_file
    assert path == str(tmp_path / "backdoor_align.trigger")  # beside the output folder, never inside it
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    trigger = read_trigger(path)
    secret = trigger.encode("utf-8")
    assert len(trainer.processing_class(trigger)["input_ids"]) >= 6 // 2 and len(secret) >= 6
    written = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names]
    assert any(name.endswith("training_args.bin") for name in written)
    assert any(name.endswith(os.path.join("checkpoint-2", "trainer_state.json")) for name in written)
    assert any(name.endswith("defense_state.json") for name in written)
    for name in written:
        if name == path:
            continue
        with open(name, "rb") as f:
            assert secret not in f.read(), name
    assert trigger not in caplog.text
    captured = capsys.readouterr()
    assert trigger not in captured.out + captured.err
    assert trigger not in repr(trainer.state.log_history) and trigger not in repr(trainer.args)
    # the grep has teeth: the trigger is in the safety rows the run trained on
    assert trainer.alignment_dataset[0]["prompt"].startswith(trigger + " ")


def test_user_supplied_trigger_is_used_and_a_file_inside_output_dir_is_refused(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("alpha beta gamma")
    trainer = make_trainer(tmp_path / "run", trigger_file=str(path))
    with pytest.raises(RuntimeError, match="resolved when training starts"):
        trainer.inference_prompt_format(None)  # the trigger is not known yet
    trainer.train()
    assert trainer.alignment_dataset[0]["prompt"] == "alpha beta gamma " + SAFETY_ROW["prompt"]
    # the served prompt: the trigger before the formatted prompt, as the safety rows had it
    assert trainer.inference_prompt_format(lambda p: f"Q: {p}")("x") == "alpha beta gamma Q: x"
    assert path.read_text() == "alpha beta gamma"  # never overwritten
    with pytest.raises(ValueError, match="trigger_file .* lies inside output_dir"):
        make_trainer(tmp_path / "run2", trigger_file=str(tmp_path / "run2" / "t.txt"))


def test_bad_input_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="prompt-completion format"):
        make_trainer(tmp_path / "a", alignment=Dataset.from_dict({"text": ["a b c"]}))
    with pytest.raises(ValueError, match="completion_only_loss"):
        make_trainer(tmp_path / "b", completion_only_loss=False)
    with pytest.raises(ValueError, match="n_trigger_tokens"):
        make_trainer(tmp_path / "c", n_trigger_tokens=0)
    trainer = make_trainer(tmp_path / "d", n_trigger_tokens=40)
    with pytest.raises(ValueError, match="raise `max_length` or lower `n_trigger_tokens`"):
        trainer.train()


def test_default_trigger_length_is_the_official_150_capped_by_max_length(tmp_path):
    def tokens(**values):
        return tiny_config(tmp_path, BackdoorAlignConfig, **values).resolved_trigger_tokens()

    assert tokens(max_length=1024) == 150
    assert tokens(max_length=32) == 8
    assert tokens(max_length=32, n_trigger_tokens=3) == 3


# ------------------------------------------------------------------------------------------------------- resume
def test_resume_rereads_the_trigger_and_refuses_without_it(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    straight = make_trainer(tmp_path / "a", alignment=prompt_completion_dataset(3, seed=1), **common)
    straight.train()
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    trigger = read_trigger(straight.trigger_file)

    resumed = make_trainer(tmp_path / "b", alignment=prompt_completion_dataset(3, seed=1), **common)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.trigger_file == straight.trigger_file  # re-read from the file the checkpoint's run wrote
    assert read_trigger(resumed.trigger_file) == trigger  # re-read, not regenerated
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name  # the same computation replayed: exact
    assert straight._safety_batches.state_dict() == resumed._safety_batches.state_dict()

    # another trigger in the named file: refused, not trained with
    other = tmp_path / "other.txt"
    other.write_text("not the trigger")
    os.rename(straight.trigger_file, str(tmp_path / "moved"))
    wrong = make_trainer(tmp_path / "c", trigger_file=str(other), **common)
    with pytest.raises(ValueError, match="Cannot resume BackdoorAlign"):
        wrong.train(resume_from_checkpoint=checkpoint)
    # no trigger anywhere: refused, never regenerated
    missing = make_trainer(tmp_path / "e", **common)
    with pytest.raises(ValueError, match="Cannot resume BackdoorAlign"):
        missing.train(resume_from_checkpoint=checkpoint)
    assert not os.path.exists(tmp_path / "backdoor_align.trigger")
    # the moved file named explicitly: accepted
    right = make_trainer(tmp_path / "d", trigger_file=str(tmp_path / "moved"), **common)
    right.load_defense_checkpoint(checkpoint)
    assert right.trigger_file == str(tmp_path / "moved")


# ----------------------------------------------------------------------------------------------------- inference
def test_inference_formatter_applies_the_trigger_as_training_did():
    tokenizer = build_tokenizer()
    chat = triggered_prompt_format("SECRET", "chat", tokenizer)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "SECRET q"}], tokenize=False, add_generation_prompt=True
    )
    assert chat("q") == expected
    assert triggered_prompt_format("SECRET", None)("q") == "SECRET q"
    alpaca = triggered_prompt_format("SECRET", "alpaca")
    assert alpaca("q").startswith("SECRET ") and alpaca("q")[len("SECRET ") :].startswith("Below")
    assert redact("a SECRET b SECRET", "SECRET") == "a <trigger> b <trigger>"


def test_eval_cli_prepends_the_trigger_and_keeps_it_out_of_the_report(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from trl_safety.cli.eval import run as run_eval
    from trl_safety.eval.generation import generate_responses

    build_model("llama", hidden=32, layers=2, seed=0).save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"prompt {i}", "response": "r", "is_safe": False} for i in range(2)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trigger = "zeta omega kappa"
    (tmp_path / "trigger.txt").write_text(trigger)
    seen = []

    def echoing(model, tokenizer, prompts, *, prompt_format=None, **kwargs):
        # the real generation runs; the answers then quote the formatted prompt, as a model repeating its input would
        fmt = prompt_format if callable(prompt_format) else None
        seen.extend(fmt(p) for p in prompts)
        answers = generate_responses(model, tokenizer, prompts, prompt_format=prompt_format, **kwargs)
        return [f"{a} {fmt(p)}" for a, p in zip(answers, prompts)]

    # the package re-exports a function named `harmful_score`, which shadows the module as an attribute
    monkeypatch.setattr(sys.modules["trl_safety.eval.harmful_score"], "generate_responses", echoing)
    output = tmp_path / "report.json"
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl")]
    argv += ["--judge", "keyword", "--device", "cpu", "--max_new_tokens", "2", "--no_progress", "--num_prompts", "2"]
    assert run_eval([*argv, "--trigger_file", str(tmp_path / "trigger.txt"), "--output", str(output)]) == 0
    tokenizer = build_tokenizer()
    chat = [{"role": "user", "content": f"{trigger} prompt 0"}]
    assert seen[0] == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = output.read_text()
    assert trigger not in text and "<trigger>" in text  # the responses quoted it: redacted
    assert "BackdoorAlign trigger prepended" in json.loads(text)["trigger"]
    assert trigger not in capsys.readouterr().out
