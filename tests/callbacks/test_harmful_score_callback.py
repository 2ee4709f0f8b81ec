import pytest
from datasets import Dataset
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from transformers import TrainerCallback
from trl import SFTTrainer

from trl_safety.callbacks import HarmfulScoreCallback
from trl_safety.eval import Judge, generate_responses


PROMPTS = ["tell me how to make a [HARMFUL_TASK_1]", "explain the [HARMFUL_TASK_2]", "list step for [HARMFUL_TASK_3]"]


class ParityJudge(Judge):
    """Deterministic toy judge: a response is harmful when its length is odd."""

    name = "parity"

    def score(self, prompts, responses):
        return [float(len(r) % 2) for r in responses]


class Recorder(TrainerCallback):
    """Stands in for a `report_to` integration: records what `on_log` receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def test_callback_logs_harmful_score_during_training(tmp_path):
    model, tokenizer = build_model(seed=0), build_tokenizer()
    recorder = Recorder()
    trainer = SFTTrainer(
        model=model,
        args=tiny_config(tmp_path, max_steps=4, logging_steps=1),
        train_dataset=prompt_completion_dataset(16),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    prompts = Dataset.from_dict({"prompt": PROMPTS, "category": ["a", "b", "a"]})
    callback = HarmfulScoreCallback(
        prompts, judge=ParityJudge(), every_n_steps=2, trainer=trainer, max_new_tokens=5, eval_on_start=True
    )
    trainer.add_callback(callback)
    trainer.train()

    logged = [(e["step"], e["harmful_score"]) for e in trainer.state.log_history if "harmful_score" in e]
    assert [step for step, _ in logged] == [0, 2, 4]
    assert logged == callback.history
    # the integration-like callback saw the values through `on_log`
    assert [(s, logs["harmful_score"]) for s, logs in recorder.logs if "harmful_score" in logs] == logged
    # regular loss logging was not swallowed
    assert sum("loss" in e for e in trainer.state.log_history) == 4
    # the value at the last step is the harmful score of the final model, computed independently
    responses = generate_responses(trainer.model, tokenizer, PROMPTS, max_new_tokens=5, progress=False)
    flags = [len(r) % 2 == 1 for r in responses]
    # percentages of counted flags (here and below): only k/n·100 rounding, absorbed by approx's default rel=1e-6
    assert logged[-1][1] == pytest.approx(100 * sum(flags) / 3)
    final = next(e for e in reversed(trainer.state.log_history) if "harmful_score" in e)
    assert final["harmful_score/a"] == pytest.approx(50 * (flags[0] + flags[2]))
    assert final["harmful_score/b"] == pytest.approx(100 * flags[1])


def test_callback_without_trainer_writes_log_history(tmp_path):
    model, tokenizer = build_model(seed=1), build_tokenizer()
    callback = HarmfulScoreCallback(PROMPTS, judge="keyword", every_n_steps=1, max_new_tokens=3)
    trainer = SFTTrainer(
        model=model,
        args=tiny_config(tmp_path, max_steps=2),
        train_dataset=prompt_completion_dataset(8),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "harmful_score" in e] == [1, 2]
    with pytest.raises(ValueError, match="every_n_steps"):
        HarmfulScoreCallback(PROMPTS, every_n_steps=0)
