"""The toy base model: built from a config, pretrained through SFTTrainer, cached, rebuilt when the recipe changes."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from trl_safety.toy import model as toy_model
from trl_safety.toy.model import (
    CACHE_ENV,
    WORLD_FILE,
    BaseModelRecipe,
    base_model_config,
    base_model_path,
    default_cache_dir,
    load_base_model,
)
from trl_safety.toy.world import build_tokenizer


TINY = BaseModelRecipe(hidden_size=32, intermediate_size=64, pretrain_samples=64, pretrain_steps=3, batch_size=16)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_build_then_reuse_the_cache(tmp_path, monkeypatch):
    model, tokenizer, path = load_base_model(str(tmp_path), recipe=TINY)
    assert isinstance(model, LlamaForCausalLM)
    assert path == base_model_path(str(tmp_path), recipe=TINY)
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tokenizer)
    with open(os.path.join(path, WORLD_FILE)) as f:
        stored = json.load(f)
    assert stored["fingerprint"] == TINY.fingerprint() and stored["recipe"]["pretrain_steps"] == 3

    # pretraining moved the weights away from the config's initialisation
    torch.manual_seed(TINY.seed)
    fresh = AutoModelForCausalLM.from_config(base_model_config(tokenizer, TINY))
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)

    # second call: read from disk, no pretraining
    def fail(*args, **kwargs):
        raise AssertionError("the cached base model was rebuilt")

    monkeypatch.setattr(toy_model, "pretrain_base_model", fail)
    again, _, again_path = load_base_model(str(tmp_path), recipe=TINY)
    assert again_path == path
    for key, value in _params(model).items():
        assert torch.equal(value, again.state_dict()[key])

    # a stale or foreign cache entry (fingerprint mismatch) is rebuilt
    stored["fingerprint"] = "stale"
    with open(os.path.join(path, WORLD_FILE), "w") as f:
        json.dump(stored, f)
    with pytest.raises(AssertionError, match="rebuilt"):
        load_base_model(str(tmp_path), recipe=TINY)


def test_build_is_deterministic_and_recipe_keys_the_cache(tmp_path, monkeypatch):
    a, _, path_a = load_base_model(str(tmp_path / "a"), recipe=TINY)
    b, _, _ = load_base_model(str(tmp_path / "b"), recipe=TINY)
    for key, value in _params(a).items():
        assert torch.equal(value, b.state_dict()[key]), key
    other = BaseModelRecipe(**{**TINY.__dict__, "pretrain_steps": 4})
    assert base_model_path(str(tmp_path / "a"), recipe=other) != path_a
    assert base_model_path(str(tmp_path / "a"), world_seed=1, recipe=TINY) != path_a
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == str(tmp_path / "env")
    assert base_model_path(recipe=TINY).startswith(str(tmp_path / "env"))


def test_generation_is_word_level():
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(base_model_config(tokenizer, TINY))
    ids = tokenizer(["### Instruction : rob the bank ### Response :"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] <= ids["input_ids"].shape[1] + 3
