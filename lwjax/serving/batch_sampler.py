"""N samples per prompt, offline, as one static batch with the prompt prefilled once (prefix sharing).

The offline counterpart of the engine for drawing many candidates per problem (Best-of-N for GenRM,
arXiv 2408.15240; compute-matched sampling, arXiv 2408.16737): `P` prompts are prefilled together, each
prompt's KV rows are copied to its `n` samples (the prefix is computed once, not `n` times), and the
`P * n` rows decode under one `lax.while_loop` with the engine's per-row sampler
(`lwjax.serving.sampling.sample`) until every row has written eos or `max_new_tokens`. Shapes are fixed
per (P, prompt_len, n, max_new_tokens), so a sweep compiles once. A row's randomness depends only on its
seed and token index, as in the engine.

On a mesh (`sampler_shardings`; a job's is its training mesh, `job_mesh`), the weights lie over `tensor` as the
engine's (`lwjax.serving.tensor_parallel`: heads, kv heads, MLP hidden, vocabulary; replicated over the other axes)
and the prompts over the data-parallel axes (`data`, and `fsdp`, which splits the batch in training too): each
group of `tensor` devices samples its share of the prompts, their KV caches over kv heads. The tokens are those of
one device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lwjax.models.logical import logical_to_spec
from lwjax.serving import tensor_parallel
from lwjax.serving.sampling import sample
from lwjax.training import mesh as mesh_lib

# The engine's rules, with the batch over the data-parallel axes: the weights over `tensor` only.
RULES = tuple((name, ("data", "fsdp") if name == "batch" else target) for name, target in mesh_lib.SERVING_RULES)


def job_mesh(shape) -> Mesh | None:
  """The mesh a job's `mesh.shape` names (training's, `lwjax.training.mesh.make_mesh`: every device, a -1 filling
  them), or None when that is one device: where the job samples as it trains."""
  mesh = mesh_lib.make_mesh(shape)
  return mesh if mesh.size > 1 else None


def sampler_shardings(model, mesh: Mesh | None, rules=RULES) -> tensor_parallel.EngineShardings | None:
  """Where a sampler of `model` (a GPT or a hybrid, or its abstract shape) puts its arrays on `mesh` under `rules`;
  None without a mesh. A ConfigError naming the model key when the mesh's `tensor` does not divide its heads, kv
  heads, MLP hidden or vocabulary."""
  if mesh is None:
    return None
  cfg = model.gpt_config()
  tensor_parallel.check_shapes(cfg, mesh.shape, rules)
  return tensor_parallel.EngineShardings.build(nnx.state(model), cfg.n_kv_heads, mesh, rules)


def _batch_axes(mesh: Mesh | None, rules) -> dict[str, int]:
  """The mesh axes (and their sizes) `rules` split the prompts of one call over."""
  if mesh is None:
    return {}
  rows = logical_to_spec(("batch",), rules, mesh)[0]
  return {axis: mesh.shape[axis] for axis in (() if rows is None else ((rows,) if isinstance(rows, str) else rows))}


def batch_extent(mesh: Mesh | None, rules=RULES) -> int:
  """The devices the prompts of one call are split over on `mesh` (1 without one): prompts per call must be a
  multiple."""
  return math.prod(_batch_axes(mesh, rules).values())


def rounded_batch(num_prompts: int, mesh: Mesh | None, rules=RULES) -> int:
  """`num_prompts` rounded up to a multiple of `batch_extent` (the padding prompts cost compute, not samples: a
  prompt's samples depend on its seeds only)."""
  extent = batch_extent(mesh, rules)
  return -(-num_prompts // extent) * extent


def check_batch(num_prompts: int, mesh: Mesh | None, rules=RULES) -> None:
  """ValueError naming `batch_prompts` unless `num_prompts` prompts per call split evenly over the mesh's batch
  axes."""
  extent = batch_extent(mesh, rules)
  if num_prompts % extent:
    axes = " x ".join(f"{axis}={size}" for axis, size in _batch_axes(mesh, rules).items())
    raise ValueError(f"batch_prompts: {num_prompts} prompts per call do not split over the mesh's batch axes {axes} "
                     f"(valid: a multiple of {extent})")


def _put(x, sharding: NamedSharding):
  """A host array onto `sharding`, cut from the whole array every process holds (multi-host safe, where `jit`
  takes no NumPy array for a split argument)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


@functools.lru_cache(maxsize=16)
def make_sampler(graphdef, *, prompt_len: int, max_new_tokens: int, n: int, eos_id: int,
                 placement: tensor_parallel.EngineShardings | None = None):
  """A jitted `sample_n(params, prompts_pp, lengths_p, seeds_pn, temperature, top_p) -> tokens [P, n, T]`:
  prompts right-padded to `prompt_len`, `seeds_pn` one uint32 seed per sample; positions after a row's
  first eos hold eos. Cached per model structure, shapes and `placement` (`sampler_shardings`: on a mesh, the
  parameters placed there, the prompts over its batch axes, the tokens replicated; with `bucket`ed prompt lengths,
  calls share compilations)."""

  def sample_n(params, prompts_pp, lengths_p, seeds_pn, temperature, top_p):
    with tensor_parallel.axis_rules(placement):
      return _sample_n(nnx.merge(graphdef, params), prompts_pp, lengths_p, seeds_pn, temperature, top_p)

  def _sample_n(model, prompts_pp, lengths_p, seeds_pn, temperature, top_p):
    num_prompts = prompts_pp.shape[0]
    rows = num_prompts * n
    cache = model.init_cache(num_prompts, prompt_len + max_new_tokens)
    logits_ptv, cache = model.prefill(prompts_pp, cache, num_new=lengths_p)
    last_pv = logits_ptv[jnp.arange(num_prompts), lengths_p - 1].astype(jnp.float32)
    # [P, ...] -> [P * n, ...]: each prompt's prefilled rows shared by its n samples.
    cache = cache.map_batch(lambda a: jnp.repeat(a, n, axis=0))
    temperature_b = jnp.full((rows,), temperature, jnp.float32)
    top_k_b = jnp.zeros((rows,), jnp.int32)
    top_p_b = jnp.full((rows,), top_p, jnp.float32)
    seeds_b = seeds_pn.reshape(rows).astype(jnp.uint32)

    def draw(logits_bv, step):
      return sample(logits_bv, temperature_b, top_k_b, top_p_b, seeds_b, jnp.full((rows,), step, jnp.int32))

    first = draw(jnp.repeat(last_pv, n, axis=0), 0)
    out = jnp.full((rows, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)

    def cond(carry):
      step, _, _, _, done = carry
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      step, token, cache, out, done = carry
      logits_bv, cache = model.decode_step(token, cache)
      token = jnp.where(done, eos_id, draw(logits_bv.astype(jnp.float32), step))
      out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
      return step + 1, token, cache, out, done | (token == eos_id)

    carry = (jnp.int32(1), first, cache, out, first == eos_id)
    out = jax.lax.while_loop(cond, body, carry)[3]
    return out.reshape(num_prompts, n, max_new_tokens)

  if placement is None:
    return jax.jit(sample_n)
  rep = placement.replicated
  by_row = NamedSharding(placement.mesh, logical_to_spec(("batch", None), placement.rules, placement.mesh))
  by_row_1d = NamedSharding(placement.mesh, logical_to_spec(("batch",), placement.rules, placement.mesh))
  jitted = jax.jit(sample_n, in_shardings=(placement.params, by_row, by_row_1d, by_row, rep, rep),
                   out_shardings=rep)

  def on_mesh(params, prompts_pp, lengths_p, seeds_pn, temperature, top_p):
    check_batch(len(prompts_pp), placement.mesh, placement.rules)
    return jitted(placement.place_params(params), _put(prompts_pp, by_row), _put(lengths_p, by_row_1d),
                  _put(seeds_pn, by_row), np.float32(temperature), np.float32(top_p))
  on_mesh.place_params = placement.place_params  # callers looping over batches place the weights once
  return on_mesh


def bucket(prompt_len: int, multiple: int = 32) -> int:
  return -(-prompt_len // multiple) * multiple


def sample_texts(sample_n, params, tokenizer, prompts: Sequence[Sequence[int]], *, n: int, prompt_len: int,
                 batch_prompts: int, seed: int, temperature: float, top_p: float = 1.0,
                 progress=None, first_index: int = 0) -> list[list[tuple[str, int]]]:
  """For each prompt (token ids, bos included), its `n` samples as (text cut at eos, tokens before eos).

  Prompts go `batch_prompts` at a time (the last batch padded), so one compilation serves them all;
  sample j of prompt i has seed `seed * 2**20 + (first_index + i) * n + j` wherever it lands in a batch (a
  set's prompts sampled in shards, each with its `first_index`, get the seeds of one call)."""
  results = []
  params = getattr(sample_n, "place_params", lambda p: p)(params)  # on a mesh: moved once, not every batch
  for start in range(0, len(prompts), batch_prompts):
    chunk = prompts[start:start + batch_prompts]
    tokens_pp = np.zeros((batch_prompts, prompt_len), np.int32)
    lengths_p = np.ones(batch_prompts, np.int32)
    for i, ids in enumerate(chunk):
      if len(ids) > prompt_len:
        raise ValueError(f"prompt {start + i}: {len(ids)} tokens exceed prompt_len={prompt_len} "
                         "(valid: a larger prompt_len)")
      tokens_pp[i, :len(ids)], lengths_p[i] = ids, len(ids)
    index = (first_index + start + np.arange(batch_prompts))[:, None] * n + np.arange(n)[None, :]
    seeds = ((seed * 2**20 + index) % 2**32).astype(np.uint32)
    out = np.asarray(sample_n(params, tokens_pp, lengths_p, seeds, np.float32(temperature), np.float32(top_p)))
    for row in out[:len(chunk)]:
      samples = []
      for tokens in row:
        ends = np.flatnonzero(tokens == tokenizer.eos_id)
        kept = tokens[:ends[0]] if len(ends) else tokens
        samples.append((tokenizer.decode(kept).strip(), len(kept)))
      results.append(samples)
    if progress is not None:
      progress.update(len(chunk))
  return results
