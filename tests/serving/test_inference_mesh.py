"""Every inference path on a device mesh (8 fake CPU devices) gives the tokens of one device: the batch sampler
behind `lwjax.candidates` (greedy and seeded samples; tensor, data, fsdp), candidate sampling through a job's mesh,
speculative decoding (GPT and hybrid targets and drafts, tensor=2), the WiM job's engine (tensor from its
`mesh.shape`) and a Mamba hybrid in the engine (tensor=2, its recurrent states over heads)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lwjax import candidates, reasoning_tasks
from lwjax.models import mamba_hybrid as mh
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving import batch_sampler, speculative, tensor_parallel
from lwjax.serving.engine import Engine
from tests.serving.test_batch_sampler import _Tok
from tests.serving.test_engine_hybrid import GREEDY as HYBRID_GREEDY, _prompts as hybrid_prompts

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=64)
EOS = _Tok.eos_id


def _mesh(data=1, fsdp=1, tensor=1):
  return tensor_parallel.serving_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def _numpy_gpt(cfg=CFG, seed=0, scale=0.3):
  """A GPT with normal weights drawn by numpy (GPT's own initialisation compiles a program per parameter shape)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda v: v.replace(jnp.asarray(rng.normal(0.0, scale, v.shape), jnp.float32)), state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
  return _numpy_gpt()


def _samples(model, mesh, prompts, temperature):
  placement = batch_sampler.sampler_shardings(model, mesh)
  graphdef, params = nnx.split(model)
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=10, max_new_tokens=6, n=3, eos_id=EOS,
                                        placement=placement)
  return batch_sampler.sample_texts(sample_n, params, _Tok, prompts, n=3, prompt_len=10,
                                    batch_prompts=batch_sampler.rounded_batch(2, mesh), seed=7,
                                    temperature=temperature)


@pytest.mark.parametrize("axes", [dict(data=2, tensor=2), pytest.param(dict(tensor=2), marks=pytest.mark.slow),
                                  pytest.param(dict(data=2), marks=pytest.mark.slow),
                                  pytest.param(dict(data=2, fsdp=2), marks=pytest.mark.slow)],
                         ids=["data2-tensor2", "tensor2", "data2", "data2-fsdp2"])
def test_batch_sampler_on_a_mesh_equals_one_device(model, axes):
  """Greedy and seeded samples of five ragged prompts (batches of 2, or of the data extent rounded up to it: the
  last one padded), the weights over tensor and the prompts over data and fsdp."""
  rng = np.random.default_rng(0)
  prompts = [[1] + rng.integers(3, 64, size=rng.integers(1, 9)).tolist() for _ in range(5)]
  mesh = _mesh(**axes)
  for temperature in (0.0, 1.0):
    expected = _samples(model, None, prompts, temperature)
    assert _samples(model, mesh, prompts, temperature) == expected
  assert len({text for samples in expected for text, _ in samples}) > 5  # seeded samples differ
  placement = batch_sampler.sampler_shardings(model, mesh)
  assert placement.params["layers"][0]["attn"]["wq"].spec == P(None, "tensor" if "tensor" in axes else None, None)
  if "data" in axes:  # prompts per call that do not split over the batch axes: refused before any work
    sample_n = batch_sampler.make_sampler(nnx.graphdef(model), prompt_len=10, max_new_tokens=6, n=3, eos_id=EOS,
                                          placement=placement)
    with pytest.raises(ValueError, match=r"^batch_prompts: 3 prompts per call do not split over the mesh's batch "
                                         r"axes data=2( x fsdp=2)? \(valid: a multiple of [24]\)$"):
      batch_sampler.sample_texts(sample_n, nnx.state(model), _Tok, prompts, n=3, prompt_len=10, batch_prompts=3,
                                 seed=7, temperature=0.0)


@pytest.mark.slow
def test_candidates_on_a_jobs_mesh_equal_one_device(monkeypatch):
  """`candidates.sample` and `greedy` on a job's mesh (`batch_sampler.job_mesh`, training's: data=2 x fsdp=4 here;
  batch_prompts 3 rounded up to 8) give the labelled candidates of one device."""
  task = reasoning_tasks.get("last_letter")
  cfg = GPTConfig(vocab_size=task.tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                  head_dim=8, d_ff=32, max_seq_len=96)
  solver = _numpy_gpt(cfg, scale=0.5)
  records = task.records(5, seed=0, split="test")
  mesh = batch_sampler.job_mesh({"data": 2, "fsdp": -1, "tensor": 1})  # every device, as training's
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  options = dict(n=2, temperature=1.0, max_new_tokens=10, batch_prompts=3, seed=3)
  expected, _ = candidates.sample(solver, task, records, **options)
  problems, _ = candidates.sample(solver, task, records, mesh=mesh, **options)
  assert problems == expected
  assert candidates.greedy(solver, task, records, max_new_tokens=10, batch_prompts=3, mesh=mesh) == \
      candidates.greedy(solver, task, records, max_new_tokens=10, batch_prompts=3)


@pytest.mark.slow
def test_speculative_decoding_on_a_mesh_equals_one_device():
  """Speculative decoding and greedy decoding with target and draft tensor parallel (tensor=2): a hybrid target
  with a GPT draft and a GPT target with a hybrid draft (Mamba states over heads, per-shard state updates)."""
  cfg = dataclasses.replace(CFG, vocab_size=24, max_seq_len=128)
  teacher, other = _numpy_gpt(cfg, seed=1), _numpy_gpt(cfg, seed=2)
  hybrid = mh.HybridGPT.from_teacher(teacher, mh.HybridConfig(gpt=cfg, mamba_layers=(0,), chunk_size=8),
                                     rngs=nnx.Rngs(1))
  mesh, prompt = _mesh(tensor=2), [3, 7, 1, 9, 4]
  for target, draft in ((hybrid, other), (teacher, hybrid)):
    expected = speculative.greedy(target, prompt, 10)
    np.testing.assert_array_equal(speculative.greedy(target, prompt, 10, mesh=mesh), expected)
    tokens, stats = speculative.generate(target, draft, prompt, 10, k=3)
    sharded, sharded_stats = speculative.generate(target, draft, prompt, 10, k=3, mesh=mesh)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(sharded, tokens)
    assert sharded_stats == stats and stats["acceptance_rate"] < 1.0
  with pytest.raises(ValueError, match=r"^mesh.shape.data: 2: the engine runs tensor parallel only"):
    speculative.greedy(teacher, prompt, 2, mesh=_mesh(data=2, tensor=2))


@pytest.mark.slow
def test_the_wim_jobs_engine_takes_the_configs_tensor_split():
  """The WiM job's reading of one tiny document (margins, relevance, the answer; three methods) with
  `mesh.shape.tensor=2` equals one device's; its engine holds the weights over tensor."""
  from experiments import wim as wim_experiment
  from lwjax.projects.wim import job, tasks
  config = wim_experiment.get_config("scale=smoke")
  config.model.update(n_heads=4, n_kv_heads=2, head_dim=8)
  config.eval.update(margin_tokens=4, answer_tokens=3)
  cfg = GPTConfig.from_dict(config.model)
  reader = _numpy_gpt(dataclasses.replace(cfg, max_seq_len=320), scale=0.2)
  docs = tasks.generate("retrieval", 1, seed=3, num_segments=2, segment_words=config.task.segment_words)
  results = {}
  for tensor in (1, 2):
    config.mesh.shape.update(data=8 // tensor, tensor=tensor)  # training's mesh: data fills the devices
    engine = job._engine(config, reader, tasks.WiMTokenizer())
    assert (engine.shardings is not None) == (tensor == 2)
    result = job.read(config, reader, docs, engine)
    results[tensor] = {m: {k: v for k, v in r.items() if "seconds" not in k} for m, r in result.items()}
  assert results[2] == results[1]
  assert engine.params["layers"][0]["attn"]["wq"][...].sharding.spec == P(None, "tensor", None)


@pytest.mark.slow
def test_a_hybrid_in_the_engine_on_a_mesh_equals_one_device():
  """A half-Mamba hybrid served tensor parallel (tensor=2) under chunked prefill and preemption: the greedy outputs
  of one device; the recurrent-state pools lie over heads, the KV pools over kv heads."""
  hybrid = mh.HybridGPT(mh.HybridConfig(gpt=CFG, mamba_layers=(1,), chunk_size=4), rngs=nnx.Rngs(0))
  prompts = hybrid_prompts(6)
  outputs = []
  for mesh in (None, _mesh(tensor=2)):
    engine = Engine(hybrid, mesh=mesh, max_num_seqs=4, num_pages=9, page_size=4, prefill_chunk=8,
                    max_batch_tokens=32)
    requests = [engine.add_request(p, HYBRID_GREEDY) for p in prompts]
    engine.run_until_done()
    assert engine.scheduler.num_preemptions > 0 and not engine.leaks()
    outputs.append([r.output for r in requests])
  assert outputs[1] == outputs[0]
  (conv_x, conv_b, conv_c), ssm = engine.states[1]
  assert conv_x.sharding.spec == P(None, None, "tensor", None) and ssm.sharding.spec == P(None, "tensor", None, None)
  assert {s.data.shape for s in ssm.addressable_shards} == {(5, 2, 8, 8)}  # 2 of 4 heads per device, 4 + 1 slots
  assert engine.kv.k[0].sharding.spec == P("tensor", None, None, None)
