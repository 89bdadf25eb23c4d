"""Distillation into hybrids (arXiv 2408.15237): progressive stages start from the right parameters; end to end."""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from lwjax.models import gpt, mamba_hybrid as mh
from lwjax.projects.mamba_distill import job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TINY = gpt.GPTConfig(vocab_size=40, d_model=16, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                     max_seq_len=32)


def test_progressive_stage_keeps_trained_layers_and_initialises_new_ones_from_the_teacher():
  teacher = nnx.jit(lambda: gpt.GPT(TINY, rngs=nnx.Rngs(0)))()
  first = mh.HybridConfig(gpt=TINY, mamba_layers=mh.every_other_layer(4, 0.5))
  second = mh.HybridConfig(gpt=TINY, mamba_layers=mh.every_other_layer(4, 0.25))
  assert first.mamba_layers == (0, 2) and second.mamba_layers == (0, 1, 2)
  trained = job._stage_params(teacher, first, None, (), "attention", seed=0)
  trained = jax.tree.map(lambda x: np.asarray(x) + 1.0, trained)  # stands in for stage-1 training
  params = job._stage_params(teacher, second, trained, first.mamba_layers, "attention", seed=1)
  layers = params["layers"]
  np.testing.assert_array_equal(layers[0]["mixer"]["w_x"], trained["layers"][0]["mixer"]["w_x"])  # kept
  np.testing.assert_array_equal(layers[3]["attn"]["wq"], trained["layers"][3]["attn"]["wq"])  # still attention
  np.testing.assert_array_equal(layers[1]["mixer"]["w_c"], teacher.layers[1].attn.wq[...])  # new: Q -> C
  np.testing.assert_array_equal(params["embed"], trained["embed"])
  random = job._stage_params(teacher, second, trained, first.mamba_layers, "random", seed=1)
  assert not np.array_equal(random["layers"][1]["mixer"]["w_c"], teacher.layers[1].attn.wq[...])


def test_a_missing_teacher_is_a_one_line_error():
  import importlib

  from lwjax import jobs
  from lwjax.config import ConfigError
  config = importlib.import_module("experiments.mamba_distill").get_config("scale=smoke,teacher=/no/such/run")
  with pytest.raises(ConfigError, match="^teacher.workdir: '/no/such/run' holds no checkpoints"):
    jobs.get(config)


@pytest.mark.slow
def test_smoke_distillation_end_to_end_and_resume(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def main(*args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
  main("--config", os.path.join(ROOT, "experiments/lm_pretrain.py") + ":scale=smoke", "--workdir", "teacher")
  config = os.path.join(ROOT, "experiments/mamba_distill.py") + ":scale=smoke,teacher=teacher,schedule=0.5-0"
  main("--config", config, "--workdir", "distill")
  metrics = json.loads((tmp_path / "distill" / "metrics.json").read_text())
  results = metrics["results"]
  assert set(results) == {"teacher", "stage0_attention0.5", "stage1_attention0", "sft"}
  assert results["teacher"]["teacher_agreement"] == 1.0 and results["stage1_attention0"]["mamba_layers"] == [0, 1]
  hybrid = mh.load(str(tmp_path / "distill" / "sft"))
  assert isinstance(hybrid, mh.HybridGPT) and hybrid.cfg.mamba_layers == (0, 1)
  again = main("--config", config, "--workdir", "distill")  # every stage finished: nothing retrains
  assert "first step took" not in again.stderr
  assert json.loads((tmp_path / "distill" / "metrics.json").read_text())["results"] == results


def _hf_teacher(tmp_path):
  """A Mistral-family checkpoint (a window on every layer) with the llama3_style fixture tokenizer, and two text
  files of documents, as a user brings a Hugging Face teacher."""
  import pathlib
  import shutil

  from lwjax.models import hf_checkpoint
  fixtures = pathlib.Path(__file__).parents[2] / "fixtures" / "hf" / "tokenizers" / "llama3_style"
  shutil.copytree(fixtures, tmp_path / "teacher", ignore=shutil.ignore_patterns("expected.json"))
  cfg = gpt.GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      max_seq_len=128, sliding_window=24)
  hf_checkpoint.save_random(cfg, tmp_path / "teacher", scale=0.3)
  for name, n in (("train.txt", 64), ("eval.txt", 16)):
    (tmp_path / name).write_text("".join(f"the model {i} reads the page {i % 7} and writes {i * 3}\n"
                                         for i in range(n)))
  config = importlib.import_module("experiments.mamba_distill").get_config(
      f"scale=smoke,teacher={tmp_path / 'teacher'},schedule=0.5-0")
  config.data.update(train_files=str(tmp_path / "train.txt"), eval_files=str(tmp_path / "eval.txt"))
  return config


def test_a_hugging_face_teacher_brings_its_tokenizer_and_needs_documents(tmp_path):
  from lwjax import jobs
  from lwjax.config import ConfigError
  from lwjax.data.hf_tokenizer import HFTokenizer
  config = _hf_teacher(tmp_path)
  jobs.get(config)
  teacher, run, tok, (train_docs, eval_docs) = job.load_teacher(config.teacher.workdir, config.data)
  assert isinstance(tok, HFTokenizer) and teacher.cfg.sliding_window == 24 and run["model"]["vocab_size"] == 448
  rows = job.document_rows(train_docs, tok, 48, 4)
  assert rows[0]["inputs"][0] == tok.bos_id and len(eval_docs) == 16
  config.data.eval_files = str(tmp_path / "absent*.txt")
  with pytest.raises(ConfigError, match="^data.eval_files: no file matches"):
    jobs.get(config)
  config.data.eval_files = str(tmp_path / "eval.txt")
  hf = json.loads((tmp_path / "teacher" / "config.json").read_text())
  (tmp_path / "teacher" / "config.json").write_text(json.dumps({**hf, "model_type": "qwen2"}))
  with pytest.raises(ConfigError, match="^teacher.workdir: the teacher has qkv_bias"):
    jobs.get(config)


@pytest.mark.slow
def test_smoke_distillation_from_a_hugging_face_teacher(tmp_path):
  """End to end through main.py on one device, as a user runs it."""
  config = _hf_teacher(tmp_path)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  experiment = os.path.join(ROOT, "experiments/mamba_distill.py")
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config",
       f"{experiment}:scale=smoke,teacher={config.teacher.workdir},schedule=0.5-0",
       "--workdir", str(tmp_path / "run"), f"--config.data.train_files={config.data.train_files}",
       f"--config.data.eval_files={config.data.eval_files}"], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
  assert set(results) == {"teacher", "stage0_attention0.5", "stage1_attention0", "sft"}
  assert results["teacher"]["teacher_agreement"] == 1.0


@pytest.mark.slow
def test_a_distillation_stage_trains_on_a_mesh_of_eight_devices(tmp_path):
  """The stage's start shares the teacher's arrays (embeddings, norms, MLPs, attention), which are also the
  reference every step reads: on a mesh the donated state must hold copies of them, not device 0's buffers."""
  config = _hf_teacher(tmp_path)
  config.hybrid.schedule = "0.5"
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  config.data.update(num_train_docs=8, num_eval_docs=8)
  config.distill.update(num_sequences=8, steps=2)
  config.sft.steps = 0
  metrics = job.run(config, str(tmp_path / "run"))
  results = metrics["results"]
  assert set(results) == {"teacher", "stage0_attention0.5"} and results["stage0_attention0.5"]["mamba_layers"] == [0]
  assert results["teacher"]["teacher_agreement"] == 1.0 and np.isfinite(results["stage0_attention0.5"]["loss"])


def _chat_teacher(tmp_path):
  """The Hugging Face teacher of `_hf_teacher` with UltraChat (parquet shards, as on the Hub) and binarized
  UltraFeedback (jsonl) written here in their published schemas, with invented conversations."""
  import pyarrow
  import pyarrow.parquet
  config = _hf_teacher(tmp_path)

  def chat(i):
    question = f"What does the page {i % 7} say?"
    return {"prompt": question, "prompt_id": f"{i:064x}",
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"The page {i % 7} says {i * 3}."},
                         {"role": "user", "content": "And then?"},
                         {"role": "assistant", "content": f"Then it reads {i}."}]}

  def pair(i):
    prompt = [{"role": "user", "content": f"Which page comes after {i}?"}]
    return {"prompt": prompt[0]["content"], "prompt_id": f"{i:064x}",
            "chosen": prompt + [{"role": "assistant", "content": f"The page {i + 1}."}],
            "rejected": prompt + [{"role": "assistant", "content": f"The page {i - 1}."}],
            "score_chosen": 9.0, "score_rejected": 3.5}
  (tmp_path / "ultrachat" / "data").mkdir(parents=True)
  for split, n in (("train_sft", 48), ("test_sft", 12)):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([chat(i) for i in range(n)]),
                                tmp_path / "ultrachat" / "data" / f"{split}-00000-of-00001-0a1b.parquet")
  (tmp_path / "ultrafeedback").mkdir()
  for split, n in (("train_prefs", 32), ("test_prefs", 12)):
    (tmp_path / "ultrafeedback" / f"{split}.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in range(n)))
  config = importlib.import_module("experiments.mamba_distill").get_config(
      f"scale=smoke,data=chat,teacher={config.teacher.workdir},schedule=0.5-0")
  config.data.update(sft_path=str(tmp_path / "ultrachat"), dpo_path=str(tmp_path / "ultrafeedback"),
                     seq_len=64)
  config.distill.prompt_len = 40
  return config


def test_chat_data_is_checked_before_any_heavy_work(tmp_path):
  from lwjax import jobs
  from lwjax.config import ConfigError
  config = _chat_teacher(tmp_path)
  assert config.dpo.steps > 0 and config.data.source == "chat"
  jobs.get(config)
  config.data.dpo_path = str(tmp_path / "ultrachat")
  with pytest.raises(ConfigError, match=r"^data.dpo_path: no 'train_prefs' files under \S+ultrachat"):
    jobs.get(config)
  config.data.dpo_path, config.data.sft_path = str(tmp_path / "ultrafeedback"), ""
  with pytest.raises(ConfigError, match=r"^data.sft_path: empty"):
    jobs.get(config)
  config.data.sft_path = str(tmp_path / "ultrachat")
  (tmp_path / "teacher" / "chat_template.jinja").unlink()
  with pytest.raises(ConfigError, match=r"^data.source: 'chat' renders conversations with the teacher's chat "
                                        r"template; \S+teacher has none"):
    jobs.get(config)
  documents = importlib.import_module("experiments.mamba_distill").get_config("scale=smoke")
  assert documents.data.source == "documents" and documents.dpo.steps == 0
  (tmp_path / "lm" / "checkpoints").mkdir(parents=True)
  documents.teacher.workdir, documents.dpo.steps = str(tmp_path / "lm"), 2
  with pytest.raises(ConfigError, match=r"^dpo.steps: DPO trains on preference pairs"):
    jobs.get(documents)
  documents.dpo.steps, documents.data.source = 0, "chat"
  with pytest.raises(ConfigError, match=r"^data.source: 'chat' renders conversations"):
    jobs.get(documents)


def test_chat_rows_prompts_and_pairs_of_the_distillation(tmp_path):
  from lwjax.config import ConfigError
  from lwjax.data import hf_tokenizer
  from lwjax.projects.mamba_distill import chat_data
  config = _chat_teacher(tmp_path)
  tok = hf_tokenizer.load(config.teacher.workdir)
  rows = chat_data.sft_rows(config.data, tok, "train_sft", 10)
  assert len(rows) == 10 and all(0 < r["loss_mask"].sum() < r["segment_ids"].sum() for r in rows)
  prompts = chat_data.prompts(config.data, tok, config.distill.prompt_len, 48)
  assert len(prompts) == 48 and max(map(len, prompts)) <= config.distill.prompt_len
  assert tok.decode(prompts[0], skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  with pytest.raises(ConfigError, match=r"^distill.prompt_len: none of 48 UltraChat prompts has at most 5 tokens"):
    chat_data.prompts(config.data, tok, 5, 48)
  pairs = chat_data.preference_rows(config.data, tok, "test_prefs", 100)
  assert len(pairs) == 12 and pairs[0]["inputs"].shape == (2, config.data.seq_len)
  tok.chat_templates = {"default": "{{ raise_exception('Conversation roles must alternate') }}"}
  with pytest.raises(ConfigError, match=r"^teacher.workdir: UltraChat test_sft row 0: chat template .*Conversation "
                                        r"roles must alternate"):
    chat_data.sft_rows(config.data, tok, "test_sft", 4)


@pytest.mark.slow
def test_smoke_distillation_on_chat_data_with_sft_and_dpo(tmp_path):
  """Stage 1 on the teacher's answers to UltraChat prompts, SFT on the conversations (assistant turns only), DPO
  on the UltraFeedback pairs; the held-out rewards of DPO are reported."""
  config = _chat_teacher(tmp_path)
  metrics = job.run(config, str(tmp_path / "run"))
  results = metrics["results"]
  assert set(results) == {"teacher", "stage0_attention0.5", "stage1_attention0", "sft", "dpo"}
  prefs = results["dpo"]["test_prefs"]
  assert prefs["pairs"] == 12 and set(prefs) >= {"loss", "reward_accuracy", "reward_margin", "chosen_reward",
                                                 "rejected_reward"}
  assert all(np.isfinite(v) for v in prefs.values()) and 0.0 <= prefs["reward_accuracy"] <= 1.0
  assert results["teacher"]["teacher_agreement"] == 1.0 and np.isfinite(results["dpo"]["loss"])
  assert mh.load(str(tmp_path / "run" / "dpo")).cfg.mamba_layers == (0, 1)
  pseudo = np.load(tmp_path / "run" / "pseudo_labels.npz")
  tok = job.load_teacher(config.teacher.workdir, config.data)[2]
  first = pseudo["inputs"][0][:int(np.argmax(pseudo["loss_mask"][0] > 0)) + 1].tolist()
  assert tok.decode(first, skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
