"""CoT verification rationales written by an LLM over the API and filtered by the known label (GenRM, arXiv
2408.15240, §4.1: "synthetic rationales" by reference-guided grading).

Where no step checker writes the rationales (GSM8K, MATH), the paper prompts a strong model with the problem,
the reference solution and a candidate, asks it to verify the candidate step by step and end on "Is the answer
correct (Yes/No)?", samples several rationales per candidate and keeps those whose verdict agrees with the
candidate's known correctness: a rationale that reaches the wrong verdict is not trained on.

Here any OpenAI-compatible endpoint writes them (`lwjax.judge.Judge.ask`, cached, retried, lwjax's own server
included). Each kept rationale becomes the CoT verifier's target in the same shape as a checker-written one:
its reasoning on one line, then the separator and the verdict word (`<reasoning> ; Yes`), so the verifier is
scored as before (p(Yes) after its last `;`). The reasoning is the answer up to its final question (or its last
line, when that line holds the verdict); a `;` inside it is written `,` so that the last `;` is the verdict's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lwjax import judge as judge_lib
from lwjax.projects.genrm import rationale

QUESTION_START = "Is the answer correct"
FINAL_QUESTION = f"{QUESTION_START} (Yes/No)?"
DEFAULT_PROMPT = (
    "You are a math teacher grading a student's solution against the reference solution.\n\n"
    "Problem:\n{question}\n\n"
    "Reference solution:\n{reference}\n\n"
    "Student's solution:\n{candidate}\n\n"
    "Let's verify the student's solution step by step: for each step, say whether it is correct and why, "
    "using the reference for guidance (the student may reason differently and still be right). End with the "
    f"line \"{FINAL_QUESTION} X\", where X is Yes or No.")


def split_verdict(text: str) -> tuple[str, bool | None]:
  """(the reasoning, the verdict) of a written rationale: the first yes/no after its last "Is the answer
  correct" (the question's own "(Yes/No)" skipped), or else the verdict of its last non-empty line; None when
  neither can be read (the rationale is then unusable)."""
  cut = text.lower().rfind(QUESTION_START.lower())
  if cut >= 0:
    tail = re.sub(r"\(\s*yes\s*/\s*no\s*\)", " ", text[cut + len(QUESTION_START):].lower())
    verdicts = [w for w in re.findall(r"[a-z]+", tail) if w in ("yes", "no")]
    return _one_line(text[:cut]), (verdicts[0] == "yes") if verdicts else None
  lines = [line for line in text.strip().splitlines() if line.strip()]
  if not lines:
    return "", None
  return _one_line("\n".join(lines[:-1])), judge_lib.parse_verdict(lines[-1])


def _one_line(text: str) -> str:
  """The reasoning on one line, each `;` written `,` (the last `;` of a target is the verdict's)."""
  return " ".join(text.replace(rationale.SEP, ",").split())


def target(body: str, verdict: bool) -> str:
  """The verifier's target: the reasoning, the separator, the verdict word (as `rationale.rationale` ends)."""
  return " ".join([*([body] if body else []), rationale.SEP, rationale.YES if verdict else rationale.NO])


def write(client: judge_lib.Judge, pairs: Sequence[tuple[dict, dict]], *, samples: int,
          temperature: float) -> tuple[list[list[str]], dict]:
  """For each (problem record, candidate): the targets of its written rationales whose verdict agrees with the
  candidate's label (`correct`), and the counts: asked, unread (no verdict), disagreeing, kept, and the
  candidates left with none. The reference shown is the record's `solution`."""
  prompts = [judge_lib.fill(client.prompt, record["question"], record["solution"], candidate["text"])
             for record, candidate in pairs]
  answers = client.ask(prompts, samples=samples, temperature=temperature) if prompts else []
  kept, unread, disagree = [], 0, 0
  for (_, candidate), texts in zip(pairs, answers, strict=True):
    mine = []
    for text in texts:
      body, verdict = split_verdict(text)
      if verdict is None:
        unread += 1
      elif verdict != bool(candidate["correct"]):
        disagree += 1
      else:
        mine.append(target(body, verdict))
    kept.append(mine)
  asked = samples * len(pairs)
  stats = {"asked": asked, "unread": unread, "disagree": disagree, "kept": sum(map(len, kept)),
           "agreement": (asked - unread - disagree) / (asked - unread) if asked > unread else float("nan"),
           "candidates": len(pairs), "candidates_without": sum(not k for k in kept)}
  return kept, stats
