"""RepNoise: the trainer's gradient equals L = L_harmless + β·MMD − α·log(L̄_harm + 1) computed here from §2.5."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config

from trl_safety import RepNoiseConfig, RepNoiseTrainer


LORA = dict(
    r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
)
PAIR = "repnoise_pair_index"


def paired_datasets(n=8):
    harmless = prompt_completion_dataset(n, seed=0)
    answers = prompt_completion_dataset(n, seed=7)["completion"]
    harmful = Dataset.from_dict({"prompt": harmless["prompt"], "completion": answers})
    return harmless, harmful


def make_trainer(tmp_path, peft=False, n=8, harmful_rows=None, **kwargs):
    harmless, harmful = paired_datasets(n)
    if harmful_rows is not None:
        harmful = harmful.select(range(harmful_rows))
    return RepNoiseTrainer(
        model=build_model("llama", hidden=32, layers=2, seed=0),
        args=tiny_config(tmp_path, RepNoiseConfig, **kwargs),
        train_dataset=harmless,
        harmful_dataset=harmful,
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def right_pad(rows, key, value):
    width = max(len(r[key]) for r in rows)
    return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])


def harmful_batch(trainer, pair_index):
    """The paired harmful rows, looked up by pair index and right-padded here."""
    by_index = {row[PAIR]: row for row in trainer.harmful_dataset}
    rows = [by_index[i] for i in pair_index.tolist()]
    ids = right_pad(rows, "input_ids", 0)
    mask = right_pad([{"m": [1] * len(r["input_ids"])} for r in rows], "m", 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": right_pad(rows, "labels", -100)}


def differ_mask(ids, mask, other_ids, other_mask):
    """Token t counts when it is a real token and the paired sequence has no equal token at t."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(ids.size(0)):
        other_len = int(other_mask[i].sum())
        for t in range(int(mask[i].sum())):
            out[i, t] = t >= other_len or bool(ids[i, t] != other_ids[i, t])
    return out


def ce_on(logits, labels, keep):
    """Mean CE of predicting token t from position t-1, over target positions where `keep` and labels are valid."""
    sel = keep[:, 1:] & (labels[:, 1:] != -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1][sel].float(), labels[:, 1:][sel])


def mmd(x, y):
    total = torch.cat([x, y])
    d2 = ((total[None, :, :] - total[:, None, :]) ** 2).sum(-1)
    n = total.size(0)
    base = d2.detach().sum() / (n * n - n) / 4
    k = sum(torch.exp(-d2 / (base * 2**i)) for i in range(5))
    b = x.size(0)
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def expected_loss(model, harmless, harmful, alpha, beta, seed):
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = hf.model.layers
    keep_b = differ_mask(
        harmless["input_ids"], harmless["attention_mask"], harmful["input_ids"], harmful["attention_mask"]
    )
    keep_h = differ_mask(
        harmful["input_ids"], harmful["attention_mask"], harmless["input_ids"], harmless["attention_mask"]
    )
    logits = model(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"]).logits
    loss = ce_on(logits, harmless["labels"], keep_b)
    mlp_out = []
    handles = [layer.mlp.register_forward_hook(lambda m, i, o: mlp_out.append(o)) for layer in layers]
    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    for h in handles:
        h.remove()
    assert len(out.hidden_states) == len(layers) + 1
    lens = [hf.lm_head(hf.model.norm(h)) for h in out.hidden_states]
    harm = ce_on(out.logits, harmful["labels"], keep_h) + sum(ce_on(lg, harmful["labels"], keep_h) for lg in lens)
    harm = harm / len(out.hidden_states)
    answer = (keep_h & (harmful["labels"] != -100)).unsqueeze(-1).float()
    generator = torch.Generator().manual_seed(seed)
    noise_loss = 0
    for hidden in mlp_out:
        noise = torch.randn(hidden.shape, generator=generator) * answer
        noise_loss = noise_loss + mmd((hidden * answer).flatten(1), noise.flatten(1))
    noise_loss = noise_loss / len(layers)
    return loss + beta * noise_loss - alpha * torch.log(harm + 1)


CHECKPOINTING = {
    "off": dict(gradient_checkpointing=False),
    "non_reentrant": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
    "reentrant": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
}
CASES = [
    # (peft, ga, checkpointing, alpha, beta)
    (False, 1, "off", 0.5, 0.5),
    (False, 2, "off", 0.5, 0.5),
    (True, 1, "off", 0.5, 0.5),
    (True, 2, "off", 0.5, 0.5),
    (False, 2, "non_reentrant", 0.5, 0.5),
    (True, 2, "non_reentrant", 0.5, 0.5),
    (False, 1, "reentrant", 0.5, 0.5),
    (True, 2, "reentrant", 0.5, 0.5),
    (False, 1, "off", 0.0, 0.0),  # strength zero: CE on the differing refusal tokens only
    (True, 2, "off", 0.0, 0.0),
    (False, 1, "off", 0.1, 0.001),  # the defaults
]


@pytest.mark.parametrize("peft,ga,checkpointing,alpha,beta", CASES)
def test_gradient_matches_spec(tmp_path, peft, ga, checkpointing, alpha, beta):
    trainer = make_trainer(tmp_path, peft=peft, alpha=alpha, beta=beta, **CHECKPOINTING[checkpointing])
    model = trainer.model
    if trainer.args.activation_checkpointing:  # what Trainer.train() does before the first step
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=trainer.args.activation_checkpointing_kwargs
        )
    seed = 1234
    trainer._noise_generator = lambda device: torch.Generator(device=device).manual_seed(seed)
    loader = iter(trainer.get_train_dataloader())
    batch_list = [trainer._prepare_inputs(next(loader)) for _ in range(ga)]
    assert all(PAIR in b for b in batch_list)
    params = [p for p in model.parameters() if p.requires_grad]

    model.eval()
    expected = [torch.zeros_like(p) for p in params]
    expected_losses = []
    for batch in batch_list:
        harmless = {k: v for k, v in batch.items() if k != PAIR}
        loss = expected_loss(model, harmless, harmful_batch(trainer, batch[PAIR]), alpha, beta, seed) / ga
        expected_losses.append(loss.detach())
        for e, g in zip(expected, torch.autograd.grad(loss, params)):
            e += g

    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = ga
    num_items = trainer._get_num_items_in_batch(batch_list, batch_list[0]["input_ids"].device)
    losses = [trainer.training_step(model, dict(batch), num_items) for batch in batch_list]
    # package vs the spec written out here (docs/testing.md): observed ≤ 2.2e-8 abs on the gradients (13× margin) and
    # ≤ 1.4e-7 relative on the losses. Not looser: the β term is small (test_each_term_changes_the_gradient only
    # guarantees > 1e-6 at β = 0.5), so a looser atol would stop seeing it.
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses), rtol=1e-5, atol=1e-7)
    if alpha:
        assert trainer._metrics["train"]["repnoise/harmful_loss"]
    if beta:
        assert trainer._metrics["train"]["repnoise/mmd_noise"]


def test_each_term_changes_the_gradient(tmp_path):
    """Guards the test above: α and β terms both contribute, and the harmless CE ignores the shared prompt."""
    trainer = make_trainer(tmp_path)
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    harmless = {k: v for k, v in batch.items() if k != PAIR}
    harmful = harmful_batch(trainer, batch[PAIR])
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()

    def grads(alpha, beta):
        return torch.autograd.grad(expected_loss(model, harmless, harmful, alpha, beta, 0), params)

    base, with_alpha, with_beta = grads(0, 0), grads(0.5, 0), grads(0, 0.5)
    assert max((a - b).abs().max() for a, b in zip(with_alpha, base)) > 1e-4
    assert max((a - b).abs().max() for a, b in zip(with_beta, base)) > 1e-6
    keep = differ_mask(
        harmless["input_ids"], harmless["attention_mask"], harmful["input_ids"], harmful["attention_mask"]
    )
    labelled = harmless["labels"] != -100
    assert (keep & labelled).sum() < labelled.sum() or (keep | ~labelled).all()


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_train_and_save(tmp_path, peft):
    trainer = make_trainer(tmp_path, peft=peft, max_steps=3, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)
    logged = [e for e in trainer.state.log_history if "repnoise/harmless_loss" in e]
    assert len(logged) == 3 and all("repnoise/harmful_loss" in e and "repnoise/mmd_noise" in e for e in logged)
    trainer.save_model()
    trainer.create_model_card()
    card = open(os.path.join(tmp_path, "README.md")).read()
    assert "RepNoise" in card and "2405.14577" in card
    info = json.load(open(os.path.join(tmp_path, "defense_config.json")))
    assert info["defense"] == "repnoise" and info["hyperparameters"]["alpha"] == 0.1


def test_unpaired_rows_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no harmful partner"):
        make_trainer(tmp_path, harmful_rows=5)


def test_packing_refused(tmp_path):
    with pytest.raises(ValueError, match="packing"):
        tiny_config(tmp_path, RepNoiseConfig, packing=True)
    with pytest.raises(ValueError, match="alpha"):
        tiny_config(tmp_path, RepNoiseConfig, alpha=-0.1)


def test_registered():
    from trl_safety import get_defense

    spec = get_defense("repnoise")
    assert spec.trainer_class is RepNoiseTrainer and spec.config_class is RepNoiseConfig
