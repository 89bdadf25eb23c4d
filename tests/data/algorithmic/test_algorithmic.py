"""The algorithmic tasks of GenRM: generated solutions check correct, planted errors are found at their step
with their kind, the tokenizer is exact, generation is deterministic, the word list is fixed."""

import hashlib
import re

import pytest

from lwjax.data import algorithmic, verifier_words
from lwjax.data.algorithmic import last_letter, text, word_sort
from lwjax.data.algorithmic.tokenizer import AlgorithmicTokenizer
from lwjax.data.algorithmic.words import vocabulary

TASKS = sorted(algorithmic.TASKS.items())


def _offset(steps, k):
  """Character offset of step k (of the ending when k == len(steps)) in `text.solution(steps, ...)`."""
  return sum(len(step) + len(" ; ") for step in steps[:k])


def _record(module, n, seed=0):
  return module.generate(1, seed=seed, num_words=(n,))[0]


def _answer_text(record):
  return record["solution"].rsplit(f" {text.ANSWER} ", 1)[1][:-len(f" {text.END}")]


def _assert_verdict(module, record, solution, first_error, kind, answer_correct, position):
  verdict = module.check(record, solution)
  assert (verdict.first_error, verdict.error_kind, verdict.answer_correct, verdict.error_position) == (
      first_error, kind, answer_correct, position), (solution, verdict)
  assert not verdict.correct and verdict.error_kind in module.ERROR_KINDS and verdict.num_retries == 0
  assert verdict.message


@pytest.mark.parametrize("name,module", TASKS)
def test_generated_solutions_check_correct(name, module):
  vocab = set(vocabulary())
  for n in range(1, 9):
    for record in module.generate(15, seed=n, num_words=(n,)):
      words = record["words"]
      assert record["task"] == name and record["num_words"] == len(words) == n
      assert len(set(words)) == n and set(words) <= vocab
      assert text.words_of(record["question"].split()[2:-1]) == words
      verdict = module.check(record, record["solution"])
      assert verdict.correct and verdict.answer_correct and verdict.num_steps == n and verdict.first_error is None
      assert module.steps(record["solution"]) == module.reference_steps(record)
      expected = "".join(w[-1] for w in words) if name == "last_letter" else " ".join(sorted(words))
      assert record["answer"] == expected
      assert _answer_text(record).replace(" ", "").replace("|", " ") == expected


def test_text_formats():
  record = {"words": ["mipe", "kavo", "tur", "kav"]}
  assert last_letter.reference_steps(record) == ["m i p e -> e", "k a v o -> o", "t u r -> r", "k a v -> v"]
  assert word_sort.reference_steps(record) == [
      "pick k a v rest m i p e | k a v o | t u r", "pick k a v o rest m i p e | t u r", "pick m i p e rest t u r",
      "pick t u r rest none"]
  assert text.question("sort", record["words"]) == "sort : m i p e | k a v o | t u r | k a v ?"
  assert text.steps(" a -> a ;  b  -> b ; ans a b .") == ["a -> a", "b -> b"]


def test_planted_errors_last_letter():
  record = _record(last_letter, 5)
  words, ref, answer, n = record["words"], last_letter.reference_steps(record), _answer_text(record), 5
  other = next(w for w in vocabulary() if w not in words)
  seen = set()

  def expect(steps, first_error, kind, answer_correct=True, ans=answer):
    seen.add(kind)
    _assert_verdict(last_letter, record, text.solution(steps, ans), first_error, kind, answer_correct,
                    _offset(steps, first_error))

  for k in range(n):
    wrong_letter = ref[k][:-1] + ("a" if ref[k][-1] != "a" else "b")
    expect(ref[:k] + [wrong_letter] + ref[k + 1:], k, "wrong_letter")
    expect(ref[:k] + [f"{text.spell(other)} -> {words[k][-1]}"] + ref[k + 1:], k, "wrong_word")
    expect(ref[:k] + [f"{text.spell(words[k])} {words[k][-1]}"] + ref[k + 1:], k, "parse_error")
    expect(ref[:k] + ref[k + 1:], k, "missing_step")  # k == n - 1: no step is wrong, the last one is missing
    expect(ref[:k + 1] + [ref[k]] + ref[k + 1:], k + 1, "extra_step")
  expect(ref + [f"{text.spell(other)} -> {other[-1]}"], n, "extra_step")
  expect(ref, n, "wrong_answer", answer_correct=False, ans=answer[:-1] + ("a" if answer[-1] != "a" else "b"))
  expect(ref[:2] + [ref[3], ref[2]] + ref[4:], 2, "missing_step")  # swapped steps: step 2 is a later one
  assert seen == set(last_letter.ERROR_KINDS)


def test_planted_errors_word_sort():
  record = _record(word_sort, 5)
  words, ref, answer, n = record["words"], word_sort.reference_steps(record), _answer_text(record), 5
  order = sorted(words)
  seen = set()

  def expect(steps, first_error, kind, answer_correct=True, ans=answer):
    seen.add(kind)
    _assert_verdict(word_sort, record, text.solution(steps, ans), first_error, kind, answer_correct,
                    _offset(steps, first_error))

  def step(picked, rest):
    return f"pick {text.spell(picked)} rest {text.spell_list(rest) if rest else 'none'}"

  for k in range(n):
    remaining = [w for w in words if w not in order[:k]]
    rest = [w for w in remaining if w != order[k]]
    if k < n - 1:
      second = order[k + 1]
      expect(ref[:k] + [step(second, [w for w in remaining if w != second])] + ref[k + 1:], k, "not_smallest")
      if len(rest) > 1:
        expect(ref[:k] + [step(order[k], rest[::-1])] + ref[k + 1:], k, "wrong_rest")
      expect(ref[:k] + [step(order[k], rest[1:])] + ref[k + 1:], k, "wrong_rest")
    else:
      expect(ref[:k] + [step(order[k], [order[0]])] + ref[k + 1:], k, "wrong_rest")
    misspelled = next(order[k][:-1] + c for c in "aeiou" if order[k][:-1] + c not in words)
    expect(ref[:k] + [step(misspelled, rest)] + ref[k + 1:], k, "wrong_word")
    expect(ref[:k] + [ref[k].replace(" rest ", " ")] + ref[k + 1:], k, "parse_error")
    expect(ref[:k] + ref[k + 1:], k, "missing_step")
    expect(ref[:k + 1] + [ref[k]] + ref[k + 1:], k + 1, "extra_step")
  expect(ref + ["pick k a rest none"], n, "extra_step")
  wrong_answer = text.spell_list(order[1:] + order[:1])
  expect(ref, n, "wrong_answer", answer_correct=False, ans=wrong_answer)
  expect(ref[:1] + [step(order[2], [w for w in words if w not in order[:3]])] + ref[2:], 1, "missing_step")
  expect(ref[:2] + [step(order[3], [w for w in words if w not in order[:2] and w != order[3]])] + ref[3:], 2,
         "not_smallest", answer_correct=False, ans=wrong_answer)
  assert seen == set(word_sort.ERROR_KINDS)


@pytest.mark.parametrize("name,module", TASKS)
def test_malformed_text(name, module):
  record = _record(module, 3)
  solution, ref = record["solution"], module.reference_steps(record)
  ending = _offset(ref, 3)
  for garbage in ("hello world", "? ? ans", ";", "Yes No", "ans"):
    _assert_verdict(module, record, garbage, 0, "parse_error" if garbage != "ans" else "missing_step", False, 0)
  _assert_verdict(module, record, "", 0, "missing_step", False, 0)
  # The final `ans ... .` is the answer; a text ending otherwise is a parse error at the ending.
  _assert_verdict(module, record, solution + " ans", 3, "parse_error", False, len(solution) + 1)
  _assert_verdict(module, record, solution + " ans z z .", 3, "parse_error", False, len(solution) + 1)
  _assert_verdict(module, record, solution + " ; z", 3, "parse_error", True, len(solution) + 1)
  _assert_verdict(module, record, f"{solution[:ending]}ans z z . {solution[ending:]}", 3, "parse_error", True,
                  ending + len("ans z z . "))
  _assert_verdict(module, record, f"{solution[:ending]}ans {solution[ending:]}", 3, "parse_error", True,
                  ending + len("ans "))
  _assert_verdict(module, record, solution[:ending].rstrip(), 3, "parse_error", False, ending - 1)
  _assert_verdict(module, record, solution[:ending - 3], 2, "parse_error", False, _offset(ref, 2))
  _assert_verdict(module, record, solution[:-2], 3, "parse_error", False, ending)
  _assert_verdict(module, record, solution.replace(" ; ", " ; ; ", 1), 1, "parse_error", True, _offset(ref, 1))


@pytest.mark.parametrize("name,module", TASKS)
def test_generation_is_deterministic_by_seed(name, module):
  records = module.generate(30, seed=3, num_words=algorithmic.TRAIN_NUM_WORDS)
  assert records == module.generate(30, seed=3, num_words=algorithmic.TRAIN_NUM_WORDS)
  assert records[:10] == module.generate(10, seed=3, num_words=algorithmic.TRAIN_NUM_WORDS)
  assert records != module.generate(30, seed=4, num_words=algorithmic.TRAIN_NUM_WORDS)
  assert {r["num_words"] for r in records} == set(algorithmic.TRAIN_NUM_WORDS)
  assert {r["num_words"] for r in module.generate(30, seed=3, num_words=algorithmic.TEST_NUM_WORDS)} == {5, 6}
  with pytest.raises(ValueError, match="num_words"):
    module.generate(1, seed=0, num_words=(0,))


def test_tokenizer_round_trip():
  tokenizer = AlgorithmicTokenizer()
  assert tokenizer.vocab_size < 64 and len(set(tokenizer.pieces)) == len(tokenizer.pieces)
  assert tokenizer.pieces[-len(verifier_words.WORDS):] == verifier_words.WORDS
  for _, module in TASKS:
    for record in module.generate(20, seed=1, num_words=range(1, 9)):
      for line in (record["question"], record["solution"], f"{record['solution']} verify step = ok wrong Yes No"):
        ids, ends = tokenizer.encode_with_ends(line)
        assert tokenizer.decode(ids) == line and min(ids) > 3 and max(ids) < tokenizer.vocab_size
        assert [line[end - 1] for end in ends] == [word[-1] for word in line.split(" ")]
  assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("a -> a"), tokenizer.eos_id]) == "a -> a"
  with pytest.raises(ValueError, match="'kavo'"):
    tokenizer.encode("k a v o | kavo")


def test_vocabulary():
  words = vocabulary()
  assert len(words) == len(set(words)) == 4000 and list(words) == sorted(words)
  assert all(re.fullmatch(r"[a-z]{3,6}", word) for word in words)
  # Fixed: every dataset drawn from it depends on this list and its order.
  assert hashlib.sha256(" ".join(words).encode()).hexdigest()[:16] == "2c835b747cc683c3"
