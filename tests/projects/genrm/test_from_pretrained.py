"""GenRM from a pretrained checkpoint: every reasoning task reads and writes through a Hugging Face tokenizer
exactly (the checker's verdicts unchanged), and the solver finetuned from a Hugging Face checkpoint, then a
verifier trained on its candidates, run end to end with the checkpoint's tokenizer."""

import importlib
import json
import pathlib
import shutil

import numpy as np
import pytest

from lwjax import candidates, jobs, reasoning_tasks
from lwjax.config import ConfigError
from lwjax.data import hf_tokenizer
from lwjax.models import hf_checkpoint
from lwjax.models.gpt import GPTConfig

TOKENIZERS = pathlib.Path(__file__).parents[2] / "fixtures" / "hf" / "tokenizers"


@pytest.mark.parametrize("tokenizer_name", ("llama3_style", "gemma_style", "qwen_style"))
@pytest.mark.parametrize("task_name", reasoning_tasks.GENERATED_NAMES)
def test_tasks_read_and_write_exactly_through_a_pretrained_tokenizer(task_name, tokenizer_name):
  tokenizer = hf_tokenizer.load(str(TOKENIZERS / tokenizer_name))
  own = reasoning_tasks.get(task_name)
  task = own.with_tokenizer(tokenizer)
  assert task.tokenizer is not own.tokenizer and task.check is own.check
  if tokenizer.clean_up_spaces:  # the model's own tokenizer object keeps its setting; the task's copy does not
    assert not task.tokenizer.clean_up_spaces and tokenizer.clean_up_spaces
  for record in task.records(8, seed=5, split="test"):
    for text in (record["question"], record["solution"]):
      assert task.tokenizer.decode(task.tokenizer.encode(text)) == text
    solution = task.tokenizer.decode(task.tokenizer.encode(record["solution"]))
    assert task.check(record, solution).correct and task.answer(solution) == own.answer(record["solution"])


def _hf_checkpoint(tmp_path) -> str:
  """A tiny random Llama checkpoint with a Llama-3-style byte-level BPE tokenizer beside it."""
  path = tmp_path / "hf"
  shutil.copytree(TOKENIZERS / "llama3_style", path, ignore=shutil.ignore_patterns("expected.json"))
  cfg = GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  max_seq_len=512)
  hf_checkpoint.save_random(cfg, path, scale=0.3)
  return str(path)


@pytest.mark.slow
def test_solver_and_verifier_from_a_hugging_face_checkpoint(tmp_path, monkeypatch):
  """`genrm_solver` with `model.pretrained` finetunes the checkpoint (LoRA adapters here) on the task's text through
  its tokenizer and keeps it in the workdir, beside the merged model; `genrm` then loads that merged model from the
  run's workdir, samples, trains a verifier and scores through that tokenizer."""
  monkeypatch.chdir(tmp_path)
  path = _hf_checkpoint(tmp_path)
  solver_config = importlib.import_module("experiments.genrm_solver").get_config("scale=smoke,task=last_letter")
  solver_config.model.pretrained = path
  solver_config.data.update(num_train=16, long_fraction=0.0)
  solver_config.train.update(steps=2, checkpoint_every=2)
  solver_config.train.lora.update(rank=2, targets="wq,wk,wv,wo")
  solver_config.mesh.shape.update(data=2, fsdp=2, tensor=2)  # the weights loaded straight onto the mesh
  solver = jobs.get(solver_config)
  metrics = solver.run(solver_config, str(tmp_path / "solver"))
  assert set(metrics) >= {"test", "hard"} and 0.0 <= metrics["test"]["accuracy"] <= 1.0
  model, tokenizer, step = candidates.load_solver(str(tmp_path / "solver"))  # the merged model, its tokenizer
  assert step == 2 and isinstance(tokenizer, hf_tokenizer.HFTokenizer) and model.cfg.vocab_size == 448
  assert (tmp_path / "solver" / "merged" / "tokenizer.json").is_file()

  config = importlib.import_module("experiments.genrm").get_config(
      f"scale=smoke,task=last_letter,verifier=direct,base={tmp_path / 'solver'}")
  config.train.update(steps=2, checkpoint_every=2)
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  genrm = jobs.get(config)
  metrics = genrm.run(config, str(tmp_path / "direct"))
  assert metrics["kind"] == "direct" and metrics["base_step"] == 2
  assert len(metrics["test"]["answer"]["verifier"]) == len(metrics["test"]["n"])
  assert np.isfinite(metrics["test"]["auc"]) or np.isnan(metrics["test"]["auc"])
  written = json.loads((tmp_path / "direct" / "metrics.json").read_text())
  assert written["test"]["num_problems"] == config.candidates.num_test
  problems, _ = candidates.read(next(str(p) for p in (tmp_path / "runs").rglob("last_letter_test_*.arrayrecord")))
  assert all(len(p["candidates"]) == config.candidates.n_test for p in problems)


def test_a_base_that_is_no_checkpoint_is_a_config_error(tmp_path):
  config = importlib.import_module("experiments.genrm").get_config(
      f"scale=smoke,task=last_letter,verifier=judge,base={tmp_path / 'missing'}")
  with pytest.raises(ConfigError, match="base"):
    jobs.get(config).run(config, str(tmp_path / "run"))


def test_lora_needs_a_pretrained_model_and_leaves_the_reward_head_out(tmp_path):
  solver = importlib.import_module("experiments.genrm_solver").get_config("scale=smoke,task=last_letter")
  solver.train.lora.rank = 4
  with pytest.raises(ConfigError, match="^train.lora.rank: LoRA adapts a pretrained model"):
    jobs.get(solver)
  genrm = importlib.import_module("experiments.genrm")
  config = genrm.get_config("scale=smoke,task=last_letter,verifier=disc,base=solver")
  config.train.lora.rank = 4
  with pytest.raises(ConfigError, match="^train.lora.rank: the discriminative verifier's reward head"):
    jobs.get(config)
  config = genrm.get_config("scale=smoke,task=last_letter,verifier=direct,base=solver")
  config.train.lora.rank = 4
  jobs.get(config)
