"""Publishing: `trainer.push_to_hub()` and `trl-safety push`, run up to the upload, patched at the huggingface_hub
boundary (`HfApi.create_repo` / `HfApi.upload_folder`, which transformers' `Trainer.push_to_hub` reaches through
`transformers.utils.hub.hf_api()` and the CLI through its own `HfApi`)."""

import json
import os
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from trl import SFTConfig, SFTTrainer

from trl_safety.cli.main import main as cli_main
from trl_safety.core import DefenseTrainerMixin


@dataclass
class DummyConfig(SFTConfig):
    dummy_strength: float = field(default=0.25, metadata={"help": "unused strength"})


class DummyTrainer(DefenseTrainerMixin, SFTTrainer):
    """Plain SFT under a defense's identity: enough to exercise saving, cards and pushing."""

    defense_name = "dummy"
    stage = "fine-tuning"
    config_class = DummyConfig
    _name = "Dummy"
    _tag_names = ["trl", "sft", "trl-safety", "dummy"]
    _paper = {"title": "A Dummy Defense", "id": "2401.00002", "citation": "@article{dummy2024}"}
    licence_notes = ["The dummy alignment data is synthetic."]


class FakeHub:
    """Records create_repo / upload_folder calls and what the uploaded folder held at upload time."""

    def __init__(self, monkeypatch):
        self.created = []
        self.uploads = []
        hub = self

        def create_repo(api_self, repo_id, *args, **kwargs):
            hub.created.append({"repo_id": repo_id, **kwargs})
            full = repo_id if "/" in repo_id else f"tester/{repo_id}"
            return RepoUrl(f"https://huggingface.co/{full}")

        def upload_folder(api_self, *, repo_id, folder_path, **kwargs):
            files = {}
            for root, _dirs, names in os.walk(folder_path):
                for name in names:
                    files[os.path.relpath(os.path.join(root, name), folder_path)] = os.path.join(root, name)
            readme = files.get("README.md")
            hub.uploads.append(
                {
                    "repo_id": repo_id,
                    "folder": folder_path,
                    "files": set(files),
                    "readme": open(readme).read() if readme else None,
                    "defense_config": json.load(open(files["defense_config.json"]))
                    if "defense_config.json" in files
                    else None,
                    **kwargs,
                }
            )
            commit = CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/123",
                commit_message=kwargs.get("commit_message", ""),
                commit_description="",
                oid="123",
            )
            if kwargs.get("run_as_future"):  # checkpoint pushes run in the background
                future = Future()
                future.set_result(commit)
                return future
            return commit

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.fixture
def hub(monkeypatch):
    return FakeHub(monkeypatch)


def _trainer(output_dir, peft_config=None, **config):
    config.setdefault("max_steps", 1)
    args = tiny_config(output_dir, DummyConfig, **config)
    return DummyTrainer(
        build_model("llama"),
        args,
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
        peft_config=peft_config,
    )


def _kept(upload):
    """Files `upload_folder` would send, applying its ignore patterns (fnmatch semantics, as huggingface_hub does)."""
    from huggingface_hub.utils import filter_repo_objects

    return set(filter_repo_objects(upload["files"], ignore_patterns=upload["ignore_patterns"]))


def test_trainer_push_to_hub_uploads_weights_config_and_card(tmp_path, hub):
    output_dir = tmp_path / "dummy-run"
    trainer = _trainer(output_dir, save_strategy="steps", save_steps=1)
    trainer.train()
    assert (output_dir / "checkpoint-1").is_dir()
    # An evaluation report saved beside the model shows up on the card, with the judge's licence note
    report = {
        "harmful_score": {"score": 12.5, "flags": [True] + [False] * 7, "judge": "PKU-Alignment/beaver-dam-7b"},
        "finetune_accuracy": 93.0,
    }
    (output_dir / "eval_report.json").write_text(json.dumps(report))

    trainer.push_to_hub(dataset_name="my-org/customer-data")

    assert [c["repo_id"] for c in hub.created] == ["dummy-run"]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "tester/dummy-run"
    assert os.path.samefile(upload["folder"], output_dir)
    kept = _kept(upload)
    assert {"README.md", "defense_config.json", "model.safetensors", "config.json", "tokenizer.json"} <= kept
    assert not any(name.startswith("checkpoint-") for name in kept)

    info = upload["defense_config"]
    assert info["defense"] == "dummy" and info["stage"] == "fine-tuning" and info["is_adapter"] is False
    assert info["hyperparameters"] == {"dummy_strength": 0.25}
    card = ModelCard(upload["readme"])
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "trl-safety-testing/tiny-llama"
    assert card.data.datasets == ["my-org/customer-data"]
    assert {"dummy", "trl-safety", "harmful-finetuning-defense"} <= set(card.data.tags)
    text = upload["readme"]
    assert "## Harmful fine-tuning defense" in text
    assert "| Defense | Dummy (`dummy`) |" in text
    assert "| Stage | fine-tuning |" in text
    assert "[A Dummy Defense](https://huggingface.co/papers/2401.00002)" in text
    assert "- `dummy_strength`: `0.25`" in text
    assert "| harmful_score | 12.5 |" in text and "| finetune_accuracy | 93 |" in text
    assert "Read from `eval_report.json`" in text
    assert "beaver-dam-7b is derived from LLaMA-1" in text
    assert "The dummy alignment data is synthetic." in text
    assert "@article{dummy2024}" in text
    assert 'AutoModelForCausalLM.from_pretrained("tester/dummy-run")' in text


def test_lora_trainer_push_uploads_adapter_and_names_base_model(tmp_path, hub):
    output_dir = tmp_path / "lora-run"
    trainer = _trainer(output_dir, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    trainer.push_to_hub(results={"harmful_score": 20.0})

    (upload,) = hub.uploads
    kept = _kept(upload)
    assert {"README.md", "defense_config.json", "adapter_model.safetensors", "adapter_config.json"} <= kept
    assert "model.safetensors" not in kept
    assert upload["defense_config"]["is_adapter"] is True
    assert upload["defense_config"]["base_model"] == "trl-safety-testing/tiny-llama"
    card = ModelCard(upload["readme"])
    assert card.data.library_name == "peft"
    assert card.data.base_model == "trl-safety-testing/tiny-llama"
    assert "[trl-safety-testing/tiny-llama](https://huggingface.co/trl-safety-testing/tiny-llama)" in upload["readme"]
    assert "| Defense | Dummy (`dummy`) |" in upload["readme"]
    assert 'AutoPeftModelForCausalLM.from_pretrained("tester/lora-run")' in upload["readme"]
    assert "| harmful_score | 20 |" in upload["readme"]


def test_push_during_training_uploads_a_complete_folder_at_each_save(tmp_path, hub):
    """`push_to_hub=True`: every checkpoint push (made before any `save_model` on the output dir) has card and config."""
    output_dir = tmp_path / "live"
    trainer = _trainer(
        output_dir, push_to_hub=True, hub_model_id="my-org/live", save_strategy="steps", save_steps=1, max_steps=2
    )
    assert [c["repo_id"] for c in hub.created] == ["my-org/live"]
    trainer.train()
    checkpoint_pushes = [u for u in hub.uploads if u["commit_message"].startswith("Training in progress")]
    assert checkpoint_pushes
    first = next(u for u in checkpoint_pushes if u["folder"] == str(output_dir))
    assert {"README.md", "defense_config.json", "model.safetensors"} <= _kept(first)
    assert "| Defense | Dummy (`dummy`) |" in first["readme"]
    assert first["defense_config"]["defense"] == "dummy"


def test_cli_push_regenerates_card_with_folder_results(tmp_path, hub, capsys):
    output_dir = tmp_path / "saved"
    trainer = _trainer(output_dir)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset_name="my-org/customer-data")
    (output_dir / "checkpoint-9").mkdir()
    (output_dir / "checkpoint-9" / "model.safetensors").write_text("stale")
    bench = {
        "config": {"p": 0.1, "n": 1000, "seed": 0},
        "rows": [
            {"name": "sft", "defense": None, "stage": None, "harmful_score": 71.0, "finetune_accuracy": 98.0},
            {
                "name": "dummy",
                "defense": "dummy",
                "stage": "fine-tuning",
                "harmful_score": 40.5,
                "finetune_accuracy": 97.5,
            },
        ],
    }
    (output_dir / "results.json").write_text(json.dumps(bench))

    code = cli_main(
        ["push", str(output_dir), "--repo_id", "my-org/tiny-dummy", "--private", "--commit_message", "release v1"]
    )

    assert code == 0
    assert hub.created == [{"repo_id": "my-org/tiny-dummy", "private": True, "exist_ok": True, "token": None}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "my-org/tiny-dummy"
    assert upload["commit_message"] == "release v1"
    kept = _kept(upload)
    assert {"README.md", "defense_config.json", "model.safetensors", "results.json"} <= kept
    assert not any(name.startswith("checkpoint-") for name in kept)
    text = upload["readme"]
    card = ModelCard(text)
    assert card.data.datasets == ["my-org/customer-data"]  # kept from the card written at training time
    assert "| Defense | Dummy (`dummy`) |" in text and "| Stage | fine-tuning |" in text
    assert "| harmful_score | 40.5 |" in text and "| finetune_accuracy | 97.5 |" in text
    assert "| harmful_score (SFT baseline) | 71 |" in text
    assert 'from_pretrained("my-org/tiny-dummy")' in text
    assert (output_dir / "README.md").read_text() == text
    assert "https://huggingface.co/my-org/tiny-dummy/commit/123" in capsys.readouterr().out


def test_cli_push_refuses_folder_without_defense_config(tmp_path, hub, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "model.safetensors").write_text("weights")
    assert cli_main(["push", str(folder), "--repo_id", "me/plain"]) == 2
    err = capsys.readouterr().err
    assert "has no defense_config.json" in err and "trainer.save_model" in err
    assert hub.created == [] and hub.uploads == []

    (folder / "defense_config.json").write_text(json.dumps({"defense": "dummy", "stage": "fine-tuning"}))
    (folder / "model.safetensors").unlink()
    assert cli_main(["push", str(folder), "--repo_id", "me/plain"]) == 2
    assert "holds no weights" in capsys.readouterr().err
    assert hub.uploads == []
