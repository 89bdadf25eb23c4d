"""Logit processing against numpy on random batches: bias, penalties over ragged prompts and outputs, min_tokens'
banned stop ids, rows that ask for nothing left exactly as they were; the parameters are checked at the door."""

import numpy as np
import pytest

from lwjax.serving.logits_processors import batch_processing, process_logits, uses_processing
from lwjax.serving.sampling import SamplingParams

VOCAB = 50
STOP_IDS = frozenset({2, 7})


def _reference(logits, params, prompt, output):
  """One row by hand: bias, repetition over prompt + output, OpenAI's presence and frequency over the output, then
  the stop ids at -inf while the output is shorter than min_tokens."""
  logits = logits.astype(np.float64).copy()
  for token, bias in params.logit_bias:
    logits[token] += bias
  counts = np.bincount(np.array(output, int), minlength=VOCAB)
  seen = counts > 0
  seen[np.array(prompt, int)] = True
  r = params.repetition_penalty
  logits = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
  logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
  if len(output) < params.min_tokens:
    banned = set(params.stop_token_ids) | (set() if params.ignore_eos else STOP_IDS)
    logits[sorted(banned)] = -np.inf
  return logits


def _random_params(rng):
  kinds = rng.integers(0, 2, 5)
  return SamplingParams(
      max_tokens=20,
      logit_bias={str(t): float(rng.uniform(-100, 100)) for t in rng.choice(VOCAB, rng.integers(0, 12), replace=False)}
      if kinds[0] else {},
      presence_penalty=float(rng.uniform(-2, 2)) if kinds[1] else 0.0,
      frequency_penalty=float(rng.uniform(-2, 2)) if kinds[2] else 0.0,
      repetition_penalty=float(rng.uniform(0.2, 3)) if kinds[3] else 1.0,
      min_tokens=int(rng.integers(0, 6)) if kinds[4] else 0,
      stop_token_ids=tuple(int(t) for t in rng.choice(VOCAB, rng.integers(0, 3), replace=False)),
      ignore_eos=bool(rng.integers(0, 2)))


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_equal_the_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  rows = 6
  params = [_random_params(rng) for _ in range(rows - 1)] + [SamplingParams(presence_penalty=1.0)]
  prompts = [rng.integers(0, VOCAB, rng.integers(1, 20)).tolist() for _ in range(rows)]
  outputs = [rng.integers(0, VOCAB, rng.integers(0, 10)).tolist() for _ in range(rows)]
  logits = rng.normal(0, 3, (rows, VOCAB)).astype(np.float32)
  arrays = batch_processing(params, prompts, outputs, STOP_IDS, VOCAB)
  got = np.asarray(process_logits(logits, arrays))
  for row in range(rows):
    np.testing.assert_allclose(got[row], _reference(logits[row], params[row], prompts[row], outputs[row]),
                               rtol=1e-5, atol=1e-4)


def test_rows_that_ask_for_nothing_are_untouched_and_a_batch_of_them_has_no_arrays():
  logits = np.random.default_rng(0).normal(size=(3, VOCAB)).astype(np.float32)
  plain = [SamplingParams(stop_token_ids=(4,)), SamplingParams(ignore_eos=True)]
  assert not any(map(uses_processing, plain))
  assert batch_processing(plain, [[1, 2]] * 2, [[3]] * 2, STOP_IDS, VOCAB) is None
  params = plain + [SamplingParams(max_tokens=4, min_tokens=2, logit_bias={"3": 5.0}, repetition_penalty=2.0)]
  arrays = batch_processing(params, [[1, 2]] * 3, [[3, 3]] * 3, STOP_IDS, VOCAB)
  got = np.asarray(process_logits(logits, arrays))
  np.testing.assert_array_equal(got[:2], logits[:2])


@pytest.mark.parametrize("kwargs, field", [
    ({"logit_bias": {"5": 100.5}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"presence_penalty": 2.01}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_tokens": 17}, "min_tokens"), ({"stop_token_ids": (-3,)}, "stop_token_ids"),
])
def test_bad_parameters_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}:"):
    SamplingParams(**kwargs)
