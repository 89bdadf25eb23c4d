"""Trainer: sharded steps equal single-device steps; gradient accumulation is exact; sharding is applied."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax.data import pipeline, tokenizer
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.training import losses, mesh as mesh_lib
from lwjax.training.trainer import Trainer

lm_pretrain = importlib.import_module("experiments.lm_pretrain")
# fp32 everywhere; devices differ only in the order of the reductions.
LOSS_RTOL, PARAM_ATOL = 1e-5, 2e-5


def _config(mesh_shape=(1, 1, 1), grad_accum=1):
  config = lm_pretrain.get_config("scale=smoke")
  config.mesh.shape.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
  config.train.grad_accum_steps = grad_accum
  return config


def _dataset(config):
  docs = [f"doc {i}: " + " ".join(["alpha", "beta", "gamma"][j % 3] for j in range(i % 17 + 3))
          for i in range(200)]
  return pipeline.make_lm_dataset(docs, tokenizer.ByteTokenizer(), seq_len=config.data.seq_len,
                                  global_batch_size=config.train.global_batch_size, shuffle_seed=0)


def _batches(config, n):
  it = iter(_dataset(config))
  return [next(it) for _ in range(n)]


def _train(config, batches, devices=None):
  model_cfg = GPTConfig.from_dict(config.model)
  mesh = mesh_lib.make_mesh(config.mesh.shape, devices)
  trainer = Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs),
                    loss_fn=losses.lm_loss, mesh=mesh)
  state = trainer.init_state(jax.random.key(0))
  losses_seen = []
  for local in batches:
    state, metrics = trainer.train_step(state, pipeline.global_batch(local, trainer.batch_sharding))
    losses_seen.append(float(metrics["loss"]))
  return trainer, state, np.array(losses_seen)


@pytest.fixture(scope="module")
def single_device_run():
  config = _config()
  batches = _batches(config, 3)
  _, state, losses_seen = _train(config, batches, devices=jax.devices()[:1])
  return batches, jax.device_get(state["params"]), losses_seen


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_steps_equal_single_device(single_device_run, mesh_shape):
  batches, params_1, losses_1 = single_device_run
  trainer, state, losses_n = _train(_config(mesh_shape), batches)
  np.testing.assert_allclose(losses_n, losses_1, rtol=LOSS_RTOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), jax.device_get(state["params"]),
               params_1)
  # The parameters really are sharded as the rules say.
  wq = state["params"]["layers"][0]["attn"]["wq"]
  expect = ("fsdp" if mesh_shape[1] > 1 else None, "tensor" if mesh_shape[2] > 1 else None, None)
  assert tuple(wq.sharding.spec) + (None,) * (3 - len(wq.sharding.spec)) == expect
  mu = state["opt_state"][1][0].mu["layers"][0]["attn"]["wq"]
  assert mu.sharding == wq.sharding


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
  batches, params_1, losses_1 = single_device_run
  _, state, losses_acc = _train(_config(grad_accum=4), batches, devices=jax.devices()[:1])
  np.testing.assert_allclose(losses_acc, losses_1, rtol=LOSS_RTOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), jax.device_get(state["params"]),
               params_1)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_loss_decreases_on_repeated_batch(optimizer):
  config = _config((2, 2, 2))
  config.optim.name = optimizer
  batch = _batches(config, 1) * 15
  _, _, losses_seen = _train(config, batch)
  assert losses_seen[-1] < 0.8 * losses_seen[0]


def test_pallas_attention_kernel_runs_per_shard_under_a_mesh(single_device_run):
  batches, _, losses_1 = single_device_run
  config = _config((2, 2, 2))
  config.model.attention_impl = "interpret"  # the TPU kernel, interpreted on CPU, inside shard_map
  _, _, losses_n = _train(config, batches[:1])
  np.testing.assert_allclose(losses_n, losses_1[:1], rtol=LOSS_RTOL)


def test_fit_starts_a_finetune_from_given_params_and_calls_the_eval_hook(tmp_path):
  config = _config(mesh_shape=(2, 2, 2))
  config.train.update(steps=2, eval_every=1, checkpoint_every=2, async_checkpointing=False)
  batches = _batches(config, 3)
  model_cfg = GPTConfig.from_dict(config.model)
  trainer = Trainer(config, str(tmp_path), model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=losses.lm_loss)
  start = jax.tree.map(lambda x: x * 0.5, jax.device_get(trainer.init_state(jax.random.key(7))["params"]))
  expected = trainer.evaluate(start, iter(batches[:1]))["loss"]
  calls = []
  result = trainer.fit(iter(_dataset(config)), lambda: iter(batches[:1]), seed=0, init_params=start,
                       eval_hook=lambda step, params: calls.append((step, jax.tree.structure(params))))
  assert [step for step, _ in calls] == [1, 2] and calls[0][1] == jax.tree.structure(start)
  assert result["step"] == 2
  # The first step trained from `start`: its loss is the loss of those params on the first batch.
  first = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "train"][0]
  np.testing.assert_allclose(first["loss"], expected, rtol=1e-5)


def test_state_from_params_copies_arrays_the_caller_keeps_onto_a_replicated_mesh():
  """The train step donates its state: a start whose arrays the caller keeps (a teacher's, also the reference)
  must not lend them to it, though `device_put(may_alias=False)` keeps device 0's buffer when it reshards."""
  config = _config(mesh_shape=(8, 1, 1))
  model_cfg = GPTConfig.from_dict(config.model)
  trainer = Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=losses.lm_loss)
  start = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype), trainer.abstract_state["params"])  # on device 0
  kept = {leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(start)}
  state = trainer.state_from_params(start)
  placed = {shard.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state) for shard in leaf.addressable_shards}
  assert not kept & placed
  np.testing.assert_array_equal(jax.device_get(state["params"]["embed"]), jax.device_get(start["embed"]))


def test_frozen_parameters_keep_their_values_and_the_reference_model_reaches_the_loss():
  """Distillation support: `frozen` paths never change (weight decay included); `reference` is passed to the loss."""
  from flax import nnx
  config = _config()
  config.optim.weight_decay = 0.1
  model_cfg = GPTConfig.from_dict(config.model)
  teacher = GPT(model_cfg, rngs=nnx.Rngs(7))
  seen = []

  def loss_fn(model, batch, reference):
    seen.append(type(reference).__name__)
    logits, target = model(batch["inputs"]), jax.nn.softmax(reference(batch["inputs"]))
    loss = -(target * jax.nn.log_softmax(logits)).sum(-1)
    return loss.sum(), np.float32(loss.size), {}

  def frozen(path):
    return "mlp" in path

  mesh = mesh_lib.make_mesh(config.mesh.shape, jax.devices()[:1])
  trainer = Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=loss_fn,
                    mesh=mesh, frozen=frozen, reference=teacher)
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(state["params"])
  for local in _batches(config, 2):
    state, metrics = trainer.train_step(state, pipeline.global_batch(local, trainer.batch_sharding))
  after = jax.device_get(state["params"])
  assert seen and set(seen) == {"GPT"} and np.isfinite(float(metrics["loss"]))
  layer_before, layer_after = before["layers"][0], after["layers"][0]
  np.testing.assert_array_equal(layer_after["mlp"]["w_up"], layer_before["mlp"]["w_up"])
  assert not np.array_equal(layer_after["attn"]["wq"], layer_before["attn"]["wq"])


def _lora_config(steps=12):
  config = _config((2, 2, 2))
  config.train.lora.update(rank=4, alpha=8.0, targets="wq,wv,wo,w_down")
  config.train.update(steps=steps, eval_every=0, log_every=1, checkpoint_every=2, async_checkpointing=False)
  config.optim.update(learning_rate=1e-2, schedule="constant", warmup_steps=0)
  return config


def _base(config):
  from flax import nnx
  model = GPT(GPTConfig.from_dict(config.model), rngs=nnx.Rngs(7))
  return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))


def test_lora_trains_sharded_adapters_over_a_frozen_base_and_merges_into_the_same_model():
  from flax import traverse_util
  config = _lora_config()
  model_cfg = GPTConfig.from_dict(config.model)
  trainer = Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=losses.lm_loss)
  base = _base(config)
  trainer.load_base(base)
  state = trainer.init_state(jax.random.key(0))
  # The state holds adapters only, and so does the optimizer: nothing of the base's size besides the base.
  adapters = traverse_util.flatten_dict(state["params"])
  assert {p[-1] for p in adapters} == {"a", "b"} and {p[-2] for p in adapters} == {"wq", "wv", "wo", "w_down"}
  assert {x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim} <= {x.shape for x in adapters.values()}
  # Each factor is sharded over the mesh axes of the weight axes it covers: a b comes out laid out like W.
  wq = state["params"]["layers"][0]["attn"]["wq"]
  assert tuple(wq["a"].sharding.spec) == ("fsdp", None) and tuple(wq["b"].sharding.spec)[:2] == (None, "tensor")
  wo = state["params"]["layers"][0]["attn"]["wo"]
  assert tuple(wo["a"].sharding.spec)[:1] == ("tensor",) and tuple(wo["b"].sharding.spec) == (None, "fsdp")

  batch = pipeline.global_batch(_batches(config, 1)[0], trainer.batch_sharding)
  losses_seen = []
  for _ in range(config.train.steps - 1):
    state, metrics = trainer.train_step(state, batch)
    losses_seen.append(float(metrics["loss"]))
  assert losses_seen[-1] < 0.8 * losses_seen[0], losses_seen
  merged = trainer.model_params(state["params"])
  merged_loss = trainer.evaluate(merged, iter(_batches(config, 1)))["loss"]
  merged = jax.device_get(merged)
  state, metrics = trainer.train_step(state, batch)  # its loss is the adapted model's, before the update
  np.testing.assert_allclose(merged_loss, float(metrics["loss"]), rtol=1e-5)

  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.base), base)  # bit-identical base
  assert all(np.abs(x).max() > 0 for p, x in traverse_util.flatten_dict(jax.device_get(state["params"])).items()
             if p[-1] == "b")
  flat_merged = traverse_util.flatten_dict(merged)
  for path, w in traverse_util.flatten_dict(base).items():  # merged: only the adapted weights moved
    if path[-1] in ("wq", "wv", "wo", "w_down"):
      assert np.abs(flat_merged[path] - w).max() > 1e-4, path
    else:
      np.testing.assert_array_equal(flat_merged[path], w)


@pytest.mark.slow  # two LoRA runs; the default suite keeps LoRA's mechanics above and lm_pretrain's LoRA run
def test_lora_fit_resumes_from_adapter_checkpoints_and_writes_the_merged_model(tmp_path):
  """Checkpoints hold the adapters; the base is read again on every start; a resumed run's losses are the
  uninterrupted run's, bit for bit; the finished run's merged model loads as a workdir."""
  from lwjax.models import load_pretrained
  reads = []

  def fit(steps, workdir):
    config = _lora_config(steps)
    model_cfg = GPTConfig.from_dict(config.model)
    trainer = Trainer(config, str(workdir), model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=losses.lm_loss)
    result = trainer.fit(iter(_dataset(config)), init_params=lambda: reads.append(1) or _base(config))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return trainer, result, {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

  _, _, uninterrupted = fit(4, tmp_path / "a")
  fit(2, tmp_path / "b")
  trainer, result, resumed = fit(4, tmp_path / "b")
  assert len(reads) == 3 and sorted(resumed) == [1, 2, 3, 4]
  assert [resumed[s] for s in (3, 4)] == [uninterrupted[s] for s in (3, 4)]
  assert result["merged"] == str(tmp_path / "b" / "merged")
  model, tokenizer = load_pretrained(result["merged"])
  assert tokenizer is None and model.cfg == GPTConfig.from_dict(_lora_config().model)
  from flax import nnx
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)),
               jax.device_get(trainer.restore_params()))


def test_a_batch_the_mesh_cannot_split_is_a_config_error_before_lowering():
  """A global batch whose rows the batch's mesh axes (data x fsdp) do not divide: one line naming the key and the
  valid values, at construction, instead of XLA's IndivisibleError when the batch is placed or lowered."""
  from lwjax.config import ConfigError
  config = _config((4, 2, 1))
  config.train.global_batch_size = 12
  model_cfg = GPTConfig.from_dict(config.model)
  with pytest.raises(ConfigError, match=r"^train.global_batch_size: 12 rows do not split over the batch's mesh "
                                        r"axes data=4 x fsdp=2 \(8 ways\) \(valid: a multiple of 8"):
    Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=losses.lm_loss)


def test_model_dimensions_the_tensor_axis_cannot_split_are_a_config_error_before_lowering():
  """Heads (or the MLP hidden) that the tensor axis does not divide: one line naming the model key, the axis and
  the extents that would divide, at construction; the sharding would otherwise replicate them silently, with no
  tensor parallelism left. A reward model's wrapped GPT is checked too. Fewer kv heads than the axis are
  replicated (grouped-query attention at a high tensor degree), as the sharded-step test runs them."""
  from lwjax.config import ConfigError
  from lwjax.projects.genrm import verifiers
  config = _config((2, 1, 4))
  config.model.update(n_heads=6, n_kv_heads=2, d_ff=96)
  model_cfg = GPTConfig.from_dict(config.model)
  with pytest.raises(ConfigError, match=r"^model.n_heads: 6 is not divisible by mesh axis tensor=4 \(valid: "
                                        r"mesh.shape.tensor in 1, 2, 3, 6;"):
    Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=losses.lm_loss)
  with pytest.raises(ConfigError, match=r"^model.n_heads"):
    Trainer(config, "/tmp/unused", loss_fn=verifiers.disc_loss,
            model_fn=lambda rngs: verifiers.RewardModel(GPT(model_cfg, rngs=rngs), rngs=rngs))
  config.model.update(n_heads=8, d_ff=90)
  mlp_cfg = GPTConfig.from_dict(config.model)
  with pytest.raises(ConfigError, match=r"^model.d_ff: 90 is not divisible by mesh axis tensor=4"):
    Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(mlp_cfg, rngs=rngs), loss_fn=losses.lm_loss)
  config.mesh.shape.update(data=4, tensor=2)
  Trainer(config, "/tmp/unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs), loss_fn=losses.lm_loss)
