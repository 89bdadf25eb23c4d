"""Orbax checkpoints of a training run: model + optimizer state + step, data-iterator state, config.

Saves are atomic (Orbax writes to a temporary directory and renames it) and asynchronous; the latest
complete checkpoint in `<workdir>/checkpoints` is what a restarted run resumes from.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lwjax.models import layer_stack
from lwjax.models.gpt import GPT
from lwjax.training import sharding
from lwjax.training.mesh import DEFAULT_RULES


class Checkpointer:
  """Keeps the last `keep` checkpoints of `{state, data iterator, config}` under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000, async_save: bool = True):
    # Orbax needs absolute paths; URLs (gs://...) are absolute already.
    directory = directory if "://" in directory else os.path.abspath(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=("state", "data", "config"))

  @property
  def directory(self):
    return self._manager.directory

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, config=None, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `save_every` (or `force`); returns whether a save started."""
    if step % self.save_every and not force:
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None) -> tuple[int, Any]:
    """Restores `step` (default: latest) into the shardings of `abstract_state`; the data iterator in place."""
    step = self._manager.latest_step() if step is None else step
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return step, restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _open(directory: str, step: int | None) -> tuple[ocp.CheckpointManager, int, dict]:
  """(a manager of the run's `checkpoints/` folder, the step (default: the latest), the run config saved there)."""
  directory = directory if "://" in directory else os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"))
  step = manager.latest_step() if step is None else step
  if step is None:
    manager.close()
    raise FileNotFoundError(f"no checkpoint under {directory}")
  return manager, step, manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def load_config(directory: str, step: int | None = None) -> dict:
  """The run config saved with a checkpoint under `directory` (default: the latest step); no parameters read."""
  manager, _, config = _open(directory, step)
  manager.close()
  return config


def load_model(directory: str, build: Callable[[dict], Any], step: int | None = None, *, mesh=None,
               rules=None) -> tuple[Any, dict, int]:
  """The NNX model of a training run's checkpoint: (model, run config, step).

  `directory` is a run's `checkpoints/` folder; `build(config)` makes the model from the run config
  saved beside the state (only its shape is used); the parameters of `step` (default: latest) fill it, on the
  default device, or with `mesh` each restored straight onto the sharding its logical axes get under `rules`
  (default `DEFAULT_RULES`). A GPT saved with the other layer layout (`GPTConfig.scan_layers`: stacked or per-layer)
  than `build` gives is restored as saved, then converted.
  """
  manager, step, config = _open(directory, step)
  try:
    abstract = nnx.eval_shape(lambda: build(config))
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)
    if mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, params)
    else:
      shardings = sharding.param_shardings(params, sharding.logical_axes(state), mesh, rules or DEFAULT_RULES)
    target = {"params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     params, shardings)}
    saved_stacked = bool((config.get("model") or {}).get("scan_layers"))
    convert = isinstance(abstract, GPT) and abstract.cfg.scan_layers != saved_stacked
    if convert:
      target = {"params": _in_layout(target["params"], saved_stacked, abstract.cfg.n_layers)}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  finally:
    manager.close()
  params = restored["state"]["params"]
  if convert:
    params = jax.jit(lambda p: layer_stack.to_layout(p, not saved_stacked), out_shardings=shardings)(params)
  return nnx.merge(graphdef, params), config, step


def _in_layout(abstract_params: dict, stacked: bool, n_layers: int) -> dict:
  """Abstract GPT params (ShapeDtypeStructs with shardings) in the stacked (`stacked`) or per-layer layout: a
  stacked parameter's sharding is its layer's with the `layers` axis unsharded."""
  def spec(sharding_, change):
    if not isinstance(sharding_, NamedSharding):
      return sharding_
    return NamedSharding(sharding_.mesh, PartitionSpec(*change(tuple(sharding_.spec))))
  if stacked:
    return layer_stack.stack_layers(abstract_params, combine=lambda *xs: jax.ShapeDtypeStruct(
        (len(xs), *xs[0].shape), xs[0].dtype, sharding=spec(xs[0].sharding, lambda s: (None, *s))))
  return layer_stack.unstack_layers(abstract_params, n_layers, pick=lambda x, _: jax.ShapeDtypeStruct(
      x.shape[1:], x.dtype, sharding=spec(x.sharding, lambda s: s[1:])))
