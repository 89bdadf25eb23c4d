"""The compact iGSM rendering: the same problems, statements that evaluate to the generator's values, an exact
tokenizer over a closed word list, shorter texts than the English form, retry data and loss masks."""

import random
import re

import numpy as np
import pytest

from lwjax.data import igsm
from lwjax.data.igsm import compact
from lwjax.data.igsm.graph import MOD
from lwjax.data.igsm.tokenizer import CompactTokenizer, IGSMTokenizer, for_format
from lwjax.projects.retry import data as data_lib


def _pairs(preset, ops, seeds):
  for op in ops:
    for seed in seeds:
      yield (igsm.generate(op=op, seed=seed, preset=preset, split="train"),
             igsm.generate(op=op, seed=seed, preset=preset, split="train", fmt="compact"))


@pytest.mark.parametrize("preset", ["small", "med"])
def test_same_problem_and_solution_as_the_english_form(preset):
  for english, problem in _pairs(preset, (1, 3, 5, 9) if preset == "med" else (1, 2, 3, 4, 5), range(4)):
    assert problem.to_json() | {"fmt": "pq"} == english.to_json()
    assert problem.template == english.template and problem.answer == english.answer
    assert compact.to_english(problem, problem.solution)[0] == english.solution
    assert compact.to_compact(problem, english.solution) == problem.solution
    assert problem.question == f"{problem.statement} ? {compact.param_token(problem.query)}"


def test_statement_sentences_evaluate_to_the_generators_values():
  """Each `P = ...` sentence, read as arithmetic mod 23 over the other parameters' values, gives P's value."""
  for _, problem in _pairs("small", (1, 2, 3, 4, 5), range(10)):
    values = {compact.param_token(p): v for p, v in problem.values.items()}
    sentences = problem.statement.split(" . ")
    assert len(sentences) == problem.ip and problem.statement.endswith(" .")
    for sentence in sentences:
      lhs, rhs = sentence.rstrip(" .").split(" = ")
      expression = " ".join(str(values[w]) if w in values else w for w in rhs.split())
      assert eval(expression) % MOD == values[lhs], sentence  # noqa: S307 (digits, + - * and parentheses)


def test_tokenizer_is_exact_over_a_closed_word_list():
  tok = for_format("compact")
  assert isinstance(tok, CompactTokenizer) and isinstance(for_format("pq"), IGSMTokenizer)
  # 162 solver words (ids fixed: the trained solvers use them), then the GenRM verification words.
  assert tok.vocab_size == 4 + len(compact.vocabulary()) == 168 and tok.encode("verify Yes No") == [162, 163, 164]
  assert len(set(compact.vocabulary())) == len(compact.vocabulary())
  source = igsm.IGSMSource(40, seed=3, preset="small", fmt="compact", ops=range(1, 6), retry_rate=0.5)
  for i in range(len(source)):
    text = source[i]["question"] + " " + source[i]["solution"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and min(ids) >= 4 and len(ids) == len(text.split())
    ids, ends = tok.encode_with_ends(" " + text)
    assert [(" " + text)[:end].split()[-1] for end in ends] == text.split()
  assert tok.decode([tok.bos_id, *tok.encode("A0B1 = 3 ."), tok.eos_id, 9999]) == "A0B1 = 3 ."
  with pytest.raises(ValueError, match="'Define' is not a word of the compact iGSM vocabulary"):
    tok.encode("A0B1 Define")
  with pytest.raises(ValueError, match="fmt"):
    for_format("latex")


def test_parameter_tokens_cover_every_structure_the_generator_draws():
  tokens = set(compact.param_tokens())
  for preset in ("small", "med", "hard"):
    for op in (1, 4, 12):
      problem = igsm.generate(op=op, seed=op, preset=preset)
      assert {compact.param_token(p) for p in problem.structure.params} <= tokens
      assert len({compact.param_token(p) for p in problem.structure.params}) == len(problem.structure.params)


def test_texts_are_shorter_than_the_english_form():
  """Measured at ops 1-5 of the small preset: questions ~2.7x fewer tokens, whole problems ~2x."""
  compact_tok, english_tok = CompactTokenizer(), IGSMTokenizer()
  for op in (1, 3, 5):
    pairs = list(_pairs("small", (op,), range(30)))
    q = [len(english_tok.encode(e.question)) / len(compact_tok.encode(c.question)) for e, c in pairs]
    whole = [len(english_tok.encode(e.question + " " + e.solution))
             / len(compact_tok.encode(c.question + " " + c.solution)) for e, c in pairs]
    assert np.mean(q) > 2.5 and np.mean(whole) > 1.7, (op, np.mean(q), np.mean(whole))


def test_retry_data_and_loss_masks_in_the_compact_form():
  tok = CompactTokenizer()
  problem = igsm.generate(op=5, seed=2, preset="small", fmt="compact")
  retry = igsm.write_retry_solution(problem, random.Random(0), retry_rate=1.0)
  assert retry.num_retries > 0 and igsm.check(problem, retry.text).correct
  wrong = [retry.text[a:b] for a, b in retry.masked_spans]
  assert all(w in compact.param_tokens() for w in wrong)
  assert re.sub(r" \S+ \[BACK\] \.", "", " " + retry.text).strip() == problem.solution
  record = igsm.IGSMSource(1, seed=0, preset="small", fmt="compact", ops=(4,), retry_rate=1.0)[0]
  masked = data_lib.encode_example(record, tok, 256, mask_retries=True)
  plain = data_lib.encode_example(record, tok, 256, mask_retries=False)
  assert tok.decode(plain["targets"][plain["loss_mask"] > 0]) == record["solution"]
  kept = tok.decode(masked["targets"][masked["loss_mask"] > 0]).split()
  assert len(record["solution"].split()) - len(kept) == record["num_retries"] and kept.count("[BACK]") == record[
      "num_retries"]
