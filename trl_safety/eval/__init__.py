"""Evaluation: judges, greedy generation, harmful score, task accuracy, the papers' protocols, and `evaluate_model`
(the one evaluation the CLI, the bench and the callback share)."""

import os

from .evaluation import EvalResult, evaluate_model
from .generation import generate_responses
from .harmful_score import (
    HarmfulScoreResult,
    harmful_score,
    judge_responses,
    per_category_counts,
    per_category_scores,
)
from .judges import (
    BEAVER_DAM_FORMAT,
    BEAVER_DAM_ID,
    BEAVERTAILS_CATEGORIES,
    REFUSAL_KEYWORDS,
    BeaverDamJudge,
    ClassifierJudge,
    Judge,
    KeywordJudge,
    load_judge,
)
from .protocols import PROTOCOLS, EvalProtocol, get_protocol
from .task_accuracy import (
    TaskAccuracyResult,
    TaskSet,
    agnews_correct,
    extract_gsm8k_number,
    finetune_accuracy,
    gsm8k_correct,
    sst2_correct,
    task_accuracy,
)


# Folder of the `evaluate` metric shipped with the package: `evaluate.load(HARMFUL_SCORE_METRIC_PATH)`
HARMFUL_SCORE_METRIC_PATH = os.path.join(os.path.dirname(__file__), "metrics", "harmful_score")

__all__ = [
    "HARMFUL_SCORE_METRIC_PATH",
    "PROTOCOLS",
    "EvalProtocol",
    "EvalResult",
    "TaskAccuracyResult",
    "TaskSet",
    "agnews_correct",
    "extract_gsm8k_number",
    "finetune_accuracy",
    "evaluate_model",
    "get_protocol",
    "gsm8k_correct",
    "sst2_correct",
    "task_accuracy",
    "BEAVERTAILS_CATEGORIES",
    "BEAVER_DAM_FORMAT",
    "BEAVER_DAM_ID",
    "REFUSAL_KEYWORDS",
    "BeaverDamJudge",
    "ClassifierJudge",
    "HarmfulScoreResult",
    "Judge",
    "KeywordJudge",
    "generate_responses",
    "harmful_score",
    "judge_responses",
    "load_judge",
    "per_category_counts",
    "per_category_scores",
]
