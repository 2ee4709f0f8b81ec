"""Command-line mistakes end `trl-safety` with exit code 2 and one `trl-safety <cmd>: error: ...` line on stderr.

Each case is a separate process (see `cli_case_runner.py`: one interpreter imports the subcommand modules once, then
forks a child per case, so the ~25 cases cost one start-up instead of ~25 x 3-10 s). The assertion is strict: stderr
holds exactly one non-empty line, with no "Traceback". Import-time noise of the libraries (none today, with
HF_HUB_OFFLINE=1) would show in the runner's own stderr, which must be empty too, and one case runs through the real
`trl-safety` console script from scratch.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset


RUNNER = Path(__file__).with_name("cli_case_runner.py")
MODEL = "MODEL"  # placeholders, replaced by the fixture's paths
DATA = "DATA"
PROMPTS = "PROMPTS"
ADAPTER = "ADAPTER"
TYPO_YAML = "TYPO_YAML"  # a config file with a misspelt key (the fixture writes it)


def train(command, *extra):
    argv = [command, "--model_name_or_path", MODEL, "--dataset_name", DATA, "--output_dir", "out", "--bf16", "false"]
    return [*argv, *extra]


def evaluate(*extra):
    argv = ["eval", "--model_name_or_path", MODEL, "--prompts", PROMPTS, "--judge", "keyword", "--device", "cpu"]
    return [*argv, *extra]


def prune(*extra):
    argv = ["prune", "--defense", "antidote", "--model_name_or_path", MODEL, "--output_dir", "out"]
    return [*argv, "--harmful_dataset_name", DATA, *extra]


def bench(*extra):
    return ["bench", "--output-dir", "out", *extra]


NOT_FOUND = ("no such folder", "pass an existing folder or a Hub id")
NO_DATASET = ("'./nope.jsonl' does not exist", "pass an existing file")

# id -> (argv, words the error line must contain). Later flags override earlier ones (argparse: the last one wins).
CASES = {
    # align / sft (train.py)
    "align-unknown-defense": (train("align", "--defense", "nope"), ("unknown defense 'nope'", "vaccine", "booster")),
    "align-missing-model": (
        train("align", "--defense", "vaccine", "--model_name_or_path", "./nope-model"),
        ("--model_name_or_path './nope-model'", *NOT_FOUND),
    ),
    "align-missing-harmful-dataset": (
        train("align", "--defense", "booster", "--harmful_dataset_name", "./nope.jsonl"),
        ("--harmful_dataset_name", *NO_DATASET),
    ),
    "align-wrong-stage-defense": (
        train("align", "--defense", "lisa"),
        ("'lisa' runs at the fine-tuning stage", "sft"),
    ),
    "sft-unknown-defense": (train("sft", "--defense", "nope"), ("unknown defense 'nope'", "lisa")),
    "sft-unknown-profile": (
        train("sft", "--accelerate_config", "nope", "--num_processes", "2"),
        ("unknown accelerate profile 'nope'", "cpu_ddp", "zero2", "path of an accelerate config file"),
    ),
    "sft-missing-model": (
        train("sft", "--model_name_or_path", "runs/nope/final"),
        ("--model_name_or_path 'runs/nope/final'", *NOT_FOUND),
    ),
    "sft-uncached-hub-model-offline": (
        train("sft", "--model_name_or_path", "nobody-xyz/not-cached"),
        ("not in the local Hugging Face cache", "HF_HUB_OFFLINE", "pass an existing folder"),
    ),
    "sft-missing-config-file": (
        train("sft", "--config", "./nope.yaml"),
        ("--config './nope.yaml': no such file", "YAML"),
    ),
    "sft-missing-dataset": (train("sft", "--dataset_name", "./nope.jsonl"), ("--dataset_name", *NO_DATASET)),
    "sft-typo-flag": (
        train("sft", "--lerning_rate", "1e-5"),
        ("unrecognized argument --lerning_rate", "--learning_rate"),
    ),
    "sft-typo-flag-with-a-defense": (
        train("sft", "--defense", "lisa", "--alignmnet_steps", "5", "--num_processes", "2"),
        ("unrecognized argument --alignmnet_steps", "did you mean --alignment_steps?"),
    ),
    "sft-typo-yaml-key": (
        train("sft", "--config", TYPO_YAML),
        ("unknown key 'lerning_rate'", "did you mean 'learning_rate'?"),
    ),
    "sft-typo-defense": (train("sft", "--defense", "lsia"), ("unknown defense 'lsia'", "did you mean 'lisa'?")),
    "sft-typo-profile": (
        train("sft", "--accelerate_config", "zero22"),
        ("unknown accelerate profile 'zero22'", "did you mean 'zero2'?"),
    ),
    "sft-bad-accelerate-value": (
        train("sft", "--num_processes", "abc"),
        ("accelerate launch: argument --num_processes", "invalid int value: 'abc'"),
    ),
    "sft-missing-alignment-dataset": (
        train("sft", "--defense", "lisa", "--alignment_dataset_name", "data/nope.jsonl"),
        ("--alignment_dataset_name", "'data/nope.jsonl' does not exist"),
    ),
    "sft-asft-missing-base-model": (
        train("sft", "--defense", "asft", "--base_model_name_or_path", "runs/nope-base"),
        ("--base_model_name_or_path 'runs/nope-base'", *NOT_FOUND),
    ),
    # eval
    "eval-unknown-judge": (
        evaluate("--judge", "foo"),
        ("unknown judge 'foo'; available: beaver-dam", "keyword", "Hub id (owner/name)"),
    ),
    "eval-missing-judge-folder": (
        evaluate("--judge", "./nope-judge"),
        ("judge folder './nope-judge' does not exist",),
    ),
    "eval-uncached-hub-judge-offline": (
        evaluate("--judge", "nobody-xyz/not-cached"),
        ("--judge 'nobody-xyz/not-cached'", "not in the local Hugging Face cache", "HF_HUB_OFFLINE"),
    ),
    "eval-unknown-protocol": (evaluate("--protocol", "nope"), ("unknown protocol 'nope'", "booster")),
    "eval-missing-model": (
        ["eval", "--model_name_or_path", "./nope-model", "--judge", "keyword"],
        ("--model_name_or_path './nope-model'", *NOT_FOUND),
    ),
    "eval-adapter-without-its-base": (
        ["eval", "--model_name_or_path", ADAPTER, "--judge", "keyword"],
        ("'./gone-base'", "no such folder", "--base_model"),
    ),
    "eval-missing-prompts": (evaluate("--prompts", "./nope.jsonl"), ("--prompts", *NO_DATASET)),
    # prune
    "prune-unknown-defense": (prune("--defense", "nope"), ("unknown defense 'nope'", "antidote", "safelora")),
    "prune-missing-model": (
        prune("--model_name_or_path", "./nope-model"),
        ("--model_name_or_path './nope-model'", *NOT_FOUND),
    ),
    "prune-missing-harmful-dataset": (
        prune("--harmful_dataset_name", "./nope.jsonl"),
        ("--harmful_dataset_name", *NO_DATASET),
    ),
    "prune-typo-flag": (prune("--prune_rato", "0.1"), ("unrecognized argument --prune_rato", "--prune_ratio")),
    "prune-typo-yaml-key": (prune("--config", TYPO_YAML), ("unknown key 'lerning_rate'",)),
    # merge
    "merge-not-an-adapter": (
        ["merge", "--model_name_or_path", MODEL, "--output_dir", "out"],
        ("holds no adapter_config.json", "not a PEFT adapter folder"),
    ),
    "merge-adapter-without-its-base": (
        ["merge", "--model_name_or_path", ADAPTER, "--output_dir", "out"],
        ("'./gone-base'", "no such folder", "--adapter_base_model"),
    ),
    "merge-missing-output-dir": (
        ["merge", "--model_name_or_path", ADAPTER],
        ("the following arguments are required: --output_dir",),
    ),
    "merge-typo-flag": (
        ["merge", "--model_name_or_path", ADAPTER, "--output_dirr", "out"],
        ("unrecognized argument --output_dirr", "did you mean --output_dir?"),
    ),
    # defenses
    "defenses-typo-flag": (
        ["defenses", "--stages", "alignment"],
        ("unrecognized argument --stages", "did you mean --stage?"),
    ),
    # push
    "push-missing-folder": (
        ["push", "./nope-folder", "--repo_id", "me/x"],
        ("./nope-folder is not a folder", "defense_config.json"),
    ),
    # bench
    "bench-unknown-defense": (bench("--defenses", "nope"), ("unknown defenses ['nope']", "vaccine")),
    "bench-typo-flag": (bench("--sweeep", "0.1"), ("unrecognized argument --sweeep", "did you mean --sweep?")),
    "bench-typo-yaml-key": (bench("--config", TYPO_YAML), ("unknown key 'lerning_rate'",)),
    "bench-unknown-judge": (bench("--judge", "foo"), ("unknown judge 'foo'", "beaver-dam")),
    "bench-missing-model": (
        bench("--model_name_or_path", "./nope-model", "--judge", "keyword"),
        ("--model_name_or_path './nope-model'", *NOT_FOUND),
    ),
    "bench-missing-dataset": (
        bench("--model_name_or_path", MODEL, "--judge", "keyword", "--alignment_dataset", "./nope.jsonl"),
        ("--alignment_dataset", *NO_DATASET),
    ),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a tiny model, a data file, a prompt file and an adapter whose base model is gone."""
    root = tmp_path_factory.mktemp("cli_errors")
    build_model("llama").save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    prompt_completion_dataset(4).to_json(str(root / "train.jsonl"))
    rows = [{"prompt": f"p{i}", "response": "r", "is_safe": False, "category": {"x": True}} for i in range(2)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "./gone-base"}))
    (root / "typo.yaml").write_text("lerning_rate: 1.0e-5\n")
    (root / "data").mkdir()
    (root / "runs").mkdir()
    return root


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _substitute(argv, root):
    paths = {
        MODEL: root / "model",
        DATA: root / "train.jsonl",
        PROMPTS: root / "prompts.jsonl",
        ADAPTER: root / "adapter",
        TYPO_YAML: root / "typo.yaml",
    }
    return [str(paths[a]) if a in paths else a for a in argv]


@pytest.fixture(scope="module")
def results(workdir):
    if not hasattr(os, "fork"):
        pytest.skip("the case runner forks")
    cases = [{"id": name, "argv": _substitute(argv, workdir)} for name, (argv, _) in CASES.items()]
    (workdir / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "cases.json", "results.json"],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    # What importing every subcommand module prints: nothing
    assert proc.stderr.strip() == "", proc.stderr
    return json.loads((workdir / "results.json").read_text())


def assert_one_line_usage_error(rc, stderr, command, words):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert rc == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"trl-safety {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_is_one_line(results, case):
    argv, words = CASES[case]
    result = results[case]
    assert_one_line_usage_error(result["rc"], result["stderr"], argv[0], words)


def test_console_script_from_scratch(workdir):
    """The installed `trl-safety` script, a fresh interpreter: exit status 2 and one line, import noise included."""
    script = shutil.which("trl-safety", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "trl_safety.cli.main"]
    argv = _substitute(evaluate("--judge", "foo"), workdir)
    proc = subprocess.run([*command, *argv], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert_one_line_usage_error(proc.returncode, proc.stderr, "eval", CASES["eval-unknown-judge"][1])
