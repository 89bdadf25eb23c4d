"""The LM pretraining experiment end to end through main.py: it learns, and reports against a baseline."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_scale_runs_end_to_end_and_beats_the_unigram_baseline(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # Run from another directory with a relative workdir, as users do.
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config",
       os.path.join(ROOT, "experiments/lm_pretrain.py") + ":scale=smoke", "--workdir", "run",
       "--config.train.steps=60", "--config.train.eval_every=60", "--config.train.checkpoint_every=30"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  tmp_path = tmp_path / "run"
  assert result.returncode == 0, result.stderr[-3000:]
  assert "unigram cross-entropy" in result.stderr and "steps/s" in result.stderr and "eta" in result.stderr
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["step"] == 60
  # The baseline is measured in the same run on the same held-out tokens.
  assert metrics["eval_loss"] < 0.9 * metrics["unigram_cross_entropy"], metrics
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]
  assert os.listdir(tmp_path / "tensorboard")


def test_starts_from_a_hugging_face_checkpoint_with_its_tokenizer(tmp_path):
  """`model.pretrained`: the run takes the checkpoint's shape, weights and tokenizer (at learning rate 0 its
  final weights are the checkpoint's), and its own checkpoints load back as that model."""
  import importlib
  import shutil

  import numpy as np

  from lwjax import jobs
  from lwjax.data.hf_tokenizer import HFTokenizer
  from lwjax.models import hf_checkpoint, load_pretrained
  from lwjax.models.gpt import GPTConfig
  from lwjax.projects.lm import pretrain

  hf_dir = tmp_path / "hf"
  tokenizer_dir = os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers", "llama3_style")
  shutil.copytree(tokenizer_dir, hf_dir, ignore=shutil.ignore_patterns("expected.json"))
  cfg = GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  max_seq_len=128, sliding_window=16)
  hf_checkpoint.save_random(cfg, hf_dir, scale=0.3)
  config = importlib.import_module("experiments.lm_pretrain").get_config("scale=smoke")
  config.model.pretrained = str(hf_dir)
  config.data.update(num_train_docs=40, num_eval_docs=8)
  config.train.update(steps=2, eval_every=2, eval_steps=1, checkpoint_every=2, log_every=1)
  config.optim.update(learning_rate=0.0, warmup_steps=0)
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  jobs.get(config)
  metrics = pretrain.run(config, str(tmp_path / "run"))
  assert metrics["step"] == 2 and np.isfinite(metrics["eval_loss"])
  trained, tokenizer = load_pretrained(tmp_path / "run")
  assert trained.cfg == cfg and isinstance(tokenizer, HFTokenizer)  # the run keeps the checkpoint's tokenizer
  original, _ = load_pretrained(hf_dir)
  tokens = np.arange(12, dtype=np.int32)[None]
  np.testing.assert_allclose(np.asarray(trained(tokens)), np.asarray(original(tokens)), atol=1e-6)


def _bfloat16_llama(tmp_path):
  """The llama fixture's family and options (tied embeddings, llama3 RoPE scaling, sharded safetensors) with a
  Llama-3-style tokenizer, written as a bfloat16 checkpoint (random weights; the vocabulary fits the tokenizer)."""
  import dataclasses
  import shutil

  from lwjax.models import hf_checkpoint

  hf_dir = tmp_path / "hf"
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers", "llama3_style"), hf_dir,
                  ignore=shutil.ignore_patterns("expected.json"))
  fixture = hf_checkpoint.config_from_dir(os.path.join(ROOT, "tests", "fixtures", "hf", "models", "llama"))
  cfg = dataclasses.replace(fixture, vocab_size=448, param_dtype="bfloat16")
  hf_checkpoint.save_random(cfg, hf_dir, scale=0.3, max_shard_bytes=40_000)
  return hf_dir, cfg


def _from_pretrained(hf_dir):
  import importlib
  config = importlib.import_module("experiments.lm_pretrain").get_config("scale=smoke")
  config.model.pretrained = str(hf_dir)
  config.data.update(num_train_docs=40, num_eval_docs=8)
  return config


def test_pretrained_weights_train_in_the_configured_param_dtype(tmp_path):
  """`model.param_dtype` of a pretrained model: the master weights' dtype (float32 by default, whatever the
  checkpoint's), validated at the door."""
  import pytest

  from lwjax import jobs
  from lwjax.config import ConfigError
  from lwjax.projects.lm import pretrain

  hf_dir, cfg = _bfloat16_llama(tmp_path)
  config = _from_pretrained(hf_dir)
  jobs.get(config)
  assert cfg.param_dtype == "bfloat16" and pretrain._model_config(config).param_dtype == "float32"
  config.model.param_dtype = "bfloat16"
  assert pretrain._model_config(config) == cfg
  config.model.param_dtype = "fp32"
  with pytest.raises(ConfigError, match=r"^model\.param_dtype: 'fp32' is not a valid choice"):
    jobs.get(config)


def test_lora_finetunes_a_bfloat16_hugging_face_checkpoint_and_writes_the_merged_model(tmp_path):
  """`train.lora.rank > 0` from `model.pretrained`: adapters train over the frozen checkpoint, held in float32
  master weights; the run's checkpoints hold the adapters, and the merged model, in `<workdir>/merged`, loads
  with the checkpoint's tokenizer: every weight but the adapted ones bit-identical to the checkpoint's, those
  moved by a rank-r update."""
  import dataclasses
  import shutil

  import numpy as np
  import pytest
  from flax import nnx, traverse_util

  from lwjax import jobs
  from lwjax.data.hf_tokenizer import HFTokenizer
  from lwjax.models import load_pretrained
  from lwjax.models.pretrained import PretrainedError
  from lwjax.projects.lm import pretrain

  hf_dir, cfg = _bfloat16_llama(tmp_path)
  config = _from_pretrained(hf_dir)
  config.train.update(steps=3, eval_every=3, eval_steps=1, checkpoint_every=3, log_every=1)
  config.train.lora.update(rank=2, alpha=4.0, targets="wq,wv,wo")
  config.optim.update(learning_rate=1e-2, warmup_steps=0)
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  jobs.get(config)
  metrics = pretrain.run(config, str(tmp_path / "run"))
  assert metrics["step"] == 3 and np.isfinite(metrics["eval_loss"])
  merged, tokenizer = load_pretrained(tmp_path / "run" / "merged")
  # The run's own workdir holds adapters in its checkpoints; loading it gives its merged model.
  via_run, _ = load_pretrained(tmp_path / "run")
  tokens = np.arange(12, dtype=np.int32)[None]
  np.testing.assert_array_equal(np.asarray(via_run(tokens)), np.asarray(merged(tokens)))
  assert merged.cfg == dataclasses.replace(cfg, param_dtype="float32") and isinstance(tokenizer, HFTokenizer)
  original, _ = load_pretrained(hf_dir, param_dtype="float32")
  after = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(merged)))
  for path, w in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(original))).items():
    if path[-1] in ("wq", "wv", "wo"):
      update = np.asarray(after[path] - w).reshape(w.shape[0] * (w.shape[1] if path[-1] == "wo" else 1), -1)
      assert np.abs(update).max() > 0 and np.linalg.matrix_rank(update, tol=1e-6) <= 2, path
    else:
      np.testing.assert_array_equal(after[path], w)
  shutil.rmtree(tmp_path / "run" / "merged")  # as if the run had stopped before its end
  with pytest.raises(PretrainedError, match="LoRA run that has not finished"):
    load_pretrained(tmp_path / "run")
