"""GenRM-CoT rationales written over the API: the verdict read from the paper's closing question (or a last
line), the rationales whose verdict disagrees with the candidate's label dropped, the kept ones turned into CoT
training rows that end in `; Yes|No` with the verdict token the scorer reads, answers cached so a rerun asks
nothing; the config's refusals; and GenRM-CoT end to end on GSM8K files from a Hugging Face checkpoint (slow)."""

import importlib
import json
import shutil

import pytest

from lwjax import candidates, jobs, judge as judge_lib, reasoning_tasks
from lwjax.config import ConfigError
from lwjax.data import hf_tokenizer
from lwjax.projects.genrm import api_rationales, data as data_lib, rationale
from tests.test_judge import StubEndpoint, between
from tests.test_reasoning_datasets import TOKENIZER, _write_gsm8k

SPLITS = [
    ("Step 1 is right.\nStep 2 adds 3 and 4 to 8; wrong.\nIs the answer correct (Yes/No)? No",
     "Step 1 is right. Step 2 adds 3 and 4 to 8, wrong.", False),
    ("All fine.\nIs the answer correct? yes.", "All fine.", True),
    ("Step one; fine\n**Is the answer correct (Yes/No)?** **Yes**", "Step one, fine **", True),
    ("Both steps match the reference.\nVerdict: Yes", "Both steps match the reference.", True),
    ("Is the answer correct (Yes/No)?", "", None),
    ("I am not sure.", "", None),
    ("", "", None),
]


@pytest.mark.parametrize("text, body, verdict", SPLITS)
def test_split_verdict(text, body, verdict):
  assert api_rationales.split_verdict(text) == (body, verdict)


def _grading_stub(task, records, flip_every: int = 0):
  """A rationale writer that grades the candidate's final number against the reference's, in the paper's
  format; with `flip_every` k, every k-th answer it gives has the wrong verdict (to be filtered out)."""
  by_question, count = {r["question"]: r for r in records}, [0]

  def answer(prompt: str) -> str:
    record = by_question[between(prompt, "Problem:\n", "\n\nReference solution")]
    assert between(prompt, "Reference solution:\n", "\n\nStudent's") == record["solution"]
    candidate = between(prompt, "Student's solution:\n", "\n\nLet's verify")
    right = task.check(record, candidate).answer_correct
    count[0] += 1
    if flip_every and count[0] % flip_every == 0:
      right = not right
    return (f"The student's final number is {task.answer(candidate)}; the reference's is {record['answer']}.\n"
            f"{api_rationales.FINAL_QUESTION} {'Yes' if right else 'No'}")

  return answer


def _problems(task, records) -> list[dict]:
  """Each record with its reference (right) and a candidate whose final number is off by one (wrong)."""
  out = []
  for i, record in enumerate(records):
    wrong = record["solution"].rsplit("####", 1)[0] + f"#### {int(record['answer']) + 1}"
    cands = [{"text": text, **candidates.label(task, record, text)} for text in (record["solution"], wrong)]
    out.append({"index": i, "record": record, "candidates": cands})
  return out


def test_rationales_disagreeing_with_the_label_are_dropped_and_the_rest_are_cot_rows(tmp_path):
  _write_gsm8k(tmp_path / "gsm8k")
  task = candidates.task_for(reasoning_tasks.get("gsm8k", path=str(tmp_path / "gsm8k")),
                             hf_tokenizer.load(str(TOKENIZER)))
  records = task.records(6, seed=0, split="train")
  problems = _problems(task, records)
  pairs = data_lib.balanced(problems, per_class=1, seed=0)
  cache = tmp_path / "rationales.jsonl"
  with StubEndpoint(_grading_stub(task, records, flip_every=3)) as stub:
    client = judge_lib.Judge(stub.base_url, "grader", prompt=api_rationales.DEFAULT_PROMPT, cache_path=str(cache))
    kept, stats = api_rationales.write(client, pairs, samples=3, temperature=0.7)
  assert stub.requests == stats["asked"] == 3 * len(pairs) == 36
  assert {b["temperature"] for b in stub.bodies} == {0.7} and {b["seed"] for b in stub.bodies} == {0, 1, 2}
  assert stats["disagree"] == 12 and stats["kept"] == 24 and stats["unread"] == 0
  assert stats["agreement"] == pytest.approx(24 / 36)
  for (_, candidate), texts in zip(pairs, kept, strict=True):
    assert texts and all(t.endswith(" ; " + (rationale.YES if candidate["correct"] else rationale.NO)) for t in texts)

  with StubEndpoint(lambda prompt: pytest.fail("asked again")) as again:  # the cache answers a rerun
    client = judge_lib.Judge(again.base_url, "grader", prompt=api_rationales.DEFAULT_PROMPT, cache_path=str(cache))
    assert api_rationales.write(client, pairs, samples=3, temperature=0.7)[0] == kept

  tok = task.tokenizer
  rows = data_lib.training_rows("cot", task.name, problems, tok, seq_len=1024, per_class=1, seed=0,
                                write_rationales=lambda p: kept if p == pairs else pytest.fail("other pairs"))
  assert len(rows) == stats["kept"]
  yes, no, sep = tok.encode(rationale.YES), tok.encode(rationale.NO), tok.encode(rationale.SEP)
  yes_rows = 0
  for row in rows:
    trained = list(row["targets"][row["loss_mask"] > 0])
    assert trained[-1] == tok.eos_id
    verdict = yes if trained[-1 - len(yes):-1] == yes else no  # encoded on its own: the scorer reads its first
    assert trained[-1 - len(verdict):-1] == verdict and trained[-1 - len(verdict) - len(sep):-1 - len(verdict)] == sep
    yes_rows += verdict == yes
  assert yes_rows == sum(len(texts) for (_, c), texts in zip(pairs, kept, strict=True) if c["correct"])


def test_the_config_refuses_cot_on_a_data_set_without_a_writer(tmp_path):
  genrm = importlib.import_module("experiments.genrm")
  arg = f"scale=smoke,task=gsm8k,verifier=cot,path={tmp_path}"
  with pytest.raises(ConfigError, match="^rationales.base_url: empty"):
    jobs.get(genrm.get_config(arg))
  config = genrm.get_config(arg)
  config.rationales.source = "checker"
  with pytest.raises(ConfigError, match="^rationales.source: checker: gsm8k has no step checker"):
    jobs.get(config)
  config = genrm.get_config(arg)
  config.rationales.update(base_url="http://localhost:8000/v1", model="m", temperature=0.0)
  with pytest.raises(ConfigError, match="^rationales.temperature"):
    jobs.get(config)
  config.rationales.update(temperature=0.7, prompt="Grade {candidate}")
  with pytest.raises(ConfigError, match="^rationales.prompt"):
    jobs.get(config)
  config.rationales.prompt = api_rationales.DEFAULT_PROMPT
  jobs.get(config)
  jobs.get(genrm.get_config(f"scale=smoke,task=math,verifier=direct,path={tmp_path}"))  # no writer needed


@pytest.mark.slow
def test_genrm_cot_on_gsm8k_with_rationales_written_over_the_api(tmp_path, monkeypatch):
  """GenRM-CoT end to end on GSM8K files: a Hugging Face checkpoint samples the candidates; a stub endpoint
  writes the rationales (a third of them with the wrong verdict, dropped); the CoT verifier trains on the rest
  through the model's tokenizer and scores the test and hard candidates."""
  from lwjax.models import hf_checkpoint
  from lwjax.models.gpt import GPTConfig
  monkeypatch.chdir(tmp_path)
  _write_gsm8k(tmp_path / "gsm8k")
  shutil.copytree(TOKENIZER, tmp_path / "hf", ignore=shutil.ignore_patterns("expected.json"))
  hf_checkpoint.save_random(GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                      d_ff=64, max_seq_len=512), tmp_path / "hf", scale=0.3)
  task = reasoning_tasks.get("gsm8k", path=str(tmp_path / "gsm8k"))
  records = task.records(12, seed=0, split="train")
  config = importlib.import_module("experiments.genrm").get_config(
      f"scale=smoke,task=gsm8k,verifier=cot,path={tmp_path / 'gsm8k'},base={tmp_path / 'hf'}")
  config.candidates.max_new_tokens = 24
  config.data.seq_len = 384
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  with StubEndpoint(_grading_stub(task, records, flip_every=3)) as stub:
    config.rationales.update(base_url=stub.base_url, model="grader", samples=2)
    metrics = jobs.get(config).run(config, str(tmp_path / "cot"))
  written = metrics["api_rationales"]
  assert written["model"] == "grader" and written["asked"] == stub.requests > 0
  assert written["kept"] + written["disagree"] + written["unread"] == written["asked"] and written["disagree"] > 0
  for split in ("test", "hard"):
    assert metrics[split]["num_problems"] == config.candidates.num_test and set(metrics[split]["cot_k"]) == {"1", "2"}
  kept = [json.loads(line) for line in (tmp_path / "cot" / "rationales_kept.jsonl").read_text().splitlines()]
  assert sum(len(k["rationales"]) for k in kept) == written["kept"]
