import json

import pytest
from datasets import Dataset

from trl_safety.data import (
    AGNEWS_INSTRUCTION,
    BEAVERTAILS_ID,
    REPNOISE_REFUSALS_ID,
    SST2_INSTRUCTION,
    agnews_dataset,
    alpaca_prompt,
    beavertails_dataset,
    beavertails_eval_prompts,
    gsm8k_dataset,
    load_role_dataset,
    load_task_dataset,
    parse_adapter_options,
    refusal_answer,
    repnoise_refusal_dataset,
    select_indices,
    sst2_dataset,
)
from trl_safety.eval import BEAVERTAILS_CATEGORIES


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def category(i):
    return {name: (k == i % 14) for k, name in enumerate(BEAVERTAILS_CATEGORIES)}


@pytest.fixture
def beavertails_file(tmp_path):
    # safe rows at even indices, unsafe at odd ones; synthetic placeholders only
    rows = [
        {
            "prompt": f"Explain how to do [HARMFUL_TASK_{i}]",
            "response": f"[SAFE_ANSWER_{i}]" if i % 2 == 0 else f"[HARMFUL_ANSWER_{i}]",
            "category": category(i),
            "is_safe": i % 2 == 0,
        }
        for i in range(20)
    ]
    return write_jsonl(tmp_path / "beavertails.jsonl", rows)


@pytest.fixture
def refusal_file(tmp_path):
    rows = [
        {
            "prompt": f"Explain how to do [HARMFUL_TASK_{i}]",
            "response": f"[HARMFUL_ANSWER_{i}]",
            "refusal": f"Question: Explain how to do [HARMFUL_TASK_{i}] \nAnswer:  I cannot help with [TASK_{i}].",
            "is_safe": i == 3,
            "category": category(i),
        }
        for i in range(12)
    ]
    path = tmp_path / "beavertails_with_refusals_train.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_alpaca_template_variants():
    plain = alpaca_prompt("Do [TASK]")
    assert plain.endswith("### Instruction:\nDo [TASK]\n\n### Response:")
    assert alpaca_prompt("Do [TASK]", newline=True) == plain + "\n"
    with_input = alpaca_prompt("Do [TASK]", "some input")
    assert "### Input:\nsome input\n\n### Response:" in with_input and with_input.startswith("Below is an instruction")
    assert with_input.split("\n\n")[0] != plain.split("\n\n")[0]  # the preamble mentions the input


def test_select_indices_and_booster_quirk():
    assert select_indices(10, 2, 3) == [2, 3, 4]
    assert select_indices(10, 2, 3, booster_quirk=True) == [3, 4]  # 2 < idx < 5
    assert select_indices(10, 0, None) == list(range(10))
    with pytest.raises(ValueError, match="only 10 rows"):
        select_indices(10, 5, 6)


def test_beavertails_roles_offsets_counts(beavertails_file):
    harmful = beavertails_dataset("harmful", source=beavertails_file, offset=2, num_samples=3, template=None)
    # unsafe rows are 1, 3, 5, ...; unsafe index 2.. → file rows 5, 7, 9
    assert harmful.column_names == ["prompt", "completion"]
    assert harmful["prompt"] == [f"Explain how to do [HARMFUL_TASK_{i}]" for i in (5, 7, 9)]
    assert harmful["completion"] == [f"[HARMFUL_ANSWER_{i}]" for i in (5, 7, 9)]
    alignment = beavertails_dataset("alignment", source=beavertails_file, num_samples=2, keep_category=True)
    assert alignment["completion"] == ["[SAFE_ANSWER_0]", "[SAFE_ANSWER_2]"]
    assert alignment["prompt"][1] == alpaca_prompt("Explain how to do [HARMFUL_TASK_2]")  # default: Vaccine template
    assert alignment["category"][1] == category(2)
    quirk = beavertails_dataset("harmful", source=beavertails_file, offset=0, num_samples=4, booster_quirk=True)
    assert [p.split("[HARMFUL_TASK_")[1].split("]")[0] for p in quirk["prompt"]] == ["3", "5", "7"]


def test_registered_adapters_through_load_role_dataset(beavertails_file, refusal_file):
    harmful = load_role_dataset(
        "harmful", BEAVERTAILS_ID, config=f"source={beavertails_file},offset=1,template=none", num_samples=2
    )
    assert harmful["prompt"] == ["Explain how to do [HARMFUL_TASK_3]", "Explain how to do [HARMFUL_TASK_5]"]
    alignment = load_role_dataset("alignment", REPNOISE_REFUSALS_ID, config=f"source={refusal_file}", num_samples=3)
    assert alignment["completion"] == [f"I cannot help with [TASK_{i}]." for i in range(3)]
    assert alignment["prompt"][0].endswith("### Response:\n")  # default: Booster template
    assert parse_adapter_options("offset=5000, booster_quirk=true,template=None,x=0.5") == {
        "offset": 5000,
        "booster_quirk": True,
        "template": None,
        "x": 0.5,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_adapter_options("offset")


def test_repnoise_roles_share_prompts(refusal_file):
    kwargs = dict(source=refusal_file, offset=5, num_samples=4, booster_quirk=True, template=None)
    alignment = repnoise_refusal_dataset("alignment", **kwargs)
    harmful = repnoise_refusal_dataset("harmful", **kwargs)
    assert alignment["prompt"] == harmful["prompt"] == [f"Explain how to do [HARMFUL_TASK_{i}]" for i in (6, 7, 8)]
    assert harmful["completion"] == [f"[HARMFUL_ANSWER_{i}]" for i in (6, 7, 8)]
    assert alignment["completion"][0] == "I cannot help with [TASK_6]."
    unsafe = repnoise_refusal_dataset("harmful", source=refusal_file, num_samples=4, only_unsafe=True, template=None)
    assert [p[-3:-1] for p in unsafe["prompt"]] == ["_0", "_1", "_2", "_4"]  # row 3 is marked safe


def test_refusal_answer_parsing():
    assert refusal_answer("Question: Q? \nAnswer: No thanks.") == "No thanks."
    assert refusal_answer("Question: Q \nAnswer: a\nAnswer: b") == "a\nAnswer: b"  # first marker only
    assert refusal_answer("  plain refusal ") == "plain refusal"


def test_eval_prompts_unsafe_filter_and_categories(beavertails_file):
    unsafe = beavertails_eval_prompts(source=beavertails_file, num_samples=3)
    assert unsafe["prompt"] == [f"Explain how to do [HARMFUL_TASK_{i}]" for i in (1, 3, 5)]
    assert unsafe["category"] == [[BEAVERTAILS_CATEGORIES[i]] for i in (1, 3, 5)]
    unfiltered = beavertails_eval_prompts(source=beavertails_file, num_samples=3, only_unsafe=False)
    assert unfiltered["prompt"] == [f"Explain how to do [HARMFUL_TASK_{i}]" for i in (0, 1, 2)]
    with pytest.raises(ValueError, match="only 10 rows"):
        beavertails_eval_prompts(source=beavertails_file, num_samples=11)


def test_task_adapters(tmp_path):
    sst2 = write_jsonl(
        tmp_path / "sst2.jsonl", [{"idx": i, "sentence": f"a film {i} ", "label": i % 2} for i in range(5)]
    )
    data = sst2_dataset("validation", source=sst2, num_samples=3)
    assert data["completion"] == ["negative", "positive", "negative"] and data["label"] == [0, 1, 0]
    assert data["prompt"][1] == alpaca_prompt(SST2_INSTRUCTION, "a film 1 ")
    assert load_task_dataset("SST-2", source=sst2, template="alpaca_newline")["prompt"][0].endswith("### Response:\n")

    agnews = write_jsonl(tmp_path / "ag.jsonl", [{"text": f"news {i}", "label": i % 4} for i in range(6)])
    data = agnews_dataset("test", source=agnews, offset=2)
    assert data["completion"] == ["Business", "Sci/Tech", "World", "Sports"]
    assert data["prompt"][0] == alpaca_prompt(AGNEWS_INSTRUCTION, "news 2")
    assert "World\nSports\nBusiness\nSci/Tech" in AGNEWS_INSTRUCTION

    gsm = write_jsonl(
        tmp_path / "gsm.jsonl",
        [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(3)],
    )
    data = gsm8k_dataset("test", source=gsm, template=None)
    assert data["prompt"][2] == "What is 2 + 2?"
    assert data["completion"][2] == "2 + 2 = 4\nThe final answer is:  4"


def test_adapters_report_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="lacks columns"):
        sst2_dataset(source=path)
    assert isinstance(Dataset.from_dict({"a": [1]}), Dataset)
