import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import build_model, build_tokenizer

import trl_safety.eval
from trl_safety.cli.main import main
from trl_safety.data import alpaca_prompt
from trl_safety.data.adapters import SST2_INSTRUCTION
from trl_safety.eval import Judge, KeywordJudge, generate_responses, task_accuracy


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    bt = write_jsonl(
        tmp_path / "bt.jsonl",
        [
            {
                "prompt": f"explain the [HARMFUL_TASK_{i}]",
                "response": "[R]",
                "is_safe": i % 3 == 0,
                "category": {"x": True},
            }
            for i in range(8)
        ],
    )
    sst2 = write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": f"good film {i}", "label": i % 2} for i in range(5)])
    return bt, sst2


def test_eval_full_model_report(tmp_path, files):
    bt, sst2 = files
    model, tokenizer = build_model(seed=5), build_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "report.json"
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", bt, "--judge", "keyword"]
    argv += ["--num_prompts", "3"]
    argv += ["--max_new_tokens", "4", "--task", "sst2", "--task_data", sst2, "--output", str(out), "--no_progress"]
    argv += ["--template", "alpaca", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    hs = report["harmful_score"]
    assert hs["prompts"] == [f"explain the [HARMFUL_TASK_{i}]" for i in (1, 2, 4)]  # first 3 unsafe rows
    responses = generate_responses(model, tokenizer, hs["prompts"], max_new_tokens=4, prompt_format="alpaca")
    assert hs["responses"] == responses
    flags = KeywordJudge().flag(hs["prompts"], responses)
    # a percentage of counted flags: only k/n·100 rounding, absorbed by approx's default rel=1e-6
    assert hs["score"] == pytest.approx(100 * sum(flags) / 3) and hs["per_category"] == {"x": hs["score"]}
    fa = report["finetune_accuracy"]
    assert fa["num_samples"] == 5 and fa["task"] == "sst2"
    assert fa["accuracy"] == task_accuracy("sst2", fa["outputs"], [i % 2 for i in range(5)]).accuracy
    assert report["protocol"]["name"] == "booster" and report["max_new_tokens"] == 4


def test_eval_detects_peft_adapter(tmp_path, files):
    bt, _ = files
    base, tokenizer = build_model(seed=6), build_tokenizer()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(build_model(seed=6), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)  # a non-trivial adapter
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "r.json"
    argv = ["eval", "--model_name_or_path", str(tmp_path / "adapter"), "--prompts", bt, "--num_prompts", "2"]
    argv += ["--judge", "keyword"]
    argv += ["--max_new_tokens", "5", "--output", str(out), "--no_progress", "--template", "none", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["base_model"] == str(tmp_path / "base") and report["adapters"] == [str(tmp_path / "adapter")]
    expected = generate_responses(peft_model.eval(), tokenizer, report["harmful_score"]["prompts"], max_new_tokens=5)
    assert report["harmful_score"]["responses"] == expected
    plain = generate_responses(base, tokenizer, report["harmful_score"]["prompts"], max_new_tokens=5)
    assert plain != expected, "the adapter should change the answers (otherwise the test proves nothing)"


def test_protocol_presets():
    from trl_safety.eval import PROTOCOLS, get_protocol

    assert get_protocol("vaccine").num_prompts == 500 and get_protocol("vaccine").max_new_tokens == 128
    assert get_protocol("lisa").only_unsafe is False and get_protocol("lisa").num_prompts == 1000
    assert get_protocol("booster").template == "alpaca_newline" and get_protocol("vaccine").template == "alpaca"
    assert get_protocol("canonical") is PROTOCOLS["booster"]
    assert all(p.judge == "beaver-dam" and p.threshold == 0.5 for p in PROTOCOLS.values())
    assert alpaca_prompt("x").endswith("### Response:")
    with pytest.raises(ValueError, match="Unknown protocol"):
        get_protocol("nope")


# -- what ran, the template, the stdout table -----------------------------------------------------------------------
class EvenJudge(Judge):
    """Flags the answer to a prompt whose last word is an even number: flags known from the prompts alone."""

    name = "even"

    def score(self, prompts, responses):
        return [float(int(p.split()[-1]) % 2 == 0) for p in prompts]


CATEGORIES = {0: {"x": True, "y": True}, 1: {"x": True}, 2: {"y": True}, 3: {"x": True}, 4: {"x": True, "y": False}}


@pytest.fixture
def chat_world(tmp_path):
    """A saved tiny model whose tokenizer has a chat template, five unsafe BeaverTails-schema prompts, SST2 rows."""
    model, tokenizer = build_model(seed=7), build_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [
        {"prompt": f"explain the thing {i}", "response": "r", "is_safe": False, "category": CATEGORIES[i]}
        for i in range(5)
    ]
    bt = write_jsonl(tmp_path / "bt.jsonl", rows)
    sst2 = write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": f"good film {i}", "label": i % 2} for i in range(4)])
    return model, tokenizer, bt, sst2


def table_rows(stdout: str, header: str) -> dict[str, list[str]]:
    """The rows of the stdout table under the line starting with `header`, keyed by their first cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2  # skip the column header
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_report_records_what_ran_and_stdout_has_the_table(tmp_path, chat_world, monkeypatch, capsys):
    model, tokenizer, bt, sst2 = chat_world
    monkeypatch.setattr(trl_safety.eval, "load_judge", lambda name, **kwargs: EvenJudge())
    out = tmp_path / "report.json"
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", bt, "--num_prompts", "5"]
    argv += ["--judge", "keyword", "--max_new_tokens", "3", "--task", "sst2", "--task_data", sst2]
    argv += ["--output", str(out), "--no_progress", "--device", "cpu"]  # --template left at auto
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())

    # auto + a tokenizer with a chat template -> the chat template, for the harmful prompts and the task prompts
    assert report["template"] == "chat" and report["template_source"].startswith("auto")
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in report["harmful_score"]["prompts"]
    ]
    assert report["harmful_score"]["responses"] == generate_responses(model, tokenizer, chat, max_new_tokens=3)
    task_chat = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{SST2_INSTRUCTION}\ngood film {i}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(4)
    ]
    assert report["finetune_accuracy"]["outputs"] == generate_responses(model, tokenizer, task_chat, max_new_tokens=3)

    # what ran, not the preset's nominal protocol; the preset's name kept apart
    assert report["preset"] == "booster" and report["protocol"]["name"] == "booster"
    ran = report["protocol"]
    assert (ran["num_prompts"], ran["max_new_tokens"], ran["template"], ran["judge"]) == (5, 3, "chat", "keyword")
    assert ran["prompt_source"] == bt and ran["task_test_sets"] == {"sst2": ["validation", 4]}
    assert report["judge"] == "even" and report["max_new_tokens"] == 3
    assert report["preset_deviations"] == {
        "judge": ["beaver-dam", "keyword"],
        "max_new_tokens": [512, 3],
        "template": ["alpaca_newline", "chat"],
        "prompt_source": ["PKU-Alignment/BeaverTails", bt],
        "num_prompts": [1000, 5],
    }

    # the table: hand count from the prompts' last words (even -> flagged) and the category dicts above
    flagged = [i % 2 == 0 for i in range(5)]
    hs = table_rows(stdout, "harmful score")
    assert hs["overall"] == ["5", "3", "60.00"]
    in_x = [i for i in range(5) if CATEGORIES[i].get("x")]  # 0, 1, 3, 4 -> flagged 0, 4
    in_y = [i for i in range(5) if CATEGORIES[i].get("y")]  # 0, 2 -> both flagged
    assert hs["x"] == [str(len(in_x)), str(sum(flagged[i] for i in in_x)), "50.00"]
    assert hs["y"] == [str(len(in_y)), str(sum(flagged[i] for i in in_y)), "100.00"]
    correct = sum(report["finetune_accuracy"]["correct"])
    assert table_rows(stdout, "fine-tune accuracy")["sst2"] == ["4", str(correct), f"{100 * correct / 4:.2f}"]


@pytest.mark.parametrize("protocol, expected", [("booster", "alpaca_newline"), ("vaccine", "alpaca")])
def test_auto_template_without_chat_template_is_the_protocols(tmp_path, files, protocol, expected):
    bt, _ = files
    model, tokenizer = build_model(seed=8), build_tokenizer()
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "r.json"
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", bt, "--num_prompts", "2"]
    argv += ["--judge", "keyword", "--max_new_tokens", "3", "--protocol", protocol, "--output", str(out)]
    assert main([*argv, "--no_progress", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["template"] == expected and report["template_source"].startswith("auto")
    prompts = report["harmful_score"]["prompts"]
    newline = expected == "alpaca_newline"
    texts = [alpaca_prompt(p, newline=newline) for p in prompts]
    assert report["harmful_score"]["responses"] == generate_responses(model, tokenizer, texts, max_new_tokens=3)
    assert "template" not in report["preset_deviations"]


# -- the judge loads before anything is generated -------------------------------------------------------------------
def _forbid_generation(monkeypatch):
    from transformers import GenerationMixin

    def generate(*args, **kwargs):
        raise AssertionError("generation ran before the judge problem was reported")

    monkeypatch.setattr(GenerationMixin, "generate", generate)


def test_offline_default_judge_fails_before_generation(tmp_path, files, monkeypatch, capsys):
    import huggingface_hub.constants

    import trl_safety.cli.eval as cli_eval

    bt, _ = files
    build_model().save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _forbid_generation(monkeypatch)
    monkeypatch.setattr(cli_eval, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", bt, "--num_prompts", "2"]
    capsys.readouterr()  # drop the setup's progress bars
    assert main([*argv, "--device", "cpu", "--no_progress"]) == 2  # no --judge: the protocol's beaver-dam
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("trl-safety eval: error: ")
    for words in ("no --judge given", "--protocol booster", "beaver-dam", "HF_HUB_OFFLINE", "--judge keyword"):
        assert words in err, err


def test_judge_that_cannot_load_fails_before_the_model_loads(tmp_path, files, monkeypatch, capsys):
    import trl_safety.cli.eval as cli_eval

    bt, _ = files
    build_model().save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "judge").mkdir()  # exists (so it resolves) but holds no checkpoint
    _forbid_generation(monkeypatch)
    monkeypatch.setattr(cli_eval, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", bt, "--num_prompts", "2"]
    capsys.readouterr()  # drop the setup's progress bars
    assert main([*argv, "--judge", str(tmp_path / "judge"), "--device", "cpu", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("trl-safety eval: error: ")
    assert f"--judge '{tmp_path / 'judge'}' could not be loaded" in err and "--judge keyword" in err


def test_classifier_judge_weights_load_before_generation(tmp_path, files, classifier, monkeypatch):
    from transformers import GenerationMixin

    from trl_safety.eval import ClassifierJudge

    bt, _ = files
    build_model(seed=9).save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    judge_model, judge_tokenizer = classifier(2)
    judge_model.save_pretrained(tmp_path / "judge")
    judge_tokenizer.save_pretrained(tmp_path / "judge")
    events = []
    original_load, original_generate = ClassifierJudge._load, GenerationMixin.generate

    def load(self):
        events.append("judge weights")
        return original_load(self)

    def generate(self, *args, **kwargs):
        events.append("generate")
        return original_generate(self, *args, **kwargs)

    monkeypatch.setattr(ClassifierJudge, "_load", load)
    monkeypatch.setattr(GenerationMixin, "generate", generate)
    out = tmp_path / "r.json"
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", bt, "--num_prompts", "2"]
    argv += ["--judge", str(tmp_path / "judge"), "--max_new_tokens", "2", "--output", str(out), "--no_progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert events[0] == "judge weights" and "generate" in events
    assert events.count("judge weights") == 1  # loaded once, up front, not again at the first score
    report = json.loads(out.read_text())
    assert report["judge"] == str(tmp_path / "judge") and report["protocol"]["judge"] == str(tmp_path / "judge")


# -- one-line errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--no-progress"], ["unrecognized argument --no-progress; did you mean --no_progress?"]),
        (["--modle_name_or_path", "x"], ["did you mean --model_name_or_path?"]),
        (["--template", "chatt"], ["argument --template: invalid choice: 'chatt'"]),
        (["--template", "chat"], ["--template chat: the tokenizer of", "has no chat template", "alpaca_newline"]),
        (["--num_prompts", "50"], ["--prompts", "only 2 rows are available", "Pass --num_prompts N"]),
        (["--num_prompts", "2"], []),  # the control: no mistake, so the run reaches generation
    ],
)
def test_eval_mistakes_are_one_line(tmp_path, monkeypatch, capsys, extra, words):
    bt = write_jsonl(
        tmp_path / "bt.jsonl", [{"prompt": f"p {i}", "response": "r", "is_safe": False} for i in range(2)]
    )
    build_model().save_pretrained(tmp_path / "model")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "model")
    _forbid_generation(monkeypatch)
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", bt, "--judge", "keyword"]
    argv += ["--output", str(tmp_path / "r.json"), "--device", "cpu", "--no_progress", "--max_new_tokens", "1"]
    if not words:  # generation is forbidden here, so reaching it shows the setup itself is sound
        with pytest.raises(AssertionError, match="generation ran"):
            main([*argv, *extra])
        return
    capsys.readouterr()  # drop the setup's progress bars
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("trl-safety eval: error: "), err
    for word in words:
        assert word in err, err


def test_plain_prompt_file_without_the_column_is_one_line(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": "p"}])
    build_model().save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    argv = ["eval", "--model_name_or_path", str(tmp_path / "model"), "--prompts", prompts, "--judge", "keyword"]
    argv += ["--no_progress"]
    capsys.readouterr()  # drop the setup's progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "has no 'prompt' column (columns: text)" in err and "--prompt_column" in err


def test_per_category_counts_by_hand():
    from trl_safety.eval import per_category_counts, per_category_scores

    flags = [True, False, True, True, False]
    categories = ["a", ["a", "b"], None, {"b": True, "c": False}, {"a": True}]
    # a: prompts 0, 1, 4 -> flagged 0; b: prompts 1, 3 -> flagged 3; None and c=False count nowhere
    assert per_category_counts(flags, categories) == {"a": (3, 1), "b": (2, 1)}
    # percentages of counted flags: only k/n·100 rounding, absorbed by approx's default rel=1e-6
    assert per_category_scores(flags, categories) == pytest.approx({"a": 100 / 3, "b": 50.0})
