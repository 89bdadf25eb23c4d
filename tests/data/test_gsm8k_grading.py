"""Tests of the GSM8K answer grader: the final number of a solution and when two are the same."""

import pytest

from lwjax.data.math_sets import gsm8k_grading

# (solution text, its final number)
FINAL_NUMBERS = [
    ("She sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The total is 1,000,000 grains.", "1000000"),
    ("The answer is $18.00.", "18"),
    ("He pays \\$5 each, so the answer is 18.0", "18"),
    ("So 5-3=2 and the answer is -7.", "-7"),
    ("It drops by 3 degrees: the temperature is −4.", "-4"),
    ("The answer is: 12 apples, not 13 apples.", "12"),
    ("Each costs 3.5 dollars.", "3.5"),
    ("The share is .25 of the pie.", "0.25"),
    ("It takes 2 hours, which is 120 minutes.", "120"),
    ("So she has $\\boxed{72}$ left after 3 days.", "72"),
    ("He had 3 cards, then 5.\n#### 8\nAnd 10 more words.", "8"),
    ("0.0", "0"),
    ("no numbers here", None),
]


@pytest.mark.parametrize(("text", "number"), FINAL_NUMBERS)
def test_final_number(text, number):
  assert gsm8k_grading.final_number(text) == number


@pytest.mark.parametrize(("answer", "reference", "same"), [
    ("The answer is 18.", "18", True),
    ("The answer is $18.00", "18", True),
    ("The answer is 1,800", "1800", True),
    ("The answer is 18.5", "18", False),
    ("The answer is -18", "18", False),
    ("no answer", "18", False),
    (None, "18", False),
])
def test_same_number(answer, reference, same):
  assert gsm8k_grading.same_number(answer, reference) is same
