"""The toy world's base model: a tiny Llama pretrained with `SFTTrainer` to follow every instruction, cached on disk.

The cache lives in `$TRL_SAFETY_TOY_CACHE` (default `~/.cache/trl_safety/toy`), one folder per world version and
recipe fingerprint (`v1-<hash>`); changing the world or the recipe changes the folder, so a stale model is never
reused. The folder is written atomically (built in a temporary folder, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

from .world import WORLD_VERSION, ToyWorld, build_tokenizer, world_fingerprint


logger = logging.getLogger(__name__)

CACHE_ENV = "TRL_SAFETY_TOY_CACHE"
WORLD_FILE = "toy_world.json"


@dataclass(frozen=True)
class BaseModelRecipe:
    """Architecture and pretraining of the base model (part of the cache key)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 64
    pretrain_samples: int = 6000
    pretrain_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0

    def fingerprint(self, world_seed: int = 0) -> str:
        payload = json.dumps({"recipe": asdict(self), "world": world_fingerprint(world_seed)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "trl_safety", "toy")


def base_model_path(cache_dir: str | None = None, world_seed: int = 0, recipe: BaseModelRecipe | None = None) -> str:
    recipe = recipe or BaseModelRecipe()
    return os.path.join(cache_dir or default_cache_dir(), f"v{WORLD_VERSION}-{recipe.fingerprint(world_seed)}")


def base_model_config(tokenizer, recipe: BaseModelRecipe | None = None):
    from transformers import LlamaConfig

    recipe = recipe or BaseModelRecipe()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def toy_sft_config(output_dir: str, config_class=None, **overrides):
    """A fast CPU training config for the toy world (fp32, no checkpointing, no saving, no logging side effects)."""
    from trl import SFTConfig

    values = dict(
        output_dir=output_dir,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=64,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=False,
        seed=0,
    )
    values.update(overrides)
    return (config_class or SFTConfig)(**values)


def pretrain_base_model(output_dir: str, world: ToyWorld | None = None, recipe: BaseModelRecipe | None = None):
    """Build the tiny Llama from its config and pretrain it with `SFTTrainer` to comply with every request."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    world = world or ToyWorld()
    recipe = recipe or BaseModelRecipe()
    tokenizer = build_tokenizer()
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(base_model_config(tokenizer, recipe))
    dataset = world.pretraining_dataset(num_samples=recipe.pretrain_samples, seed=recipe.seed)
    args = toy_sft_config(
        os.path.join(output_dir, "trainer"),
        per_device_train_batch_size=recipe.batch_size,
        max_steps=recipe.pretrain_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, recipe.pretrain_steps // 20),
        seed=recipe.seed,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    model = strip_trainer_patches(trainer.model)
    model.config._name_or_path = "trl-safety/toy-base"
    return model, tokenizer


def strip_trainer_patches(model):
    """Remove the fused-LM-head `forward` that `SFTTrainer` installs, so the model is safe to copy and to hand to the
    next trainer (`compat.strip_fused_lm_head`)."""
    from ..compat import strip_fused_lm_head

    return strip_fused_lm_head(model)


def load_base_model(
    cache_dir: str | None = None,
    world_seed: int = 0,
    recipe: BaseModelRecipe | None = None,
    rebuild: bool = False,
):
    """The cached base model and tokenizer, pretraining and caching them first if needed.

    Returns `(model, tokenizer, path)`.
    """
    from transformers import AutoModelForCausalLM

    recipe = recipe or BaseModelRecipe()
    path = base_model_path(cache_dir, world_seed, recipe)
    world_file = os.path.join(path, WORLD_FILE)
    expected = {
        "world_version": WORLD_VERSION,
        "fingerprint": recipe.fingerprint(world_seed),
        "world_seed": world_seed,
    }
    valid = False
    if os.path.exists(world_file) and not rebuild:
        with open(world_file) as f:
            stored = json.load(f)
        valid = all(stored.get(k) == v for k, v in expected.items())
    if not valid:
        logger.info("Building the toy base model in %s (once per world version).", path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=parent, prefix=".building-") as tmp:
            model, tokenizer = pretrain_base_model(tmp, ToyWorld(world_seed), recipe)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, WORLD_FILE), "w") as f:
                json.dump({**expected, "recipe": asdict(recipe), "seconds": time.perf_counter() - start}, f, indent=2)
            if os.path.exists(path):
                shutil.rmtree(path)
            try:
                os.replace(tmp, path)
            except OSError:  # another process finished first
                if not os.path.exists(world_file):
                    raise
            os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleans up the (now moved) folder
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, build_tokenizer(), path
