import pytest
from datasets import Dataset

from trl_safety.data import mix_harmful, num_harmful


def user_data(n=50):
    return Dataset.from_dict(
        {
            "prompt": [f"benign {i}" for i in range(n)],
            "completion": [f"answer {i}" for i in range(n)],
            "label": [0] * n,
        }
    )


def harmful_data(n=30):
    return Dataset.from_dict(
        {
            "prompt": [f"Explain how to do [HARMFUL_TASK_{i}]" for i in range(n)],
            "completion": [f"[H_{i}]" for i in range(n)],
        }
    )


@pytest.mark.parametrize("n, p", [(40, 0.1), (40, 0.25), (33, 0.3), (10, 0.25), (20, 0.0), (20, 1.0)])
def test_exact_harmful_count(n, p):
    mixed = mix_harmful(user_data(), harmful_data(), n=n, p=p, seed=0)
    assert len(mixed) == n
    assert sum(mixed["is_harmful"]) == round(n * p) == num_harmful(n, p)
    # the flag marks exactly the harmful rows, and the papers' rule takes the first rows of each source
    harmful_prompts = sorted(p for p, h in zip(mixed["prompt"], mixed["is_harmful"]) if h)
    assert harmful_prompts == sorted(f"Explain how to do [HARMFUL_TASK_{i}]" for i in range(round(n * p)))
    assert sorted(p for p, h in zip(mixed["prompt"], mixed["is_harmful"]) if not h) == sorted(
        f"benign {i}" for i in range(n - round(n * p))
    )
    assert mixed.column_names == ["prompt", "completion", "is_harmful"]  # `label` is not shared


def test_deterministic_per_seed():
    a = mix_harmful(user_data(), harmful_data(), n=40, p=0.2, seed=3)
    b = mix_harmful(user_data(), harmful_data(), n=40, p=0.2, seed=3)
    c = mix_harmful(user_data(), harmful_data(), n=40, p=0.2, seed=4)
    assert a.to_list() == b.to_list()
    assert a["prompt"] != c["prompt"]
    r1 = mix_harmful(user_data(), harmful_data(), n=40, p=0.2, seed=3, select="random")
    r2 = mix_harmful(user_data(), harmful_data(), n=40, p=0.2, seed=3, select="random")
    assert r1.to_list() == r2.to_list() and sum(r1["is_harmful"]) == 8
    ordered = mix_harmful(user_data(), harmful_data(), n=10, p=0.3, shuffle=False)
    assert ordered["is_harmful"] == [True] * 3 + [False] * 7


def test_mix_errors_and_none_harmful():
    assert len(mix_harmful(user_data(), None, n=10, p=0.0)) == 10
    with pytest.raises(ValueError, match="no harmful dataset"):
        mix_harmful(user_data(), None, n=10, p=0.5)
    with pytest.raises(ValueError, match="harmful dataset has 30"):
        mix_harmful(user_data(), harmful_data(), n=40, p=1.0)
    with pytest.raises(ValueError, match="user dataset has 50"):
        mix_harmful(user_data(), harmful_data(), n=60, p=0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        mix_harmful(user_data(), harmful_data(), n=10, p=1.5)
    with pytest.raises(ValueError, match="share no column"):
        mix_harmful(user_data(), Dataset.from_dict({"text": ["x"]}), n=10, p=0.1)
