"""The GPT's layers as one stack: each parameter gets a leading `layers` axis and the forward is a `jax.lax.scan`.

Unrolled, XLA compiles every layer's forward and backward separately and keeps every layer's gathered weights and
temporaries alive side by side (compile time and memory grow with depth); scanned, it compiles one body and reuses
its buffers (MaxText's `scan_layers`). `GPTConfig.scan_layers` picks the layout.

Layers whose static options differ (Gemma-2: a sliding window on every other layer) are scanned in groups of one
period (`period`): the scan body runs k consecutive layers, each with its own window, as static as when unrolled,
so the attention kernels still skip the blocks outside a window. (A per-layer flag carried through the scan would
make the window a traced value: every layer would then compute the full causal scores.) The parameters stay one
[n_layers, ...] stack in layer order, reshaped to [n_layers / k, k, ...] inside the forward only.

Layouts of the params pytree: per-layer `{"layers": {0: block, 1: block, ...}, ...}` (an `nnx.List` of blocks) or
stacked `{"layers": block with every leaf [n_layers, ...], ...}`; `stack_layers` and `unstack_layers` convert.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"  # the logical axis of the stacked dimension: unsharded (each step uses one slice whole)
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def period(cfg) -> int:
  """How many consecutive layers differ in their static options (their sliding window): the scan's group size."""
  return cfg.full_attention_every if cfg.sliding_window is not None and cfg.full_attention_every else 1


@functools.cache
def _block_graphdef(cfg, layer: int) -> nnx.GraphDef:
  """The structure (and static options: layer `layer`'s window) of one block, without its parameters."""
  from lwjax.models.gpt import Block
  return nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0), layer=layer)))


def stacked_blocks(cfg, rngs: nnx.Rngs) -> nnx.Module:
  """One block whose parameters are those of layers 0..n-1 stacked on a leading `layers` axis: the same values,
  from the same `rngs` draws, as the unrolled model's per-layer blocks."""
  from lwjax.models.gpt import Block
  states = [nnx.state(Block(cfg, rngs=rngs, layer=i)) for i in range(cfg.n_layers)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  for _, variable in nnx.to_flat_state(stacked):
    variable.set_metadata(logical_axes=(LAYERS_AXIS, *variable.get_metadata()["logical_axes"]))
  return nnx.merge(_block_graphdef(cfg, 0), stacked)


def _layer_fn(cfg, layer: int):
  """(params of one block, x, positions, inv_freq, segment_ids) -> x: layer `layer`'s forward (its window), a pure
  function, rematerialised in the backward pass as `cfg.remat` says."""
  graphdef = _block_graphdef(cfg, layer)

  def run(params, x, positions, inv_freq, segment_ids):
    return nnx.merge(graphdef, params)(x, positions, inv_freq, segment_ids)[0]
  if cfg.remat == "none":
    return run
  # prevent_cse=False: inside a scan, CSE cannot hoist the recomputation out of the loop (JAX's advice).
  return jax.checkpoint(run, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)


def scan_blocks(blocks: nnx.Module, cfg, x_btd, positions_bt, inv_freq, segment_ids=None):
  """The forward through every layer of `blocks` (from `stacked_blocks`): one scan step per group of `period`
  layers. x [b, t, d] -> [b, t, d]."""
  k = period(cfg)
  params = nnx.to_pure_dict(nnx.state(blocks))
  grouped = jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]), params)
  layers = [_layer_fn(cfg, j) for j in range(k)]

  def body(x, group):
    for j, layer in enumerate(layers):
      x = layer(jax.tree.map(lambda a, j=j: a[j], group), x, positions_bt, inv_freq, segment_ids)
    return x, None
  return jax.lax.scan(body, x_btd, grouped)[0]


def layer_views(blocks: nnx.Module, cfg) -> list[nnx.Module]:
  """Per-layer blocks reading slices of the stack (layer i's window set as when unrolled): what the decode paths
  iterate. Each step then slices every layer's weights out of the stack; a server loads the model unrolled
  (`lwjax.models.load_pretrained` does by default) and iterates the blocks themselves."""
  params = nnx.to_pure_dict(nnx.state(blocks))
  return [nnx.merge(_block_graphdef(cfg, i % period(cfg)), jax.tree.map(lambda a, i=i: a[i], params))
          for i in range(cfg.n_layers)]


def is_stacked(params: Mapping) -> bool:
  """Whether a GPT params pytree (pure dict, or abstract) has the stacked layout."""
  return not any(isinstance(key, int) or str(key).isdigit() for key in params["layers"])


def stack_layers(params: Mapping[str, Any], combine=lambda *xs: jnp.stack(xs)) -> dict:
  """Per-layer -> stacked params (`{"layers": {0: tree, 1: tree, ...}}` -> `{"layers": tree of [n, ...]}`); the
  other entries as they are. Layer keys may be ints or digit strings (a restored checkpoint's). `combine` joins
  the layers' leaves (e.g. their shardings instead of arrays)."""
  layers = params["layers"]
  ordered = [layers[key] for key in sorted(layers, key=int)]
  return {**params, "layers": jax.tree.map(combine, *ordered)}


def unstack_layers(params: Mapping[str, Any], n: int | None = None, pick=lambda a, i: a[i]) -> dict:
  """Stacked -> per-layer params (the inverse of `stack_layers`; layer keys are ints). `n` (default: the leaves'
  leading size) layers, leaf i taken by `pick(leaf, i)`."""
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0] if n is None else n
  return {**params, "layers": {i: jax.tree.map(lambda a, i=i: pick(a, i), stacked) for i in range(n)}}


def to_layout(params: Mapping[str, Any], stacked: bool) -> dict:
  """`params` in the stacked (`stacked`) or per-layer layout, converted only when it is in the other one."""
  if is_stacked(params) == stacked:
    return dict(params)
  return stack_layers(params) if stacked else unstack_layers(params)
