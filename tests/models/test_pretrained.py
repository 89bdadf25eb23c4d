"""`load_pretrained`: a Hugging Face directory (model and tokenizer) or an lwjax workdir, on one device or placed
tensor by tensor onto a mesh (8 fake CPU devices: fsdp 4 x tensor 2) with the same logits; clear errors."""

import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lwjax.data.hf_tokenizer import HFTokenizer
from lwjax.models import hf_checkpoint, load_pretrained
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.models.pretrained import PretrainedError
from lwjax.training import mesh as mesh_lib
from lwjax.training.checkpoint import Checkpointer

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "hf"


@nnx.jit
def logits(model, tokens):
  return model(tokens)


def hf_directory(tmp_path, family="gemma2", tokenizer="gemma_style"):
  """A model fixture with a tokenizer fixture beside it, as a downloaded Hugging Face model directory is."""
  path = tmp_path / family
  shutil.copytree(FIXTURES / "models" / family, path)
  for file in (FIXTURES / "tokenizers" / tokenizer).iterdir():
    if file.name != "expected.json":
      shutil.copy(file, path / file.name)
  return path


def test_hf_directory_gives_model_and_tokenizer(tmp_path):
  path = hf_directory(tmp_path)
  model, tokenizer = load_pretrained(path, dtype="float32")
  assert isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template
  expected = json.loads((path / "expected.json").read_text())
  np.testing.assert_allclose(np.asarray(logits(model, np.asarray(expected["input_ids"], np.int32))),
                             np.asarray(expected["logits"], np.float32), atol=1e-4, rtol=1e-4)


def test_sharded_loading_onto_a_mesh_gives_the_same_logits(tmp_path):
  path = hf_directory(tmp_path, family="qwen2", tokenizer="qwen_style")
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
  model, _ = load_pretrained(path, mesh=mesh)
  single, _ = load_pretrained(path)
  wq = model.layers[0].attn.wq[...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert {s.data.shape for s in wq.addressable_shards} == {(8, 2, 8)}  # [32, 4, 8] over fsdp 4, tensor 2
  assert len(model.embed[...].sharding.device_set) == 8
  tokens = np.asarray(json.loads((path / "expected.json").read_text())["input_ids"], np.int32)
  np.testing.assert_allclose(np.asarray(logits(model, tokens)), np.asarray(logits(single, tokens)), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.slow
def test_lwjax_workdir_loads_with_its_saved_shape_onto_a_mesh(tmp_path):
  cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
  model = GPT(cfg, rngs=nnx.Rngs(3))
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  run_config = ml_collections.ConfigDict({"model": cfg.to_dict()})
  ckpt.save(1, {"params": nnx.to_pure_dict(nnx.state(model))}, config=run_config, force=True)
  ckpt.close()
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  loaded, tokenizer = load_pretrained(tmp_path, mesh=mesh)
  assert tokenizer is None and loaded.cfg == cfg
  assert loaded.layers[0].mlp.w_up[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  tokens = np.array([[5, 6, 7, 8]], np.int32)
  np.testing.assert_allclose(np.asarray(logits(loaded, tokens)), np.asarray(logits(model, tokens)), atol=1e-6)


def test_errors_name_the_path_and_the_fix(tmp_path):
  with pytest.raises(PretrainedError, match="no such directory"):
    load_pretrained(tmp_path / "absent")
  with pytest.raises(PretrainedError, match=r"neither config\.json .* nor checkpoints/"):
    load_pretrained(tmp_path)
  path = tmp_path / "no_tokenizer"
  shutil.copytree(FIXTURES / "models" / "llama", path)
  with pytest.raises(PretrainedError, match=r"no tokenizer \(tokenizer\.json or tokenizer\.model\)"):
    load_pretrained(path)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"config\.json: model_type: 'falcon' is not supported"):
    load_pretrained(path)
