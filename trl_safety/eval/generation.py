"""Batched greedy generation for evaluation (docs/design/algorithms.md §6.3: `do_sample=False`, `num_beams=1`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.templates import prompt_formatter


logger = logging.getLogger(__name__)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    prompt_format: Callable[[str], str] | str | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of `prompts`, one string per prompt: only the newly generated text, special tokens removed.

    Batches are left-padded (so every row's new tokens start at the same position); a tokenizer without a pad token
    pads with EOS for the duration of the call. The tokenizer's padding side and pad token and the model's train/eval
    mode are restored afterwards.

    Args:
        prompt_format: applied to each prompt before tokenization: a callable, a template name (`"alpaca"`,
            `"alpaca_newline"`, `"chat"`), or `None` to use prompts as given.
        progress: show a tqdm progress bar over batches.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    prompts = list(prompts)
    if not prompts:
        return []
    fmt = prompt_formatter(prompt_format, tokenizer)
    texts = [fmt(p) for p in prompts] if fmt is not None else prompts

    was_training = model.training
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    device = _model_device(model)
    responses: list[str] = []
    try:
        batches = range(0, len(texts), batch_size)
        for start in tqdm(batches, desc="Generating", disable=not progress, total=len(batches)):
            batch = texts[start : start + batch_size]
            encoded = tokenizer(batch, return_tensors="pt", padding=True)
            encoded = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                # neutralise sampling settings a model's generation_config may carry (they only cause warnings)
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        tokenizer.pad_token = pad_token
        model.train(was_training)
    return responses
