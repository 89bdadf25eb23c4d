"""The reasoning tasks behind one interface, generated ones with exact step checkers and published data sets with
final-answer graders (shared by GenRM, arXiv 2408.15240, and compute-matched sampling, arXiv 2408.16737).

- `igsm`: the compact iGSM of the CPU reasoning testbed (Physics of LMs 2.1/2.2): train split = training
  templates at the training ops; test = held-out templates at the same ops; hard = held-out templates at
  the ops beyond training.
- `last_letter`, `word_sort`: the GenRM paper's algorithmic tasks (`lwjax.data.algorithmic`): train and
  test on short lists, hard on longer lists than trained, as the paper tests length generalisation.
- `gsm8k`, `math`: the data sets as published (`lwjax.data.math_sets`, read from `path`), graded on the final
  answer (GSM8K's number; MATH's box, by the MATH equivalence). Train and test are the published splits; hard is
  MATH's level-5 test problems, and for GSM8K the test problems whose reference takes at least
  `GSM8K_HARD_STEPS` steps (lines), the long tail of its test set. They have no tokenizer of their own (a
  pretrained model's reads them) and no step checker: a solution's `correct` is its final answer's verdict, and
  `step_checker` is False so that the metrics that need reasoning checked step by step say they are not measured.

A task gives problem records (each with `question`, `solution` and `answer`), its exact tokenizer, the
step checker (`check(record, text) -> Verdict` with `correct`, `answer_correct`, `first_error`,
`error_kind`) and the final answer of a solution text (`answer(text)`, for majority voting). Records,
solutions and the checker work on text, so a pretrained model reads and writes the same problems through its
own tokenizer: `task.with_tokenizer(model_tokenizer)`.

A data set's prompt is its bare question, or with `fewshot` k > 0 the few-shot prompt a pretrained model is
sampled with (4 exemplars at the paper scale): GSM8K as `Question: ...\nAnswer: ...`, MATH in the Minerva style
`Problem:\n...\n\nSolution:\n...` (Lewkowycz et al. 2022, arXiv 2206.14858; the published solutions box their
answer). The exemplars are the first k problems of the set's own training files,
which the training split then leaves out. A sampled continuation goes on to invent the next problem;
`task.trim(text)` cuts it at the next `Question:` / `Problem:` (`lwjax.serving.batch_sampler` stops at eos only,
so those tokens are sampled, and counted, then dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

from lwjax.config import ConfigError
from lwjax.data import algorithmic, igsm, math_sets, tokenizer as tokenizer_lib
from lwjax.data.algorithmic.tokenizer import AlgorithmicTokenizer
from lwjax.data.igsm.tokenizer import CompactTokenizer
from lwjax.data.verdict import Verdict

SPLITS = ("train", "test", "hard")
GENERATED_NAMES = ("igsm", "last_letter", "word_sort")  # with an exact step checker and a tokenizer of their own
DATASET_NAMES = math_sets.NAMES  # gsm8k, math
TASK_NAMES = (*GENERATED_NAMES, *DATASET_NAMES)
ANSWER_WORD = "ans"  # compact iGSM and the algorithmic tasks end a solution with `ans <answer> .`
GSM8K_HARD_STEPS = 5  # GSM8K's hard split: test problems whose reference solution has at least this many lines
MATH_HARD_LEVEL = "Level 5"


@dataclasses.dataclass(frozen=True)
class FewShotFormat:
  """A few-shot prompt: each problem as `question` (with `{question}`), an exemplar's solution after `joiner`;
  problems separated by a blank line; `stop` starts the next problem."""
  question: str
  joiner: str
  stop: str


FEWSHOT_FORMATS = {"gsm8k": FewShotFormat("Question: {question}\nAnswer:", " ", "Question:"),
                   "math": FewShotFormat("Problem:\n{question}\n\nSolution:", "\n", "Problem:")}


def answer_word(text: str) -> str | None:
  """The final answer of a solution (`... ans <answer> .`), or None when it states none."""
  words = text.split()
  if ANSWER_WORD not in words:
    return None
  last = len(words) - 1 - words[::-1].index(ANSWER_WORD)
  body = words[last + 1:]
  if body and body[-1] == ".":
    body = body[:-1]
  return " ".join(body) or None


@dataclasses.dataclass(frozen=True)
class ReasoningTask:
  name: str
  tokenizer: Any
  make_records: Callable[[int, int, str], list[dict]]  # (num, seed, split) -> records
  check: Callable[[dict, str], Verdict]  # (record, solution text) -> the checker's verdict
  answer: Callable[[str], str | None] = answer_word  # solution text -> its final answer (for majority voting)
  step_checker: bool = True  # whether `check` judges every step, or (a data set) the final answer only
  exemplars: tuple[dict, ...] = ()  # the few-shot prompt's solved problems (none: the bare question)
  fewshot_format: FewShotFormat | None = None

  def records(self, num: int, *, seed: int, split: str) -> list[dict]:
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    return self.make_records(num, seed, split)

  def with_tokenizer(self, tokenizer) -> ReasoningTask:
    """The same task read and written through `tokenizer` (a pretrained model's) instead of its own word-level
    one. The checker compares texts word by word, so decoding must give back the very text encoded: a Hugging
    Face tokenizer's clean-up of spaces before punctuation (`ans 7 .` -> `ans 7.`) is turned off on a copy."""
    return dataclasses.replace(self, tokenizer=tokenizer_lib.exact_text(tokenizer))

  def prompt(self, record: dict) -> str:
    """What a solver reads: the question, after the exemplars' solved problems when few-shot."""
    f = self.fewshot_format
    if f is None:
      return record["question"]
    shots = [f.question.format(question=e["question"]) + f.joiner + e["solution"] for e in self.exemplars]
    return "\n\n".join([*shots, f.question.format(question=record["question"])])

  def trim(self, text: str) -> str:
    """A sampled solution cut where a few-shot continuation starts the next problem."""
    if self.fewshot_format is None:
      return text
    return text.split(self.fewshot_format.stop, 1)[0].strip()

  def zero_shot(self) -> ReasoningTask:
    """The same task prompted with the bare question (what a model finetuned on its problems reads)."""
    return dataclasses.replace(self, exemplars=(), fewshot_format=None)


def _igsm_task(preset: str, train_ops: Sequence[int], hard_ops: Sequence[int]) -> ReasoningTask:
  ops = {"train": tuple(train_ops), "test": tuple(train_ops), "hard": tuple(hard_ops)}

  def make_records(num: int, seed: int, split: str) -> list[dict]:
    source = igsm.IGSMSource(num, seed=seed, preset=preset, fmt="compact",
                             split="train" if split == "train" else "test", ops=ops[split])
    return [source[i] for i in range(num)]

  return ReasoningTask("igsm", CompactTokenizer(), make_records,
                       lambda record, text: igsm.check(igsm.problem_of(record), text))


def _algorithmic_task(name: str, train_words: Sequence[int], hard_words: Sequence[int]) -> ReasoningTask:
  module = algorithmic.TASKS[name]
  lengths = {"train": tuple(train_words), "test": tuple(train_words), "hard": tuple(hard_words)}
  # Test problems come from a seed stream of their own, so they are new instances of the training lengths.
  offsets = {"train": 0, "test": 1_000_003, "hard": 2_000_003}

  def make_records(num: int, seed: int, split: str) -> list[dict]:
    return module.generate(num, seed=seed + offsets[split], num_words=lengths[split])

  return ReasoningTask(name, AlgorithmicTokenizer(), make_records, module.check)


def _is_hard(name: str, record: dict) -> bool:
  if name == "math":
    return str(record.get("level")) in (MATH_HARD_LEVEL, "5")
  return len([line for line in record["solution"].split("####")[0].splitlines() if line.strip()]) >= GSM8K_HARD_STEPS


def check_path(name: str, path: str) -> None:
  """A data set is read from its published files: a ConfigError naming `task.path` when it is empty."""
  if name in DATASET_NAMES and not path:
    raise ConfigError("task.path", f"empty: {name} is read from its published files",
                      f"the directory (or file) holding them, e.g. /data/{name}")


def _dataset_task(name: str, path: str, fewshot: int) -> ReasoningTask:
  check_path(name, path)
  splits: dict[str, list[dict]] = {}

  def split_records(split: str) -> list[dict]:
    if split not in splits:
      rows = math_sets.load(name, path, "train" if split == "train" else "test")
      splits[split] = [r for r in rows if _is_hard(name, r)] if split == "hard" else rows
    return splits[split]

  def make_records(num: int, seed: int, split: str) -> list[dict]:
    """`num` problems of the split, drawn without replacement by `seed` (the same `seed`, the same problems)."""
    rows = split_records(split)
    if num > len(rows):
      raise ValueError(f"{name} {split}: {num} problems asked, the split under {path} has {len(rows)} (valid: at "
                       f"most {len(rows)})")
    return [rows[i] for i in random.Random(seed).sample(range(len(rows)), num)]

  def check(record: dict, text: str) -> Verdict:
    right = math_sets.is_correct(name, record, text)
    return Verdict(correct=right, answer_correct=right, num_retries=0, num_steps=0,
                   first_error=None if right else 0, error_kind=None if right else "answer")

  exemplars = ()
  if fewshot:
    train = math_sets.load(name, path, "train")
    if len(train) <= fewshot:
      raise ConfigError("task.fewshot", f"{fewshot} exemplars asked, the training split under {path} has "
                        f"{len(train)} problems", f"fewer than {len(train)}")
    exemplars, splits["train"] = tuple(train[:fewshot]), train[fewshot:]  # the exemplars are no training problem
  return ReasoningTask(name, None, make_records, check, answer=functools.partial(math_sets.answer_of, name),
                       step_checker=False, exemplars=exemplars,
                       fewshot_format=FEWSHOT_FORMATS[name] if fewshot else None)


def check_fewshot(name: str, fewshot: int) -> None:
  """Few-shot prompts are the data sets' (a pretrained model's); the generated tasks' solvers are trained on
  their bare questions, in a closed vocabulary."""
  if fewshot < 0 or (fewshot and name not in DATASET_NAMES):
    raise ConfigError("task.fewshot", f"{fewshot} for {name}",
                      f"0 (the bare question){'; or k >= 1 exemplars' if name in DATASET_NAMES else ''}")


def get(name: str, *, preset: str = "small", train_ops: Sequence[int] = (1, 2, 3), hard_ops: Sequence[int] = (4, 5),
        train_words: Sequence[int] = algorithmic.TRAIN_NUM_WORDS,
        hard_words: Sequence[int] = algorithmic.TEST_NUM_WORDS, path: str = "", fewshot: int = 0) -> ReasoningTask:
  """The task `name` (one of TASK_NAMES); iGSM takes the preset and ops, the algorithmic tasks list lengths, the
  data sets the `path` of their files and the number of few-shot exemplars (0: the bare question)."""
  check_fewshot(name, fewshot)
  if name == "igsm":
    return _igsm_task(preset, train_ops, hard_ops)
  if name in ("last_letter", "word_sort"):
    return _algorithmic_task(name, train_words, hard_words)
  if name in DATASET_NAMES:
    return _dataset_task(name, path, fewshot)
  raise ValueError(f"task={name!r}: expected one of {TASK_NAMES}")
