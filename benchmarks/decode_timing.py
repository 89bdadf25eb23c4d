"""ms per decode step of any model with `init_cache`, `prefill` and `decode_step` (GPT, hybrid): the shared timer
of `benchmarks.kv_decode` and `benchmarks.hybrid_decode`."""

import time

import jax
import jax.numpy as jnp
from flax import nnx


def decode_ms(model, rows: int, *, filled: int, capacity: int, steps: int = 32) -> float:
  """ms per step of `steps` greedy decode steps of `rows` sequences in one compiled loop, from a cache of
  `capacity` positions whose first `filled` are prefilled (0: an empty cache)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, cache, token):
    m = nnx.merge(graphdef, params)

    def body(_, carry):
      token, cache = carry
      logits, cache = m.decode_step(token, cache)
      return jnp.argmax(logits, -1).astype(jnp.int32), cache
    return jax.lax.fori_loop(0, steps, body, (token, cache))[0]

  cache = model.init_cache(rows, capacity)
  if filled:
    _, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, jnp.ones((rows, filled), jnp.int32), cache)
  token = jnp.zeros(rows, jnp.int32)
  run(params, cache, token).block_until_ready()
  start = time.perf_counter()
  run(params, cache, token).block_until_ready()
  return (time.perf_counter() - start) / steps * 1e3
