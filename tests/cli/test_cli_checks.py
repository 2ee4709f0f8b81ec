"""The up-front checks behind `trl-safety`'s one-line errors, in-process: the path rules, `load_named_dataset`'s
missing-path error, judge resolution, and that a mistake stops a command before any model is loaded or launched."""

import json
import os

import pytest
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset

from trl_safety.cli.checks import UsageError, check_dataset, check_judge, check_model, looks_like_local_model_path
from trl_safety.cli.main import main
from trl_safety.data.loading import check_local_dataset, load_named_dataset, load_role_dataset
from trl_safety.data.loading import looks_like_local_path as looks_like_local_dataset
from trl_safety.eval.judges import BEAVER_DAM_ID, BeaverDamJudge, ClassifierJudge, KeywordJudge, resolve_judge


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "runs").mkdir()
    return tmp_path


# -- data/loading.py ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["./nope.jsonl", "../nope", "/no/such/dir", "~/nope.csv", "sub/nope.parquet", "x.json"]
)
def test_missing_local_dataset_is_file_not_found(in_tmp, name):
    assert looks_like_local_dataset(name)
    with pytest.raises(FileNotFoundError) as info:
        load_named_dataset(name)
    message = str(info.value)
    assert f"{name!r} does not exist" in message and "unreachable" not in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_role_dataset("harmful", name)


def test_hub_ids_still_go_to_the_hub(in_tmp):
    for name in ("PKU-Alignment/BeaverTails", "owner/name", "sst2"):
        assert not looks_like_local_dataset(name)
        check_local_dataset(name)  # not a local path: nothing to check here
    with pytest.raises(RuntimeError, match="the Hub is unreachable"):
        load_named_dataset("nobody-xyz/no-such-dataset")


def test_existing_local_datasets_pass(in_tmp):
    prompt_completion_dataset(3).to_json("data.jsonl")
    check_local_dataset("data.jsonl")
    assert len(load_named_dataset("./data.jsonl")) == 3
    (in_tmp / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="supported local formats"):
        check_local_dataset("notes.txt")
    with pytest.raises(UsageError, match="^--dataset_name: Cannot read 'notes.txt'"):
        check_dataset("notes.txt", "--dataset_name")


# -- model-path rule -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, local",
    [
        ("./model", True),
        ("../model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("model/", True),
        ("a/b/c", True),  # a Hub id has at most one slash
        ("runs/final", True),  # `runs/` is a local folder
        ("meta-llama/Llama-2-7b-hf", False),
        ("gpt2", False),
    ],
)
def test_model_path_rule(in_tmp, name, local):
    assert looks_like_local_model_path(name) is local


def test_check_model(in_tmp, monkeypatch):
    (in_tmp / "model").mkdir()
    check_model("model", "--model")
    check_model(None, "--model")
    with pytest.raises(UsageError, match=r"^--model 'runs/final': no such folder; pass an existing folder or a Hub"):
        check_model("runs/final", "--model")
    with pytest.raises(UsageError, match="neither an existing folder nor a valid Hub id"):
        check_model("not a repo", "--model")
    with pytest.raises(UsageError, match="not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"):
        check_model("owner/name", "--model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_model("owner/name", "--model")  # online: left to the download, no network call here


def test_offline_hub_id_in_the_cache_passes(in_tmp, monkeypatch):
    import huggingface_hub.constants

    cache = in_tmp / "hub"
    snapshot = cache / "models--owner--name" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--owner--name" / "refs").mkdir()
    (cache / "models--owner--name" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    check_model("owner/name", "--model")
    with pytest.raises(UsageError, match="not in the local Hugging Face cache"):
        check_model("owner/other", "--model")


# -- judges ----------------------------------------------------------------------------------------------------------
def test_resolve_judge(in_tmp):
    (in_tmp / "classifier").mkdir()
    assert resolve_judge("keyword") == (KeywordJudge, None)
    assert resolve_judge("beaver-dam") == (BeaverDamJudge, BEAVER_DAM_ID)
    assert resolve_judge(BEAVER_DAM_ID) == (BeaverDamJudge, BEAVER_DAM_ID)
    assert resolve_judge("beaver-dam:classifier") == (BeaverDamJudge, "classifier")
    assert resolve_judge("classifier") == (ClassifierJudge, "classifier")
    assert resolve_judge("owner/harm-classifier") == (ClassifierJudge, "owner/harm-classifier")
    with pytest.raises(ValueError, match=r"^unknown judge 'foo'; available: beaver-dam .*keyword"):
        resolve_judge("foo")
    for path in ("./nope", "beaver-dam:./nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_judge(path)


def test_check_judge_offline(in_tmp):
    check_judge("keyword")
    with pytest.raises(UsageError, match="not in the local Hugging Face cache"):
        check_judge("nobody-xyz/not-cached")


# -- the error comes before the expensive work -----------------------------------------------------------------------
def _forbid(monkeypatch, target, name):
    def expensive(*args, **kwargs):
        raise AssertionError(f"{name} ran before the command-line mistake was reported")

    monkeypatch.setattr(target, name, expensive)


@pytest.fixture
def files(in_tmp):
    build_model("llama").save_pretrained("model")
    build_tokenizer().save_pretrained("model")
    prompt_completion_dataset(4).to_json("train.jsonl")
    rows = [{"prompt": "p", "response": "r", "is_safe": False}]
    (in_tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return in_tmp


def test_eval_resolves_the_judge_before_loading_the_model(files, monkeypatch, capsys):
    import trl_safety.cli.eval as cli_eval
    import trl_safety.eval

    _forbid(monkeypatch, cli_eval, "load_model_and_tokenizer")
    _forbid(monkeypatch, trl_safety.eval, "harmful_score")
    for judge, words in [("foo", "unknown judge 'foo'"), ("./nope-judge", "does not exist")]:
        assert main(["eval", "--model_name_or_path", "model", "--prompts", "prompts.jsonl", "--judge", judge]) == 2
        err = capsys.readouterr().err
        assert err.startswith("trl-safety eval: error: ") and words in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--accelerate_config", "nope", "--num_processes", "2"], "unknown accelerate profile 'nope'"),
        (["--dataset_name", "./nope.jsonl", "--num_processes", "2"], "'./nope.jsonl' does not exist"),
        (["--model_name_or_path", "./nope", "--accelerate_config", "cpu_ddp"], "'./nope': no such folder"),
    ],
)
def test_sft_checks_before_training_or_relaunching(files, monkeypatch, capsys, extra, words):
    import accelerate.commands.launch

    import trl_safety.cli.train as cli_train

    _forbid(monkeypatch, cli_train, "main")
    _forbid(monkeypatch, accelerate.commands.launch, "launch_command")
    argv = ["sft", "--model_name_or_path", "model", "--dataset_name", "train.jsonl", "--output_dir", "out"]
    assert main([*argv, "--bf16", "false", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-safety sft: error: ") and words in err and len(err.splitlines()) == 1
    assert not os.path.exists("out")


def test_prune_and_bench_check_before_loading(files, monkeypatch, capsys):
    import trl_safety.bench
    import trl_safety.cli.prune as cli_prune

    _forbid(monkeypatch, cli_prune, "load_model_for_repair")
    _forbid(monkeypatch, trl_safety.bench, "run_bench")
    argv = ["prune", "--defense", "antidote", "--model_name_or_path", "model", "--output_dir", "out"]
    assert main([*argv, "--harmful_dataset_name", "./nope.jsonl"]) == 2
    assert "--harmful_dataset_name: dataset path './nope.jsonl' does not exist" in capsys.readouterr().err
    assert main(["bench", "--judge", "foo", "--output-dir", "out"]) == 2
    assert "trl-safety bench: error: unknown judge 'foo'" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(files, monkeypatch):
    """Only `UsageError` is turned into a line: a bug elsewhere still raises."""
    import trl_safety.cli.eval as cli_eval

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_eval, "load_model_and_tokenizer", broken)
    argv = ["eval", "--model_name_or_path", "model", "--prompts", "prompts.jsonl", "--judge", "keyword"]
    with pytest.raises(KeyError, match="a bug"):
        main([*argv, "--num_prompts", "1"])
