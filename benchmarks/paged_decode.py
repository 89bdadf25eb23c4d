"""Paged vs contiguous KV cache, decode step and attention alone, at the same lengths (NanoFlow serving, vLLM's
PagedAttention): what the serving engine's page pool costs over a contiguous cache.

  python -m benchmarks.paged_decode                                   # gpt_125m, 16 rows, 64-512 keys, CPU
  python -m benchmarks.paged_decode --model llama3_8b --dtype bfloat16 --rows 64 --lengths 1024,4096

For each cache length L it times, in one process:
  - the model: `GPT.paged_step` with one token per row over per-layer page pools (the engine's decode call:
    `--num_pages` pages of `--page_size` tokens, each row's L / page_size pages scattered through the pool)
    against `GPT.decode_step` over a contiguous cache of L positions (static batching's), each one jitted call
    per step with its cache donated, `--steps` calls timed;
  - the attention alone: `kernels.decode_attention` (on CPU the reference, which gathers the pages) against
    the attention `GPT.decode_step` runs over a contiguous [rows, kv_heads, L, head_dim] cache, per layer.
Reported: ms per step (median of --repeats loops; per call for the attention, median of --iters) and the ratio
paged / contiguous (1.00x: the pages cost nothing).
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import configs.gpt
from lwjax import kernels
from lwjax.models.gpt import GPT

_MODEL = flags.DEFINE_string("model", "gpt_125m", "Model preset of configs/gpt.py (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute and KV dtype.")
_ROWS = flags.DEFINE_integer("rows", 16, "Sequences decoded together.")
_LENGTHS = flags.DEFINE_list("lengths", ["64", "128", "256", "512"], "Cache lengths (keys per row).")
_PAGE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_PAGES = flags.DEFINE_integer("num_pages", 1024, "Pages in each layer's pool.")
_STEPS = flags.DEFINE_integer("steps", 16, "Decode steps per timed loop.")
_ITERS = flags.DEFINE_integer("iters", 50, "Timed calls of the attention alone (median reported).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed loops of each model step, alternated (median reported).")


def _timed_calls(step, state, steps: int) -> float:
  """ms per call of `state = step(state)` (each call donating the cache it updates), after two warm-up calls."""
  for _ in range(2):
    state = step(state)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state = step(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps * 1e3


def paged_ms(model: GPT, rows: int, length: int, page_size: int, num_pages: int, steps: int, seed: int = 0) -> float:
  """ms per one-token `GPT.paged_step` of `rows` rows at `length` keys, whose pages are scattered through the
  pool: one jitted call per step with the pools donated, as the serving engine runs it."""
  cfg = model.cfg
  pages = -(-length // page_size)
  if rows * pages > num_pages:
    raise ValueError(f"num_pages: {num_pages} pages cannot hold {rows} rows x {pages} pages (valid: >= "
                     f"{rows * pages})")
  graphdef, params = nnx.split(model)
  shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
  pools = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers)), \
      tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers))
  table = jnp.asarray(np.random.default_rng(seed).permutation(num_pages)[:rows * pages].reshape(rows, pages),
                      jnp.int32)
  lengths = jnp.full((rows,), length, jnp.int32)
  slots = (table[:, (length - 1) // page_size][:, None], jnp.full((rows, 1), (length - 1) % page_size, jnp.int32))

  @functools.partial(jax.jit, donate_argnums=1)
  def step(params, state):
    token, (k_pools, v_pools) = state
    logits, k_pools, v_pools = nnx.merge(graphdef, params).paged_step(token[:, None], k_pools, v_pools, slots, table,
                                                                      lengths, last_only=True)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), (k_pools, v_pools)
  return _timed_calls(functools.partial(step, params), (jnp.zeros(rows, jnp.int32), pools), steps)


def contiguous_ms(model: GPT, rows: int, length: int, steps: int) -> float:
  """ms per one-token `GPT.decode_step` of `rows` rows over a contiguous cache of `length` positions (each step
  attends over all of them): one jitted call per step with the cache donated, as static batching runs it."""
  graphdef, params = nnx.split(model)
  cache = model.init_cache(rows, length)

  @functools.partial(jax.jit, donate_argnums=1)
  def step(params, state):
    token, cache = state
    cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, length - 1))  # write the last slot
    logits, cache = nnx.merge(graphdef, params).decode_step(token, cache)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache
  return _timed_calls(functools.partial(step, params), (jnp.zeros(rows, jnp.int32), cache), steps)


def attention_ms(cfg, rows: int, length: int, page_size: int, num_pages: int, iters: int) -> tuple[float, float]:
  """Median ms of one layer's decode attention: (paged over a pool, contiguous over a cache of `length`)."""
  rng = np.random.default_rng(0)
  dtype, kvh, hd = cfg.dtype, cfg.n_kv_heads, cfg.head_dim
  pages = -(-length // page_size)
  q = jnp.asarray(rng.normal(size=(rows, 1, cfg.n_heads, hd)), dtype)
  k_pool, v_pool = (jnp.asarray(rng.normal(size=(kvh, num_pages, page_size, hd)), dtype) for _ in range(2))
  table = jnp.asarray(rng.permutation(num_pages)[:rows * pages].reshape(rows, pages), jnp.int32)
  lengths = jnp.full((rows,), length, jnp.int32)
  k_cache, v_cache = (pool[:, table].reshape(kvh, rows, pages * page_size, hd).swapaxes(0, 1)
                      for pool in (k_pool, v_pool))
  paged = jax.jit(kernels.decode_attention)
  if jax.default_backend() == "cpu":  # what `GPT.decode_step` runs on CPU: the reference over [b, kv_heads, L, d]
    contiguous = jax.jit(lambda q, k, v, offset: kernels.reference.attention(q, k, v, q_offset=offset,
                                                                           kv_layout="bhsd"))
  else:
    contiguous = jax.jit(lambda q, k, v, offset: kernels.attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2),
                                                                   q_offset=offset))
  out_paged = paged(q, k_pool, v_pool, table, lengths)
  out_contiguous = contiguous(q, k_cache, v_cache, lengths - 1)
  np.testing.assert_allclose(np.asarray(out_paged, np.float32), np.asarray(out_contiguous, np.float32),
                             atol=2e-2 if dtype != "float32" else 1e-5)

  def median_ms(fn, *args):
    for _ in range(3):
      fn(*args).block_until_ready()
    times = []
    for _ in range(iters):
      start = time.perf_counter()
      fn(*args).block_until_ready()
      times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3
  return median_ms(paged, q, k_pool, v_pool, table, lengths), median_ms(contiguous, q, k_cache, v_cache, lengths - 1)


def main(argv):
  del argv
  cfg = dataclasses.replace(configs.gpt.PRESETS[_MODEL.value], dtype=_DTYPE.value)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  rows, steps = _ROWS.value, _STEPS.value
  print(f"{_MODEL.value} ({cfg.num_params():,} params, {_DTYPE.value}), {rows} rows, pages of {_PAGE.value} in a "
        f"pool of {_PAGES.value}, {jax.default_backend()}")
  print(f"{'keys':>6} {'paged step':>11} {'contig step':>12} {'ratio':>7}   {'paged attn':>11} {'contig attn':>12}"
        f" {'ratio':>7}   (ms; attention: one layer)")
  for length in map(int, _LENGTHS.value):
    paged, contiguous = [], []
    for _ in range(_REPEATS.value):  # alternated, so that a change in the machine's load hits both alike
      paged.append(paged_ms(model, rows, length, _PAGE.value, _PAGES.value, steps))
      contiguous.append(contiguous_ms(model, rows, length, steps))
    paged, contiguous = float(np.median(paged)), float(np.median(contiguous))
    attn_paged, attn_contiguous = attention_ms(cfg, rows, length, _PAGE.value, _PAGES.value, _ITERS.value)
    print(f"{length:>6} {paged:>11.2f} {contiguous:>12.2f} {paged / contiguous:>6.2f}x   {attn_paged:>11.3f} "
          f"{attn_contiguous:>12.3f} {attn_paged / attn_contiguous:>6.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
