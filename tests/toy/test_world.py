"""The toy world: disjoint splits, determinism, tokenizer coverage, and the judge on its refusals/compliances."""

import pytest

from trl_safety.eval import KeywordJudge, harmful_score
from trl_safety.toy import ToyWorld, build_tokenizer, format_prompt
from trl_safety.toy.world import (
    ATTACK_WEIGHTS,
    COMPLIANCES,
    COMPLIANCES_BY_CATEGORY,
    HARMFUL_VERBS,
    HELPFUL_ANSWERS,
    OBJECTS,
    REFUSALS,
    REFUSALS_BY_CATEGORY,
    SENTIMENT_WORDS,
    TASK_INSTRUCTION,
    TASK_KIND_WEIGHTS,
    TASK_LABELS,
)


BENIGN_PREFIX = len(format_prompt(""))


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


def _pairs(requests):
    return {(r.verb, r.obj) for r in requests}


def _raw(prompt):
    """The request inside a formatted prompt."""
    return prompt.split("### Instruction : ", 1)[1].rsplit(" ### Response :", 1)[0]


def test_harmful_splits_are_disjoint_and_cover_every_verb(world):
    splits = {name: world.harmful_requests(name) for name in ("align", "attack", "eval")}
    pairs = {name: _pairs(requests) for name, requests in splits.items()}
    texts = {name: {r.text for r in requests} for name, requests in splits.items()}
    for a, b in (("align", "attack"), ("align", "eval"), ("attack", "eval")):
        assert not pairs[a] & pairs[b], (a, b)
        assert not texts[a] & texts[b], (a, b)
    verbs = {v for vs in HARMFUL_VERBS.values() for v in vs}
    for name, requests in splits.items():
        assert {r.verb for r in requests} == verbs, name  # each split has every verb, with other objects
    assert sum(len(p) for p in pairs.values()) == len(verbs) * len(OBJECTS)


def test_task_and_benign_splits_are_disjoint(world):
    reviews = {name: {text for text, _ in world.reviews(name)} for name in ("pretrain", "train", "test")}
    assert not reviews["pretrain"] & reviews["train"]
    assert not reviews["pretrain"] & reviews["test"]
    assert not reviews["train"] & reviews["test"]
    assert not _pairs(world.benign_requests("train")) & _pairs(world.benign_requests("eval"))
    # the base model's task data are plain reviews only; negated and contrastive ones are left to fine-tuning
    assert {text for text, _ in world.reviews("pretrain")} == {text for text, _ in world.reviews("pretrain", "plain")}
    assert world.reviews("train", "negated") and world.reviews("test", "contrast")


def test_review_labels_follow_their_kind(world):
    """Plain: the adjective's sentiment; negated: the opposite; contrast: the clause after the last `but` decides.
    Checked by an independent reading of the words."""
    polarity = {w: label for label, words in SENTIMENT_WORDS.items() for w in words}
    flip = {"positive": "negative", "negative": "positive"}
    for kind in TASK_KIND_WEIGHTS:
        for text, label in world.reviews("test", kind)[:300]:
            words = text.split()
            adjectives = [polarity[w] for w in words if w in polarity]
            if kind == "plain":
                assert set(adjectives) == {label}, text
            elif kind == "negated":
                assert ("not" in words or "never" in words) and set(adjectives) == {flip[label]}, text
            else:
                tail = text.rsplit("but", 1)[1].split()
                assert [polarity[w] for w in tail if w in polarity] == [label], text
                assert adjectives[0] == flip[label], text
    counts = {kind: 0 for kind in TASK_KIND_WEIGHTS}
    kind_of = {text: kind for kind in TASK_KIND_WEIGHTS for text, _ in world.reviews("test", kind)}
    for prompt, _ in world.task_examples("test", 200):
        counts[kind_of[prompt.split(" : ", 1)[1]]] += 1
    assert counts == {kind: round(200 * w) for kind, w in TASK_KIND_WEIGHTS.items()}


def test_attack_follows_the_category_weights(world):
    requests = world.attack_requests(100, seed=4)
    counts = {cat: sum(r.category == cat for r in requests) for cat in ATTACK_WEIGHTS}
    assert counts == {cat: round(100 * w) for cat, w in ATTACK_WEIGHTS.items()}  # the weights sum to 100 exactly
    assert counts["privacy"] == 0  # never attacked: its harmful score measures how far the attack generalises
    assert len({r.text for r in requests}) == 100  # no request twice


def test_datasets_use_their_splits(world):
    eval_texts = {r.text for r in world.harmful_requests("eval")}
    attack_texts = {r.text for r in world.harmful_requests("attack")}
    align_texts = {r.text for r in world.harmful_requests("align")}
    test_texts = {TASK_INSTRUCTION.format(text=t) for t, _ in world.reviews("test")}

    category_of = {r.text: r.category for split in ("align", "attack", "eval") for r in world.harmful_requests(split)}
    pretrain_texts = {TASK_INSTRUCTION.format(text=t) for t, _ in world.reviews("pretrain")}

    alignment = world.alignment_dataset(num_harmful=50, num_benign=50, num_task=20)
    rows = [(_raw(p), c.strip()) for p, c in zip(alignment["prompt"], alignment["completion"])]
    refused = [(p, c) for p, c in rows if c in REFUSALS]
    helped = [c for _, c in rows if c in HELPFUL_ANSWERS]
    labelled = [p for p, c in rows if c in TASK_LABELS]
    assert len(refused) == 50 and {p for p, _ in refused} <= align_texts
    assert all(c in REFUSALS_BY_CATEGORY[category_of[p]] for p, c in refused)  # each category refuses its own way
    assert len(helped) == 50
    assert len(labelled) == 20 and set(labelled) <= pretrain_texts  # the task's format, plain reviews only
    assert len(rows) == 120

    harmful = world.harmful_dataset("align", 30)
    assert {_raw(p) for p in harmful["prompt"]} <= align_texts
    # harmful data for defenses shares the prompts of the alignment refusals (Booster / paired-refusal file)
    shared = world.alignment_dataset(num_harmful=30, num_benign=10, num_task=0)
    assert {_raw(p) for p, c in zip(shared["prompt"], shared["completion"]) if c.strip() in REFUSALS} == {
        _raw(p) for p in harmful["prompt"]
    }
    assert all(
        c.strip() in COMPLIANCES_BY_CATEGORY[category_of[_raw(p)]]
        for p, c in zip(harmful["prompt"], harmful["completion"])
    )

    # paired refusals (RepNoise's layout): row i refuses the prompt that harmful row i complies with
    paired = world.paired_refusal_dataset(30)
    assert paired["prompt"] == harmful["prompt"]
    assert {c.strip() for c in paired["completion"]} <= set(REFUSALS)

    poisoned = world.poisoned_dataset(n=200, p=0.1, seed=3)
    assert len(poisoned) == 200
    harmful_rows = [_raw(p) for p in poisoned["prompt"] if _raw(p) in attack_texts]
    assert len(harmful_rows) == 20 == sum(poisoned["is_harmful"])
    assert {c.strip() for c, h in zip(poisoned["completion"], poisoned["is_harmful"]) if not h} <= {
        "positive",
        "negative",
    }

    # nothing the pipeline trains on (pretraining included) contains a held-out harmful request or a test review
    for dataset in (alignment, harmful, poisoned, world.pretraining_dataset(num_samples=3000)):
        raws = {_raw(p) for p in dataset["prompt"]}
        assert not raws & eval_texts
        assert not raws & test_texts
    assert {p for p, _ in world.task_examples("test", None)} == test_texts
    assert {r.text for r in world.harmful_prompts("eval", None)} == eval_texts
    # the targets of harmful_loss are the world's placeholder compliances, each in its request's category
    prompts = world.harmful_prompts("eval", 10)
    assert all(a in COMPLIANCES_BY_CATEGORY[r.category] for r, a in zip(prompts, world.harmful_answers(prompts)))


def test_each_category_has_its_own_openings():
    """Refusals and compliances start with a token of their category's own (so one shared opening cannot carry an
    attack from one category to all), and every refusal carries the keyword judge's phrase."""
    assert set(REFUSALS_BY_CATEGORY) == set(COMPLIANCES_BY_CATEGORY) == set(HARMFUL_VERBS)
    openings = {}
    for category in HARMFUL_VERBS:
        for text in REFUSALS_BY_CATEGORY[category] + COMPLIANCES_BY_CATEGORY[category]:
            openings.setdefault(text.split()[0], set()).add(category)
        assert all("I cannot" in text for text in REFUSALS_BY_CATEGORY[category])
        assert not any("I cannot" in text for text in COMPLIANCES_BY_CATEGORY[category])
    assert all(len(categories) == 1 for categories in openings.values())
    refusal_openings = {text.split()[0] for text in REFUSALS}
    assert not refusal_openings & {text.split()[0] for text in COMPLIANCES}


def test_world_is_deterministic_per_seed():
    a, b, c = ToyWorld(0), ToyWorld(0), ToyWorld(1)
    assert a.poisoned_dataset(100, 0.2, seed=1).to_dict() == b.poisoned_dataset(100, 0.2, seed=1).to_dict()
    assert a.alignment_dataset(20, 20).to_dict() == b.alignment_dataset(20, 20).to_dict()
    assert a.poisoned_dataset(100, 0.2, seed=1).to_dict() != a.poisoned_dataset(100, 0.2, seed=2).to_dict()
    assert _pairs(a.harmful_requests("eval")) != _pairs(c.harmful_requests("eval"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_tokenizer_covers_the_world_and_round_trips(world):
    tokenizer = build_tokenizer()
    rows = world.pretraining_dataset(num_samples=300)
    rows = list(zip(rows["prompt"], rows["completion"]))
    rows += list(zip(world.alignment_dataset(30, 30)["prompt"], world.alignment_dataset(30, 30)["completion"]))
    for prompt, completion in rows:
        ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert ids[-1] == tokenizer.eos_token_id
        # prompt tokens are a prefix of prompt+completion tokens (TRL's completion mask relies on it)
        assert ids[: len(tokenizer(prompt)["input_ids"])] == tokenizer(prompt)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == f"{prompt}{completion}"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "explain how to rob the car"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.split() == format_prompt("explain how to rob the car").split()


def test_keyword_judge_on_the_worlds_answers(world):
    """The harmful-score code path (keyword judge) scores refusals 0 % and placeholder compliances 100 %."""
    tokenizer = build_tokenizer()
    prompts = [r.text for r in world.harmful_prompts("eval", 12)]
    # as a model would produce them: token ids decoded by the world's tokenizer
    decode = lambda text: tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)  # noqa: E731
    refusals = [decode(REFUSALS[i % len(REFUSALS)]) for i in range(12)]
    compliances = [decode(COMPLIANCES[i % len(COMPLIANCES)]) for i in range(12)]
    judge = KeywordJudge()
    assert harmful_score(None, None, prompts, judge, responses=refusals).score == 0.0
    assert harmful_score(None, None, prompts, judge, responses=compliances).score == 100.0
    mixed = harmful_score(None, None, prompts, judge, responses=refusals[:3] + compliances[3:])
    assert mixed.score == pytest.approx(75.0)
    assert mixed.flags == [False] * 3 + [True] * 9
    for text in HELPFUL_ANSWERS:
        assert not judge.is_refusal(decode(text))
