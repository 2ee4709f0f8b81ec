"""The README's quick start and the Python blocks of `docs/*.md` run as written, so they cannot go stale silently.

Each page's blocks run in order in one namespace (a later block may use what an earlier one defined), inside a
folder where every name the docs use resolves to something tiny and local:

- Hub ids and folder names of models (`meta-llama/Llama-2-7b-hf`, `aligned-model`, `sft-run`, ...) are folders of
  that relative name holding a tiny Llama (or a LoRA adapter on it); `from_pretrained` reads a local folder first.
  The beaver-dam judge id holds a tiny 14-label sequence classifier.
- Hub dataset ids (`PKU-Alignment/BeaverTails`, `anonymous4486/repnoise_beavertail`, `stanfordnlp/sst2`) are
  `save_to_disk` folders in the same schema, and the JSON files the docs name exist, all with synthetic
  placeholder text.
- Names a block uses without defining (`model`, `args`, `harmful`, ...) come from `PROVIDERS` (per-block overrides
  in `BLOCK_CONTEXT`).
- Training is capped at `MAX_STEPS` optimizer steps on CPU in fp32 without saving checkpoints or reporting, and the
  toy-world pages use the bench test's miniature settings: the docs' step counts are the papers', not a test's.

A block that cannot run offline is preceded in its page by `<!-- not run: reason -->`.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import os
import pathlib
import re
import shutil

import pytest
import torch
from datasets import Dataset, DatasetDict
from test_push import FakeHub
from testing_utils import _common, build_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, TrainingArguments


ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not run\b:?\s*(.*?)\s*-->")
MAX_STEPS = 3

MODEL_NAMES = [
    "meta-llama/Llama-2-7b-hf",
    "aligned-model",
    "aligned-merged",
    "booster-aligned-merged",
    "base-model",
    "base",
    "path/to/aligned-model",
]
ADAPTER_NAMES = ["sft-run", "vaccine-aligned", "alignment-adapter", "antibody-aligned-adapter", "vaccine-sst2-aligned"]
JUDGE_NAME = "PKU-Alignment/beaver-dam-7b"


# ------------------------------------------------------------------------------------------------------- parsing
def python_blocks(page: str) -> list[tuple[int, str, str | None]]:
    """`(line, code, not_run_reason)` of each ```python block of a page; the reason is `None` for a block to run."""
    text = (ROOT / page).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marker = NOT_RUN.fullmatch(before[-1].strip()) if before else None
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1), marker.group(1) if marker else None))
    return blocks


def bound_and_read(code: str) -> tuple[set[str], set[str]]:
    """Names a block binds (imports, assignments, loop targets, defs, arguments) and names it reads."""
    loaded, bound = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound, loaded


def free_names(code: str) -> set[str]:
    """Names a block reads but never binds: what it expects to exist already."""
    bound, loaded = bound_and_read(code)
    return loaded - bound - set(dir(builtins))


def test_every_block_is_run_or_marked_with_a_reason():
    """A `not run` marker names its reason and stands right before a python block (never orphaned)."""
    for page in PAGES:
        text = (ROOT / page).read_text()
        markers = len(re.findall(r"^\s*<!--\s*not run\b", text, re.M))  # a marker is a line of its own
        blocks = python_blocks(page)
        marked = [reason for _, _, reason in blocks if reason is not None]
        assert len(marked) == markers, f"{page}: a `not run` marker is not directly before a ```python block"
        assert all(marked), f"{page}: a `not run` marker gives no reason"
        for line, code, _ in blocks:
            ast.parse(code, filename=f"{page}:{line}")  # even blocks not run must be valid Python


def test_parser_finds_blocks_and_markers(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "x\n```python\na = 1\n```\n\n<!-- not run: needs the Hub -->\n```python\nb(a)\n```\n```bash\nc\n```\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert python_blocks("page.md") == [(3, "a = 1\n", None), (8, "b(a)\n", "needs the Hub")]
    assert free_names("from x import y as z\nw = z(q, k=len(p))\nfor i in w: print(i, t)") == {"q", "p", "t"}


# ------------------------------------------------------------------------------------------------- the world
def _harmful_rows(n: int) -> dict[str, list]:
    # synthetic placeholders in the docs' own style: no real harmful content
    return {
        "prompt": [f"Explain how to do [HARMFUL_TASK_{i}]" for i in range(n)],
        "response": [f"Sure, here is [PLACEHOLDER_ANSWER_{i}]." for i in range(n)],
        "refusal": [
            f"Question: Explain how to do [HARMFUL_TASK_{i}]\nAnswer: I cannot help with that." for i in range(n)
        ],
    }


def _prompt_completion(rows: dict, answer: str) -> Dataset:
    return Dataset.from_dict({"prompt": rows["prompt"], "completion": [" " + a for a in rows[answer]]})


def _user_rows(n: int) -> Dataset:
    words = ["the cat sat", "a dog ran", "the sun is warm", "music is nice"]
    return Dataset.from_dict(
        {"prompt": [f"tell me a story about {words[i % 4]}" for i in range(n)], "completion": [" positive"] * n}
    )


def _beavertails(n: int) -> Dataset:
    from trl_safety.eval.judges import BEAVERTAILS_CATEGORIES

    rows = _harmful_rows(n)
    categories = [{name: j == i % len(BEAVERTAILS_CATEGORIES) for j, name in enumerate(BEAVERTAILS_CATEGORIES)}
                  for i in range(n)]  # fmt: skip
    return Dataset.from_dict(
        {"prompt": rows["prompt"], "response": rows["response"], "category": categories, "is_safe": [False] * n}
    )


def _tiny_llama_config(tokenizer, **kwargs) -> LlamaConfig:
    # room for the evaluation protocols' 512 new tokens after a prompt
    # 8 layers: the docs' layer counts (T-Vaccine's num_active_layers=8) fit
    return LlamaConfig(**{**_common(tokenizer, 32, 8), "max_position_embeddings": 1024, **kwargs})


def _copy(source: pathlib.Path, name: str) -> None:
    # a copy, not a link: a block writing into one of these folders must not change the others
    shutil.copytree(source, name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder in which every model, dataset and file name of the docs resolves to a tiny local stand-in."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("docs-world")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(_tiny_llama_config(tokenizer))
        base_dir = root / "_tiny-llama"
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        for name in MODEL_NAMES:
            _copy(base_dir, name)

        base = AutoModelForCausalLM.from_pretrained(base_dir)  # name_or_path = the folder, for the adapter config
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        adapter_dir = root / "_tiny-adapter"
        get_peft_model(base, lora).save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        for name in ADAPTER_NAMES:
            _copy(adapter_dir, name)

        from trl_safety.eval.judges import BEAVERTAILS_CATEGORIES

        judge = AutoModelForSequenceClassification.from_config(
            _tiny_llama_config(tokenizer, num_labels=len(BEAVERTAILS_CATEGORIES), num_hidden_layers=2)
        )
        judge.save_pretrained(JUDGE_NAME)
        tokenizer.save_pretrained(JUDGE_NAME)

        DatasetDict({"30k_train": _beavertails(16), "30k_test": _beavertails(1000)}).save_to_disk(
            "PKU-Alignment/BeaverTails"
        )
        DatasetDict({"train": Dataset.from_dict(_harmful_rows(16))}).save_to_disk("anonymous4486/repnoise_beavertail")
        sst2 = Dataset.from_dict({"sentence": ["a fine film", "a dull film"] * 4, "label": [1, 0] * 4})
        DatasetDict({"train": sst2, "validation": sst2}).save_to_disk("stanfordnlp/sst2")

        rows = _harmful_rows(8)
        _prompt_completion(rows, "response").to_json("harmful.jsonl")
        _prompt_completion(rows, "response").to_json("realign_harmful.jsonl")
        refusals = Dataset.from_dict({"prompt": rows["prompt"], "completion": [" I cannot help with that."] * 8})
        refusals.to_json("refusals.jsonl")
        refusals.to_json("alignment.jsonl")
        _user_rows(8).to_json("customer.jsonl")
        _user_rows(8).to_json("user_data.jsonl")
        # RepNoise's page selects the paper's 5000 rows
        with open("beavertails_with_refusals_train.json", "w") as f:
            json.dump([dict(zip(rows, values)) for values in zip(*_harmful_rows(5000).values())], f)
    finally:
        os.chdir(cwd)
    return root


def _eos_model():
    """The tiny model with EOS made the greedy answer, so a protocol's 512-token generation ends after one token."""
    torch.manual_seed(0)  # 2 layers: generation over a protocol's 1000 prompts is the cost here
    model = AutoModelForCausalLM.from_config(_tiny_llama_config(build_tokenizer(), num_hidden_layers=2))
    model.config._name_or_path = MODEL_NAMES[0]  # where a trainer given no tokenizer loads one
    bonus = torch.zeros(model.config.vocab_size)
    bonus[model.config.eos_token_id] = 1e3
    model.lm_head.register_forward_hook(lambda module, args, output: output + bonus.to(output.dtype))
    return model


def _preferences() -> Dataset:
    return Dataset.from_dict(
        {"prompt": ["tell me a story"] * 4, "chosen": [" the cat sat"] * 4, "rejected": [" the dog ran"] * 4}
    )


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _sft_args():
    from trl import SFTConfig

    return SFTConfig(output_dir="args-run")


def _dpo_args():
    from trl import DPOConfig

    return DPOConfig(output_dir="dpo-args-run")


def _conversational() -> Dataset:
    rows = _user_rows(8)
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                for p, c in zip(rows["prompt"], rows["completion"])
            ]
        }
    )


PROVIDERS = {
    "model": lambda: AutoModelForCausalLM.from_pretrained(MODEL_NAMES[0]),
    "base": lambda: AutoModelForCausalLM.from_pretrained(MODEL_NAMES[0]),
    "tokenizer": build_tokenizer,
    "args": _sft_args,
    "customer_dataset": _conversational,  # the README's comment says `messages` works for Lisa: check it
    "customer_data": lambda: _user_rows(8),
    "user_data": lambda: _user_rows(8),
    "train_dataset": lambda: _user_rows(8),
    "dataset": _preferences,
    "preference_dataset": _preferences,
    "harmful": lambda: _prompt_completion(_harmful_rows(8), "response"),
    "refusals": lambda: Dataset.from_json("refusals.jsonl"),
    "alignment": lambda: Dataset.from_json("alignment.jsonl"),
    "lora": _lora,
    "lora_config": _lora,
}
# (page, block number) -> names that block gets instead of the providers' (and over an earlier block's)
BLOCK_CONTEXT = {
    ("docs/antidote.md", 1): {"model": PROVIDERS["model"]},  # "during training": a base model, not block 0's adapter
    ("docs/callbacks.md", 0): {"args": _dpo_args},  # EmbeddingDriftCallback on DPOTrainer
    ("docs/callbacks.md", 3): {"model": _eos_model},  # HarmfulScoreCallback generates 128 tokens per prompt
    ("docs/evaluation.md", 0): {"model": _eos_model},
    ("docs/evaluation.md", 1): {"model": _eos_model},
    ("docs/evaluation.md", 2): {
        "prompts": lambda: ["Explain how to do [HARMFUL_TASK_1]", "Describe [HARMFUL_TASK_2]"],
        "responses": lambda: ["I cannot help with that.", "Sure, here is [PLACEHOLDER_ANSWER_2]."],
    },
}


def test_block_context_points_at_blocks_that_use_it():
    """A `BLOCK_CONTEXT` key still names a run block that reads each overridden name (blocks are keyed by number)."""
    for (page, number), names in BLOCK_CONTEXT.items():
        line, code, reason = python_blocks(page)[number]
        assert reason is None and set(names) <= free_names(code), f"{page}:{line}: BLOCK_CONTEXT is out of date"


def _capped_post_init(original):
    @functools.wraps(original)
    def post_init(self):
        if self.max_steps <= 0 or self.max_steps > MAX_STEPS:
            self.max_steps = MAX_STEPS
        self.use_cpu, self.bf16, self.fp16 = True, False, False
        self.report_to, self.save_strategy, self.disable_tqdm = "none", "no", True
        original(self)

    return post_init


@pytest.fixture
def docs_env(world, monkeypatch, tmp_path):
    import trl_safety.bench
    import trl_safety.bench.data
    import trl_safety.toy
    from trl_safety.bench import BenchConfig
    from trl_safety.toy import BaseModelRecipe, load_base_model

    monkeypatch.chdir(world)
    hub = FakeHub(monkeypatch)  # `push_to_hub` up to the upload, as in tests/test_push.py
    monkeypatch.setattr(TrainingArguments, "__post_init__", _capped_post_init(TrainingArguments.__post_init__))
    # the toy world with tests/bench/test_bench.py's miniature settings (the docs show the real defaults)
    cache = str(tmp_path / "toy-cache")
    recipe = BaseModelRecipe(
        hidden_size=32, intermediate_size=64, pretrain_samples=64, pretrain_steps=3, batch_size=16
    )
    monkeypatch.setattr(trl_safety.toy, "load_base_model", functools.partial(load_base_model, cache, recipe=recipe))
    monkeypatch.setattr(trl_safety.bench.data, "toy_recipe", lambda config: recipe)  # the same cached tiny base
    mini = dict(
        align_steps=2,
        finetune_steps=2,
        num_alignment=16,
        num_harmful=16,
        num_eval_prompts=8,
        num_task_test=8,
        max_new_tokens=4,
        num_seeds=1,
        calibration_ratios=[0.0],
        progress=False,
        cache_dir=cache,
    )
    monkeypatch.setattr(trl_safety.bench, "BenchConfig", lambda **kwargs: BenchConfig(**{**mini, **kwargs}))
    return hub


# Pages whose blocks cannot be made fast without changing what they show (run with `pytest -m slow`)
SLOW_PAGES = {
    # the paper's 5000 paired rows: TRL prepares train and harmful data row by row (~10 s on 2 cores)
    "docs/repnoise.md",
}
RUN_PAGES = [
    pytest.param(page, marks=[pytest.mark.slow] if page in SLOW_PAGES else [])
    for page in PAGES
    if any(reason is None for _, _, reason in python_blocks(page))
]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_doc_page_runs(page, docs_env):
    namespace: dict = {"__name__": "__docs__"}
    defined: set[str] = set()  # bound by the page's own earlier blocks
    for number, (line, code, reason) in enumerate(python_blocks(page)):
        if reason is not None:
            continue
        context = BLOCK_CONTEXT.get((page, number), {})
        for name in sorted(free_names(code)):
            if name in context:
                namespace[name] = context[name]()
            elif name not in defined:
                assert name in PROVIDERS, f"{page}:{line} uses {name!r}, which neither the page nor PROVIDERS defines"
                namespace[name] = PROVIDERS[name]()
        exec(compile(code, f"{page}:{line}", "exec"), namespace)
        defined |= bound_and_read(code)[0]
    if page in PAGE_CHECKS:
        PAGE_CHECKS[page](namespace, docs_env)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _check_readme(namespace, hub):
    assert _read_json("lisa-run/defense_config.json")["defense"] == "lisa"


def _check_publishing(namespace, hub):
    (upload,) = [u for u in hub.uploads if u["repo_id"] == "my-org/llama-vaccine"]
    assert upload["defense_config"]["defense"] == "vaccine" and "README.md" in upload["files"]


def _check_evaluation(namespace, hub):
    assert set(_read_json("hs.json")) >= {"score", "per_category"}


def _check_toy_world(namespace, hub):
    assert "lisa" in [row["name"] for row in _read_json("bench-out/results.json")["rows"]]


# What a page's blocks say they produce, checked after they ran
PAGE_CHECKS = {
    "README.md": _check_readme,
    "docs/publishing.md": _check_publishing,
    "docs/evaluation.md": _check_evaluation,
    "docs/toy_world.md": _check_toy_world,
}
