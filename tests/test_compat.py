"""`trl_safety.compat`, the one module that reaches TRL / transformers internals, still matches the installed versions.

A TRL or transformers upgrade that moves, renames or re-signs one of these internals fails here, naming it. The scan at
the end keeps every other file of the package off these names, so this is the only place such an upgrade can break.
"""

import ast
import importlib
import inspect
import os
import pathlib
import re

import pytest
import torch
import transformers
import trl
from datasets import Dataset
from testing_utils import build_model, prompt_completion_dataset, tiny_config
from trl import SFTTrainer

from trl_safety import compat
from trl_safety.registry import list_defenses


ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_safety"

# compat function -> (class, private method it calls, that method's parameter names after `self`)
WRAPPED_METHODS = {
    "prepare_dataset": (
        SFTTrainer,
        "_prepare_dataset",
        ("dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
    ),
    "remove_unused_columns": (transformers.Trainer, "_remove_unused_columns", ("dataset", "description")),
    "prepare_inputs": (transformers.Trainer, "_prepare_inputs", ("inputs",)),
    "num_items_in_batch": (transformers.Trainer, "_get_num_items_in_batch", ("batch_samples", "device")),
    "checkpoint_folder": (transformers.Trainer, "_get_output_dir", ("trial",)),
}

# Instance attributes compat reads, with where the installed library assigns them
WRAPPED_ATTRIBUTES = {
    "_formatting_func": (SFTTrainer.__init__, "self._formatting_func = formatting_func"),
    "completion_only_loss": (SFTTrainer.__init__, "self.completion_only_loss ="),
    "_metrics": (SFTTrainer.__init__, "self._metrics ="),
    "_total_train_tokens": (SFTTrainer.__init__, "self._total_train_tokens = 0"),
    "_signature_columns": (transformers.Trainer.__init__, "self._signature_columns = None"),
    "_train_batch_size": (transformers.Trainer.__init__, "self._train_batch_size ="),
    "current_gradient_accumulation_steps": (transformers.Trainer, "self.current_gradient_accumulation_steps ="),
}

# `trl.trainer.utils` function (not exported by `trl`) -> the compat function calling it, and the keywords it passes
WRAPPED_FUNCTIONS = {
    "generate_model_card": (
        "generate_model_card",
        {
            "base_model",
            "model_name",
            "hub_model_id",
            "dataset_name",
            "tags",
            "wandb_url",
            "trackio_url",
            "comet_url",
            "trainer_name",
            "trainer_citation",
            "paper_title",
            "paper_id",
        },
    ),
    "get_trackio_space_url": ("tracker_urls", set()),
    "get_comet_experiment_url": ("tracker_urls", set()),
}

# Names no file of the package but compat.py may reach as attributes (or through getattr)
PRIVATE_NAMES = {method for _, method, _ in WRAPPED_METHODS.values()} | set(WRAPPED_ATTRIBUTES)
# Overridden private hooks: reachable only as `super().<name>(...)` inside an override of the same name
PRIVATE_OVERRIDES = {name for name in compat.OVERRIDDEN_METHODS if name.startswith("_")}


def parameter_names(function) -> tuple[str, ...]:
    names = tuple(inspect.signature(function).parameters)
    return names[1:] if names and names[0] == "self" else names


def resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------- names and signatures
def test_installed_versions_are_reported():
    # Not a check: names the versions in the test log, next to any failure below
    print(f"trl {trl.__version__}, transformers {transformers.__version__}")


@pytest.mark.parametrize("wrapper", sorted(WRAPPED_METHODS))
def test_wrapped_private_method_keeps_its_signature(wrapper):
    owner, method, expected = WRAPPED_METHODS[wrapper]
    assert callable(getattr(compat, wrapper))
    assert hasattr(owner, method), f"{owner.__name__}.{method} (used by compat.{wrapper}) is gone"
    assert parameter_names(getattr(owner, method)) == expected, (
        f"{owner.__name__}.{method} (used by compat.{wrapper}) changed signature"
    )


@pytest.mark.parametrize("function", sorted(WRAPPED_FUNCTIONS))
def test_wrapped_trl_function_takes_the_keywords_compat_passes(function):
    wrapper, keywords = WRAPPED_FUNCTIONS[function]
    assert callable(getattr(compat, wrapper))
    target = getattr(trl.trainer.utils, function, None)
    assert target is not None, f"trl.trainer.utils.{function} (used by compat.{wrapper}) is gone"
    assert keywords <= set(inspect.signature(target).parameters), f"trl.trainer.utils.{function} changed signature"


def test_trl_card_has_the_sections_the_card_builder_splices():
    # `core/card.py` replaces TRL's quick start and adds to its framework-version list; both must still be there
    card = compat.generate_model_card(
        base_model=None,
        model_name="m",
        hub_model_id="o/m",
        dataset_name=None,
        tags=[],
        trainer_name="SFT",
        wandb_url=None,
        trackio_url=None,
        comet_url=None,
    )
    assert {"## Quick start", "## Training procedure", "## Citations"} <= set(card.text.splitlines())
    assert f"- TRL: {trl.__version__}" in card.text.split("### Framework versions", 1)[1]
    assert set(compat.tracker_urls()) == {"wandb_url", "trackio_url", "comet_url"}


@pytest.mark.parametrize("attribute", sorted(WRAPPED_ATTRIBUTES))
def test_wrapped_attribute_is_still_assigned_by_the_library(attribute):
    where, assignment = WRAPPED_ATTRIBUTES[attribute]
    assert assignment in inspect.getsource(where), f"the library no longer assigns `{assignment}` ({attribute})"


@pytest.mark.parametrize("name", sorted(compat.OVERRIDDEN_METHODS))
def test_override_target_keeps_the_signature_our_overrides_use(name):
    owner_path, expected = compat.OVERRIDDEN_METHODS[name]
    owner = resolve(owner_path)
    assert hasattr(owner, name), f"{owner_path}.{name}, which trl_safety overrides, is gone"
    assert parameter_names(getattr(owner, name)) == expected, f"{owner_path}.{name} changed signature"


def _package_overrides(name):
    """Every class of trl_safety in a registered trainer's MRO that defines `name` itself."""
    classes = {}
    for spec in list_defenses():
        for cls in inspect.getmro(spec.trainer_class) if spec.trainer_class else ():
            if cls.__module__.startswith("trl_safety") and name in vars(cls):
                classes[cls.__qualname__] = vars(cls)[name]
    return classes


@pytest.mark.parametrize("name", sorted(compat.OVERRIDDEN_METHODS))
def test_our_overrides_use_the_listed_signature(name):
    _, expected = compat.OVERRIDDEN_METHODS[name]
    overrides = _package_overrides(name)
    wrong = {cls: parameter_names(fn) for cls, fn in overrides.items() if parameter_names(fn) != expected}
    assert wrong == {}, f"overrides of {name} differ from {expected}"


def test_every_private_override_in_the_package_is_listed():
    # A trainer overriding a private Trainer/SFTTrainer hook that compat does not list would escape the checks above
    listed = set(compat.OVERRIDDEN_METHODS)
    found = set()
    for spec in list_defenses():
        for cls in inspect.getmro(spec.trainer_class) if spec.trainer_class else ():
            if not cls.__module__.startswith("trl_safety"):
                continue
            for attr in vars(cls):
                if attr.startswith("_") and not attr.startswith("__") and hasattr(SFTTrainer, attr):
                    found.add(attr)
    assert found - listed - set(compat.TRL_CLASS_ATTRIBUTES) == set()


@pytest.mark.parametrize("name", compat.TRL_CLASS_ATTRIBUTES)
def test_trl_class_attribute_exists(name):
    assert hasattr(SFTTrainer, name), f"SFTTrainer.{name}, which the defense trainers set, is gone"


def test_fused_output_has_the_fields_the_package_reads():
    fields = set(inspect.signature(compat.FusedCausalLMOutput).parameters)
    assert {"loss", "log_probs", "label_mask", "entropy", "is_top1"} <= fields


# Loss-scaling rules compat mirrors (`loss_is_scaled_for_ga`, `step_loss_scale`): the library lines they copy
MIRRORED_RULES = {
    "loss_is_scaled_for_ga": (
        transformers.Trainer.training_step,
        [
            "if self.loss_is_scaled_for_ga is not None:",
            "self.model_accepts_loss_kwargs and num_items_in_batch is not None",
            "or self.compute_loss_func is not None",
            "loss = loss / self.current_gradient_accumulation_steps",
        ],
    ),
    "step_loss_scale": (
        transformers.Trainer.compute_loss,
        [
            "self.args.average_tokens_across_devices",
            "and (self.model_accepts_loss_kwargs or self.compute_loss_func)",
            "loss_scale = self.accelerator.num_processes // self.get_tp_size()",
            "loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu",
        ],
    ),
}


@pytest.mark.parametrize("rule", sorted(MIRRORED_RULES))
def test_mirrored_loss_scaling_rule_is_unchanged(rule):
    where, lines = MIRRORED_RULES[rule]
    source = inspect.getsource(where)
    missing = [line for line in lines if line not in source]
    assert missing == [], f"compat.{rule} mirrors {where.__qualname__}, which no longer has {missing}"


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tokenizer):
    model = build_model()
    args = tiny_config(tmp_path_factory.mktemp("compat"), max_steps=1, gradient_accumulation_steps=2)
    return SFTTrainer(model=model, args=args, train_dataset=prompt_completion_dataset(8), processing_class=tokenizer)


def test_loss_scaling_rules_on_a_single_process(trainer):
    # SFT on a Llama: the model takes loss kwargs, so a token-count-normalised loss is not divided by GA again
    assert compat.loss_is_scaled_for_ga(trainer, torch.tensor(10))
    assert not compat.loss_is_scaled_for_ga(trainer, None)
    assert compat.step_loss_scale(trainer, torch.tensor(10)) == 1  # one process
    assert compat.step_loss_scale(trainer, None) == 1


def test_prepare_dataset_tokenizes_like_the_train_data(trainer):
    prepared = compat.prepare_dataset(trainer, prompt_completion_dataset(8), trainer.args, "again")
    assert prepared["input_ids"] == trainer.train_dataset["input_ids"]
    assert prepared["labels"] == trainer.train_dataset["labels"]


def test_dataset_attributes(trainer):
    assert compat.formatting_func(trainer) is None
    assert compat.completion_only_loss(trainer) is True  # prompt/completion data, config left at None
    assert compat.train_batch_size(trainer) == 4
    assert compat.current_accumulation_steps(trainer) == 2  # before training: the configured value


def test_signature_columns_extend_once_and_survive_column_pruning(trainer):
    trainer._set_signature_columns_if_needed()
    before = list(trainer._signature_columns)
    compat.extend_signature_columns(trainer, ["extra", before[0], "extra"])
    assert trainer._signature_columns == [*before, "extra"]
    dataset = Dataset.from_dict({"input_ids": [[1, 2]], "extra": [0], "junk": [1]})
    kept = compat.remove_unused_columns(trainer, dataset, description="test")
    assert sorted(kept.column_names) == ["extra", "input_ids"]
    trainer._signature_columns = before


def test_prepare_inputs_and_num_items(trainer):
    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])
    batches = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": labels}] * 2
    prepared = compat.prepare_inputs(trainer, batches[0])
    assert torch.equal(prepared["labels"], labels)
    # Hand count: labels after the shift (position 0 is never a target), not -100: 2 + 2 per batch, two batches
    assert int(compat.num_items_in_batch(trainer, batches, torch.device("cpu"))) == 8


def test_checkpoint_folder_is_where_save_checkpoint_writes(trainer):
    if trainer.optimizer is None:  # the checkpoint holds the optimizer state
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.state.global_step = 3
    trainer._save_checkpoint(trainer.model, None)
    folder = compat.checkpoint_folder(trainer)
    assert folder == os.path.join(trainer.args.output_dir, "checkpoint-3")
    assert os.path.isfile(os.path.join(folder, "trainer_state.json"))
    trainer.state.global_step = 0


def test_fused_head_detection_forward_and_strip(tokenizer):
    model = build_model()
    assert not compat.uses_fused_lm_head(model)
    batch = tokenizer(["one two three four", "five six"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(**batch).logits
    trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    assert compat.uses_fused_lm_head(model)
    with torch.no_grad():
        out = compat.fused_forward(model, **batch, labels=labels)
    # Hand computation from the full logits: log-softmax, gather the next token, zero where the label is -100
    target = labels[:, 1:]
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    expected = expected.masked_fill(target == -100, 0.0).float()
    assert torch.equal(out.label_mask, target != -100)
    # chunked fused head vs one full-logits matmul: other reduction order over a 32-dim hidden, fp32 → rtol 1e-5
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    compat.strip_fused_lm_head(model)
    assert not compat.uses_fused_lm_head(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)  # the class forward again, same kernels and inputs


def test_metrics_buffer_and_token_count_reach_the_logs(trainer):
    trainer.model.train()
    compat.metrics_buffer(trainer, "train")["compat/probe"].append(3.0)
    compat.metrics_buffer(trainer, "train")["compat/probe"].append(5.0)
    start = compat.total_train_tokens(trainer)
    assert compat.count_train_tokens(trainer, 7) == start + 7 == compat.total_train_tokens(trainer)
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert logged["compat/probe"] == 4.0  # TRL averages the buffer over the logging interval
    assert compat.metrics_buffer(trainer, "train") == {}  # and flushes it


def test_metrics_buffer_presence(trainer):
    assert compat.has_metrics_buffer(trainer)  # every TRL trainer keeps one
    assert not compat.has_metrics_buffer(object())  # a plain transformers Trainer has no `_metrics`


def test_training_counts_tokens_and_accumulation_steps(trainer):
    start = compat.total_train_tokens(trainer)
    trainer.train()
    # max_steps=1, batch 4, GA 2: the one step sees all 8 rows; each row's real tokens are its input_ids
    counted = compat.total_train_tokens(trainer) - start
    assert counted == sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    assert compat.current_accumulation_steps(trainer) == 2


# ---------------------------------------------------------------------------------------------- nobody else reaches them
FORWARD_PATCH = re.compile(r"vars\(.*\)\.get\(\s*[\"']forward[\"']")


def private_accesses(source: str) -> list[str]:
    """Each place `source` reaches a compat-only internal, as `line: what`."""
    found = []
    tree = ast.parse(source)
    functions = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                functions[id(child)] = node.name  # breadth-first: an inner function is visited later and wins
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
            if owner in ("compat", "args"):  # compat's own functions; config fields (`args.completion_only_loss`)
                continue
            if node.attr in PRIVATE_NAMES:
                found.append(f"{line}: .{node.attr}")
            elif node.attr in PRIVATE_OVERRIDES:
                is_super = isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super"
                if not (is_super and functions.get(id(node)) == node.attr):
                    found.append(f"{line}: .{node.attr} outside its override")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in PRIVATE_NAMES:
                found.append(f"{line}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.keyword) and node.arg == "fused_lm_head":
            found.append(f"{line}: fused_lm_head=")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("trl.trainer", "transformers.trainer")
        ):
            if node.module not in ("transformers.trainer_utils", "transformers.trainer_callback"):
                found.append(f"{line}: from {node.module} import")
    found += [
        f"{n}: forward-patch detection" for n, text in enumerate(source.splitlines(), 1) if FORWARD_PATCH.search(text)
    ]
    return sorted(found)


@pytest.mark.parametrize(
    "source, hits",
    [
        ("x = self._prepare_dataset(d, p, a, False, None, 'n')", 1),
        ("self._metrics['train']['a'].append(1.0)", 1),
        ("n = getattr(trainer, '_formatting_func', None)", 1),
        ("trainer.current_gradient_accumulation_steps", 1),
        ("out = model(**inputs, fused_lm_head=True)", 1),
        ("from trl.trainer.utils import FusedCausalLMOutput", 1),
        ("patched = isinstance(vars(m).get('forward'), types.MethodType)", 1),
        ("def _save_checkpoint(self, model, trial):\n    super()._save_checkpoint(model, trial)", 0),
        ("def save(self):\n    super()._save_checkpoint(model, trial)", 1),
        ("def _set_signature_columns_if_needed(self):\n    self._set_signature_columns_if_needed()", 1),
        ("from transformers.trainer_utils import get_last_checkpoint", 0),
        ("value = self.args.learning_rate", 0),
        ("on = self.args.completion_only_loss or compat.completion_only_loss(self)", 0),
        ("on = trainer.completion_only_loss", 1),
    ],
)
def test_scanner_finds_planted_accesses(source, hits):
    assert len(private_accesses(source)) == hits


def test_only_compat_reaches_private_internals():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan reads the package
    found = [
        f"{path.relative_to(ROOT)}:{hit}"
        for path in files
        if path != PACKAGE / "compat.py"
        for hit in private_accesses(path.read_text())
    ]
    assert found == [], "private TRL/transformers internals reached outside trl_safety/compat.py:\n" + "\n".join(found)
