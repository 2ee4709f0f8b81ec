"""Offline test kit: a locally trained tokenizer, tiny causal LMs built from configs, and datasets in TRL formats.

Nothing here touches the Hub. Builders are cached per process so a test session pays for them once.
"""

from __future__ import annotations

import copy
import functools
import glob
import os
import random
import shlex

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from trl import SFTConfig


# ChatML-like template with `{% generation %}` markers, so `assistant_only_loss=True` works
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = [
    "the",
    "a",
    "an",
    "to",
    "of",
    "and",
    "in",
    "is",
    "it",
    "you",
    "that",
    "for",
    "on",
    "with",
    "as",
    "be",
    "this",
    "are",
    "can",
    "how",
    "what",
    "why",
    "please",
    "tell",
    "me",
    "write",
    "story",
    "poem",
    "about",
    "cat",
    "dog",
    "house",
    "tree",
    "river",
    "city",
    "music",
    "book",
    "game",
    "food",
    "water",
    "sun",
    "moon",
    "friend",
    "day",
    "night",
    "happy",
    "sad",
    "good",
    "bad",
    "great",
    "terrible",
    "movie",
    "film",
    "review",
    "positive",
    "negative",
    "sure",
    "here",
    "answer",
    "sorry",
    "cannot",
    "help",
    "request",
    "refuse",
    "safe",
    "unsafe",
    "placeholder",
    "item",
    "object",
    "build",
    "make",
    "find",
    "explain",
    "describe",
    "list",
    "step",
]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(path: str | None = None) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on a random-word corpus, with pad/bos/eos and a training-ready chat template.

    Trained once per process; each call returns its own copy, so a test that edits it (e.g. drops the chat template)
    cannot change the tokenizer of the tests that run after it.
    """
    tokenizer = copy.deepcopy(_trained_tokenizer())
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer


@functools.cache
def _trained_tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    corpus += ["user assistant system", ".,!?:;'\"()-0123456789#"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _common(tokenizer, hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=((len(tokenizer) + 63) // 64) * 64,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


ARCHITECTURES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
}


def build_model(arch: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0, name: str | None = None):
    """A tiny randomly initialised causal LM of the given architecture (fp32, eval-free, no dropout)."""
    tokenizer = build_tokenizer()
    config = ARCHITECTURES[arch](**_common(tokenizer, hidden, layers))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.config._name_or_path = name or f"trl-safety-testing/tiny-{arch}"
    return model


def text_dataset(n: int = 8, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_dict(
        {"text": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(n)]}
    )


def prompt_completion_dataset(n: int = 8, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
    completions = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def conversational_dataset(n: int = 8, seed: int = 0) -> Dataset:
    pc = prompt_completion_dataset(n, seed)
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                for p, c in zip(pc["prompt"], pc["completion"])
            ]
        }
    )


def conversational_prompt_completion_dataset(n: int = 8, seed: int = 0) -> Dataset:
    pc = prompt_completion_dataset(n, seed)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in pc["prompt"]],
            "completion": [[{"role": "assistant", "content": c.strip()}] for c in pc["completion"]],
        }
    )


DATASET_FORMATS = {
    "text": text_dataset,
    "prompt_completion": prompt_completion_dataset,
    "conversational": conversational_dataset,
    "conversational_prompt_completion": conversational_prompt_completion_dataset,
}


def tiny_config(output_dir, config_class=SFTConfig, **kwargs):
    """A fast CPU config: fp32, no checkpointing, no saving or logging side effects unless asked."""
    defaults = dict(
        output_dir=str(output_dir),
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=1e-2,
        max_length=32,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_drop_last=False,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return config_class(**defaults)


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def set_offline_env() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------ independent references for defense gradient tests
TINY_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def token_nll(model, batch, reduction):
    """Cross-entropy of the shifted labels from the full logits (no fused head), in fp32."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction=reduction)


def grads_of(loss, params):
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def enable_checkpointing(trainer, mode: str):
    """What `Trainer.train()` does before the first step: `mode` is "off", "non-reentrant" or "reentrant"."""
    from trl_safety.core.layers import unwrap_model

    if mode != "off":
        unwrap_model(trainer.model).activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": mode == "reentrant"}
        )
    return trainer


def run_training_steps(trainer, ga):
    """One optimizer step's worth of `training_step` calls (GA micro-batches), without the optimizer.

    Asserts the weights are unchanged afterwards (any in-place perturbation was undone bit-exactly) and returns the
    micro-batches and the accumulated gradients of the trainable parameters.
    """
    loader = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(loader)) for _ in range(ga)]
    trainer.current_gradient_accumulation_steps = ga
    num_items = trainer._get_num_items_in_batch(batches, batches[0]["input_ids"].device)
    trainer.model.zero_grad(set_to_none=True)
    before = trainable_snapshot(trainer.model)
    for batch in batches:
        trainer.training_step(trainer.model, batch, num_items)
    after = trainable_snapshot(trainer.model)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    actual = [p.grad.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.zero_grad(set_to_none=True)
    return batches, actual


# ------------------------------------------------------------------------------------------------------- recipes
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO_ROOT, "recipes", "**", "*.yaml"), recursive=True))


def recipe_header_command(path: str) -> list[str]:
    """The one `trl-safety ...` command of a recipe's leading comment lines (continuation lines joined)."""
    header = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            header.append(line[1:].strip())
    text = "\n".join(header).replace("\\\n", " ")
    commands = [line for line in text.splitlines() if line.startswith("trl-safety ")]
    assert len(commands) == 1, f"{path}: expected one `trl-safety` command in the header, found {commands}"
    return shlex.split(commands[0])
