"""The model-card builder: defense section, results read from a folder, licence notes, LoRA cards."""

import json
from dataclasses import dataclass, field

import pytest
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from trl import SFTConfig, SFTTrainer

from trl_safety.core import DefenseTrainerMixin
from trl_safety.core.card import build_model_card, find_results, licence_notes_for, write_folder_card


INFO = {
    "defense": "vaccine",
    "title": "Vaccine",
    "stage": "alignment",
    "trainer": "VaccineTrainer",
    "hyperparameters": {"rho": 2.0},
    "datasets": {"alignment dataset": "PKU-Alignment/BeaverTails"},
    "paper": {"title": "Vaccine: Perturbation-aware Alignment", "id": "2402.01109", "citation": "@article{vaccine}"},
    "base_model": "meta-llama/Llama-2-7b-hf",
    "is_adapter": True,
    "licence_notes": [],
}


def test_positional_signature_and_lora_card():
    # build_model_card(info, model_name, hub_model_id, dataset_name, tags, results): the original positional order
    card = build_model_card(INFO, "llama-vaccine", "org/llama-vaccine", "my/sst2", ["extra"], {"harmful_score": 42.8})
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.library_name == "peft"
    assert card.data.datasets == ["my/sst2", "PKU-Alignment/BeaverTails"]
    assert {"extra", "vaccine", "trl-safety", "harmful-finetuning-defense"} <= set(card.data.tags)
    text = str(card)
    assert "[meta-llama/Llama-2-7b-hf](https://huggingface.co/meta-llama/Llama-2-7b-hf)" in text
    assert "| Defense | Vaccine (`vaccine`) |" in text and "| Stage | alignment |" in text
    assert "- `rho`: `2.0`" in text
    assert "| harmful_score | 42.8 |" in text
    assert "CC BY-NC 4.0" in text  # BeaverTails named among the datasets
    assert 'AutoPeftModelForCausalLM.from_pretrained("org/llama-vaccine")' in text
    assert "@article{vaccine}" in text


def test_local_base_model_and_data_files_are_not_linked(tmp_path):
    info = {
        **INFO,
        "base_model": str(tmp_path),
        "is_adapter": False,
        "datasets": {"alignment dataset": "data/refusals.jsonl"},
    }
    card = build_model_card(info, "m")
    assert card.data.base_model is None and card.data.datasets is None
    assert card.data.library_name == "transformers"
    assert f"`{tmp_path}`" in str(card)
    assert "### Evaluation results" not in str(card) and "### Licence notes" not in str(card)


def test_licence_notes_match_known_ids_only():
    notes = licence_notes_for(["PKU-Alignment/beaver-dam-7b", "pku-alignment/beavertails", "my/data", "keyword"])
    assert len(notes) == 2
    assert any("beaver-dam-7b" in n for n in notes) and any("CC BY-NC 4.0" in n for n in notes)
    assert licence_notes_for(["my/data"]) == []


def test_find_results_formats(tmp_path):
    assert find_results(str(tmp_path)) == {}
    # Trainer.save_metrics("eval", ...) file
    (tmp_path / "eval_results.json").write_text(json.dumps({"eval_loss": 1.5, "epoch": 2.0, "note": "x"}))
    assert find_results(str(tmp_path))["metrics"] == {"eval_loss": 1.5, "epoch": 2.0}
    # A bench results.json takes precedence and yields the defense's row beside the SFT baseline
    bench = {
        "config": {"p": 0.1, "n": 1000, "seed": 0, "judge": "keyword"},
        "rows": [
            {"name": "sft", "defense": None, "harmful_score": 71.0, "finetune_accuracy": 98.0},
            {"name": "vaccine", "defense": "vaccine", "harmful_score": 40.5, "finetune_accuracy": 97.5},
        ],
    }
    (tmp_path / "results.json").write_text(json.dumps(bench))
    found = find_results(str(tmp_path), "vaccine")
    assert found["source"] == "results.json" and found["judge"] == "keyword"
    assert found["metrics"] == {
        "harmful_score": 40.5,
        "finetune_accuracy": 97.5,
        "harmful_score (SFT baseline)": 71.0,
        "finetune_accuracy (SFT baseline)": 98.0,
        "bench p": 0.1,
        "bench n": 1000,
        "bench seed": 0,
    }
    # A bench without this defense's row falls through to the next file
    assert find_results(str(tmp_path), "lisa")["source"] == "eval_results.json"
    # An eval report holding a serialised harmful-score result
    report = {
        "model": "org/model",
        "harmful_score": {
            "score": 25.0,
            "flags": [True, False, False, False],
            "judge": "PKU-Alignment/beaver-dam-7b",
            "per_category": {"violence": 50.0},
            "num_prompts": 4,
        },
        "finetune_accuracy": {"accuracy": 91.0},
    }
    (tmp_path / "eval_report.json").write_text(json.dumps(report))
    found = find_results(str(tmp_path), "vaccine")
    assert found["source"] == "eval_report.json"
    assert found["metrics"] == {
        "harmful_score": 25.0,
        "harmful_score/num_prompts": 4,
        "harmful_score/violence": 50.0,
        "finetune_accuracy/accuracy": 91.0,
    }
    assert found["judge"] == "PKU-Alignment/beaver-dam-7b"
    assert licence_notes_for(found["mentions"])


def test_write_folder_card(tmp_path):
    with pytest.raises(FileNotFoundError, match="defense_config.json"):
        write_folder_card(str(tmp_path))
    (tmp_path / "defense_config.json").write_text(json.dumps(INFO))
    (tmp_path / "README.md").write_text(
        "---\ndatasets:\n- my/sst2\n- PKU-Alignment/BeaverTails\ntags:\n- mine\n---\nold"
    )
    (tmp_path / "eval_report.json").write_text(json.dumps({"harmful_score": 30.0, "judge": "keyword"}))
    write_folder_card(str(tmp_path), hub_model_id="org/pushed")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets == ["my/sst2", "PKU-Alignment/BeaverTails"]
    assert "mine" in card.data.tags and "vaccine" in card.data.tags
    assert card.data.model_name == "pushed"
    assert "| harmful_score | 30 |" in card.text and "Judge: `keyword`" in card.text
    (tmp_path / "defense_config.json").write_text(json.dumps({"defense": "x"}))
    with pytest.raises(ValueError, match="stage"):
        write_folder_card(str(tmp_path))


@dataclass
class TinyDefenseConfig(SFTConfig):
    tiny_strength: float = field(default=0.5, metadata={"help": "unused strength"})


class TinyDefenseTrainer(DefenseTrainerMixin, SFTTrainer):
    defense_name = "tiny-defense"
    stage = "fine-tuning"
    config_class = TinyDefenseConfig
    _name = "TinyDefense"
    _tag_names = ["trl", "sft", "trl-safety", "tiny-defense"]
    _paper = {"title": "Tiny", "id": "2401.00003", "citation": "@article{tiny}"}


def test_lora_run_card_names_base_model_and_defense(tmp_path):
    trainer = TinyDefenseTrainer(
        build_model("qwen2", name="org/tiny-qwen"),
        tiny_config(tmp_path, TinyDefenseConfig),
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
    )
    trainer.save_model()  # PEFT writes its own README here; the defense card replaces it
    trainer.create_model_card(dataset_name="org/task", results={"harmful_score": 5.0})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/tiny-qwen"
    assert card.data.library_name == "peft"
    assert "tiny-defense" in card.data.tags
    assert "[org/tiny-qwen](https://huggingface.co/org/tiny-qwen)" in card.text
    assert "| Defense | TinyDefense (`tiny-defense`) |" in card.text
    assert "- `tiny_strength`: `0.5`" in card.text
    assert "| harmful_score | 5 |" in card.text
    info = json.loads((tmp_path / "defense_config.json").read_text())
    assert info["base_model"] == "org/tiny-qwen" and info["is_adapter"] is True


EVAL_REPORT = {  # the shape `trl-safety eval` writes (cli/eval.py)
    "model": "run",
    "protocol": {
        "name": "vaccine",
        "prompt_source": "PKU-Alignment/BeaverTails",
        "prompt_split": "30k_test",
        "num_prompts": 4,  # what ran: a setting, not a result
        "max_new_tokens": 8,
    },
    "max_new_tokens": 8,
    "harmful_score": {
        "score": 25.0,
        "flags": [True, False, False, False],
        "judge": "keyword",
        "per_category": {"violence": 50.0},
        "num_prompts": 4,
        "num_flagged": 1,
    },
    "finetune_accuracy": {"task": "sst2", "accuracy": 75.0, "correct": [True, True, True, False]},
}


def yaml_header(text: str) -> dict:
    """The card's YAML header, parsed independently of huggingface_hub."""
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def test_lora_run_card_has_trls_sections_the_defense_section_and_model_index(tmp_path):
    folder = tmp_path / "tiny-run"
    trainer = TinyDefenseTrainer(
        build_model("qwen2", name="org/tiny-qwen"),
        tiny_config(folder, TinyDefenseConfig),
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
    )
    trainer.train()
    # TRL's own card for this run, from TRL's create_model_card (the class after the mixin in the MRO)
    super(DefenseTrainerMixin, trainer).create_model_card(model_name="tiny-run", dataset_name="org/task")
    trl_text = ModelCard.load(folder / "README.md").text
    (folder / "eval_report.json").write_text(json.dumps(EVAL_REPORT))
    trainer.save_model()
    text = (folder / "README.md").read_text()

    # TRL's content from its training procedure on, line by line and in order (blank lines aside)
    trl_lines = [line.strip() for line in trl_text[trl_text.index("## Training procedure") :].splitlines()]
    lines = iter(line.strip() for line in text.splitlines())
    missing = [line for line in trl_lines if line and not any(line == other for other in lines)]
    assert missing == []
    assert "This model was trained with TinyDefense, a method introduced in [Tiny]" in text
    assert "Cite TRL as:" in text and "@software{vonwerra2020trl," in text and "@article{tiny}" in text
    assert "- trl-safety: " in text and "- PEFT: " in text  # added to TRL's framework versions
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Quick start", "## Harmful fine-tuning defense", "## Training procedure", "## Citations"]
    assert text.count("## Quick start") == 1  # TRL's pipeline quick start is replaced by ours
    quick_start = text[text.index("## Quick start") : text.index("## Harmful fine-tuning defense")]
    assert 'AutoTokenizer.from_pretrained("tiny-run")' in quick_start
    assert 'AutoPeftModelForCausalLM.from_pretrained("tiny-run")' in quick_start and "model.generate(" in quick_start

    # the defense section, with the report's numbers
    assert "| Defense | TinyDefense (`tiny-defense`) |" in text and "- `tiny_strength`: `0.5`" in text
    assert "| harmful_score | 25 |" in text and "Read from `eval_report.json`" in text
    assert "| max_new_tokens |" not in text and "| protocol/" not in text  # the run's settings are not results

    header = yaml_header(text)
    assert header["library_name"] == "peft" and header["base_model"] == "org/tiny-qwen"
    assert {"trl", "sft", "trl-safety", "tiny-defense", "generated_from_trainer"} <= set(header["tags"])
    (index,) = header["model-index"]
    assert index["name"] == "tiny-run"
    by_task = {r["task"]["name"]: r for r in index["results"]}
    hs, fa = by_task["Harmful score"], by_task["Fine-tune accuracy"]
    assert hs["task"]["type"] == fa["task"]["type"] == "text-generation"
    assert hs["dataset"] == {
        "name": "PKU-Alignment/BeaverTails",
        "type": "PKU-Alignment/BeaverTails",
        "split": "30k_test",
    }
    assert [(m["type"], m["value"]) for m in hs["metrics"]] == [
        ("harmful_score", 25.0),
        ("harmful_score/violence", 50.0),
    ]
    assert fa["dataset"] == {"name": "sst2", "type": "sst2"}
    assert [(m["type"], m["value"]) for m in fa["metrics"]] == [("finetune_accuracy", 75.0)]


def test_model_index_only_for_results_on_recorded_data(tmp_path):
    # explicit results name no dataset: shown in the table, not indexed (the Hub needs a dataset per entry)
    card = build_model_card(INFO, "m", results={"harmful_score": 42.8})
    assert "model-index" not in yaml_header(str(card))
    # a bench results.json: the toy world's data; baseline rows and bench settings are not the model's results
    bench = {
        "config": {"p": 0.1, "n": 100, "seed": 0, "judge": "keyword"},
        "rows": [
            {"name": "sft", "defense": None, "harmful_score": 71.0, "finetune_accuracy": 98.0},
            {"name": "vaccine", "defense": "vaccine", "harmful_score": 40.5, "finetune_accuracy": 97.5},
        ],
    }
    (tmp_path / "results.json").write_text(json.dumps(bench))
    found = find_results(str(tmp_path), "vaccine")
    assert found["eval_datasets"] == {
        "harmful_score": {"name": "trl_safety toy world"},
        "finetune_accuracy": {"name": "trl_safety toy world sentiment"},
    }
    card = build_model_card(INFO, "m", results=found["metrics"], eval_datasets=found["eval_datasets"])
    metrics = {
        m["type"]: m["value"] for r in yaml_header(str(card))["model-index"][0]["results"] for m in r["metrics"]
    }
    assert metrics == {"harmful_score": 40.5, "finetune_accuracy": 97.5}


def test_full_model_card_quick_start_runs(tmp_path, capsys):
    """The card's quick start, pointed at the saved folder, loads the tokenizer and model and generates."""
    folder = tmp_path / "run"
    trainer = TinyDefenseTrainer(
        build_model(seed=0),
        tiny_config(folder, TinyDefenseConfig, max_steps=1),
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
    )
    trainer.train()
    trainer.save_model()
    text = (folder / "README.md").read_text()
    code = text.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count('"run"') == 2  # the tokenizer and the model, from the repository id (here the folder name)
    exec(compile(code.replace('"run"', repr(str(folder))), "quick_start", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip()  # a decoded answer of the untrained tiny model
