"""Compute-matched sampling: the budget arithmetic, coverage / diversity / false-positive rate and the
answer-only filter on planted candidate sets, and the job end to end on planted candidates (every setup's
configs validate)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from lwjax import candidates
from lwjax.models import hf_checkpoint
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.compute_matched import budget, job, quality, report
from lwjax.training.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _cfg(d_model, n_layers=2, vocab=256):
  return GPTConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=2, n_kv_heads=2,
                   head_dim=d_model // 2, d_ff=4 * d_model, max_seq_len=256)


def test_budget_matching_arithmetic():
  wc, se = _cfg(64), _cfg(128)
  context = 100
  # Forward FLOPs of a token: 2 x (non-embedding params + the head) + 2 x the attention scores.
  dense = lambda c: c.num_params(include_embedding=False) + c.d_model * c.vocab_size  # noqa: E731
  attention = lambda c: 2 * c.n_layers * c.n_heads * c.head_dim * context  # noqa: E731
  for c in (wc, se):
    assert budget.flops_per_token(c, context) == pytest.approx(2 * dense(c) + 2 * attention(c))
  ratio = budget.cost_ratio(se, wc, context)
  assert ratio == pytest.approx((dense(se) + attention(se)) / (dense(wc) + attention(wc)))
  assert 3 < ratio < 4
  assert [budget.matched_samples(k, ratio) for k in (1, 2, 4)] == [int(k * ratio) for k in (1, 2, 4)]
  # The paper's Gemma2 pair: 27B / 9B = 3 samples per SE sample, not 2 by a rounding error.
  assert budget.matched_samples(10, 27 / 9) == 30 and budget.matched_samples(1, 1.0) == 1
  # WC never spends more than SE: k WC samples cost at most the SE budget.
  for k in (1, 3, 7):
    assert budget.matched_samples(k, ratio) * budget.flops_per_token(wc, context) <= (
        k * budget.flops_per_token(se, context) + 1e-6)
  with pytest.raises(ValueError, match="swap wc and se"):
    budget.cost_ratio(wc, se, context)
  with pytest.raises(ValueError, match="se_samples"):
    budget.matched_samples(0, ratio)


def _cand(text, answer_correct, correct):
  return {"text": text, "answer_correct": answer_correct, "correct": correct}


PLANTED = [  # three problems, four candidates each
    {"index": 0, "record": {"question": "q0"}, "candidates": [
        _cand("a b", True, True), _cand("a  b", True, True), _cand("c", True, False), _cand("x", False, False)]},
    {"index": 1, "record": {"question": "q1"}, "candidates": [
        _cand("x", False, False), _cand("y", False, False), _cand("d", True, False), _cand("e", True, True)]},
    {"index": 2, "record": {"question": "q2"}, "candidates": [
        _cand("x", False, False), _cand("y", False, False), _cand("z", False, False), _cand("w", False, False)]},
]


def test_coverage_diversity_fpr_and_filter_on_planted_sets():
  assert quality.coverage(PLANTED, 1) == pytest.approx(1 / 3)
  assert quality.coverage(PLANTED, 3) == pytest.approx(2 / 3)
  assert quality.coverage(PLANTED, 4, "correct") == pytest.approx(2 / 3)
  assert quality.coverage(PLANTED, 3, "correct") == pytest.approx(1 / 3)
  # "a b" and "a  b" are one solution: problem 0 has {a b, c}, problem 1 {d, e}; problem 2 has none.
  assert quality.diversity(PLANTED, 4) == pytest.approx(2.0)
  assert quality.diversity(PLANTED, 2) == pytest.approx(1.0)
  assert quality.false_positive_rate(PLANTED, 4) == pytest.approx(2 / 5)
  assert quality.false_positive_rate(PLANTED, 2) == 0.0
  assert np.isnan(quality.false_positive_rate(PLANTED[2:], 4))
  kept = quality.answer_filtered(PLANTED, 3)
  assert [(r["question"], c["text"]) for r, c in kept] == [("q0", "a b"), ("q0", "a  b"), ("q0", "c"), ("q1", "d")]
  s = quality.summary(PLANTED, 4)
  assert s["kept"] == 5 and s["sample_accuracy"] == pytest.approx(5 / 12)
  with pytest.raises(ValueError, match="fewer candidates"):
    quality.coverage(PLANTED, 5)


def _save_solver(directory, cfg: GPTConfig, seed: int):
  """A (random) solver run as `experiments/igsm_solver.py` leaves one: checkpoints/ with params and config."""
  model = GPT(cfg, rngs=nnx.Rngs(seed))
  ckpt = Checkpointer(os.path.join(directory, "checkpoints"), async_save=False)
  ckpt.save(1, {"params": nnx.to_pure_dict(nnx.state(model))},
            config=ml_collections.ConfigDict({"model": cfg.to_dict()}), force=True)
  ckpt.close()


def _plant(task, problems_records, n, rng):
  """Candidates a solver might draw: the reference solution, one with a wrong first step but the right
  answer (a false positive), and a wrong answer; labelled by the checker."""
  out = []
  for index, record in enumerate(problems_records):
    sentences = record["solution"].split(" . ")
    words = sentences[0].split()
    words[-1] = str((int(words[-1]) + 1) % 23)
    lucky = " . ".join([" ".join(words)] + sentences[1:])
    wrong = record["solution"].rsplit(" ", 2)[0] + f" {(int(record['answer']) + 1) % 23} ."
    texts = [record["solution"], lucky, wrong]
    cands = [{"text": t, "num_tokens": len(t.split()), **candidates.label(task, record, t)}
             for t in (texts[i] for i in rng.integers(0, 3, n))]
    out.append({"index": index, "record": record, "candidates": cands})
  return out


def _main(tmp_path, arg, workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                         os.path.join(ROOT, "experiments/compute_matched.py") + f":{arg}", "--workdir", workdir,
                         *flags],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _save_hf(directory, cfg: GPTConfig, seed: int):
  """A (random) Hugging Face Llama checkpoint with a Llama-3-style tokenizer beside it, as a pretrained WC, SE
  or student comes."""
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers", "llama3_style"), directory,
                  ignore=shutil.ignore_patterns("expected.json"))
  hf_checkpoint.save_random(dataclasses.replace(cfg, vocab_size=448, max_seq_len=512), directory, scale=0.3,
                            seed=seed)


@pytest.mark.parametrize("models_from", ["workdirs", pytest.param("hugging_face", marks=pytest.mark.slow)])
def test_smoke_end_to_end_on_planted_candidates(tmp_path, monkeypatch, models_from):
  """The kd setup (three models: lwjax solver runs, or Hugging Face checkpoints sampling, finetuning and
  evaluated through their own tokenizer) on candidate sets planted where the job looks for them: quality
  numbers, the false-positive rate judged over HTTP (a stub endpoint judging with the checker), both finetunes,
  evaluations; a second run reads everything back and asks the judge nothing."""
  from experiments import compute_matched
  from tests.test_judge import StubEndpoint, checker_answer
  save = _save_solver if models_from == "workdirs" else _save_hf
  save(tmp_path / "wc", _cfg(32), 0)
  save(tmp_path / "se", _cfg(64), 1)
  save(tmp_path / "student", _cfg(32), 2)
  arg = "scale=smoke,setup=kd,wc=wc,se=se,student=student"
  monkeypatch.chdir(tmp_path)
  config = compute_matched.get_config(arg)
  task = job.get_task(config)
  models = job.load_models(config)
  plan = job.plan(config, task, models)
  assert plan["n"]["wc"] == budget.matched_samples(2, plan["cost_ratio"]) > plan["n"]["se"] == 2
  c, rng = config.candidates, np.random.default_rng(0)
  records = task.records(c.num_train, seed=c.record_seed, split="train")
  planted = {}
  for source in job.SOURCES:
    model, workdir, step, _ = models[source]
    planted[source] = _plant(task, records, plan["n"][source], rng)
    settings = {"workdir": os.path.abspath(workdir), "task": "igsm", "split": "train", "num": c.num_train,
                "n": plan["n"][source], "temperature": c.temperature, "max_new_tokens": c.max_new_tokens,
                "seed": config.seed * 7919 + job.SOURCES.index(source), "record_seed": c.record_seed,
                "task_options": {"preset": "small", "train_ops": [1, 2, 3], "hard_ops": [4, 5]}, "step": step}
    stats = {"generated_tokens": 1000, "answer_accuracy": 0.5, "accuracy": 0.3}
    candidates.write(plan["paths"][source], planted[source],
                     {"settings": settings, "checkpoint_step": step, "stats": stats})
  assert any(not c["correct"] and c["answer_correct"] for p in planted["wc"] for c in p["candidates"])
  with StubEndpoint(checker_answer(records)) as stub:
    flags = (f"--config.judge.base_url={stub.base_url}", "--config.judge.model=checker")
    result = _main(tmp_path, arg, "kd", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert m["judge"]["wc"]["agreement"] == 1.0 and stub.requests > 0
    assert m["judge"]["wc"]["judged"] == min(config.judge.max_candidates, m["judge"]["wc"]["kept"])
    assert (tmp_path / "kd" / "judged.jsonl").is_file()
    asked = stub.requests
    again = _main(tmp_path, arg, "kd", *flags)
    assert stub.requests == asked
  assert m["setup"] == "kd" and m["finetuned"] == "student" and m["steps"] == config.train.steps
  for row in m["quality"]:
    for source in job.SOURCES:
      assert row[source] == quality.summary(planted[source], row["budget"][source])
  k = m["finetune_data"]
  # Rows are tokenized by the finetuned model's tokenizer (the student's own for a Hugging Face one); those past
  # data.seq_len are left out.
  _, student_tokenizer, _ = candidates.load_solver(str(tmp_path / "student"))
  tokenizer = candidates.task_for(task, student_tokenizer).tokenizer
  kept = quality.answer_filtered(planted["wc"], plan["n"]["wc"])
  assert k["wc"]["rows"] == len(job.finetune_rows(kept, tokenizer, config.data.seq_len)) > 0
  if models_from == "workdirs":
    assert k["wc"]["rows"] == len(kept)
  assert k["se"]["false_positive_rate"] == pytest.approx(quality.false_positive_rate(planted["se"], 2))
  for name in ("base", "wc_data", "se_data"):
    assert set(m["eval"][name]) == {"test", "hard"} and m["eval"][name]["test"]["n"] == config.eval.num_test
  assert set(m["wc_minus_se"]) == {"test", "hard"}
  assert (tmp_path / "kd" / "on_wc_data" / "checkpoints").is_dir() and (tmp_path / "kd" / "coverage.png").is_file()
  assert again.returncode == 0 and "finetuning student" in again.stderr and "step 1/" not in again.stderr
  assert json.loads((tmp_path / "kd" / "metrics.json").read_text())["eval"] == m["eval"]
  table = report.finetune_table(report.load_runs(str(tmp_path)), "test")
  assert table.splitlines()[2].startswith("| distillation (student finetuned) | 1 |")
  quality_lines = report.quality_table(report.load_runs(str(tmp_path))).splitlines()
  assert quality_lines[0].endswith("| judged FPR SE (n) | judged FPR WC (n) |")
  assert len(quality_lines) == 2 + len(m["quality"]) == 2 + len(m["judge_by_budget"])
  last = m["judge_by_budget"][-1]["wc"]
  assert quality_lines[-1].endswith(f"({last['n']}) |") and last["agreement"] == 1.0


@pytest.mark.parametrize("scale", ("smoke", "cpu", "gpu", "paper"))
def test_every_scale_and_setup_validates(scale):
  from experiments import compute_matched
  from lwjax import jobs
  from lwjax.config import ConfigError
  for setup in job.SETUPS:
    jobs.get(compute_matched.get_config(f"scale={scale},setup={setup}"))
  with pytest.raises(ConfigError, match="budget.finetune"):
    jobs.get(compute_matched.get_config(f"scale={scale},budget=5"))


def test_judged_false_positive_rate_equals_the_checkers_on_compact_igsm(tmp_path):
  """The false-positive rate as an LLM judge sees it, over HTTP, at every budget: a stub endpoint that judges
  with the exact iGSM checker gives the checker's rate on the judged candidates (agreement 1), on all of them or
  a random subset; the subsets are nested across the budgets (a larger budget's draw holds what a smaller one
  judged while it has room), so the budgets ask little more than the largest; the judged candidates are written
  beside the metrics; no base_url, no judge."""
  from experiments import compute_matched
  from lwjax import jobs
  from lwjax.config import ConfigError
  from lwjax.projects.compute_matched import judged as judged_lib
  from tests.test_judge import StubEndpoint, checker_answer
  config = compute_matched.get_config("scale=smoke")
  config.candidates.dir = str(tmp_path / "candidates")
  task = job.get_task(config)
  records = task.records(6, seed=0, split="train")
  rng = np.random.default_rng(0)
  sets = {source: _plant(task, records, 4, rng) for source in job.SOURCES}
  rows = [{"budget": {"se": 1, "wc": 2}}, {"budget": {"se": 2, "wc": 4}}]
  assert judged_lib.false_positive_rates(config, task, sets, rows, str(tmp_path / "off")) is None
  unnamed = compute_matched.get_config("scale=smoke")
  unnamed.judge.base_url = "http://127.0.0.1:1/v1"
  with pytest.raises(ConfigError, match="^judge.model"):
    jobs.get(unnamed)
  with pytest.raises(ConfigError, match="^task.fewshot"):
    jobs.get(compute_matched.get_config("scale=smoke,fewshot=4"))
  with StubEndpoint(checker_answer(records)) as stub:
    config.judge.update(base_url=stub.base_url, model="checker", max_candidates=1000)
    judged = judged_lib.false_positive_rates(config, task, sets, rows, str(tmp_path / "all"))
    for row, result in zip(rows, judged, strict=True):
      assert result["budget"] == row["budget"]
      for source in job.SOURCES:
        k, r = row["budget"][source], result[source]
        assert r["judged"] == r["kept"] == len(quality.answer_filtered(sets[source], k))
        assert r["false_positive_rate"] == pytest.approx(quality.false_positive_rate(sets[source], k))
        assert r["agreement"] == 1.0 and r["unparsed"] == 0 and r["samples_per_problem"] == k
    assert 0 < judged[-1]["wc"]["false_positive_rate"] < 1
    largest = len({(record["question"], c["text"]) for source in job.SOURCES  # identical prompts asked once
                   for record, c in quality.answer_filtered(sets[source], rows[-1]["budget"][source])})
    assert stub.requests == largest  # the smaller budget's candidates are among the larger's: asked once
    config.judge.max_candidates = 3
    subset = judged_lib.false_positive_rates(config, task, sets, rows, str(tmp_path / "three"))
    assert stub.requests == largest  # every answer cached under candidates.dir
  lines = [json.loads(line) for line in (tmp_path / "three" / "judged.jsonl").read_text().splitlines()]
  assert {line["source"] for line in lines} == {"wc", "se"}
  for source in job.SOURCES:
    mine = [line for line in lines if line["source"] == source]
    for row, result in zip(rows, subset, strict=True):
      k = row["budget"][source]
      at_k = [line for line in mine if k in line["budgets"]]
      picked = [sets[source][line["problem"]]["candidates"][line["candidate"]] for line in at_k]
      assert len(at_k) == result[source]["n"] == 3 and all(c["answer_correct"] for c in picked)
      assert all(line["candidate"] < k for line in at_k)
      assert result[source]["false_positive_rate"] == pytest.approx(np.mean([not c["correct"] for c in picked]))
      assert [line["verdict"] for line in at_k] == [c["correct"] for c in picked]


@pytest.mark.slow
def test_kd_on_math_files_from_hugging_face_checkpoints_with_a_judged_false_positive_rate(tmp_path, monkeypatch):
  """compute-matched on MATH in its published schema, three Hugging Face checkpoints reading it through their
  tokenizer: candidate sets planted where the job looks for them (the reference, a right box after a wrong step,
  a wrong box), graded by the MATH equivalence; no step checker, so the quality table's FPR is nan and the judge
  (a stub endpoint that rejects the wrong step) gives it at every budget; both finetunes and their evaluations."""
  from experiments import compute_matched
  from lwjax import jobs, reasoning_tasks
  from tests.test_judge import StubEndpoint, between
  from tests.test_reasoning_datasets import _write_math
  (tmp_path / "math").mkdir()
  _write_math(tmp_path / "math")
  for name, width, seed in (("wc", 32, 0), ("se", 64, 1), ("student", 32, 2)):
    _save_hf(tmp_path / name, _cfg(width), seed)
  monkeypatch.chdir(tmp_path)
  config = compute_matched.get_config(f"scale=smoke,setup=kd,task=math,path={tmp_path / 'math'},wc=wc,se=se,"
                                      "student=student")
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  config.candidates.num_train = 5
  config.eval.update(num_test=3, num_hard=1)
  jobs.get(config)
  task = job.get_task(config)
  assert not task.step_checker
  models = job.load_models(config)
  plan = job.plan(config, task, models)
  c, rng = config.candidates, np.random.default_rng(0)
  records = task.records(c.num_train, seed=c.record_seed, split="train")
  planted = {}
  for source in job.SOURCES:
    _, workdir, step, _ = models[source]
    problems = []
    for index, record in enumerate(records):
      wrong_step = record["solution"].replace("Halving,", "Doubling then halving twice,")
      wrong_box = "It is $\\boxed{0}$."
      texts = [[record["solution"], wrong_step, wrong_box][i] for i in rng.integers(0, 3, plan["n"][source])]
      problems.append({"index": index, "record": record, "candidates": [
          {"text": t, "num_tokens": 9, **candidates.label(task, record, t)} for t in texts]})
    planted[source] = problems
    settings = {"workdir": os.path.abspath(workdir), "task": "math", "split": "train", "num": c.num_train,
                "n": plan["n"][source], "temperature": c.temperature, "max_new_tokens": c.max_new_tokens,
                "seed": config.seed * 7919 + job.SOURCES.index(source), "record_seed": c.record_seed,
                "task_options": job.task_options(config), "step": step}
    stats = {"generated_tokens": 90, "answer_accuracy": 0.6, "accuracy": 0.6}
    candidates.write(plan["paths"][source], problems, {"settings": json.loads(json.dumps(settings)),
                                                       "checkpoint_step": step, "stats": stats})
  assert all(c["answer_correct"] for p in planted["wc"] for c in p["candidates"] if "Doubling" in c["text"])

  def judge(prompt: str) -> str:  # the reasoning is wrong exactly where a step doubles first
    return "No" if "Doubling" in between(prompt, "Student's solution:\n", "\n\nIs every step") else "Yes"

  with StubEndpoint(judge) as stub:
    config.judge.update(base_url=stub.base_url, model="grader", max_candidates=1000)
    m = jobs.get(config).run(config, str(tmp_path / "kd"))
  assert m["finetuned"] == "student" and reasoning_tasks.get("math", path=str(tmp_path / "math")).name == "math"
  for row, judged in zip(m["quality"], m["judge_by_budget"], strict=True):
    for source in job.SOURCES:
      assert row[source]["false_positive_rate"] != row[source]["false_positive_rate"]  # nan: no step checker
      kept = [c for p in planted[source] for c in p["candidates"][:row["budget"][source]] if c["answer_correct"]]
      assert judged[source]["n"] == len(kept) and judged[source]["false_positive_rate"] == pytest.approx(
          np.mean(["Doubling" in c["text"] for c in kept]))
  for name in ("base", "wc_data", "se_data"):
    assert m["eval"][name]["test"]["n"] == 3
  assert m["finetune_data"]["wc"]["rows"] > 0 and m["finetune_data"]["se"]["rows"] > 0
