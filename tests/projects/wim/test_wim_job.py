"""The WiM job end to end at the smoke scale: trains a reader, reads every task at two lengths three ways on the
engine, reports scores, compute and margin quality; every scale validates; bad configs name the field."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_smoke_trains_and_reads_every_task_three_ways(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                           os.path.join(ROOT, "experiments/wim.py") + ":scale=smoke", "--workdir", "run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert set(m["results"]) == {"retrieval", "multihop", "aggregation"} and set(m["short_context"]) == set(m["results"])
  for task, by_length in m["results"].items():
    assert set(by_length) == {"1", "2"}
    for n, methods in by_length.items():
      assert set(methods) == {"wim", "full", "retrieval"}
      assert all(0.0 <= methods[k]["score"] <= 1.0 for k in methods)
      # WiM feeds every segment once plus its prompts and margins: more than the document alone.
      assert methods["wim"]["prefill_tokens"] > methods["full"]["prefill_tokens"] > int(n) * 32
      assert methods["wim"]["first_margin_seconds"] > 0 and 0 <= methods["wim"]["relevance_accuracy"] <= 1
    assert (tmp_path / "run" / f"accuracy_{task}.png").stat().st_size > 1000
  assert m["train_segments"] == "1,2"


def test_a_base_readers_training_lengths_come_from_its_own_run():
  from experiments import wim as wim_experiment
  from lwjax.projects.wim import job
  config = wim_experiment.get_config("scale=smoke")
  assert job.reader_train_segments(config, None) == config.task.train_segments
  assert job.reader_train_segments(config, {"task": {"train_segments": "1,2,4"}}) == "1,2,4"


@pytest.mark.parametrize("scale", ["smoke", "cpu", "gpu", "paper"])
def test_every_scale_validates_and_bad_configs_name_the_field(scale):
  from experiments import wim as wim_experiment
  from lwjax import jobs
  from lwjax.config import ConfigError
  jobs.get(wim_experiment.get_config(f"scale={scale},data=generated"))
  config = wim_experiment.get_config(f"scale={scale},data=generated")
  config.task.names = "retrieval,summaries"
  with pytest.raises(ConfigError, match="^task.names:"):
    jobs.get(config)
  config = wim_experiment.get_config(f"scale={scale},data=generated")
  config.eval.segments = "64"
  with pytest.raises(ConfigError, match="^model.max_seq_len:"):
    jobs.get(config)


@pytest.mark.slow
def test_smoke_finetunes_a_pretrained_reader_and_reads_through_its_tokenizer(tmp_path):
  """`model.pretrained`: the reader is the Hugging Face checkpoint finetuned on the tasks through its own tokenizer
  (kept in the workdir), then read by WiM, full context and retrieval-only; `base=` reuses it with that tokenizer."""
  import shutil

  from lwjax.models import hf_checkpoint
  from lwjax.models.gpt import GPTConfig
  hf = tmp_path / "hf"
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers", "llama3_style"), hf,
                  ignore=shutil.ignore_patterns("expected.json"))
  hf_checkpoint.save_random(GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                      d_ff=64, max_seq_len=2048), hf, scale=0.3)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  config = os.path.join(ROOT, "experiments/wim.py") + ":scale=smoke"
  overrides = ["--config.data.seq_len=512", "--config.task.names=retrieval", "--config.eval.segments=1"]
  result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", config, "--workdir", "run",
                           f"--config.model.pretrained={hf}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((tmp_path / "run" / "metrics.json").read_text())
  methods = m["results"]["retrieval"]["1"]
  assert set(methods) == {"wim", "full", "retrieval"} and all(0.0 <= methods[k]["score"] <= 1.0 for k in methods)
  # The reader's tokenizer splits the task's words: a 32-word segment is far more than 32 ids.
  assert methods["full"]["prefill_tokens"] > 64
  assert (tmp_path / "run" / "tokenizer.json").is_file()
  again = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", config + ",base=run",
                          "--workdir", "reuse", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  reused = json.loads((tmp_path / "reuse" / "metrics.json").read_text())["results"]["retrieval"]["1"]
  assert reused["full"] == methods["full"]  # the same reader, reading through the same tokenizer
