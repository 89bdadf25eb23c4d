"""iGSM: synthetic grade-school math with exact op control, a step checker and retry data
(Physics of LMs Part 2.1, arXiv 2407.20311, Sec. 2; Part 2.2, arXiv 2408.16293, Results 2-8).

  problem = generate(op=12, seed=0, preset="med", fmt="pq", split="train")
  problem.question, problem.solution, problem.answer, problem.op   # text, text, int mod 23, == 12
  check(problem, problem.solution).correct                          # True
  write_retry_solution(problem, random.Random(0), retry_rate=0.2)   # text with "... as [BACK]." steps

Modules: `graph` (structure and dependency graphs, values, op counts), `generator` (drawing problems,
presets), `problem` (the `Problem` and its text), `compact` (the compact symbolic rendering, fmt="compact"),
`tokenizer` (exact tokenizers of both renderings), `solution` (the step writer), `retry` (retry data and
loss-mask spans), `checker` (`check` -> `Verdict`), `records` (Grain source, ArrayRecord files).
"""

from lwjax.data.igsm.checker import ERROR_KINDS, Verdict, check
from lwjax.data.igsm.generator import PRESETS, generate, sample_train_op
from lwjax.data.igsm.graph import MOD, Param, Rule, Structure
from lwjax.data.igsm.problem import FORMATS, Problem
from lwjax.data.igsm.records import IGSMSource, export_array_record, problem_of, read_array_record, write_array_record
from lwjax.data.igsm.retry import BACK, RetrySolution, loss_mask_segments, write_retry_solution, wrong_step_spans

__all__ = [
    "BACK", "ERROR_KINDS", "FORMATS", "IGSMSource", "MOD", "PRESETS", "Param", "Problem", "RetrySolution", "Rule",
    "Structure", "Verdict", "check", "export_array_record", "generate", "loss_mask_segments", "problem_of",
    "read_array_record", "sample_train_op", "write_array_record", "write_retry_solution", "wrong_step_spans",
]
