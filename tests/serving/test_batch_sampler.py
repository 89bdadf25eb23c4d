"""Batch sampler: greedy rows equal uncached full-forward decoding for ragged prompts; sampled rows are
reproducible by seed wherever they sit in a batch, differ between seeds, stop at eos, and the first
token's frequencies match softmax(logits / T)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving import batch_sampler

CFG = GPTConfig(vocab_size=29, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=48)
EOS = 2


class _Tok:
  eos_id = EOS

  @staticmethod
  def decode(ids):
    return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def model():
  return GPT(CFG, rngs=nnx.Rngs(0))


def _reference_greedy(model, prompt, steps):
  """Greedy by the full training forward on the whole sequence each step (no cache)."""
  seq, forward = list(prompt), nnx.jit(lambda m, x: m(x))
  for _ in range(steps):  # right padding to one shape (one compilation): causal, so it cannot change seq's logits
    token = int(jnp.argmax(forward(model, jnp.array([seq + [0] * (32 - len(seq))]))[0, len(seq) - 1]))
    seq.append(token)
    if token == EOS:
      break
  return seq[len(prompt):]


def _prompts(num, seed=0):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, 29, size=rng.integers(1, 9)).tolist() for _ in range(num)]


def test_greedy_rows_equal_uncached_decoding_for_ragged_prompts(model):
  graphdef, params = nnx.split(model)
  prompts = _prompts(5)
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=10, max_new_tokens=12, n=3, eos_id=EOS)
  out = batch_sampler.sample_texts(sample_n, params, _Tok, prompts, n=3, prompt_len=10, batch_prompts=2, seed=0,
                                   temperature=0.0)
  for prompt, samples in zip(prompts, out, strict=True):
    want = _reference_greedy(model, prompt, 12)
    want = want[:-1] if want and want[-1] == EOS else want
    assert all(s == (_Tok.decode(want), len(want)) for s in samples), (samples, want)


def test_seeded_samples_are_reproducible_independent_of_batching_and_differ_by_seed(model):
  graphdef, params = nnx.split(model)
  prompts = _prompts(3, seed=1)
  runs = []
  for batch_prompts in (1, 3):
    sample_n = batch_sampler.make_sampler(graphdef, prompt_len=10, max_new_tokens=10, n=4, eos_id=EOS)
    runs.append(batch_sampler.sample_texts(sample_n, params, _Tok, prompts, n=4, prompt_len=10,
                                           batch_prompts=batch_prompts, seed=7, temperature=1.0))
  assert runs[0] == runs[1]
  texts = [text for samples in runs[0] for text, _ in samples]
  assert len(set(texts)) > len(texts) // 2  # random weights at T=1: samples differ
  for samples in runs[0]:
    for text, num_tokens in samples:
      assert str(EOS) not in text.split() and num_tokens == len(text.split())


def test_first_token_frequencies_match_the_softmax(model):
  graphdef, params = nnx.split(model)
  prompt = [1, 5, 9, 4]
  temperature, n = 1.5, 512
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=4, max_new_tokens=1, n=n, eos_id=EOS)
  seeds = np.arange(n, dtype=np.uint32)[None]
  tokens = np.asarray(sample_n(params, np.array([prompt], np.int32), np.array([4], np.int32), seeds,
                               np.float32(temperature), np.float32(1.0)))[0, :, 0]
  probs = np.asarray(jax.nn.softmax(model(jnp.array([prompt]))[0, -1] / temperature))
  freq = np.bincount(tokens, minlength=CFG.vocab_size) / n
  assert np.abs(freq - probs).sum() < 0.25, (freq, probs)  # total variation ~0.1 expected at n = 512


def test_prompt_longer_than_prompt_len_is_a_clear_error(model):
  graphdef, params = nnx.split(model)
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=4, max_new_tokens=2, n=1, eos_id=EOS)
  with pytest.raises(ValueError, match="prompt_len=4"):
    batch_sampler.sample_texts(sample_n, params, _Tok, [[1, 3, 4, 5, 6]], n=1, prompt_len=4, batch_prompts=1,
                               seed=0, temperature=0.0)
