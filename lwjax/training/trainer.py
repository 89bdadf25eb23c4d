"""The sharded training loop every project uses.

State is built as `eval_shape -> shardings -> jit(init, out_shardings)` (big_vision); the train step is
jitted with explicit in/out shardings and donates the old state. Gradient accumulation scans over
micro-batches and normalises by the total loss weight, so any accumulation or sharding gives the same
update. SIGTERM/SIGINT checkpoint and exit cleanly; a run restarted in the same workdir resumes exactly.

With `train.lora.rank > 0` the state holds LoRA adapters (`lwjax.training.lora`) instead of the model's
parameters: the base is a frozen input of every step (no gradients, no optimizer state, never donated), read
again when a run resumes, since the checkpoints hold the adapters only; a finished run writes the merged model
to `<workdir>/merged`, a workdir `lwjax.models.load_pretrained` reads.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lwjax.config import ConfigError, DefaultedGroup, Field, non_negative_int, positive_int
from lwjax.data.pipeline import global_batch
from lwjax.models import logical
from lwjax.models.logical import axis_rules
from lwjax.models.pretrained import CHECKPOINTS_DIR, MERGED_DIR
from lwjax.training import checkpoint, lora, mesh as mesh_lib, optim, sharding
from lwjax.training.progress import Progress

TENSOR_AXIS = "tensor"  # the axis model dimensions split over (data and fsdp split the batch and the weights' rows)
SCHEMA = {
    "steps": positive_int(),
    "global_batch_size": positive_int("examples per step over all devices and micro-batches"),
    "grad_accum_steps": positive_int("micro-batches per step; divides global_batch_size"),
    "log_every": positive_int(),
    "eval_every": non_negative_int("0 disables periodic evaluation"),
    "eval_steps": positive_int("batches per evaluation"),
    "checkpoint_every": positive_int(),
    "keep_checkpoints": positive_int(),
    "async_checkpointing": Field(bool),
    "lora": DefaultedGroup(lora.SCHEMA),  # absent: rank 0
}

# A loss function maps (model, batch) to (loss sum, weight sum, {metric name: sum}); the trainer
# divides by the weight summed over the whole global batch. With a `reference` model (a distillation
# teacher) it is called as loss_fn(model, batch, reference).
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]


def _count(tree) -> str:
  return f"{sum(np.prod(a.shape) for a in jax.tree.leaves(tree)):,}"


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (all processes agree)."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("received signal %d: will checkpoint and exit after this step", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())


def _check_batch_split(train, mesh, rules) -> None:
  """A ConfigError naming `train.global_batch_size` when the batch's rows do not split evenly over the mesh axes
  the batch is sharded on (data x fsdp by default): checked here, before anything is lowered, where XLA would stop
  with an IndivisibleError traceback. (Micro-batches with fewer rows than those axes still compile: XLA reshards
  them, as the 70B rows of SCALING.md do.)"""
  target = dict(rules).get("batch")
  axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  split = int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))
  if train.global_batch_size % split:
    names = " x ".join(f"{a}={mesh.shape[a]}" for a in axes if a in mesh.shape)
    raise ConfigError("train.global_batch_size", f"{train.global_batch_size} rows do not split over the batch's mesh "
                      f"axes {names} ({split} ways)",
                      f"a multiple of {split}, or fewer devices on {'/'.join(axes)} (mesh.shape)")


def _check_model_split(model: nnx.Module, mesh, rules) -> None:
  """A ConfigError naming `model.<key>` when a GPT's heads or MLP hidden do not divide the `tensor` axis they are
  sharded over (`logical.check_divisible`), before anything is lowered: `logical_to_spec` would otherwise
  replicate them silently, and the step would run with no tensor parallelism in attention or the MLP. Fewer kv
  heads than the axis (grouped-query attention at a high tensor degree) and a vocabulary the axis does not divide
  are replicated, as MaxText and vLLM do, and said in the log. The GPT is `model`'s own config, a hybrid's
  attention model, or the GPT a reward model wraps (each model's `gpt_config()`); other models are not checked."""
  if not hasattr(model, "gpt_config"):
    return
  cfg = model.gpt_config()
  over_tensor = {name: target for name, target in rules
                 if target == TENSOR_AXIS or (isinstance(target, (list, tuple)) and TENSOR_AXIS in target)}
  logical.check_divisible(cfg, dict(mesh.shape), [(n, t) for n, t in over_tensor.items() if n in ("heads", "mlp")])
  tensor = mesh.shape.get(TENSOR_AXIS, 1)
  for name, key in (("kv_heads", "n_kv_heads"), ("vocab", "vocab_size")):
    if name in over_tensor and getattr(cfg, key) % tensor:
      logging.info("model.%s=%d is not divisible by tensor=%d: replicated over it", key, getattr(cfg, key), tensor)


class Trainer:
  """Trains `model_fn(rngs)` on `loss_fn` with `config.{train, optim, mesh}`; checkpoints in `workdir`."""

  def __init__(self, config, workdir: str, *, model_fn: Callable[[nnx.Rngs], nnx.Module], loss_fn: LossFn,
               flops_per_token: float | None = None, seq_len: int | None = None, mesh=None,
               frozen: Callable[[tuple[str, ...]], bool] | None = None, reference: nnx.Module | None = None):
    """`frozen(path)` names parameters (by their path of dict keys) that keep their value through training
    (e.g. the MLPs in a distillation stage). `reference` is a fixed model the loss reads (a teacher): its
    parameters are placed once in their logical shardings, passed to every step, never checkpointed."""
    self.config, self.workdir = config, workdir
    self.frozen = frozen
    train = config.train
    self.lora = lora.from_section(train.get("lora"))
    if self.lora is not None and frozen is not None:
      raise ValueError("train.lora freezes every base weight already; pass no `frozen`")
    if train.global_batch_size % train.grad_accum_steps:
      raise ValueError(f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
                       f"train.grad_accum_steps ({train.grad_accum_steps})")
    self.mesh = mesh or mesh_lib.make_mesh(config.mesh.shape)
    self.rules = sharding.rules_from_config(config.mesh.rules)
    _check_batch_split(train, self.mesh, self.rules)
    self.loss_fn = loss_fn
    self.tx, self.schedule = optim.make_optimizer(config.optim, train.steps)
    self.tokens_per_step = train.global_batch_size * (seq_len or 1)
    self.flops_per_step = flops_per_token * self.tokens_per_step if flops_per_token else None

    abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    _check_model_split(abstract_model, self.mesh, self.rules)
    self.graphdef, abstract_variables = nnx.split(abstract_model)
    axes = sharding.logical_axes(abstract_variables)

    def init_model(rng):
      return nnx.to_pure_dict(nnx.state(model_fn(nnx.Rngs(rng))))
    abstract_model_params = jax.eval_shape(init_model, jax.random.key(0))
    self.base, base_sh = None, None
    if self.lora is not None:  # the state trains adapters over a frozen base (`load_base`, or `fit`)
      base_sh = sharding.param_shardings(abstract_model_params, axes, self.mesh, self.rules)
      self._base_shardings, self._init_model = base_sh, jax.jit(init_model, out_shardings=base_sh)
      self.base = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract_model_params, base_sh)  # shapes only until loaded, for AOT lowering
      axes = lora.logical_axes(axes, self.lora)

    def init(rng):
      params = lora.init(abstract_model_params, self.lora, rng) if self.lora else init_model(rng)
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    abstract_state = jax.eval_shape(init, jax.random.key(0))
    replicated = NamedSharding(self.mesh, PartitionSpec())
    params_sh = sharding.param_shardings(abstract_state["params"], axes, self.mesh, self.rules)
    self.state_shardings = {
        "step": replicated, "params": params_sh,
        "opt_state": sharding.opt_state_shardings(abstract_state["opt_state"], abstract_state["params"],
                                                  params_sh, self.mesh),
    }
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_state, self.state_shardings)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.reference, ref_sh = None, None
    if reference is not None:
      self.reference_graphdef, ref_state = nnx.split(reference)
      ref_params = nnx.to_pure_dict(ref_state)
      ref_sh = sharding.param_shardings(ref_params, sharding.logical_axes(ref_state), self.mesh, self.rules)
      if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(ref_params)):
        # An abstract reference (`nnx.eval_shape`): shapes only, for lowering the steps ahead of time.
        self.reference = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      ref_params, ref_sh)
      else:
        self.reference = jax.device_put(ref_params, ref_sh)
    self.init_state = jax.jit(init, out_shardings=self.state_shardings)
    train_step = jax.jit(self._train_step,
                         in_shardings=(self.state_shardings, self.batch_sharding, base_sh, ref_sh),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    model_sh = params_sh if base_sh is None else base_sh
    eval_step = jax.jit(self._eval_step, in_shardings=(model_sh, self.batch_sharding, ref_sh),
                        out_shardings=replicated)
    # The jitted steps take (state, batch, LoRA base or None, reference params or None) and (model params, batch,
    # reference params or None); `lower` them for AOT.
    self.jitted_train_step, self.jitted_eval_step = train_step, eval_step
    self.train_step = lambda state, batch: train_step(state, batch, self.base, self.reference)
    self.eval_step = lambda params, batch: eval_step(params, batch, self.reference)
    logging.info("trainer: mesh %s, %s parameters%s", dict(self.mesh.shape), _count(abstract_model_params),
                 f"; trains {_count(abstract_state['params'])} in LoRA adapters ({self.lora})" if self.lora else "")

  def load_base(self, params) -> None:
    """Under LoRA: `params` (the model's, e.g. a pretrained checkpoint's) become the frozen base the adapters
    train over, placed in their logical shardings (no copy when they are there already)."""
    self.base = jax.device_put(params, self._base_shardings)

  def model_params(self, params):
    """The model's parameters for trainable `params` (a state's): under LoRA the base with the adapters merged
    into the weights they adapt (the other weights are the base's arrays, not copies), else `params`."""
    if self.lora is None:
      return params
    if isinstance(jax.tree.leaves(self.base)[0], jax.ShapeDtypeStruct):
      raise ValueError("no LoRA base loaded yet: call load_base(params) or fit first")
    return jax.device_put(lora.merge(self.base, params, self.lora), self._base_shardings)

  def restore_params(self, workdir: str | None = None):
    """The model parameters of the latest checkpoint of `workdir` (default: this run's), in this trainer's
    shardings: a finished run's final params, or another run's of the same model (a finetune's base). Under
    LoRA the checkpoint's adapters come merged into the loaded base (`model_params`)."""
    ckpt = checkpoint.Checkpointer(os.path.join(workdir or self.workdir, CHECKPOINTS_DIR))
    try:
      return self.model_params(ckpt.restore(self.abstract_state)[1]["params"])
    finally:
      ckpt.close()

  def state_from_params(self, params) -> dict:
    """A step-0 train state holding `params` (placed in the parameter shardings) and a new optimizer state."""
    # The train step donates its state, and `params` may share buffers with arrays the caller keeps (a teacher
    # whose embeddings the student starts from, also placed as the `reference`; a base model), so the state
    # holds a copy made on the devices: `device_put(..., may_alias=False)` does not copy when it reshards (jax
    # 0.10: a single-device array put on a replicated mesh sharding keeps the source buffer as device 0's shard).
    placed = jax.device_put(params, self.state_shardings["params"])
    return jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": jax.tree.map(jnp.copy, p),
                              "opt_state": self.tx.init(p)}, out_shardings=self.state_shardings)(placed)

  def _call_loss(self, params, batch, base, reference):
    model = nnx.merge(self.graphdef, params if base is None else lora.merge(base, params, self.lora))
    if reference is None:
      return self.loss_fn(model, batch)
    return self.loss_fn(model, batch, nnx.merge(self.reference_graphdef, jax.lax.stop_gradient(reference)))

  def _loss_and_grad(self, params, batch, base=None, reference=None):
    def loss(p):  # the base is no argument of the gradient: none is computed for it
      loss_sum, weight, metrics = self._call_loss(p, batch, base, reference)
      return loss_sum, (weight, metrics)
    (loss_sum, (weight, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return grads, loss_sum, weight, metrics

  def _train_step(self, state, batch, base=None, reference=None):
    with axis_rules(self.mesh, self.rules):
      accum = self.config.train.grad_accum_steps
      params = state["params"]
      if accum == 1:
        grads, loss_sum, weight, metrics = self._loss_and_grad(params, batch, base, reference)
      else:
        # Micro-batch i takes examples i, i + accum, ...: each stays evenly split over the data axes.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                             batch)

        def body(carry, mb):
          out = self._loss_and_grad(params, mb, base, reference)
          return jax.tree.map(jnp.add, carry, out), None
        zero = jax.eval_shape(self._loss_and_grad, params, jax.tree.map(lambda x: x[0], micro), base, reference)
        zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero)
        (grads, loss_sum, weight, metrics), _ = jax.lax.scan(body, zero, micro)
      weight = jnp.maximum(weight, 1.0)
      grads = jax.tree.map(lambda g: g / weight, grads)
      updates, opt_state = self.tx.update(grads, state["opt_state"], params)
      new_params = optax.apply_updates(params, updates)
      if self.frozen is not None:  # frozen parameters keep their values exactly (weight decay included)
        new_params = jax.tree_util.tree_map_with_path(
            lambda path, new, old: old if self.frozen(sharding.dict_path(path)) else new, new_params, params)
      new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
      out = {"loss": loss_sum / weight, "grad_norm": optax.tree.norm(grads),
             "learning_rate": self.schedule(state["step"]), **{k: v / weight for k, v in metrics.items()}}
      return new_state, out

  def _eval_step(self, params, batch, reference=None):
    with axis_rules(self.mesh, self.rules):
      loss_sum, weight, metrics = self._call_loss(params, batch, None, reference)
      return {"loss_sum": loss_sum, "weight": weight, **metrics}

  def evaluate(self, params, batches: Iterator[dict]) -> dict:
    """Loss per token (nats) and metrics of the model with `params` (`model_params`) over `batches` (local
    numpy batches)."""
    totals = None
    for local in batches:
      out = self.eval_step(params, global_batch(local, self.batch_sharding))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    weight = max(float(totals.pop("weight")), 1.0)
    result = {"loss": float(totals.pop("loss_sum")) / weight}
    result.update({k: float(v) / weight for k, v in totals.items()})
    return result

  def fit(self, train_iter, eval_batches: Callable[[], Iterator[dict]] | None = None, seed: int = 0,
          init_params=None, eval_hook: Callable[[int, dict], None] | None = None) -> dict:
    """Trains to `config.train.steps`, resuming from the latest checkpoint in the workdir if any.

    `train_iter` is a checkpointable (Grain) iterator of local numpy batches; `eval_batches()` returns
    a fresh iterator over the evaluation batches. A fresh run starts from `init_params` (a finetune:
    params of the same structure, e.g. another run's final ones, or a function returning them, called only
    when the run starts fresh: a resumed run reads no pretrained checkpoint) with a new optimizer state, else
    from the model's initialisation. Under LoRA they are the frozen base (default: the model's initialisation
    from `seed`), read on every start; the adapters start from `seed`. `eval_hook(step, model params)` runs after
    each evaluation (e.g. image summaries). Returns the step, the last train and eval metrics and, for a
    finished LoRA run, the directory of its merged model ("merged").
    """
    cfg = self.config.train
    ckpt = checkpoint.Checkpointer(os.path.join(self.workdir, CHECKPOINTS_DIR), keep=cfg.keep_checkpoints,
                                   save_every=cfg.checkpoint_every, async_save=cfg.async_checkpointing)
    if self.lora is not None:
      params = init_params() if callable(init_params) else init_params
      self.load_base(self._init_model(jax.random.key(seed)) if params is None else params)
    if ckpt.latest_step() is not None:
      step, state = ckpt.restore(self.abstract_state, train_iter)
    elif init_params is not None and self.lora is None:
      step, state = 0, self.state_from_params(init_params() if callable(init_params) else init_params)
    else:
      step, state = 0, self.init_state(jax.random.key(seed))
    progress = Progress(self.workdir, total_steps=cfg.steps, start_step=step,
                        tokens_per_step=self.tokens_per_step, flops_per_step=self.flops_per_step,
                        log_every=cfg.log_every)
    last_train, last_eval = {}, {}
    try:
      with _StopRequest() as stop:
        while step < cfg.steps:
          state, metrics = self.train_step(state, global_batch(next(train_iter), self.batch_sharding))
          step += 1
          last_train = progress.train_step(step, metrics) or last_train
          if eval_batches is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            model_params = self.model_params(state["params"])
            last_eval = self.evaluate(model_params, eval_batches())
            progress.eval(step, last_eval)
            if eval_hook is not None:
              eval_hook(step, model_params)
            del model_params  # the merged weights are not kept through training
            progress.reset_clock(step)
          if stop.agreed():
            ckpt.save(step, state, train_iter, self.config, force=True)
            logging.warning("stopped at step %d on request; the same --workdir resumes", step)
            break
          ckpt.save(step, state, train_iter, self.config, force=step == cfg.steps)
      ckpt.wait()
    finally:
      ckpt.close()
      progress.close()
    result = {"step": step, "train": last_train, "eval": last_eval}
    if self.lora is not None and step == cfg.steps:
      result["merged"] = self._save_merged(step, state["params"])
    return result

  def _save_merged(self, step: int, params) -> str:
    """Writes the model of a finished LoRA run as a workdir of its own (its merged parameters, and the run config
    with `train.lora.rank` 0: they are the model's own); returns its path. A run restarted after finishing finds
    it written."""
    directory = os.path.join(self.workdir, MERGED_DIR)
    config = self.config.copy_and_resolve_references()
    config.train.lora.rank = 0
    ckpt = checkpoint.Checkpointer(os.path.join(directory, CHECKPOINTS_DIR), keep=1, async_save=False)
    try:
      if ckpt.latest_step() != step:
        ckpt.save(step, {"params": self.model_params(params)}, config=config, force=True)
        ckpt.wait()
    finally:
      ckpt.close()
    return directory
