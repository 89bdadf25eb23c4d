"""Decode-step time of the GPT's contiguous KV cache (`GPT.decode_step` under `lax.fori_loop`), by cache length.

  python -m benchmarks.kv_decode                      # the weak testbed solver's shape, 64 rows
  python -m benchmarks.kv_decode --rows 256 --max_lens 128,512

What `lwjax.serving.batch_sampler` (Best-of-N candidates, CoT verification) and greedy evaluation spend
their time in: each step attends over the whole preallocated cache, so the step time grows with max_len.
"""

import argparse

import jax
from flax import nnx

from benchmarks import decode_timing
from lwjax.models.gpt import GPT, GPTConfig


def step_ms(model: GPT, rows: int, max_len: int, steps: int) -> float:
  """ms per decode step from an empty cache of `max_len` positions (every step attends over all of them)."""
  return decode_timing.decode_ms(model, rows, filled=0, capacity=max_len, steps=steps)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--max_lens", default="64,384,768")
  parser.add_argument("--steps", type=int, default=48)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--n_layers", type=int, default=4)
  args = parser.parse_args()
  cfg = GPTConfig(vocab_size=256, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.d_model // 32,
                  n_kv_heads=args.d_model // 32, head_dim=32, d_ff=4 * args.d_model, max_seq_len=4096)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  print(f"{'max_len':>8} {'ms/step':>9} {'tokens/s':>10}   ({args.rows} rows, d_model {args.d_model}, "
        f"{args.n_layers} layers, {jax.default_backend()})")
  for max_len in map(int, args.max_lens.split(",")):
    ms = step_ms(model, args.rows, max_len, args.steps)
    print(f"{max_len:>8} {ms:>9.1f} {args.rows / ms * 1e3:>10.0f}")


if __name__ == "__main__":
  main()
