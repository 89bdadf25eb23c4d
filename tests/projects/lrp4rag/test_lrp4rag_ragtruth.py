"""LRP4RAG on RAGTruth: the config's choice and refusals, a missing file as exit 2 through main.py, the prompt in the
model's chat template, and (slow) the signals and detectors end to end on RAGTruth-format files explained by a tiny
Hugging Face checkpoint."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from experiments import lrp4rag as experiment
from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.data import tokenizer as tokenizer_lib
from lwjax.models import hf_checkpoint
from lwjax.models.gpt import GPTConfig
from lwjax.projects.lrp4rag import detectors, published

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers", "llama3_style")
PROMPT = ("Briefly answer the following question:\nwhat colour is a Tarrow finch\nBear in mind that your response "
          "should be strictly based on the following passage:\npassage 1: The Tarrow finch is blue.\noutput:")


def _hf_model(path) -> str:
  shutil.copytree(TOKENIZER, path, ignore=shutil.ignore_patterns("expected.json"))
  hf_checkpoint.save_random(GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                      d_ff=64, max_seq_len=1024), path, scale=0.3)
  return str(path)


def _write(root: pathlib.Path, responses: list[str], labels: list[bool]) -> None:
  root.mkdir(parents=True)
  (root / "source_info.jsonl").write_text(json.dumps(
      {"source_id": "7", "task_type": "QA", "source": "MARCO",
       "source_info": {"question": "what colour is a Tarrow finch", "passages": "The Tarrow finch is blue."},
       "prompt": PROMPT}) + "\n")
  span = {"start": 4, "end": 9, "text": "finch", "meta": "", "label_type": "Evident Conflict", "implicit_true": False,
          "due_to_null": False}
  (root / "response.jsonl").write_text("".join(json.dumps(
      {"id": str(i), "source_id": "7", "model": "llama-2-7b-chat", "temperature": 0.7, "split": "test",
       "quality": "good", "response": text, "labels": [span] if bad else []}) + "\n"
      for i, (text, bad) in enumerate(zip(responses, labels, strict=True))))


def _main(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)


def test_the_data_choice_and_its_refusals(tmp_path):
  def error(config):
    with pytest.raises(ConfigError) as info:
      jobs.get(config)
    return str(info.value)
  assert experiment.get_config("scale=paper").data.set == "ragtruth"
  assert "set" not in experiment.get_config("scale=cpu").data  # the generated task, as before
  assert error(experiment.get_config("scale=gpu")).startswith("model.pretrained: empty: RAGTruth")
  hf = _hf_model(tmp_path / "hf")
  assert error(experiment.get_config(f"scale=paper,pretrained={hf}")).startswith("data.path: empty")
  config = experiment.get_config(f"scale=paper,pretrained={hf},path={tmp_path}")
  jobs.get(config)
  config.data.task_types = "QA,Dialogue"
  assert error(config).startswith("data.task_types: 'QA,Dialogue'")
  config = experiment.get_config(f"scale=paper,pretrained={hf},path={tmp_path}")
  config.data.seq_len = 64
  assert error(config).startswith("data.seq_len: unused on RAGTruth")
  assert error(experiment.get_config(f"scale=smoke,data=ragtruth,pretrained={hf},path={tmp_path}/none")).startswith(
      f"data.path: {tmp_path}/none does not exist")


def test_the_prompt_is_a_user_turn_of_the_chat_template():
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  text = tok.decode(published.prompt_ids(tok, PROMPT), skip_special_tokens=False)
  assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nBriefly answer")
  assert text.endswith("output:<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_missing_file_exits_2_with_one_line(tmp_path):
  hf = _hf_model(tmp_path / "hf")
  (tmp_path / "rt").mkdir()
  (tmp_path / "rt" / "source_info.jsonl").write_text("")
  result = _main(tmp_path, "--config", os.path.join(ROOT, "experiments/lrp4rag.py")
                 + f":scale=smoke,data=ragtruth,path=rt,pretrained={hf}", "--workdir", "run")
  errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert errors == ["config error: data.path: no response.jsonl under rt (valid: RAGTruth's dataset directory)"]


@pytest.mark.slow
def test_ragtruth_responses_are_explained_and_detected(tmp_path):
  """Twelve responses of twelve token lengths to one RAGTruth QA prompt, half of them annotated: labelled from the
  spans, explained by AttnLRP through the model's chat template in 3 padded shapes (3 compilations of the signals,
  not 12), cross-validated."""
  hf = _hf_model(tmp_path / "hf")
  tok = tokenizer_lib.load_tokenizer(hf)
  colours = ("blue", "red", "green", "grey", "black", "white", "brown", "pink", "gold", "teal", "tan", "jade")
  responses = [f"The Tarrow finch is{' very' * k} {colour}." for k, colour in enumerate(colours)]
  lengths = [len(tok.encode(text)) for text in responses]
  assert len(set(lengths)) == 12 and min(lengths) >= 16 and max(lengths) <= 64  # answer buckets 16, 32, 64
  _write(tmp_path / "rt", responses, [False, True] * 6)
  result = _main(tmp_path, "--config", os.path.join(ROOT, "experiments/lrp4rag.py")
                 + f":scale=smoke,data=ragtruth,path=rt,pretrained={hf}", "--workdir", "run", "--config.eval.num=12")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "signals of 12 answers, padded to 3 shape(s)" in result.stderr
  m = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert m["n"] == 12 and m["hallucinated"] == 6 and m["too_long"] == 0
  assert m["by_group"] == {"QA": {"n": 12, "hallucinated": 0.5}}
  assert m["conservation"]["n"] == 12 and m["conservation"]["head_error_median"] < 1e-4
  expected = {f"{f}/{c}" for f, names in detectors.CLASSIFIERS.items() if f != "self_consistency" for c in names}
  assert set(m["detectors"]) == expected and m["folds"] == 2
  for summary in m["detectors"].values():
    assert 0 <= summary["accuracy"]["mean"] <= 1 and set(summary["accuracy_by_group"]) == {"QA"}
