"""Fine-tune accuracy (FA) with the papers' exact-match rules (docs/design/algorithms.md §6.2, §9.10).

- SST2: the stripped output must *equal* the label word, `positive`/`Positive` or `negative`/`Negative`.
- AGNews: the stripped output must equal the class name or its lowercase form; `sci` is also accepted for Sci/Tech.
- GSM8K: the predicted number is the first number after `"The final answer is: "`, else the last number in the
  output; it must equal the gold number (extracted the same way from the reference solution) as a float.

Format violations count as errors, as in the papers (confirmed by the Booster maintainers, Booster issue #1): an
SST2 answer `"positive, because …"` is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..data.adapters import AGNEWS_LABELS, GSM8K_ANSWER_MARKER, SST2_LABELS


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _label_name(label, names: Sequence[str]) -> str:
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise TypeError(f"Label must be an int index or a class name, got {label!r}.")
    if isinstance(label, int):
        return names[label]
    for name in names:
        if label.strip().lower() == name.lower():
            return name
    raise ValueError(f"Unknown label {label!r}; expected one of {list(names)}.")


def sst2_correct(output: str, label: int | str) -> bool:
    """SST2 rule: `output.strip()` is the label word, lowercase or capitalised."""
    word = _label_name(label, SST2_LABELS)
    return output.strip() in (word, word.capitalize())


def agnews_correct(output: str, label: int | str) -> bool:
    """AGNews rule: `output.strip()` is the class name, its lowercase form, or `sci` for Sci/Tech."""
    name = _label_name(label, AGNEWS_LABELS)
    accepted = {name, name.lower()}
    if name == "Sci/Tech":
        accepted.add("sci")
    return output.strip() in accepted


def extract_gsm8k_number(text: str) -> float | None:
    """First number after `"The final answer is: "` if the marker is followed by one, else the last number in the
    text; thousands separators are removed first. `None` when the text has no number."""
    text = text.replace(",", "")
    if GSM8K_ANSWER_MARKER in text:
        after = _NUMBER.findall(text.split(GSM8K_ANSWER_MARKER, 1)[1])
        if after:
            return float(after[0])
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def gsm8k_correct(output: str, reference: str | float | int) -> bool:
    """GSM8K rule: the extracted numbers of output and reference (a solution text or a number) are equal floats."""
    gold = float(reference) if isinstance(reference, (int, float)) else extract_gsm8k_number(reference)
    if gold is None:
        raise ValueError(f"No number in the GSM8K reference {reference!r}.")
    predicted = extract_gsm8k_number(output)
    return predicted is not None and predicted == gold


SCORERS = {"sst2": sst2_correct, "agnews": agnews_correct, "gsm8k": gsm8k_correct}


def _scorer(task: str):
    key = task.lower().replace("_", "").replace("-", "")
    if key not in SCORERS:
        raise ValueError(f"No accuracy rule for task {task!r}; choose one of {sorted(SCORERS)}.")
    return SCORERS[key]


@dataclass
class TaskAccuracyResult:
    """Fine-tune accuracy in percent, with the per-sample verdicts."""

    task: str
    accuracy: float
    correct: list[bool]
    outputs: list[str]
    references: list = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["num_samples"] = len(self.correct)
        return data


def task_accuracy(task: str, outputs: Sequence[str], references: Sequence) -> TaskAccuracyResult:
    """Score outputs against references (labels for SST2/AGNews, solutions or numbers for GSM8K)."""
    outputs, references = list(outputs), list(references)
    if len(outputs) != len(references):
        raise ValueError(f"Got {len(outputs)} outputs but {len(references)} references.")
    scorer = _scorer(task)
    correct = [bool(scorer(o, r)) for o, r in zip(outputs, references)]
    accuracy = 100.0 * sum(correct) / len(correct) if correct else 0.0
    return TaskAccuracyResult(task=task, accuracy=accuracy, correct=correct, outputs=outputs, references=references)


@dataclass
class TaskSet:
    """A fine-tune accuracy test set: prompts, their references, and the task whose exact-match rule scores them.

    `prompt_format` is applied to each prompt before generation (`None`: the prompts are already templated, as the
    adapters' `prompt` column is).
    """

    task: str
    prompts: list[str]
    references: list
    prompt_format: Callable[[str], str] | str | None = None

    def __post_init__(self):
        _scorer(self.task)  # an unknown task fails here, before anything is generated
        self.prompts, self.references = list(self.prompts), list(self.references)
        if len(self.prompts) != len(self.references):
            raise ValueError(f"Got {len(self.prompts)} prompts but {len(self.references)} references.")

    @classmethod
    def from_dataset(cls, task: str, dataset, prompt_format=None) -> TaskSet:
        """A test set built by the adapters. References: `label` for SST2/AGNews, `completion` (the solution) for
        GSM8K."""
        key = task.lower().replace("_", "").replace("-", "")
        column = "label" if key in ("sst2", "agnews") and "label" in dataset.column_names else "completion"
        return cls(task, dataset["prompt"], dataset[column], prompt_format)

    def score(self, model, tokenizer, **generation_kwargs) -> TaskAccuracyResult:
        """Generate greedy answers (kwargs go to [`generate_responses`]) and score them with the task's rule."""
        from .generation import generate_responses

        outputs = generate_responses(
            model, tokenizer, self.prompts, prompt_format=self.prompt_format, **generation_kwargs
        )
        return task_accuracy(self.task, outputs, self.references)


def finetune_accuracy(model, tokenizer, task: str, dataset, *, prompt_format=None, **generation_kwargs):
    """Generate greedy answers for a task test set built by the adapters (its `prompt` column is already templated)
    and score them. References: `label` for SST2/AGNews, `completion` (the solution) for GSM8K."""
    return TaskSet.from_dataset(task, dataset, prompt_format).score(model, tokenizer, **generation_kwargs)
