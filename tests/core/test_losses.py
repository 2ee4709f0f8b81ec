import pytest
import torch
import torch.nn.functional as F
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from trl import SFTTrainer

from trl_safety.core import lm_forward, lm_loss, per_sample_nll, per_sample_token_mean_nll


def _manual_per_sample(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return (ce * mask).sum(-1) / mask.sum(-1), (ce * mask).sum() / mask.sum()


@pytest.mark.parametrize("fused", [True, False])
def test_per_sample_token_mean_equals_manual_cross_entropy(tmp_path, fused):
    model = build_model("llama")
    trainer = SFTTrainer(
        model,
        tiny_config(tmp_path),
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    probe_model = trainer.model
    if not fused:
        probe_model = build_model("llama")  # untouched by SFTTrainer: the logits path
        probe_model.load_state_dict(trainer.model.state_dict())
    expected_per_sample, expected_mean = _manual_per_sample(probe_model, batch)
    outputs = lm_forward(probe_model, batch)
    # fused LM head (or the package's masked reduction) vs full-logits cross-entropy (docs/testing.md): NLLs ≈6,
    # observed ≤ 8e-8 relative, > 100× margin
    torch.testing.assert_close(per_sample_token_mean_nll(outputs), expected_per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm_loss(probe_model, batch), expected_mean, rtol=1e-5, atol=1e-6)
    nll, counts = per_sample_nll(outputs)
    assert counts.tolist() == (batch["labels"][:, 1:] != -100).sum(-1).tolist()


def test_probe_loss_has_no_metric_side_effects(tmp_path):
    trainer = SFTTrainer(
        build_model("llama"),
        tiny_config(tmp_path),
        train_dataset=prompt_completion_dataset(),
        processing_class=build_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    lm_loss(trainer.model, batch)
    assert not trainer._metrics["train"]
    assert trainer._total_train_tokens == 0


def test_lm_forward_requires_labels():
    with pytest.raises(ValueError, match="needs `labels`"):
        lm_forward(build_model("llama"), {"input_ids": torch.ones(1, 3, dtype=torch.long)})
