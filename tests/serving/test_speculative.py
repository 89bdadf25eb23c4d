"""Speculative decoding (arXiv 2408.15237, Sec. 4) is exact: its output is the target's own greedy decoding."""

import numpy as np
import pytest
from flax import nnx

from lwjax.models import gpt, mamba_hybrid as mh
from lwjax.serving import speculative

TINY = gpt.GPTConfig(vocab_size=24, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                     max_seq_len=128)


@pytest.fixture(scope="module")
def models():
  teacher = nnx.jit(lambda: gpt.GPT(TINY, rngs=nnx.Rngs(0)))()
  hybrid = nnx.jit(lambda t: mh.HybridGPT.from_teacher(t, mh.HybridConfig(gpt=TINY, mamba_layers=(0,), chunk_size=8),
                                                       rngs=nnx.Rngs(1)))(teacher)
  other = nnx.jit(lambda: gpt.GPT(TINY, rngs=nnx.Rngs(5)))()
  return teacher, hybrid, other


@pytest.mark.parametrize("target_name", ["hybrid", pytest.param("gpt", marks=pytest.mark.slow)])
def test_speculative_equals_greedy_for_any_draft(models, target_name):
  teacher, hybrid, other = models
  target = hybrid if target_name == "hybrid" else teacher
  prompt = [3, 7, 1, 9, 4]
  reference = speculative.greedy(target, prompt, 24)
  np.testing.assert_array_equal(speculative.greedy(target, prompt, 24, fused=True), reference)
  # A draft that is the target itself: everything is accepted, k + 1 tokens a round.
  tokens, stats = speculative.generate(target, target, prompt, 24, k=3)
  np.testing.assert_array_equal(tokens, reference)
  assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_round"] == 4.0
  # A draft that disagrees (another random model): rejections roll back, the output stays the target's.
  for draft in (other, teacher if target is hybrid else hybrid):
    tokens, stats = speculative.generate(target, draft, prompt, 24, k=3)
    np.testing.assert_array_equal(tokens, reference)
    assert stats["acceptance_rate"] < 1.0
