"""Tests of the MATH answer grader: extraction of the final answer, the normal form, equivalence and
non-equivalence (hand-written cases of the forms MATH answers and model answers take), and the LaTeX
reader's refusals."""

import pytest

from lwjax.data.math_sets import latex_sympy, math_grading

# (model answer, reference answer, same?)
EQUIVALENCE = [
    # fractions
    (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
    (r"\tfrac{3}{4}", r"\frac34", True),
    (r"\frac12", r"\frac{1}{2}", True),
    (r"\frac1{72}", r"\frac{1}{72}", True),
    ("1/2", r"\frac{1}{2}", True),
    ("-3/4", r"-\frac{3}{4}", True),
    (r"\frac{-1}{2}", r"-\frac{1}{2}", True),
    ("0.5", r"\frac{1}{2}", True),
    ("0.75", r"\tfrac{3}{4}", True),
    (r"2\frac{1}{2}", r"\frac{5}{2}", True),
    (r"-2\frac{1}{2}", "-2.5", True),
    (r"\frac{2}{4}", r"\frac{1}{2}", False),  # PRM800K: an unreduced fraction is not the answer
    (r"\frac{1}{3}", "0.333", False),
    (r"\frac{1}{3}", r"\frac{1}{4}", False),
    # integers and decimals
    ("18.0", "18", True),
    ("18.00", "18", True),
    ("2.50", "2.5", True),
    (".5", "0.5", True),
    ("1,000", "1000", True),
    (r"1{,}000", "1000", True),
    (r"1,\!000", "1000", True),
    (r"\frac{36}{2}", "18", False),  # PRM800K: an integer answer must be written as one
    ("-5", "5", False),
    ("5", "6", False),
    ("10^{-2}", "0.01", True),
    # radicals, pi, expressions
    (r"\sqrt2", r"\sqrt{2}", True),
    (r"\sqrt{12}", r"2\sqrt{3}", True),
    (r"\frac{1}{2}\sqrt{3}", r"\frac{\sqrt{3}}{2}", True),
    (r"\frac{\sqrt2}{2}", r"\frac{1}{\sqrt{2}}", True),
    (r"\sqrt[3]{2}", "2^{1/3}", True),
    (r"3 \pi", r"3\pi", True),
    (r"\pi", "3.14", False),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x^2+2x+1", "x^2+2x-1", False),
    (r"2 \cdot 3x", "6x", True),
    # delimiters, spaces, text, units
    (r"\left( 3, -4 \right)", "(3,-4)", True),
    (r"30^\circ", "30", True),
    (r"30^{\circ}", "30 degrees", True),
    (r"50\%", "50", True),
    (r"\$18.50", "18.5", True),
    (r"10\text{ cm}", "10", True),
    (r"10 \mbox{ inches}^2", "10", True),
    ("4 square units", "4", True),
    (r"\text{Monday}", "monday", True),
    (r"\textbf{(C)}", "C", True),
    (r"\text{(B)}", "(C)", False),
    (r"\text{even}", "odd", False),
    # a leading variable
    ("x = 5", "5", True),
    ("k=-3", "-3", True),
    (r"\theta = \frac{\pi}{3}", r"\frac{\pi}{3}", True),
    ("y = 2x+3", "2x+3", True),
    ("x = 4", "5", False),
    # tuples, intervals, unions, sets, lists, matrices
    ("(3,4)", "(4,3)", False),
    ("[1,2)", "[1,2]", False),
    ("(1, 2)", "1, 2", False),
    (r"(0.5, \sqrt{4})", r"(\frac{1}{2}, \sqrt4)", True),
    (r"(-\infty, 3] \cup (5, \infty)", r"(-\infty,3]\cup(5,\infty)", True),
    (r"(-\infty, 3) \cup (5, \infty)", r"(-\infty,3]\cup(5,\infty)", False),
    ("3, 5", "5,3", True),
    (r"1 \text{ and } 2", "1, 2", True),
    ("x=1, y=2", "1, 2", True),
    ("1, 2", "1, 2, 3", False),
    (r"\{1,2\}", r"\{2, 1\}", True),
    (r"\begin{pmatrix} 0.5 \\ 2 \end{pmatrix}", r"\begin{pmatrix}\frac12\\2\end{pmatrix}", True),
    (r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", False),
]


@pytest.mark.parametrize(("answer", "reference", "same"), EQUIVALENCE)
def test_equivalence(answer, reference, same):
  assert math_grading.equivalent(answer, reference) is same
  assert math_grading.equivalent(reference, answer) is same


@pytest.mark.parametrize("answer", sorted({a for row in EQUIVALENCE for a in row[:2]}))
def test_normal_form_is_a_fixed_point(answer):
  once = math_grading.normalize(answer)
  assert math_grading.normalize(once) == once
  assert math_grading.equivalent(answer, answer)


def test_no_answer_is_never_equivalent():
  assert not math_grading.equivalent(None, "5")
  assert not math_grading.equivalent("", "")
  assert not math_grading.equivalent("5", None)


FINAL_ANSWERS = [
    (r"So the sum is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"$\boxed{\{1, 2\}}$", r"\{1, 2\}"),
    (r"$\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt{3}}{2}"),
    (r"so $\boxed 5$.", "5"),
    (r"First \boxed{3}, corrected: \fbox{4}", "4"),
    (r"First \fbox{3}, corrected: \boxed{4}", "4"),
    (r"Final Answer: The final answer is $\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
    ("The final answer is 3.5.", "3.5"),
    (r"The final answer is $\boxed{7}$.", "7"),
    (r"\boxed{\frac{1", None),  # cut off mid-box
    ("no stated answer", None),
]


@pytest.mark.parametrize(("text", "answer"), FINAL_ANSWERS)
def test_final_answer(text, answer):
  assert math_grading.final_answer(text) == answer


@pytest.mark.parametrize("text", [
    "2^{10^{10}}",  # would take long to build
    "((2^{1000})^{1000})^{1000}",
    "(10^{3})!",
    "__import__(os)",  # words are never evaluated
    r"\text{even}",
    r"x \pm 1",
    "1, 2",
    "(" * 400 + "1" + ")" * 400,
])
def test_latex_reader_refuses(text):
  assert latex_sympy.parse(text) is None


def test_latex_reader_values():
  assert latex_sympy.parse(r"-2\frac{1}{2}") == latex_sympy.parse("-5/2")
  assert latex_sympy.parse("2^10") == 1024
  assert latex_sympy.parse("5!") == 120
  assert latex_sympy.parse(r"\sin x + 2xy").free_symbols == {latex_sympy.sympy.Symbol(n) for n in "xy"}


def test_values_past_float_range_are_not_all_equal():
  assert not latex_sympy.same_value(r"\exp(\exp(\exp(10)))", "1")
  assert not latex_sympy.same_value(r"\exp(x^{1000})", "x")
  assert latex_sympy.same_value(r"\sqrt{2}^{1000}", "2^{500}")
