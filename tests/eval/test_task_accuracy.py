import pytest

from trl_safety.eval.task_accuracy import (
    agnews_correct,
    extract_gsm8k_number,
    gsm8k_correct,
    sst2_correct,
    task_accuracy,
)


@pytest.mark.parametrize(
    "output, label, expected",
    [
        ("positive", 1, True),
        ("Positive", 1, True),
        ("  positive\n", "positive", True),  # surrounding whitespace is stripped
        ("POSITIVE", 1, False),  # only the two case variants
        ("negative", 1, False),
        ("Negative", 0, True),
        ("positive.", 1, False),  # format violation: punctuation
        ("positive, because the film is great", 1, False),  # format violation: extra text (Booster issue #1)
        ("The sentiment is positive", 1, False),
        ("", 0, False),
    ],
)
def test_sst2_exact_match(output, label, expected):
    assert sst2_correct(output, label) is expected


@pytest.mark.parametrize(
    "output, label, expected",
    [
        ("World", 0, True),
        ("world", 0, True),
        ("WORLD", 0, False),
        ("Sports", 1, True),
        ("business", "Business", True),
        ("Sci/Tech", 3, True),
        ("sci/tech", 3, True),
        ("sci", 3, True),
        ("Sci", 3, False),
        ("Tech", 3, False),
        ("Sports.", 1, False),
        ("Sports news", 1, False),
        ("sci", 2, False),
    ],
)
def test_agnews_exact_match(output, label, expected):
    assert agnews_correct(output, label) is expected


@pytest.mark.parametrize(
    "text, number",
    [
        ("She has 3 apples and buys 4. The final answer is: 7", 7.0),
        ("The final answer is:  1,234 dollars, not 5", 1234.0),  # double space from '#### 1234', commas removed
        ("Costs 2.5 each, so 10 in total", 10.0),  # no marker: last number
        ("The final answer is: unknown, maybe 12 or 13", 12.0),  # first number after the marker
        ("The final answer is: none", None),  # marker without number and no number at all
        ("3 then The final answer is: nothing", 3.0),  # marker without number: last number of the whole text
        ("answer -4", -4.0),
        ("no digits here", None),
    ],
)
def test_gsm8k_number_extraction(text, number):
    assert extract_gsm8k_number(text) == number


def test_gsm8k_float_compare_and_reference_forms():
    gold = "Step: 6 * 7 = 42\nThe final answer is:  42"
    assert gsm8k_correct("so The final answer is: 42.0", gold)
    assert gsm8k_correct("it is 42", gold)
    assert not gsm8k_correct("The final answer is: 41 and later 42", gold)
    assert not gsm8k_correct("I do not know", gold)
    assert gsm8k_correct("The final answer is: 18", 18)


def test_task_accuracy_percent():
    result = task_accuracy("sst2", ["positive", "Negative", "positive!", "negative"], [1, 0, 1, 1])
    assert result.correct == [True, True, False, False] and result.accuracy == 50.0
    assert result.to_dict()["num_samples"] == 4
    with pytest.raises(ValueError, match="No accuracy rule"):
        task_accuracy("mnli", ["a"], [0])
