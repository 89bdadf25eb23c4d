"""WiM on a published set: the paper's prompts through a chat template, the config's refusals, a bad file as exit 2
through main.py, and (slow) a HotpotQA read three ways end to end by a tiny Hugging Face checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow
import pyarrow.parquet
import pytest

from experiments import wim as experiment
from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.data import tokenizer as tokenizer_lib
from lwjax.models import hf_checkpoint
from lwjax.models.gpt import GPTConfig
from lwjax.projects.wim import paper_prompts, published

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers", "llama3_style")
HOTPOT = [
    {"id": f"h{i}", "question": f"Which river runs past the town where painter {i} was born?", "answer": "the Sorn",
     "type": "bridge", "level": "hard",
     "context": {"title": [f"Painter {i}", "Tarrow", f"Village {i}"],
                 "sentences": [[f"Painter {i} paints birds.", " The painter was born in Tarrow."],
                               ["Tarrow is a town.", " The Sorn runs past it."], [f"Village {i} is small."]]},
     "supporting_facts": {"title": [f"Painter {i}", "Tarrow"], "sent_id": [1, 1]}}
    for i in range(3)]


def _hf_reader(path) -> str:
  shutil.copytree(TOKENIZER, path, ignore=shutil.ignore_patterns("expected.json"))
  hf_checkpoint.save_random(GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                      d_ff=64, max_seq_len=2048), path, scale=0.3)
  return str(path)


def _main(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)


def test_the_papers_prompts_wrap_the_context_in_one_user_turn():
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  chat = paper_prompts.ChatPrompts(tok)
  segments = ["Tarrow is a town.\n\n", "The Sorn runs past it."]
  context = chat.head + [i for s in segments for i in tok.encode(s)]
  whole = tok.decode(context + chat.extraction("Where?"), skip_special_tokens=False)
  # The turn as the template renders it with the context in place (the engine's ids differ only at the cuts).
  rendered = tok.apply_chat_template(
      [{"role": "system", "content": paper_prompts.SYSTEM},
       {"role": "user", "content": paper_prompts.OPENING + "".join(segments)
        + paper_prompts.EXTRACTION.format(query="Where?")}], add_generation_prompt=True, date_string=paper_prompts.DATE)
  assert whole == rendered and whole.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  answer = tok.decode(chat.answer("Where?", ["the Sorn", "a town"]), skip_special_tokens=False)
  assert answer.startswith("</excerpt>\n\nAdditionally") and "<margins>\nthe Sorn\n\na town\n</margins>" in answer
  assert chat.answer("Where?", []) == chat.direct("Where?")
  assert "Question:\nWhere?" in tok.decode(chat.direct("Where?"), skip_special_tokens=False)
  classify = tok.decode(chat.classification("Where?", "the Sorn"), skip_special_tokens=False)
  assert classify.startswith("<|begin_of_text|><|start_header_id|>user") and "```text\nthe Sorn\n```" in classify
  assert [paper_prompts.parse_relevance(t) for t in ("YES#it is", "```YES#x```", "NO#no", "NOT YES", "yes#x")] == [
      True, True, False, True, False]


def test_published_scores():
  assert published.score("squad_v2", "The Sorn.", ["the Sorn"]) == {"score": 1.0, "exact_match": 1.0}
  assert published.score("cwe", "1. baku 2. miro", ["baku", "miro", "tesa", "rolo"]) == {"score": 0.5}


def test_configs_of_published_sets_name_the_field(tmp_path):
  def error(arg, max_seq_len=None, **overrides):
    config = experiment.get_config(arg)
    config.update(overrides)
    if max_seq_len:
      config.model.max_seq_len = max_seq_len
    with pytest.raises(ConfigError) as info:
      jobs.get(config)
    return str(info.value)
  assert experiment.get_config("scale=gpu").data.set == "hotpotqa"
  assert experiment.get_config("scale=cpu").data.set == "generated"
  assert error("scale=paper").startswith("model.pretrained: empty: hotpotqa is read by a pretrained")
  hf = _hf_reader(tmp_path / "hf")
  assert error(f"scale=smoke,data=squad_v2,pretrained={hf}").startswith("data.path: empty")
  assert error(f"scale=smoke,data=squad_v2,pretrained={hf},path={tmp_path}/none").startswith(
      f"data.path: {tmp_path}/none does not exist")
  assert error(f"scale=smoke,data=cwe,pretrained={hf},base={tmp_path}").startswith("base:")
  # The positions the engine reads: the config's or the checkpoint's (2048), the larger.
  assert error(f"scale=paper,data=cwe,pretrained={hf}", max_seq_len=1024).startswith(
      "model.max_seq_len: documents of up to 16 x 4096 tokens")
  jobs.get(experiment.get_config(f"scale=smoke,data=cwe,pretrained={hf}"))
  assert error("scale=smoke", data=dict(experiment.get_config("scale=smoke").data, set="nq")).startswith("data.set:")


def test_a_file_without_a_field_exits_2_with_one_line(tmp_path):
  hf = _hf_reader(tmp_path / "hf")
  (tmp_path / "hotpot.json").write_text(json.dumps([{k: v for k, v in HOTPOT[0].items() if k != "context"}]))
  result = _main(tmp_path, "--config", os.path.join(ROOT, "experiments/wim.py")
                 + f":scale=smoke,data=hotpotqa,path=hotpot.json,pretrained={hf}", "--workdir", "run")
  errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert errors == ["config error: data.path: hotpot.json row 0 lacks the field 'context' (valid: HotpotQA rows "
                    "with question, answer, context, supporting_facts)"]


@pytest.mark.slow
def test_hotpotqa_read_three_ways_by_a_pretrained_reader(tmp_path):
  """A HotpotQA split in the Hub's parquet layout, documents of two 64-token segments, read by a tiny random
  checkpoint with the paper's prompts: every method scored, compute counted, relevance checked against the gold
  segments."""
  hf = _hf_reader(tmp_path / "hf")
  (tmp_path / "hotpotqa" / "distractor").mkdir(parents=True)
  pyarrow.parquet.write_table(pyarrow.Table.from_pylist(HOTPOT),
                              tmp_path / "hotpotqa" / "distractor" / "validation-00000-of-00001.parquet")
  result = _main(tmp_path, "--config", os.path.join(ROOT, "experiments/wim.py")
                 + f":scale=smoke,data=hotpotqa,path=hotpotqa,pretrained={hf}", "--workdir", "run",
                 "--config.eval.segments=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 1/" not in result.stderr  # nothing trained
  m = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert m["set"] == "hotpotqa" and m["segment_tokens"] == 64
  methods = m["results"]["hotpotqa"]["2"]
  assert set(methods) == {"wim", "full", "retrieval"}
  for method in methods.values():
    assert 0.0 <= method["score"] <= 1.0 and 0.0 <= method["exact_match"] <= 1.0
  wim = methods["wim"]
  assert wim["segments"] >= 2 and 0.0 <= wim["relevance_accuracy"] <= 1.0
  # WiM feeds every segment once plus its prompts and margins: more than the whole document read once.
  assert wim["prefill_tokens"] > methods["full"]["prefill_tokens"] > 128
  assert wim["example"]["expected"] == ["the Sorn"] and len(wim["example"]["margins"]) >= 2
  assert (tmp_path / "run" / "accuracy_hotpotqa.png").stat().st_size > 1000
