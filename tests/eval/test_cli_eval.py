import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import build_model, build_tokenizer

from trl_safety.cli.main import main
from trl_safety.data import alpaca_prompt
from trl_safety.eval import KeywordJudge, generate_responses, task_accuracy


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
    argv = ["eval", "--model", str(tmp_path / "model"), "--prompts", bt, "--judge", "keyword", "--num_prompts", "3"]
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
    argv = ["eval", "--model", str(tmp_path / "adapter"), "--prompts", bt, "--num_prompts", "2", "--judge", "keyword"]
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
