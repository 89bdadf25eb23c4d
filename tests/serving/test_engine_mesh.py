"""The engine tensor parallel on a device mesh (8 fake CPU devices): greedy outputs of a mixed workload (chunked
prefill, a prefix-cache hit, preemption from a small pool; KV offload, nano-batches, separate calls) equal on one
device and on tensor=1, 2, 4; weights and the KV pool sharded over `tensor`; indivisible shapes refused naming the
key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lwjax.config import ConfigError
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving import tensor_parallel
from lwjax.serving.engine import LLM, Engine
from lwjax.serving.offload import KVOffloadStore
from lwjax.serving.sampling import SamplingParams

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=64,
                max_seq_len=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=5)
# Chunked prefill (chunks of 4), rows of 2, and a pool of 6 pages that preempts.
SMALL_POOL = dict(num_pages=6, page_size=4, prefill_chunk=4, max_batch_tokens=8, max_num_seqs=2)


@pytest.fixture(scope="module")
def model():
  return numpy_model()


def numpy_model():
  """A GPT of CFG's shape with normal weights drawn by numpy (GPT's own initialisation compiles a program per
  parameter shape: seconds on a loaded two-core machine)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(CFG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda v: v.replace(jnp.asarray(rng.normal(0.0, 0.2, v.shape), jnp.float32)), state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def _mesh(tensor):
  return tensor_parallel.serving_mesh({"data": 1, "fsdp": 1, "tensor": tensor})


def _workload(seed=1):
  """Prompts of 10, 6, 3 and 12 tokens; the last shares the first's two full blocks (a prefix hit once the first
  has prefilled)."""
  rng = np.random.default_rng(seed)
  shared = rng.integers(3, 64, size=9).tolist()
  return [shared + [5], rng.integers(3, 64, size=6).tolist(), rng.integers(3, 64, size=3).tolist(),
          shared + [7, 8, 9]]


def _serve(model, mesh, prompts, **engine_kwargs):
  engine = Engine(model, mesh=mesh, **engine_kwargs)
  requests = [engine.add_request(p, GREEDY) for p in prompts]
  engine.run_until_done()
  assert not engine.leaks()
  return engine, [r.output for r in requests]


def test_tensor_parallel_engine_equals_one_device(model):
  prompts = _workload()
  single, expected = _serve(model, None, prompts, **SMALL_POOL)
  assert single.scheduler.num_preemptions > 0 and single.scheduler.num_prefix_hit_tokens > 0
  engine, outputs = _serve(model, _mesh(2), prompts, **SMALL_POOL)
  assert outputs == expected
  assert engine.scheduler.num_preemptions == single.scheduler.num_preemptions
  assert engine.num_model_calls <= engine.num_iterations  # mixed decode + prefill calls ran on the mesh
  # The same programs as on one device: none compiled again for an input placed otherwise (jit keys on placement).
  assert engine.num_compiled_programs == single.num_compiled_programs


@pytest.mark.slow
@pytest.mark.parametrize("tensor,engine_kwargs", [
    (1, SMALL_POOL),
    (4, SMALL_POOL),
    (4, dict(num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16, max_num_seqs=4, nano_batches=2)),
    (2, dict(SMALL_POOL, mixed_batches=False, async_scheduling=False)),
])
def test_tensor_parallel_engine_equals_one_device_on_more_meshes(model, tensor, engine_kwargs):
  prompts = _workload(seed=2) + _workload(seed=3)
  _, expected = _serve(model, None, prompts, **engine_kwargs)
  _, outputs = _serve(model, _mesh(tensor), prompts, **engine_kwargs)
  assert outputs == expected


@pytest.mark.slow
def test_offloaded_blocks_are_restored_into_the_sharded_pool(model, tmp_path):
  """A conversation's next turn, its first turn evicted from the pool meanwhile, restores the offloaded blocks into
  the pools on the mesh and answers as on one device."""
  turn1 = list(range(10, 19))
  evictions = [list(range(40, 51)), [30] * 11]
  outputs = {}
  for tensor in (None, 2):
    store = KVOffloadStore(host_bytes=1 << 20)
    engine = Engine(model, mesh=tensor and _mesh(tensor), num_pages=8, page_size=4, prefill_chunk=8,
                    max_batch_tokens=16, offload=store)
    first = engine.add_request(turn1, GREEDY)
    engine.run_until_done()
    for prompt in evictions:
      engine.add_request(prompt, GREEDY)
      engine.run_until_done()
    second = engine.add_request(turn1 + first.output + [3, 4], GREEDY)
    engine.run_until_done()
    assert store.counters.bytes_to_device > 0 and store.counters.prefill_tokens_saved >= 12
    outputs[tensor] = (first.output, second.output)
  assert outputs[2] == outputs[None]


@pytest.mark.slow
def test_logprobs_and_seeded_sampling_on_the_mesh_match_one_device(model):
  """Top logprobs, prompt logprobs and seeded sampling (top-k, top-p) over vocabulary-sharded logits: the tokens of
  one device, the logprobs to float32 rounding."""
  prompts = _workload(seed=4)
  params = [SamplingParams(temperature=0.0, max_tokens=4, logprobs=3), SamplingParams(max_tokens=4, prompt_logprobs=2),
            SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=6),
            SamplingParams(temperature=1.0, seed=11, max_tokens=6)]
  results = {}
  for tensor in (None, 2):
    engine = Engine(model, mesh=tensor and _mesh(tensor), **SMALL_POOL)
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine.run_until_done()
    results[tensor] = requests
  for single, sharded in zip(results[None], results[2], strict=True):
    assert sharded.output == single.output
    for (chosen, ids, top), (chosen2, ids2, top2) in zip(single.logprobs, sharded.logprobs, strict=True):
      assert ids2 == ids
      np.testing.assert_allclose([chosen2, *top2], [chosen, *top], atol=1e-5)
    assert sharded.prompt_logprobs.keys() == single.prompt_logprobs.keys()
    for position, (chosen, ids, top) in single.prompt_logprobs.items():
      assert sharded.prompt_logprobs[position][1] == ids
      np.testing.assert_allclose([sharded.prompt_logprobs[position][0], *sharded.prompt_logprobs[position][2]],
                                 [chosen, *top], atol=1e-5)


@pytest.mark.slow
def test_the_pallas_kernel_runs_per_shard():
  """The Pallas paged-attention kernel (in interpret mode on CPU) under shard_map over tensor=2 decodes as on one
  device: XLA cannot partition it, each shard runs it on its own kv heads."""
  cfg = dataclasses.replace(CFG, n_layers=1, attention_impl="interpret")
  model = GPT(cfg, rngs=nnx.Rngs(0))
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
  kwargs = dict(num_pages=16, page_size=4, prefill_chunk=4, max_batch_tokens=8, max_num_seqs=2)
  assert _serve(model, _mesh(2), prompts, **kwargs)[1] == _serve(model, None, prompts, **kwargs)[1]


@pytest.mark.slow
def test_llm_passes_the_mesh_to_its_engine(model):
  llm = LLM(model, mesh=_mesh(2), num_pages=16, page_size=4)
  assert llm.engine.shardings.mesh.shape["tensor"] == 2 and llm.generate([[5, 6, 7]], GREEDY)[0][0].output == \
      _serve(model, None, [[5, 6, 7]], num_pages=16, page_size=4)[1][0]


def test_weights_and_kv_pool_are_sharded_over_tensor(model):
  engine = Engine(model, mesh=_mesh(2), num_pages=8, page_size=4)
  pool = engine.kv.k[0]
  assert pool.sharding.spec == P("tensor", None, None, None)
  assert {s.data.shape for s in pool.addressable_shards} == {(2, 8, 4, 8)}  # 2 of 4 kv heads per device
  attn, mlp = engine.params["layers"][0]["attn"], engine.params["layers"][0]["mlp"]
  assert attn["wq"][...].sharding.spec == P(None, "tensor", None)
  assert attn["wk"][...].sharding.spec == P(None, "tensor", None)
  assert attn["wo"][...].sharding.spec == P("tensor", None, None)
  assert mlp["w_gate"][...].sharding.spec == P(None, "tensor")
  assert mlp["w_down"][...].sharding.spec == P("tensor", None)
  assert engine.params["embed"][...].sharding.spec == P("tensor", None)
  assert engine.params["final_norm"]["scale"][...].sharding.is_fully_replicated
  assert {s.data.shape for s in attn["wq"][...].addressable_shards} == {(32, 4, 8)}
  np.testing.assert_array_equal(np.asarray(attn["wq"][...]), np.asarray(model.layers[0].attn.wq[...]))
  engine.kv.reset_pools()  # after a failed iteration took the pools: rebuilt on the mesh
  assert engine.kv.v[1].sharding == pool.sharding


@pytest.mark.parametrize("field,value,tensor,message", [
    ("n_kv_heads", 2, 4, "model.n_kv_heads: 2 is not divisible by mesh axis tensor=4 (valid: mesh.shape.tensor in "
                         "1, 2; or the rule ['kv_heads', None] in mesh.rules)"),
    ("d_ff", 66, 4, "model.d_ff: 66 is not divisible by mesh axis tensor=4"),
    ("vocab_size", 61, 2, "model.vocab_size: 61 is not divisible by mesh axis tensor=2"),
])
def test_indivisible_shapes_are_refused_naming_the_key(field, value, tensor, message):
  cfg = dataclasses.replace(CFG, **{field: value})
  with pytest.raises(ValueError) as error:
    Engine(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), mesh=_mesh(tensor))  # refused before any weight
  assert isinstance(error.value, ConfigError) and str(error.value).startswith(message), str(error.value)


def test_a_mesh_split_over_data_is_refused(model):
  mesh = tensor_parallel.serving_mesh({"data": 2, "fsdp": 1, "tensor": 2})
  with pytest.raises(ConfigError, match=r"^mesh.shape.data: 2: the engine runs tensor parallel only"):
    Engine(model, mesh=mesh)
  with pytest.raises(ConfigError, match=r"^mesh.shape: .* needs 16 devices, 8 present"):
    tensor_parallel.serving_mesh({"data": 1, "fsdp": 1, "tensor": 16})
