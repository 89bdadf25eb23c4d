"""The serve job loads random weights, an lwjax training checkpoint, or a Hugging Face directory."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.models import hf_llama
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.lm import pretrain
from lwjax.serving import serve

serve_experiment = importlib.import_module("experiments.serve")
lm_experiment = importlib.import_module("experiments.lm_pretrain")
TOKENS = jnp.array([[5, 6, 7, 8]])


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
  hf_llama.save(model, str(tmp_path))
  config = serve_experiment.get_config("scale=smoke")
  config.weights.update(source="hf_checkpoint", path=str(tmp_path))
  np.testing.assert_allclose(serve.load_model(config)(TOKENS), model(TOKENS), atol=1e-6)


def test_missing_weights_name_the_key():
  config = serve_experiment.get_config("scale=smoke")
  config.weights.update(source="hf_checkpoint", path="/nonexistent")
  with pytest.raises(ConfigError, match="^weights.path:"):
    jobs.get(config)



def test_every_engine_switch_of_the_serve_config_reaches_the_engine(tmp_path):
  config = serve_experiment.get_config("scale=smoke")
  config.engine.update(nano_batches=2, async_scheduling=False, max_batch_tokens=96, prefill_chunk=32)
  config.engine.kv_offload.update(host_bytes=1 << 20, disk_dir=str(tmp_path / "kv"), disk_bytes=1 << 22)
  jobs.get(config)  # validates
  tokenizer = serve.load_tokenizer(config)
  engine = serve.make_engine(config, serve.load_model(config), tokenizer)
  assert (engine.nano_batches, engine.async_scheduling) == (2, False)
  assert (engine.scheduler.max_batch_tokens, engine.prefill_chunk) == (96, 32)
  store = engine.kv.offload
  assert (store.host_bytes, store.disk_dir, store.disk_bytes) == (1 << 20, str(tmp_path / "kv"), 1 << 22)
  config.engine.kv_offload.update(host_bytes=0, disk_dir="", disk_bytes=0)
  assert serve.make_engine(config, serve.load_model(config), tokenizer).kv.offload is None


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
