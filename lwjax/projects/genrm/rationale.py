"""Verification prompts and checker-written rationales (GenRM, arXiv 2408.15240, §3: direct and CoT verifiers).

A verification sequence is the solver's prompt and a candidate solution followed by a cue:
- direct: `<question> <solution> verify ?` -> `Yes` | `No` (the paper's "Is the answer correct (Yes/No)?");
- CoT: `<question> <solution> verify step` -> a rationale, then `Yes` | `No` ("Let's verify step by step.").

The paper's rationales are written by a strong LLM guided by the reference solution; here the step checker
writes them, exactly: for each candidate step, in order, the reference's version of that step and `ok`, up
to the first wrong step, which gets `wrong`; a solution whose steps are all right gets its answer checked
the same way. The verdict word ends it:

  iGSM:         A1B2 = 7 ok ; A1C = 14 wrong ; No        (each step: the parameter it defines and its value)
  last letter:  k a v o -> o ok ; m i p e -> e ok ; ans o e ok ; Yes
  word sort:    pick k a v o rest m i p e ok ; pick m i p e rest none ok ; ans k a v o | m i p e ok ; Yes

so verifying means redoing each step and comparing, and the rationale names the first wrong step.
"""

from __future__ import annotations

from lwjax.data import igsm
from lwjax.data.algorithmic import TASKS as ALGORITHMIC, text as algorithmic_text
from lwjax.data.igsm import compact

VERIFY, DIRECT_CUE, COT_CUE = "verify", "?", "step"
YES, NO, OK, WRONG, SEP = "Yes", "No", "ok", "wrong", ";"
UNKNOWN_STEP = "step"  # stands for the reference of a step that defines nothing the problem has


def direct_prompt(question: str, solution: str) -> str:
  return f"{question} {solution} {VERIFY} {DIRECT_CUE}"


def cot_prompt(question: str, solution: str) -> str:
  return f"{question} {solution} {VERIFY} {COT_CUE}"


def _igsm_references(record: dict, solution: str) -> tuple[list[str], str]:
  """(the reference of each non-retry step of `solution`, the reference answer), compact iGSM."""
  problem = igsm.problem_of(record)
  values = {compact.param_token(p): v for p, v in problem.values.items()}
  references = []
  for sentence in (solution + " ").split(" . "):  # a last step without its "." is kept as well
    words = sentence.split()
    if words and words[0] != compact.ANSWER and igsm.BACK not in words:
      references.append(f"{words[0]} = {values[words[0]]}" if words[0] in values else UNKNOWN_STEP)
  return references, f"{compact.ANSWER} {problem.answer}"


def _algorithmic_references(task: str, record: dict, solution: str) -> tuple[list[str], str]:
  module = ALGORITHMIC[task]
  reference = module.reference_steps(record)
  num_steps = len(algorithmic_text.steps(solution))
  # A candidate step past the reference's last one (an extra step) is judged against the answer.
  answer = f"{algorithmic_text.ANSWER} {algorithmic_text.parse(record['solution']).answer}"
  return [reference[j] if j < len(reference) else answer for j in range(num_steps)], answer


def rationale(task: str, record: dict, solution: str, correct: bool, first_error: int | None) -> str:
  """The checker-written verification of `solution`, given the checker's verdict on it (`correct`, and the
  index of the first wrong step); ends in `Yes` exactly when the whole solution is correct."""
  if task == "igsm":
    references, answer = _igsm_references(record, solution)
  else:
    references, answer = _algorithmic_references(task, record, solution)
  parts = []
  first_error = None if correct else first_error
  for j, reference in enumerate(references):
    if first_error is not None and j == first_error:
      return " ".join([*parts, reference, WRONG, SEP, NO])
    parts += [reference, OK, SEP]
  if first_error is not None:  # the error is in the ending: a missing step or the answer
    return " ".join([*parts, answer, WRONG, SEP, NO])
  return " ".join([*parts, answer, OK, SEP, YES])
