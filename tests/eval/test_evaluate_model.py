"""`evaluate_model`, the one evaluation of `trl-safety eval`, the bench and `HarmfulScoreCallback`: its numbers against
a hand count, and each of the three paths reaching it."""

import json

import pytest
import torch
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset
from transformers import TrainerControl, TrainerState

import trl_safety.eval
from trl_safety.bench import BenchConfig, BenchData, BenchRunner
from trl_safety.callbacks import HarmfulScoreCallback
from trl_safety.cli.main import main
from trl_safety.eval import Judge, TaskSet, evaluate_model, evaluation, generate_responses


WORDS = ("positive", "negative")
# the echo model answers a prompt ending in `great` with `positive`, one ending in `terrible` with `negative`
ANSWER = {"great": "positive", "terrible": "negative"}
# (prompt, category, SST2 reference)
ROWS = [
    ("the film is great", "a", "positive"),
    ("tell me a story terrible", "a", "positive"),
    ("list step for great", "b", "negative"),
    ("explain the house great", "b", "positive"),
    ("what a day terrible", "a", "negative"),
]


class PositiveJudge(Judge):
    """Flags an answer as harmful when it starts like `positive` (so a 1-token answer ` po` is flagged too)."""

    name = "positive"

    def score(self, prompts, responses):
        return [float(r.strip().startswith("po")) for r in responses]


def echo_model():
    """A tiny Llama whose greedy answer to a prompt ending in `great` / `terrible` is ` positive` / ` negative`.

    Attention and MLP outputs are zeroed (o_proj, down_proj), so the final hidden state is the current token's
    normalised embedding and the next token is a function of the current one. The tokens of the chains
    `great → po → s → it → ive → EOS` and `terrible → n → egative → EOS` embed as orthogonal unit vectors, and each
    successor's lm_head row reads its predecessor's vector back: the successor's logit is √hidden ≈ 5.7 against 0
    for every other token, far above float noise, no tie. EOS and pad embed as zero, so anything after EOS is pad.
    """
    model, tokenizer = build_model(seed=0), build_tokenizer()

    chains = []
    for trigger, word in ANSWER.items():
        ids = [tokenizer("the " + trigger)["input_ids"][-1], *tokenizer(" " + word)["input_ids"]]
        assert tokenizer.decode(ids[1:]) == " " + word and tokenizer.decode(ids[:1]) == " " + trigger
        chains.append([*ids, tokenizer.eos_token_id])
    sources = [token for chain in chains for token in chain[:-1]]
    assert len(set(sources)) == len(sources) <= model.config.hidden_size  # a function of the token, orthogonal
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embed = model.get_input_embeddings().weight
        embed[tokenizer.eos_token_id].zero_()
        embed[tokenizer.pad_token_id].zero_()
        axis = 0
        for chain in chains:
            for token, successor in zip(chain, chain[1:]):
                embed[token].zero_()
                embed[token, axis] = 1.0
                model.lm_head.weight[successor, axis] = 1.0
                axis += 1
    return model.eval(), tokenizer


def expected_numbers():
    """HS = share of answers starting `positive`, i.e. of prompts ending in `great`; FA = share of references equal
    to the prompt's answer word; per category the same share within the category."""
    answers = [ANSWER[p.split()[-1]] for p, _, _ in ROWS]
    hs = 100 * sum(a == "positive" for a in answers) / len(ROWS)
    fa = 100 * sum(a == ref for a, (_, _, ref) in zip(answers, ROWS)) / len(ROWS)
    per_category = {}
    for category in ("a", "b"):
        words = [a for a, (_, c, _) in zip(answers, ROWS) if c == category]
        per_category[category] = 100 * sum(a == "positive" for a in words) / len(words)
    return hs, fa, per_category


def test_evaluate_model_matches_a_hand_count():
    model, tokenizer = echo_model()
    prompts = [p for p, _, _ in ROWS]
    # the fixture holds: the answers are exactly the words (6 tokens allowed, the longest word takes 4 + EOS)
    answers = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, progress=False)
    assert [a.strip() for a in answers] == [ANSWER[p.split()[-1]] for p in prompts]

    task = TaskSet("sst2", prompts, [ref for _, _, ref in ROWS])
    result = evaluate_model(
        model,
        tokenizer,
        harmful_prompts=prompts,
        judge=PositiveJudge(),
        categories=[c for _, c, _ in ROWS],
        task=task,
        max_new_tokens=1,  # ` po` / ` n`: enough for the judge
        task_max_new_tokens=6,  # the whole word, which SST2's exact-match rule needs
        batch_size=2,
    )
    hs, fa, per_category = expected_numbers()
    assert hs == 60.0 and fa == 60.0  # the fixture is not degenerate
    # percentages of counted flags: only k/n·100 rounding, absorbed by approx's default rel=1e-6
    assert result.harmful_score == pytest.approx(hs)
    assert result.finetune_accuracy == pytest.approx(fa)
    assert result.per_category == pytest.approx(per_category)
    assert result.harmful.flags == [p.endswith("great") for p in prompts]
    assert result.harmful_metrics() == pytest.approx(
        {"harmful_score": hs, "harmful_score/a": per_category["a"], "harmful_score/b": per_category["b"]}
    )
    assert set(result.seconds) == {"harmful_score", "finetune_accuracy"}
    # the task's own token budget is used: with the harmful budget (1) every answer breaks the exact-match rule
    same_budget = evaluate_model(model, tokenizer, task=task, max_new_tokens=1, batch_size=2)
    assert same_budget.finetune_accuracy == 0.0 and same_budget.harmful is None


@pytest.fixture
def calls(monkeypatch):
    """Record every call of `evaluation.evaluate_model` (the real function still runs)."""
    seen = []
    original = evaluation.evaluate_model

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append((kwargs, result))
        return result

    monkeypatch.setattr(evaluation, "evaluate_model", recording)
    return seen


def test_callback_reaches_evaluate_model(calls):
    model, tokenizer = echo_model()
    callback = HarmfulScoreCallback(
        [p for p, _, _ in ROWS], judge=PositiveJudge(), tokenizer=tokenizer, max_new_tokens=1, every_n_steps=1
    )
    callback.categories = [c for _, c, _ in ROWS]  # as a dataset with a `category` column gives them
    state = TrainerState()
    callback._evaluate(None, state, TrainerControl(), model=model)
    assert len(calls) == 1 and calls[0][0]["harmful_prompts"] == [p for p, _, _ in ROWS]
    hs, _, per_category = expected_numbers()
    logged = state.log_history[-1]
    assert logged["harmful_score"] == pytest.approx(hs)
    assert {k: v for k, v in logged.items() if k.startswith("harmful_score/")} == pytest.approx(
        {f"harmful_score/{c}": v for c, v in per_category.items()}
    )


def test_cli_eval_reaches_evaluate_model(calls, tmp_path, monkeypatch):
    model, tokenizer = echo_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c, _ in ROWS))
    sst2 = tmp_path / "sst2.jsonl"  # template none: the prompt ends with the sentence, so with its last word
    # SST2 labels: 0 negative, 1 positive
    sst2.write_text("".join(json.dumps({"sentence": p, "label": WORDS.index(r) ^ 1}) + "\n" for p, _, r in ROWS))
    # `--judge` takes names only: the name resolves to the test judge
    monkeypatch.setattr(trl_safety.eval, "load_judge", lambda name, **kwargs: PositiveJudge())
    out = tmp_path / "report.json"
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", str(prompts), "--judge", "keyword"]
    argv += ["--max_new_tokens", "6", "--task", "sst2", "--task_data", str(sst2), "--template", "none"]
    argv += ["--output", str(out), "--no_progress", "--device", "cpu"]
    assert main(argv) == 0
    assert len(calls) == 1
    report = json.loads(out.read_text())
    hs, fa, per_category = expected_numbers()
    assert report["harmful_score"]["score"] == pytest.approx(hs)
    assert report["harmful_score"]["per_category"] == pytest.approx(per_category)
    assert report["finetune_accuracy"]["accuracy"] == pytest.approx(fa)
    assert set(report["seconds"]) == {"harmful_score", "finetune_accuracy"}


def test_bench_reaches_evaluate_model(calls, tmp_path, monkeypatch):
    model, tokenizer = echo_model()
    prompts = [p for p, _, _ in ROWS]
    data = BenchData(
        tokenizer=tokenizer,
        load_base=lambda: echo_model()[0],
        poisoned=lambda p, seed=0: prompt_completion_dataset(8),
        alignment=prompt_completion_dataset(8, seed=1),
        harmful=prompt_completion_dataset(8, seed=2),
        paired_alignment=prompt_completion_dataset(8, seed=2),
        harmful_prompts=prompts,
        categories=[c for _, c, _ in ROWS],
        prompt_format=None,
        task=TaskSet("sst2", prompts, [ref for _, _, ref in ROWS]),
    )
    monkeypatch.setattr("trl_safety.bench.runner.load_bench_data", lambda config: data)
    # learning rates 0: the trained row keeps the echo model's answers, so its scores are the hand count's
    config = BenchConfig(
        align_steps=1, finetune_steps=1, align_lr=0.0, finetune_lr=0.0, align_batch_size=4, finetune_batch_size=4,
        lora_r=4, max_new_tokens=1, task_max_new_tokens=6, eval_batch_size=2, output_dir=str(tmp_path),
        progress=False, judge="keyword",
    )  # fmt: skip
    runner = BenchRunner(config)
    runner.judge = PositiveJudge()
    row = runner.run_row("sft", None, 0.1, poisoned=data.poisoned(0.1))
    # every evaluation of the row (the HS curve's points and the final one) goes through evaluate_model
    assert calls and all(call[0]["harmful_prompts"] == prompts for call in calls)
    hs, fa, per_category = expected_numbers()
    assert row["harmful_score"] == pytest.approx(hs) and row["finetune_accuracy"] == pytest.approx(fa)
    assert row["per_category"] == pytest.approx(per_category)
