"""The verdict of an exact step checker on one solution, shared by every reasoning task's checker (iGSM,
`lwjax.data.igsm.checker`; GenRM's algorithmic tasks, `lwjax.data.algorithmic`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Verdict:
  """`first_error` indexes the solution's steps, retries removed (the number of steps when the error is in
  the ending: a missing step or the answer); `error_position` is its character offset in the text;
  `answer_correct` judges the final answer alone, whatever the steps."""
  correct: bool
  answer_correct: bool
  num_retries: int
  num_steps: int
  first_error: int | None = None
  error_position: int | None = None
  error_kind: str | None = None
  message: str = ""
