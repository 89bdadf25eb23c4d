"""The sampling budget (Smaller, Weaker, Yet Better, arXiv 2408.16737, §2): at a fixed number of sampling FLOPs a
weaker-cheaper (WC) model draws cost(SE) / cost(WC) times as many samples per problem as a stronger-expensive
(SE) one.

The paper takes the cost of a token as 2 x the parameter count (so 27B / 9B = 3 samples of Gemma2-9B per
sample of Gemma2-27B). Here the cost is the forward FLOPs of one token from the config, parameters and
its attention over a given context (`GPTConfig.decode_flops_per_token`), and WC gets the whole number of samples
the SE budget pays for (rounded down, so WC never spends more than SE).
"""

from __future__ import annotations

import math

from lwjax.models.gpt import GPTConfig


def flops_per_token(cfg: GPTConfig, context: int) -> float:
  """Forward FLOPs of one sampled token at `context` tokens of context."""
  return cfg.decode_flops_per_token(context)


def cost_ratio(se: GPTConfig, wc: GPTConfig, context: int) -> float:
  """How many WC tokens one SE token's FLOPs pay for."""
  ratio = flops_per_token(se, context) / flops_per_token(wc, context)
  if ratio < 1.0:
    raise ValueError(f"the stronger-expensive model costs {ratio:.3f}x the weaker-cheaper one per token: "
                     "expected the SE model to be the larger (swap wc and se)")
  return ratio


def matched_samples(se_samples: int, ratio: float) -> int:
  """WC samples per problem at the budget of `se_samples` SE samples per problem."""
  if se_samples < 1:
    raise ValueError(f"se_samples={se_samples}: expected >= 1")
  return max(se_samples, math.floor(se_samples * ratio + 1e-9))


def spent_flops(num_tokens: int, cfg: GPTConfig, context: int) -> float:
  """FLOPs of sampling `num_tokens` tokens at a mean context of `context`."""
  return num_tokens * flops_per_token(cfg, context)
