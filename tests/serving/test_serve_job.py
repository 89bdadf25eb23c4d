"""The serve job loads random weights, an lwjax training checkpoint (a GPT or a hybrid), or a Hugging Face
directory; a hybrid answers over the OpenAI API as its own greedy decoding does, and takes `mesh.shape.tensor`."""

import dataclasses
import importlib
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.models import hf_checkpoint, mamba_hybrid as mh
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.lm import pretrain
from lwjax.serving import serve, speculative
from lwjax.training.checkpoint import Checkpointer

serve_experiment = importlib.import_module("experiments.serve")
lm_experiment = importlib.import_module("experiments.lm_pretrain")
TOKENS = jnp.array([[5, 6, 7, 8]])


@pytest.mark.slow
def test_lwjax_checkpoint_is_served_with_its_saved_shape(tmp_path):
  train = lm_experiment.get_config("scale=smoke")
  train.train.update(steps=2, eval_every=0, checkpoint_every=2)
  train.model.update(d_model=32, d_ff=64)  # differs from the serve config's model on purpose
  pretrain.run(train, str(tmp_path))
  config = serve_experiment.get_config("scale=smoke")
  config.weights.update(source="lwjax_checkpoint", path=str(tmp_path))
  jobs.get(config)
  model = serve.load_model(config)
  assert model.cfg.d_model == 32
  random = GPT(GPTConfig.from_dict(train.model), rngs=nnx.Rngs(train.seed))
  # Two training steps moved the weights away from their initialisation.
  assert not np.allclose(model(TOKENS), random(TOKENS))


def test_hf_checkpoint_round_trips_through_the_serve_job(tmp_path):
  cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
  model = GPT(cfg, rngs=nnx.Rngs(3))
  hf_checkpoint.save(model, str(tmp_path))
  config = serve_experiment.get_config("scale=smoke")
  config.weights.update(source="hf_checkpoint", path=str(tmp_path))
  np.testing.assert_allclose(serve.load_model(config)(TOKENS), model(TOKENS), atol=1e-6)


@pytest.mark.slow
def test_a_hybrid_checkpoint_is_served_over_the_openai_api(tmp_path):
  from fastapi.testclient import TestClient

  from lwjax.serving.server import create_app
  config = serve_experiment.get_config("scale=smoke")
  gpt_cfg = dataclasses.replace(GPTConfig.from_dict(config.model), n_layers=2)
  hybrid = mh.HybridGPT(mh.HybridConfig(gpt=gpt_cfg, mamba_layers=(1,), chunk_size=8), rngs=nnx.Rngs(4))
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": nnx.to_pure_dict(nnx.state(hybrid))}, config=config, force=True)
  ckpt.close()
  mh.save_config(str(tmp_path), hybrid.cfg)
  config.weights.update(source="lwjax_checkpoint", path=str(tmp_path))
  jobs.get(config)
  model = serve.load_model(config)
  assert isinstance(model, mh.HybridGPT) and model.cfg.mamba_layers == (1,)
  np.testing.assert_allclose(model(TOKENS), hybrid(TOKENS), atol=1e-6)
  tokenizer = serve.load_tokenizer(config)
  with TestClient(create_app(serve.make_engine(config, model, tokenizer), tokenizer, model_name="hybrid")) as client:
    r = client.post("/v1/completions", json={"model": "hybrid", "prompt": "Once", "max_tokens": 5, "temperature": 0})
  assert r.status_code == 200, r.text
  expected = speculative.greedy(hybrid, [tokenizer.bos_id] + tokenizer.encode("Once"), 5).tolist()
  assert r.json()["choices"][0]["text"] == tokenizer.decode(expected)
  config.mesh.shape.tensor = 2  # checked against hybrid.json's shape; the engine's recurrent states over heads
  jobs.get(config)
  assert serve.make_engine(config, model, tokenizer, serve.make_mesh(config)).shardings.states is not None
  config.mesh.shape.tensor = 8
  with pytest.raises(ConfigError, match="^model.n_heads: 4 is not divisible by mesh axis tensor=8"):
    jobs.get(config)
  config.mesh.shape.tensor = 1
  config.engine.nano_batches = 2
  with pytest.raises(ConfigError, match="^engine.nano_batches:"):
    jobs.get(config)


def test_missing_weights_name_the_key():
  config = serve_experiment.get_config("scale=smoke")
  config.weights.update(source="hf_checkpoint", path="/nonexistent")
  with pytest.raises(ConfigError, match="^weights.path:"):
    jobs.get(config)



def test_an_hf_tokenizer_directory_is_checked_and_its_stop_ids_reach_the_engine(tmp_path):
  config = serve_experiment.get_config("scale=smoke")
  config.tokenizer.update(kind="hf", path=str(tmp_path))
  with pytest.raises(ConfigError, match="^tokenizer.path: .* not a directory holding tokenizer.json"):
    jobs.get(config)
  config.tokenizer.path = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "hf", "tokenizers",
                                       "llama3_style")
  jobs.get(config)
  tokenizer, model = serve.load_tokenizer(config), serve.load_model(config)
  engine = serve.make_engine(config, model, tokenizer)
  stops = {tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")}
  assert engine.stop_ids == stops and engine.eos_id == tokenizer.token_to_id("<|end_of_text|>")
  config.tokenizer.update(kind="bytes", path="")
  assert serve.make_engine(config, model, serve.load_tokenizer(config)).stop_ids == {2}


def test_every_engine_switch_of_the_serve_config_reaches_the_engine(tmp_path):
  config = serve_experiment.get_config("scale=smoke")
  config.engine.update(nano_batches=2, async_scheduling=False, max_batch_tokens=96, prefill_chunk=32,
                       mixed_batches=False)
  config.engine.kv_offload.update(host_bytes=1 << 20, disk_dir=str(tmp_path / "kv"), disk_bytes=1 << 22)
  jobs.get(config)  # validates
  tokenizer = serve.load_tokenizer(config)
  engine = serve.make_engine(config, serve.load_model(config), tokenizer)
  assert (engine.nano_batches, engine.async_scheduling, engine.mixed_batches) == (2, False, False)
  assert (engine.scheduler.max_batch_tokens, engine.prefill_chunk) == (96, 32)
  store = engine.kv.offload
  assert (store.host_bytes, store.disk_dir, store.disk_bytes) == (1 << 20, str(tmp_path / "kv"), 1 << 22)
  config.engine.kv_offload.update(host_bytes=0, disk_dir="", disk_bytes=0)
  config.engine.update(nano_batches=1, mixed_batches=True)
  engine = serve.make_engine(config, serve.load_model(config), tokenizer)
  assert engine.kv.offload is None and engine.mixed_batches


@pytest.mark.parametrize("key, value, field", [
    ("nano_batches", 0, "engine.nano_batches"),
    ("max_batch_tokens", 0, "engine.max_batch_tokens"),
])
def test_engine_switch_errors_name_the_field(key, value, field):
  config = serve_experiment.get_config("scale=smoke")
  config.engine[key] = value
  with pytest.raises(ConfigError, match=f"^{field}:"):
    jobs.get(config)


def test_offload_to_disk_without_a_directory_names_the_field():
  config = serve_experiment.get_config("scale=smoke")
  config.engine.kv_offload.update(host_bytes=1024, disk_bytes=4096)
  with pytest.raises(ConfigError, match="^engine.kv_offload.disk_dir:"):
    jobs.get(config)


def test_model_pretrained_serves_the_checkpoint_with_its_tokenizer(tmp_path):
  """`model.pretrained` alone: the family's weights (transformers' logits), the checkpoint's tokenizer; naming
  weights.source too, or a directory that holds no model, is a config error."""
  import json
  import pathlib
  import shutil

  from lwjax.data.hf_tokenizer import HFTokenizer
  fixtures = pathlib.Path(__file__).parents[1] / "fixtures" / "hf"
  shutil.copytree(fixtures / "models" / "qwen2", tmp_path / "qwen2")
  shutil.copytree(fixtures / "tokenizers" / "qwen_style", tmp_path / "qwen2", dirs_exist_ok=True,
                  ignore=shutil.ignore_patterns("expected.json"))
  config = serve_experiment.get_config("scale=smoke")
  config.model.pretrained = str(tmp_path / "qwen2")
  jobs.get(config)
  model, tokenizer = serve.load_model(config), serve.load_tokenizer(config)
  assert isinstance(tokenizer, HFTokenizer) and tokenizer.bos_id is None and tokenizer.chat_template
  expected = json.loads((tmp_path / "qwen2" / "expected.json").read_text())
  np.testing.assert_allclose(model(jnp.asarray(expected["input_ids"])), np.asarray(expected["logits"]), atol=1e-4)
  config.weights.update(source="hf_checkpoint", path=str(tmp_path / "qwen2"))
  with pytest.raises(ConfigError, match="^weights.source:"):
    jobs.get(config)
  config.weights.update(source="random", path="")
  config.model.pretrained = str(tmp_path)
  with pytest.raises(ConfigError, match=r"^model.pretrained: .*neither config\.json"):
    jobs.get(config)


def test_mesh_tensor_2_reads_the_checkpoint_onto_two_devices_and_builds_the_engine_there(tmp_path):
  """`--config.mesh.shape.tensor=2`: the checkpoint's config is checked against the mesh, each weight is read onto
  its shard of the first two devices, and the engine's KV pool is split over kv heads."""
  from jax.sharding import PartitionSpec as P
  cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
  hf_checkpoint.save_random(cfg, tmp_path, scale=0.2)
  config = serve_experiment.get_config("scale=smoke")
  config.weights.update(source="hf_checkpoint", path=str(tmp_path))
  config.mesh.shape.tensor = 2
  jobs.get(config)
  mesh = serve.make_mesh(config)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2} and mesh.size == 2
  model = serve.load_model(config, mesh)
  wq = model.layers[0].attn.wq[...]
  assert wq.sharding.spec == P(None, "tensor", None) and len(wq.sharding.device_set) == 2
  np.testing.assert_array_equal(np.asarray(wq), np.asarray(hf_checkpoint.load(tmp_path).layers[0].attn.wq[...]))
  engine = serve.make_engine(config, model, serve.load_tokenizer(config), mesh)
  assert engine.params["layers"][0]["attn"]["wq"][...] is wq  # already on its sharding: not copied again
  assert engine.kv.k[0].sharding.spec == P("tensor", None, None, None)


def test_mesh_data_2_tensor_2_serves_two_replicas_of_two_devices(tmp_path):
  """`--config.mesh.shape.data=2 --config.mesh.shape.tensor=2`: the checkpoint read onto the 4 devices (replicated
  over data), and two engines behind one front, each with its weights and KV pool on its own pair."""
  from lwjax.serving.replicas import EngineReplicas
  hf_checkpoint.save_random(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                                      d_ff=48), tmp_path, scale=0.2)
  config = serve_experiment.get_config("scale=smoke")
  config.weights.update(source="hf_checkpoint", path=str(tmp_path))
  config.mesh.shape.update(data=2, tensor=2)
  jobs.get(config)
  mesh = serve.make_mesh(config)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  model = serve.load_model(config, mesh)
  engine = serve.make_engine(config, model, serve.load_tokenizer(config), mesh)
  assert isinstance(engine, EngineReplicas) and len(engine.replicas) == 2
  for replica, devices in zip(engine.replicas, ({0, 1}, {2, 3}), strict=True):
    assert {d.id for d in replica.kv.k[0].sharding.device_set} == devices
    assert {d.id for d in replica.params["layers"][0]["attn"]["wq"][...].sharding.device_set} == devices
  assert engine.max_model_len == config.engine.max_model_len and not engine.leaks()


@pytest.mark.parametrize("shape, error", [
    (dict(tensor=4), r"^model.n_kv_heads: 2 is not divisible by mesh axis tensor=4 \(valid: mesh.shape.tensor in "
                     r"1, 2;"),
    (dict(fsdp=2, tensor=2), r"^mesh.shape.fsdp: 2: the engine runs tensor parallel only"),
])
def test_a_mesh_the_model_does_not_divide_is_a_config_error(shape, error):
  config = serve_experiment.get_config("scale=smoke")  # gpt_tiny: 4 heads, 2 kv heads
  config.mesh.shape.update(shape)
  with pytest.raises(ConfigError, match=error):
    jobs.get(config)


@pytest.mark.slow
def test_a_random_model_served_on_two_devices_answers_as_on_one():
  """Random weights initialised straight onto the mesh are the seed's weights; the OpenAI API on tensor=2, and on
  two replicas of tensor=2, answers greedily as the single-device engine does."""
  from fastapi.testclient import TestClient

  from lwjax.serving.server import create_app
  config = serve_experiment.get_config("scale=smoke")
  tokenizer = serve.load_tokenizer(config)
  texts, weights = {}, {}
  for data, tensor in ((1, 1), (1, 2), (2, 2)):
    config.mesh.shape.update(data=data, tensor=tensor)
    jobs.get(config)
    mesh = serve.make_mesh(config)
    model = serve.load_model(config, mesh)
    weights[data, tensor] = np.asarray(model.layers[1].mlp.w_up[...])
    with TestClient(create_app(serve.make_engine(config, model, tokenizer, mesh), tokenizer, model_name="m")) as client:
      r = client.post("/v1/completions", json={"model": "m", "prompt": "Once upon", "max_tokens": 8, "temperature": 0,
                                               "n": 3})
      assert client.get("/metrics").status_code == 200
    assert r.status_code == 200, r.text
    texts[data, tensor] = [choice["text"] for choice in r.json()["choices"]]
  for key in ((1, 2), (2, 2)):
    np.testing.assert_array_equal(weights[key], weights[1, 1])
    assert texts[key] == texts[1, 1]
