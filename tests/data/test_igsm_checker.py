"""iGSM checker and retry data: generated solutions pass, each kind of planted error is caught, retries strip."""

import dataclasses
import random
import re

import pytest

from lwjax.data import igsm
from lwjax.data.igsm import compact, graph
from lwjax.data.igsm.solution import join_sentences, sentences, solution_steps


@pytest.mark.parametrize("preset", ["med", "hard", "small"])
@pytest.mark.parametrize("fmt", ["pq", "qp", "compact"])
def test_accepts_every_generated_solution_and_its_retry_variants(preset, fmt):
  top = {"med": 23, "hard": 21, "small": 5}[preset]
  for op in range(1, top + 1):
    for seed in range(2):
      problem = igsm.generate(op=op, seed=seed, preset=preset, fmt=fmt, split=("train", "test")[seed])
      verdict = igsm.check(problem, problem.solution)
      assert verdict == igsm.Verdict(True, True, 0, len(problem.solution_order)), (op, seed, verdict)
      for weak in (False, True):
        retry = igsm.write_retry_solution(problem, random.Random(op), retry_rate=0.3, retry_weak=weak)
        verdict = igsm.check(problem, retry.text)
        assert verdict.correct and verdict.num_retries == retry.num_retries == retry.text.count(igsm.BACK)


def _problem():
  """A problem with room for every planted error: a parameter the question does not need among others."""
  return next(p for seed in range(100) if set((p := igsm.generate(op=8, seed=seed)).structure.params) - p.necessary)


def _planted(problem):
  """(kind, index of the first wrong step, solution text) for each planted error."""
  s, steps = problem.structure, solution_steps(problem)
  texts = [text for _, text in steps]
  params = [p for p, _ in steps]
  free = problem.symbols[-1]  # a letter the solution does not use
  assert problem.num_symbols < len(problem.symbols)
  symbol = [re.match(r"Define .+ as ([A-Za-z]+);", t).group(1) for t in texts]
  first = f"Define {s.name(params[0])} as {free}; so {free} = {problem.values[params[0]]}"
  binary = next(i for i, t in enumerate(texts) if re.search(r"so \w+ = \S+ [-+*] \S+ = ", t))
  head, final = texts[binary].rsplit("; so ", 1)
  lhs, names, numbers, result = final.split(" = ")
  left, op, right = numbers.split(" ")
  other = {"+": "*", "*": "+", "-": "+"}[op]
  swapped = {"+": int(left) + int(right), "*": int(left) * int(right)}[other] % graph.MOD
  with_deps = next(i for i, p in enumerate(params) if graph.dependencies(p, s, problem.rules))
  unneeded = next(p for p in s.params if p not in problem.necessary)
  constant = next(i for i, p in enumerate(params) if p.kind == "inst" and not problem.rules[p].deps)

  def replace(index, text):
    return join_sentences(texts[:index] + [text] + texts[index + 1:], problem.answer)

  def insert(index, text):
    return join_sentences(texts[:index] + [text] + texts[index:], problem.answer)

  bogus = f"{s.items[0][0]}'s {s.items[0][1]}"  # two items of one layer: no such parameter
  const_value = problem.rules[params[constant]].const
  return [
      ("parse_error", 0, replace(0, texts[0].replace("; so ", "; thus "))),
      ("parse_error", len(texts), join_sentences(texts, problem.answer) + " Define it."),
      ("unknown_parameter", 0, insert(0, f"Define {bogus} as {free}; so {free} = 3")),
      ("redefined_parameter", 1, insert(1, first)),
      ("unnecessary_parameter", 0, insert(0, f"Define {s.name(unneeded)} as {free}; so {free} = 1")),
      ("dependency_not_ready", 0, insert(0, texts[with_deps])),
      ("reused_symbol", 1, replace(1, texts[1].replace(f" as {symbol[1]};", f" as {symbol[0]};", 1))),
      ("undefined_symbol", with_deps,
       replace(with_deps, f"Define {s.name(params[with_deps])} as {symbol[with_deps]}; "
                          f"so {symbol[with_deps]} = {free} = {problem.values[params[with_deps]]}")),
      ("wrong_arithmetic", binary, replace(binary, f"{head}; so {lhs} = {names} = {numbers} = "
                                                   f"{(int(result) + 1) % graph.MOD}")),
      ("wrong_arithmetic", binary, replace(binary, f"{head}; so {lhs} = {names} = {(int(left) + 1) % graph.MOD} "
                                                   f"{op} {right} = {result}")),
      ("wrong_formula", constant, replace(constant, texts[constant].replace(
          f"= {const_value}", f"= {(const_value + 1) % graph.MOD}"))),
      ("wrong_formula", binary, replace(binary, f"{head}; so {lhs} = {names.replace(f' {op} ', f' {other} ')} = "
                                                f"{left} {other} {right} = {swapped}")),
      ("incomplete", len(texts) - 1, join_sentences(texts[:-1], problem.answer)),
      ("wrong_answer", len(texts), join_sentences(texts, (problem.answer + 1) % graph.MOD)),
      ("wrong_answer", len(texts), ". ".join(texts) + "."),
  ]


def test_rejects_each_planted_error_with_its_kind():
  problem = _problem()
  planted = _planted(problem)
  assert {kind for kind, _, _ in planted} == set(igsm.ERROR_KINDS)
  for kind, index, text in planted:
    verdict = igsm.check(problem, text)
    assert not verdict.correct
    assert (verdict.error_kind, verdict.first_error) == (kind, index), (kind, verdict, text)
    at = verdict.error_position
    assert at == len(text) or text[at:].startswith(("Define", "Answer")), (kind, text[at:at + 30])
    assert verdict.answer_correct == (kind != "wrong_answer")


def test_errors_are_found_after_retries_are_stripped():
  problem = _problem()
  steps = [text for _, text in solution_steps(problem)]
  wrong = steps[1].replace("; so ", "; thus ")
  text = join_sentences([steps[0], "Define anything as x; so x = 1 [BACK]", wrong, *steps[2:]], problem.answer)
  verdict = igsm.check(problem, text)
  assert (verdict.error_kind, verdict.first_error, verdict.num_retries) == ("parse_error", 1, 1)
  assert text[verdict.error_position:].startswith(wrong)


def _wrong_steps(problem, text):
  """(wrong parameter, parameters of the right steps before it, parameters of the right steps after it)."""
  by_name = {problem.structure.name(p): p for p in problem.structure.params}
  found = [(start, sentence) for start, sentence in sentences(text) if sentence.startswith("Define ")]
  right = [by_name[re.match(r"Define (.+) as ", t).group(1)] for _, t in found if igsm.BACK not in t]
  result, done = [], 0
  for _, sentence in found:
    name = re.match(r"Define (.+) as ", sentence).group(1)
    if igsm.BACK in sentence:
      assert sentence == f"Define {name} as {igsm.BACK}"
      result.append((by_name[name], set(right[:done]), right[done:]))
    else:
      done += 1
  return result


def test_retry_steps_are_not_ready_or_later_parameters():
  for op in (4, 9, 15):
    problem = igsm.generate(op=op, seed=op)
    s = problem.structure
    strong = igsm.write_retry_solution(problem, random.Random(0), retry_rate=1.0)
    for wrong, done, _ in _wrong_steps(problem, strong.text):
      assert wrong not in done and not set(graph.dependencies(wrong, s, problem.rules)) <= done
    weak = igsm.write_retry_solution(problem, random.Random(0), retry_rate=1.0, retry_weak=True)
    assert weak.num_retries == len(problem.solution_order) - 1  # every step but the last has later ones
    for wrong, _, later in _wrong_steps(problem, weak.text):
      assert wrong in later[1:]
  problem = igsm.generate(op=6, seed=1)
  assert igsm.write_retry_solution(problem, random.Random(0), retry_rate=0.0).text == problem.solution
  rates = [igsm.write_retry_solution(problem, random.Random(seed), 0.5, True).num_retries for seed in range(200)]
  assert 0.4 < sum(rates) / (200 * (len(problem.solution_order) - 1)) < 0.6
  with pytest.raises(ValueError, match="retry_rate"):
    igsm.write_retry_solution(problem, random.Random(0), retry_rate=1.5)


def test_loss_mask_covers_exactly_the_wrong_steps():
  problem = igsm.generate(op=10, seed=3)
  retry = igsm.write_retry_solution(problem, random.Random(1), retry_rate=0.5)
  assert retry.num_retries > 0
  segments = igsm.loss_mask_segments(retry.text)
  assert "".join(piece for piece, _ in segments) == retry.text
  spans = igsm.wrong_step_spans(retry.text)
  masked = [piece for piece, trained in segments if not trained]
  assert list(retry.masked_spans) == spans and masked == [retry.text[a:b] for a, b in spans]
  assert all(re.fullmatch(r"Define .+ as", piece) for piece in masked) and len(masked) == retry.num_retries
  trained = "".join(piece for piece, trained in segments if trained)
  assert trained.count(igsm.BACK) == retry.num_retries
  # What stays trained, once the markers are dropped, is the correct solution.
  assert re.sub(r" \[BACK\]\. ", "", trained) == problem.solution
  assert igsm.loss_mask_segments(problem.solution) == [(problem.solution, True)]


def test_compact_form_checks_each_planted_error_as_the_english_form():
  english = _problem()
  problem = dataclasses.replace(english, fmt="compact")
  assert compact.to_compact(problem, english.solution) == problem.solution
  for kind, _index, text in _planted(english):
    compact_text = compact.to_compact(problem, text)
    if kind != "parse_error":  # off the step grammar ("thus"), the translation need not return the same text
      assert compact.to_english(problem, compact_text)[0] == text, kind
    want, got = igsm.check(english, text), igsm.check(problem, compact_text)
    assert (got.correct, got.answer_correct, got.error_kind, got.first_error, got.num_steps) == (
        want.correct, want.answer_correct, want.error_kind, want.first_error, want.num_steps), (kind, compact_text)
    at = got.error_position
    # At the start of the wrong sentence, as in the English text (or at the end of the text).
    sentence = len(compact_text[:at].split(" . ")) - 1 if at < len(compact_text) else None
    english_sentence = len(text[:want.error_position].split(". ")) - 1 if want.error_position < len(text) else None
    assert sentence == english_sentence and (at in (0, len(compact_text)) or compact_text[at - 2:at] == ". "), kind
