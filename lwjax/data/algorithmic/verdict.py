"""The verdict (`lwjax.data.verdict.Verdict`) on a solution to an algorithmic task, found step by step against
the correct steps (the exact checker behind GenRM's verification labels and rationales, arXiv 2408.15240,
Sec. 4 algorithmic tasks).

Each step is compared with the correct step of the same index. A step that differs is the first error: a
step that is a later correct step is `missing_step` (steps were skipped), an earlier one or one past the last
is `extra_step`, and any other goes to the task's judge (`parse_error`, `wrong_word`, ...). Then the ending:
too few steps (`missing_step`), a text that does not end with one `ans <answer> .` (`parse_error`), a wrong
answer (`wrong_answer`). The final answer (after the last `ans`) is judged on its own: `answer_correct`
holds whatever the steps are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lwjax.data.algorithmic import text
from lwjax.data.verdict import Verdict

# A task's diagnosis of a wrong step (index, tokens) that is no correct step: (error kind, message).
StepJudge = Callable[[int, list[str]], tuple[str, str]]


def check_steps(solution_text: str, reference: Sequence[str], answer: str, judge: StepJudge) -> Verdict:
  """Checks `solution_text` against the correct steps `reference` and answer text `answer` (the tokens
  between `ans` and `.`)."""
  parsed = text.parse(solution_text)
  answer_correct = parsed.answer == answer
  error = None
  for index, (start, step, ended) in enumerate(parsed.steps):
    if index < len(reference) and step == reference[index]:
      if not ended:
        error = (index, start, "parse_error", f"step {index} is not ended by {text.STEP_END!r}")
    elif step in reference and reference.index(step) > index:
      error = (index, start, "missing_step", f"step {index} is step {reference.index(step)}: steps were skipped")
    elif step in reference or index >= len(reference):
      error = (index, start, "extra_step", f"step {index} is not needed: {step!r}")
    else:
      error = (index, start, *judge(index, step.split()))
    if error is not None:
      break
  num_steps = len(parsed.steps)
  if error is None and num_steps < len(reference):
    error = (num_steps, parsed.ending_at, "missing_step", f"{num_steps} steps, expected {len(reference)}")
  if error is None and parsed.malformed_at is not None:
    error = (num_steps, parsed.malformed_at, "parse_error",
             f"the text does not end with one '{text.ANSWER} <answer> {text.END}'")
  if error is None and not answer_correct:
    error = (num_steps, parsed.ending_at, "wrong_answer", f"answer {parsed.answer!r}, expected {answer!r}")
  if error is None:
    return Verdict(True, True, 0, num_steps)
  return Verdict(False, answer_correct, 0, num_steps, *error)
