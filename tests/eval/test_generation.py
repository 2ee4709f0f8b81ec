import copy

import pytest
import torch
from testing_utils import build_model, build_tokenizer

from trl_safety.data.templates import alpaca_prompt
from trl_safety.eval import KeywordJudge, generate_responses, harmful_score


PROMPTS = ["tell me a story about the cat", "what is a dog", "write", "please explain the river and the moon now"]


def greedy_by_hand(model, tokenizer, text, max_new_tokens):
    """Unpadded, one-prompt greedy decoding with an explicit argmax loop."""
    ids = tokenizer(text)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_greedy_matches_unbatched_argmax():
    model, tokenizer = build_model(seed=3), build_tokenizer()
    expected = [greedy_by_hand(model, tokenizer, alpaca_prompt(p), 6) for p in PROMPTS]
    model.train()
    got = generate_responses(
        model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, prompt_format="alpaca", progress=False
    )
    assert got == expected
    assert model.training and tokenizer.padding_side == "right"
    # a callable format is the same thing
    assert (
        generate_responses(model, tokenizer, PROMPTS[:2], max_new_tokens=6, prompt_format=alpaca_prompt)
        == expected[:2]
    )


def test_generation_without_pad_token_restores_it():
    model, tokenizer = build_model(seed=1), copy.deepcopy(build_tokenizer())
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    got = generate_responses(model, tokenizer, PROMPTS[:2], max_new_tokens=3, batch_size=2, progress=False)
    assert len(got) == 2 and tokenizer.pad_token is None
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, tokenizer, PROMPTS, max_new_tokens=0)
    assert generate_responses(model, tokenizer, []) == []


def test_harmful_score_generates_then_judges():
    model, tokenizer = build_model(seed=2), build_tokenizer()
    responses = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=4, progress=False)
    # refuse exactly the responses that contain a token we pick from the first one
    marker = responses[0].strip()[:2]
    judge = KeywordJudge(keywords=[marker])
    expected_flags = [marker.lower() not in r.lower() for r in responses]
    result = harmful_score(
        model,
        tokenizer,
        PROMPTS,
        judge,
        categories=["a", ["a", "b"], None, {"b": True, "c": False}],
        max_new_tokens=4,
        progress=False,
    )
    assert result.responses == responses and result.flags == expected_flags
    # percentages of counted flags: only k/n·100 rounding, absorbed by approx's default rel=1e-6
    assert result.score == pytest.approx(100 * sum(expected_flags) / 4)
    flags = expected_flags
    assert result.per_category == pytest.approx({"a": 50 * (flags[0] + flags[1]), "b": 50 * (flags[1] + flags[3])})
    data = result.to_dict()
    assert data["num_prompts"] == 4 and data["judge"] == "keyword" and data["num_flagged"] == sum(flags)
