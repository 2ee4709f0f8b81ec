import pytest
import torch
from testing_utils import build_tokenizer
from transformers import AutoModelForSequenceClassification, LlamaConfig


def build_classifier(
    num_labels: int, problem_type: str | None = None, seed: int = 0, scale: float = 1.0, id2label=None
):
    """A tiny randomly initialised Llama sequence classifier on the test tokenizer."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=((len(tokenizer) + 63) // 64) * 64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=num_labels,
        problem_type=problem_type,
    )
    if id2label is not None:
        config.id2label = dict(enumerate(id2label))
        config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # spread the logits so that flags differ between inputs
        model.score.weight.mul_(scale)
    return model.eval(), tokenizer


@pytest.fixture
def classifier():
    return build_classifier


def center_head(model, tokenizer, texts, scale: float = 50.0, noise: float = 0.1, seed: int = 0):
    """Re-draw the classification head so that its logits on `texts` spread around zero.

    A random tiny model's last-token hidden states are nearly identical across inputs, so a random head gives every
    input the same flags. Here every output row is one shared direction orthogonal to the texts' mean hidden state
    (plus a little per-label noise): logits then agree in sign per input and differ between inputs.
    """
    with torch.no_grad():
        hidden = torch.stack(
            [model.model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).last_hidden_state[0, -1] for t in texts]
        )
        centred = hidden - hidden.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]  # largest spread between the texts
        generator = torch.Generator().manual_seed(seed)
        rows = direction + noise * torch.randn(model.score.weight.shape, generator=generator) / hidden.shape[1] ** 0.5
        mean = hidden.mean(0)
        rows = rows - (rows @ mean)[:, None] * mean / (mean @ mean)
        model.score.weight.copy_(scale * rows / rows.norm(dim=-1, keepdim=True) / centred.norm(dim=-1).mean())
    return model
