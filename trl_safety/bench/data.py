"""The bench's data sources: the toy world's, and the papers' for real models (loaded by id or local path at run
time, never shipped). Each builds one `BenchData` before the grid runs."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import BenchConfig


@dataclass
class BenchData:
    """Everything the pipeline needs from a world: the base model and tokenizer, the datasets, the evaluation sets.

    Attributes:
        load_base: returns a fresh copy of the base model.
        poisoned: `poisoned(p, seed)` is the user's fine-tuning data (`n` rows) poisoned at harmful ratio `p`, the
            attack sample and the mixing drawn with `seed`.
        alignment: harmful → refusal rows (toy: plus benign → helpful rows).
        harmful: harmful → harmful answer rows for defenses, disjoint from the attack rows.
        paired_alignment: harmful → refusal only, row i paired with `harmful` row i (`DefenseSpec.paired_data`).
        harmful_prompts / categories / prompt_format: the harmful-score prompts, their categories, their template.
        task: the fine-tune accuracy test set.
        refusals: refusal sentences for configs with a `refusals_file` field (`None`: the defenses' own pools).
        harmful_answers: one harmful answer per harmful prompt, the targets of `harmful_loss` (`None`: not measured).
        description: what `results.json`'s `config` records about the world.
    """

    tokenizer: object
    load_base: Callable[[], object]
    poisoned: Callable[[float, int], object]
    alignment: object
    harmful: object
    paired_alignment: object
    harmful_prompts: list[str]
    categories: list | None
    prompt_format: Callable[[str], str] | None
    task: object
    refusals: list[str] | None = None
    harmful_answers: list[str] | None = None
    description: dict = field(default_factory=dict)


def load_bench_data(config: BenchConfig) -> BenchData:
    """The toy world's data and model when `config.model` is unset; for a real model, the toy world's data rendered by
    its chat template (`data="toy"`) or the papers' data."""
    if config.toy:
        return toy_bench_data(config)
    return real_model_toy_data(config) if config.toy_data else real_bench_data(config)


def toy_recipe(config: BenchConfig):
    """The base-model recipe of a toy run (the default one unless `base_pretrain_steps` is set)."""
    from ..toy.model import BaseModelRecipe

    recipe = BaseModelRecipe()
    if config.base_pretrain_steps is not None:
        recipe = dataclasses.replace(recipe, pretrain_steps=config.base_pretrain_steps)
    return recipe


def toy_alignment(world, config: BenchConfig, conversational: bool = False):
    """The toy world's alignment set of a run: `num_alignment` refusals, as many helpful answers and task rows."""
    n = config.num_alignment
    return world.alignment_dataset(n, n, seed=0, conversational=conversational, num_task=n)


def toy_bench_data(config: BenchConfig) -> BenchData:
    from ..eval import TaskSet
    from ..toy.model import load_base_model
    from ..toy.world import REFUSALS, ToyWorld, format_prompt

    c = config
    world = ToyWorld(c.world_seed)
    base, tokenizer, base_path = load_base_model(c.cache_dir, c.world_seed, toy_recipe(c))
    # The instrument is fixed across the run's seeds: the evaluation sets, the alignment data and the defenses'
    # harmful data are drawn once (sampling seed 0); a seed varies the attack sample, data order and adapter init
    prompts = world.harmful_prompts("eval", c.num_eval_prompts, seed=0)
    examples = world.task_examples("test", c.num_task_test, seed=0)
    return BenchData(
        tokenizer=tokenizer,
        load_base=lambda: copy.deepcopy(base),
        poisoned=lambda p, seed: world.poisoned_dataset(c.n, p, seed=seed),
        alignment=toy_alignment(world, c),
        harmful=world.harmful_dataset("align", c.num_harmful, seed=0),
        paired_alignment=world.paired_refusal_dataset(c.num_harmful, seed=0),
        harmful_prompts=[r.text for r in prompts],
        categories=[r.category for r in prompts],
        prompt_format=format_prompt,
        # The toy labels are SST2's words, so SST2's exact-match rule applies unchanged
        task=TaskSet("sst2", [prompt for prompt, _ in examples], [label for _, label in examples], format_prompt),
        # A defense's own refusal pool is out of the toy vocabulary (mostly `<unk>`): give it the world's refusals
        refusals=list(REFUSALS),
        harmful_answers=world.harmful_answers(prompts),
        description={"world": "toy", "world_seed": c.world_seed, "base_model": base_path},
    )


def real_bench_data(config: BenchConfig) -> BenchData:
    """The papers' protocol: paired-refusal alignment data, BeaverTails attack rows and HS prompts, a task's splits."""
    from transformers import AutoTokenizer

    from ..data import (
        BEAVERTAILS_ID,
        REPNOISE_REFUSALS_ID,
        beavertails_dataset,
        load_task_dataset,
        mix_harmful,
        parse_adapter_options,
        repnoise_refusal_dataset,
    )
    from ..data.templates import prompt_formatter
    from ..eval import TaskSet, get_protocol

    c = config
    protocol = get_protocol("canonical")
    tokenizer = AutoTokenizer.from_pretrained(c.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    source = c.alignment_dataset or REPNOISE_REFUSALS_ID
    if not (source == REPNOISE_REFUSALS_ID or os.path.exists(source)):
        raise ValueError(f"Unsupported alignment dataset {source!r}: give the paired-refusal file or its Hub id.")
    options = parse_adapter_options(c.alignment_dataset_config)
    options.setdefault("template", c.template)
    alignment = repnoise_refusal_dataset("alignment", source=source, num_samples=c.num_alignment, **options)
    # Harmful data for defenses: the same prompts with their harmful answers (as in Booster)
    harmful = repnoise_refusal_dataset("harmful", source=source, num_samples=c.num_harmful, **options)
    harmful_source = c.harmful_dataset or BEAVERTAILS_ID
    harmful_options = parse_adapter_options(c.harmful_dataset_config)
    harmful_options.setdefault("template", c.template)
    attack_pool = beavertails_dataset(
        "harmful", "train", source=harmful_source, num_samples=round(c.n * max(c.ratios)), **harmful_options
    )
    prompts = protocol.load_prompts(source=c.eval_dataset or harmful_source, num_prompts=c.num_eval_prompts)
    task_source = {"source": c.task_dataset} if c.task_dataset else {}
    user_pool = load_task_dataset(c.task, "train", num_samples=c.n, template=c.template, **task_source)
    test_split = protocol.task_test_sets.get(c.task.lower(), ("test", None))[0]
    task_test = load_task_dataset(c.task, test_split, num_samples=c.num_task_test, template=c.template, **task_source)

    def load_base():
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, c.torch_dtype) if c.torch_dtype else None
        model = AutoModelForCausalLM.from_pretrained(c.model, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    return BenchData(
        tokenizer=tokenizer,
        load_base=load_base,
        poisoned=lambda p, seed: mix_harmful(user_pool, attack_pool, n=c.n, p=p, seed=seed),
        alignment=alignment,
        harmful=harmful,
        # the refusals are already paired with the harmful rows by file order
        paired_alignment=alignment.select(range(min(len(alignment), len(harmful)))),
        harmful_prompts=list(prompts["prompt"]),
        categories=list(prompts["category"]),
        prompt_format=prompt_formatter(c.template, tokenizer),
        task=TaskSet.from_dataset(c.task, task_test),  # the adapters already templated its prompts
        description={"world": "real", "model": c.model},
    )


def load_real_model(name: str, torch_dtype: str | None = None):
    """`(model, tokenizer)` of a real model: a Hub id, a folder, a `.gguf` file or an alias (`smollm2`), through
    `trl_safety.models` (GGUF files and leftover GGUF configs load as plain float models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import prepare_model

    kwargs = {"dtype": torch_dtype} if torch_dtype else {}
    model, tokenizer, _ = prepare_model(name, kwargs)
    if isinstance(model, str):  # a plain folder or Hub id (an alias is now its folder)
        import torch

        dtype = getattr(torch, torch_dtype) if torch_dtype else None
        tokenizer = AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def chat_rows(dataset, tokenizer):
    """Conversational prompt/completion rows as plain strings rendered by `tokenizer`'s chat template: the prompt up
    to the generation prompt, the completion the rest of the rendered conversation (answer and end-of-turn marker).
    Plain strings reach every trainer the same way (some tokenize their extra datasets themselves)."""
    from datasets import Dataset

    prompts, completions = [], []
    for prompt, completion in zip(dataset["prompt"], dataset["completion"]):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head):
            raise ValueError(
                "The model's chat template renders a conversation that does not start with its generation prompt; "
                "use --data papers with a --template instead."
            )
        prompts.append(head)
        completions.append(full[len(head) :])
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def real_model_toy_data(config: BenchConfig) -> BenchData:
    """The toy world's rows (alignment refusals, poisoned fine-tuning rows, task rows, held-out prompts) through a
    real model and its tokenizer, every prompt rendered by the model's chat template; the toy judge scores them."""
    from ..data.templates import prompt_formatter
    from ..eval import TaskSet
    from ..toy.world import REFUSALS, ToyWorld

    c = config
    base, tokenizer = load_real_model(c.model, c.torch_dtype)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--data toy renders the toy world with the model's chat template; {c.model} has none.")
    world = ToyWorld(c.world_seed)
    prompts = world.harmful_prompts("eval", c.num_eval_prompts, seed=0)
    examples = world.task_examples("test", c.num_task_test, seed=0)
    fmt = prompt_formatter("chat", tokenizer)
    return BenchData(
        tokenizer=tokenizer,
        load_base=lambda: copy.deepcopy(base),
        poisoned=lambda p, seed: chat_rows(world.poisoned_dataset(c.n, p, seed=seed, conversational=True), tokenizer),
        alignment=chat_rows(toy_alignment(world, c, conversational=True), tokenizer),
        harmful=chat_rows(world.harmful_dataset("align", c.num_harmful, seed=0, conversational=True), tokenizer),
        paired_alignment=chat_rows(
            world.paired_refusal_dataset(c.num_harmful, seed=0, conversational=True), tokenizer
        ),
        harmful_prompts=[r.text for r in prompts],
        categories=[r.category for r in prompts],
        prompt_format=fmt,
        task=TaskSet("sst2", [prompt for prompt, _ in examples], [label for _, label in examples], fmt),
        refusals=list(REFUSALS),
        harmful_answers=world.harmful_answers(prompts),
        description={"world": "toy", "world_seed": c.world_seed, "model": c.model, "template": "chat"},
    )
