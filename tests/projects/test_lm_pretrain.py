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
