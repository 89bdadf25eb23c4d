"""Data-parallel engine replicas (fake CPU devices): each replica on its own `tensor` devices, requests to the
least-loaded one, continuations to their parent's; greedy and unseeded sampled outputs of the mixed workload of the
tensor=2 test equal one device's on tensor=2 x data=2."""

import pytest

from lwjax.config import ConfigError
from lwjax.serving import replicas, tensor_parallel
from lwjax.serving.engine import Engine
from lwjax.serving.sampling import SamplingParams
from tests.serving.test_engine_mesh import GREEDY, SMALL_POOL, _workload, numpy_model


@pytest.fixture(scope="module")
def model():
  return numpy_model()


def _mesh(data, tensor):
  return tensor_parallel.serving_mesh({"data": data, "fsdp": 1, "tensor": tensor})


def test_replica_meshes_are_the_tensor_groups_along_data():
  mesh = _mesh(2, 2)
  subs = replicas.replica_meshes(mesh)
  assert [dict(m.shape) for m in subs] == [{"data": 1, "fsdp": 1, "tensor": 2}] * 2
  assert [[d.id for d in m.devices.flat] for m in subs] == [[0, 1], [2, 3]]
  with pytest.raises(ConfigError, match=r"^mesh.shape.fsdp: 2: the engine runs tensor parallel only"):
    replicas.check_mesh({"data": 2, "fsdp": 2, "tensor": 1})


def test_requests_go_to_the_least_loaded_replica_and_continuations_to_their_parent(model):
  front = replicas.EngineReplicas.build(model, _mesh(2, 1), num_pages=16, page_size=4, max_num_seqs=2)
  pools = [e.kv.k[0].sharding.device_set for e in front.replicas]
  assert pools[0] != pools[1]  # each replica's KV pool on its own device
  long = front.add_request(list(range(3, 30)), SamplingParams(max_tokens=10))
  short = [front.add_request([3, 4, 5], SamplingParams(max_tokens=2)) for _ in range(3)]
  where = {r.id: i for i, e in enumerate(front.replicas) for r in e.requests.values()}
  assert where[long.id] == 0 and [where[r.id] for r in short] == [1, 1, 1]  # 37 tokens vs 5 each
  assert [r.id for r in (long, *short)] == [0, 1, 2, 3]  # one counter: the ids (and default seeds) of one engine
  assert set(front.requests) == {0, 1, 2, 3}
  assert any("replica 1: 3 requests in the engine" in p for p in front.leaks())
  front.cancel(short[0].id)
  assert short[0].cancelled and not long.cancelled
  for r in (long, *short[1:]):
    front.fail_request(r, 503, "shutting down")
  front.run_until_done()
  assert not front.leaks() and front.num_failed_iterations == 0


@pytest.mark.slow
def test_tensor_parallel_replicas_equal_one_device(model):
  """tensor=2 x data=2 on 4 fake devices: the small pool's chunked prefill, prefix hit and preemption happen
  inside the replicas; every greedy output, and those of requests sampled with the engine's default seeds,
  equal one device's."""
  prompts = _workload() + _workload(seed=2)
  params = [GREEDY] * len(prompts) + [SamplingParams(temperature=1.0, max_tokens=6)] * 2
  prompts += _workload(seed=3)[:2]

  def serve(engine):
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine.run_until_done()
    assert not engine.leaks()
    return [r.output for r in requests]

  expected = serve(Engine(model, **SMALL_POOL))
  front = replicas.EngineReplicas.build(model, _mesh(2, 2), **SMALL_POOL)
  assert serve(front) == expected
  assert all(e.num_iterations > 0 for e in front.replicas)
  assert sum(e.scheduler.num_prefix_hit_tokens for e in front.replicas) > 0
  assert sum(e.scheduler.num_preemptions for e in front.replicas) > 0
