"""Hybrid decoding speed (The Mamba in the Llama, arXiv 2408.15237, Sec. 4-5), as ratios measured in one run.

  python -m benchmarks.hybrid_decode                                   # random weights, the cpu shapes
  python -m benchmarks.hybrid_decode --preset gpt_1b --dtype bfloat16   # random weights, a preset's shape (GPU)
  python -m benchmarks.hybrid_decode --teacher runs/lm_cpu --hybrid runs/distill_cpu/attention/sft \\
      --draft runs/lm_draft_cpu --prompts 8

1. Decode cost per token against the cache length: the teacher GPT (attention over a KV cache that grows)
   and its hybrids (50% and 0% attention) decoding `rows` sequences, one token per step in a compiled loop,
   at each `--lengths` cache size; the hybrid's Mamba layers cost the same at every length.
2. Speculative decoding (`lwjax.serving.speculative`): a draft GPT proposes k tokens, the hybrid verifies
   them in one pass; tokens/s against the hybrid's own greedy decoding, both one decode call per token (as
   serving does) and fused into one compiled loop (the fastest greedy there is: no per-token dispatch), on the
   same prompts, outputs checked equal. With trained models (`--teacher/--hybrid/--draft` workdirs) the
   acceptance rate is meaningful; with random weights it is not, but the two greedy baselines' speeds depend
   on the shape only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import decode_timing
from lwjax.models import gpt, mamba_hybrid as mh, presets
from lwjax.serving import speculative
from lwjax.training import checkpoint

CPU_SHAPE = gpt.GPTConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384,
                          max_seq_len=4096)


def decode_ms(model, rows: int, length: int, steps: int = 32) -> float:
  """ms per decode step at a cache of `length` tokens (filled by a prefill first)."""
  return decode_timing.decode_ms(model, rows, filled=length, capacity=length + steps + 1, steps=steps)


def _load_gpt(workdir):
  return checkpoint.load_model(os.path.join(workdir, "checkpoints"),
                               lambda saved: gpt.GPT(gpt.GPTConfig.from_dict(saved["model"]), rngs=nnx.Rngs(0)))[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--teacher", default="", help="lm_pretrain workdir (default: random weights, cpu shape)")
  parser.add_argument("--hybrid", default="", help="a mamba_distill stage directory (with hybrid.json)")
  parser.add_argument("--preset", default="", help="random weights of this shape (lwjax.models.presets)")
  parser.add_argument("--dtype", default="float32", help="compute dtype of the random-weight models")
  parser.add_argument("--draft", default="", help="lm_pretrain workdir of a smaller GPT used as the draft")
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--lengths", default="128,512,1024,2048")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=96)
  args = parser.parse_args()

  shape = dataclasses.replace(presets.PRESETS[args.preset] if args.preset else CPU_SHAPE, dtype=args.dtype)
  teacher = _load_gpt(args.teacher) if args.teacher else nnx.jit(lambda: gpt.GPT(shape, rngs=nnx.Rngs(0)))()
  cfg = teacher.cfg
  half = nnx.jit(lambda t: mh.HybridGPT.from_teacher(
      t, mh.HybridConfig(gpt=cfg, mamba_layers=mh.every_other_layer(cfg.n_layers, 0.5)), rngs=nnx.Rngs(1)))(teacher)
  if args.hybrid:
    half = mh.load(args.hybrid)
  pure = nnx.jit(lambda t: mh.HybridGPT.from_teacher(
      t, mh.HybridConfig(gpt=cfg, mamba_layers=tuple(range(cfg.n_layers))), rngs=nnx.Rngs(2)))(teacher)
  print(f"device: {jax.devices()[0].device_kind}; {args.rows} rows; ms per decode step (ratio to the teacher)")
  print("| cache length | teacher (attention) | hybrid " + f"{half.cfg.mamba_layers} Mamba | all-Mamba |")
  print("|---|---|---|---|")
  for length in [int(x) for x in args.lengths.split(",")]:
    t_ms = decode_ms(teacher, args.rows, length)
    h_ms, m_ms = decode_ms(half, args.rows, length), decode_ms(pure, args.rows, length)
    print(f"| {length} | {t_ms:.2f} | {h_ms:.2f} ({h_ms / t_ms:.2f}x) | {m_ms:.2f} ({m_ms / t_ms:.2f}x) |")

  if args.draft:
    draft = _load_gpt(args.draft)
  else:
    small = gpt.GPTConfig(**{**cfg.__dict__, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                             "head_dim": 16, "d_ff": 64})
    draft = nnx.jit(lambda: gpt.GPT(small, rngs=nnx.Rngs(3)))()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, size=16).tolist() for _ in range(args.prompts)]
  speculative.greedy(half, prompts[0], args.new_tokens)  # compile every path once
  speculative.greedy(half, prompts[0], args.new_tokens, fused=True)
  speculative.generate(half, draft, prompts[0], args.new_tokens, k=args.k)
  plain_s = fused_s = spec_s = 0.0
  accepted = proposed = 0
  for prompt in prompts:
    start = time.perf_counter()
    reference = speculative.greedy(half, prompt, args.new_tokens)
    plain_s += time.perf_counter() - start
    start = time.perf_counter()
    fused = speculative.greedy(half, prompt, args.new_tokens, fused=True)
    fused_s += time.perf_counter() - start
    assert np.array_equal(fused, reference), "the fused greedy loop differs from greedy decoding"
    start = time.perf_counter()
    tokens, stats = speculative.generate(half, draft, prompt, args.new_tokens, k=args.k)
    spec_s += time.perf_counter() - start
    assert np.array_equal(tokens, reference), "speculative decoding differs from greedy decoding"
    accepted, proposed = accepted + stats["accepted"], proposed + stats["proposed"]
  total = args.prompts * args.new_tokens
  print(f"\nspeculative decoding, k={args.k}, {args.prompts} prompts x {args.new_tokens} tokens, batch 1: "
        f"acceptance {accepted / proposed:.1%}")
  print("| decoding | tokens/s | speculative's speed-up over it |")
  print("|---|---|---|")
  print(f"| hybrid greedy, one call per token | {total / plain_s:.1f} | {plain_s / spec_s:.2f}x |")
  print(f"| hybrid greedy, fused (one compiled loop) | {total / fused_s:.1f} | {fused_s / spec_s:.2f}x |")
  print(f"| speculative (draft + one verify pass per round) | {total / spec_s:.1f} | |")


if __name__ == "__main__":
  main()
