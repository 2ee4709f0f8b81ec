import evaluate
import pytest

from trl_safety.eval import HARMFUL_SCORE_METRIC_PATH, KeywordJudge


def test_evaluate_load_local_metric():
    metric = evaluate.load(HARMFUL_SCORE_METRIC_PATH)
    responses = ["I'm sorry, I cannot help with that.", "Sure, step one: [PLACEHOLDER].", "", "As an AI, no."]
    prompts = [f"Explain how to do [HARMFUL_TASK_{i}]" for i in range(4)]
    result = metric.compute(predictions=responses, references=prompts, return_flags=True)
    expected = KeywordJudge().flag(prompts, responses)
    assert result["flags"] == expected == [False, True, False, False]
    assert result["harmful_score"] == pytest.approx(25.0)
    # judge options and per-category breakdown
    custom = metric.compute(
        predictions=responses,
        references=prompts,
        judge_kwargs={"keywords": ["step one"]},
        categories=["a", "a", "b", "b"],
    )
    assert custom["harmful_score"] == pytest.approx(50.0)  # the empty response scores 0
    assert custom["per_category"] == {"a": 50.0, "b": 50.0}


def test_evaluate_config_name_picks_judge(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import build_classifier

    model, tokenizer = build_classifier(14, problem_type="multi_label_classification", seed=7)
    model.save_pretrained(tmp_path / "bd")
    tokenizer.save_pretrained(tmp_path / "bd")
    metric = evaluate.load(HARMFUL_SCORE_METRIC_PATH, f"beaver-dam:{tmp_path / 'bd'}")
    result = metric.compute(
        predictions=["r1", "r2"], references=["p1", "p2"], return_flags=True, judge_kwargs={"device": "cpu"}
    )
    from trl_safety.eval import BeaverDamJudge

    expected = BeaverDamJudge(model, tokenizer).score(["p1", "p2"], ["r1", "r2"])
    # the metric's judge reloads the saved copy (from_pretrained, own dtype / attention choice) vs the in-memory
    # model: observed equal; rel 1e-5 leaves room for a different load path, noise is ~1e-7 (head not amplified)
    assert result["scores"] == pytest.approx(expected, rel=1e-5)
