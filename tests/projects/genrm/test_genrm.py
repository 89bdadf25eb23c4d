"""GenRM: checker-written rationales name the first wrong step; p(Yes) equals a hand softmax; Best-of-N,
majority voting, pass@n and AUC on planted candidate sets; the discriminative head learns a separable set;
the smoke run end to end."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lwjax import candidates, reasoning_tasks
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.genrm import bestofn, data as data_lib, rationale, report, verifiers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _corrupt(task: str, solution: str, step: int) -> str:
  """`solution` with step `step` made wrong (its value / letter / picked word changed)."""
  parts = solution.split(" ; ") if task != "igsm" else solution.split(" . ")
  words = parts[step].split()
  if task == "igsm":
    words[-1] = str((int(words[-1]) + 1) % 23)
  elif task == "last_letter":
    words[-1] = "z" if words[-1] != "z" else "b"
  else:  # word sort: pick the second remaining word instead (spelled letters up to "rest")
    words[1] = "z" if words[1] != "z" else "b"
  parts[step] = " ".join(words)
  return (" ; " if task != "igsm" else " . ").join(parts)


@pytest.mark.parametrize("task_name", reasoning_tasks.GENERATED_NAMES)
def test_rationales_name_the_first_wrong_step(task_name):
  task = reasoning_tasks.get(task_name)
  for record in task.records(6, seed=3, split="test"):
    solution = record["solution"]
    verdict = task.check(record, solution)
    written = rationale.rationale(task_name, record, solution, verdict.correct, verdict.first_error)
    assert written.endswith(f"{rationale.OK} ; {rationale.YES}") and rationale.WRONG not in written
    num_steps = written.count(f" {rationale.OK} ;") - 1  # the answer is checked last
    assert num_steps == verdict.num_steps
    task.tokenizer.encode(written)  # every rationale word is in the task's vocabulary
    for step in range(min(num_steps, 3)):
      bad = _corrupt(task_name, solution, step)
      verdict = task.check(record, bad)
      assert not verdict.correct and verdict.first_error == step, (bad, verdict)
      written = rationale.rationale(task_name, record, bad, verdict.correct, verdict.first_error)
      assert written.endswith(f"{rationale.WRONG} ; {rationale.NO}")
      assert written.count(f" {rationale.OK} ;") == step  # every step before the error is ok, then wrong
      task.tokenizer.encode(written)


def test_p_yes_equals_a_hand_softmax():
  cfg = GPTConfig(vocab_size=23, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32,
                  max_seq_len=16)
  model = GPT(cfg, rngs=nnx.Rngs(1))
  seqs = [[1, 5, 6, 7], [1, 9, 4], [1, 3, 3, 3, 3, 8]]
  got = verifiers.score_p_yes(model, seqs, yes_id=11, no_id=12, batch=2, seq_len=8)
  padded = jnp.array([seq + [0] * (8 - len(seq)) for seq in seqs])
  all_logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, padded), np.float64)
  for seq, p, logits in zip(seqs, got, all_logits, strict=True):
    logits = logits[len(seq) - 1]
    want = np.exp(logits[11] - logits.max()) / np.exp(logits - logits.max()).sum()
    assert abs(p - want) < 1e-5


def test_best_of_n_majority_pass_and_auc_on_planted_sets():
  # Problem 0: the verifier ranks the one right candidate top; problem 1: it ranks a wrong one top.
  scores = np.array([[0.1, 0.9, 0.2, 0.3], [0.8, 0.1, 0.2, 0.3]])
  correct = np.array([[0, 1, 0, 0], [0, 1, 1, 0]], bool)
  assert bestofn.best_of_n(scores, correct, 4)[0] == pytest.approx(0.5)
  # At n = 1 best-of-n is the mean correctness: (1/4 + 2/4) / 2.
  assert bestofn.best_of_n(scores, correct, 1, draws=4000)[0] == pytest.approx(0.375, abs=0.02)
  answers = [["7", "3", "7", "7"], ["5", "4", "4", None]]
  correct_answers = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
  assert bestofn.majority_vote(answers, correct_answers, 4)[0] == pytest.approx(1.0)
  assert bestofn.majority_vote([["1", "2", "2", "1"]], np.array([[1, 0, 0, 1]], bool), 4)[0] == 1.0  # tie: first
  # Whole-solution correctness: the majority answer "7" picked once, through its first candidate (a wrong
  # solution with the right answer), not credited because another candidate with "7" is right.
  assert bestofn.majority_vote([["7", "7", "3"]], np.array([[0, 1, 0]], bool), 3)[0] == 0.0
  # pass@2 of 1 right in 4: 1 - C(3,2)/C(4,2) = 0.5; of 2 right: 1 - C(2,2)/C(4,2) = 5/6.
  assert bestofn.pass_at_n(correct, 2)[0] == pytest.approx((0.5 + 5 / 6) / 2)
  assert bestofn.roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
  assert bestofn.roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
  mean, se = bestofn.best_of_n(np.zeros((3, 2)), np.array([[1, 1], [0, 0], [1, 1]], bool), 2)
  assert mean == pytest.approx(2 / 3) and se == pytest.approx(np.std([1, 0, 1], ddof=1) / np.sqrt(3))


def test_within_problem_auc_ranks_candidates_not_problems():
  """Scores that put every candidate of an easy problem above every candidate of a hard one have a high pooled
  AUC and a within-problem AUC of one half when they cannot tell the candidates of a problem apart."""
  labels = np.array([[1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], bool)
  by_problem = np.array([[0.9] * 4, [0.1] * 4, [0.5] * 4])
  assert bestofn.roc_auc(by_problem, labels) > 0.7
  w = bestofn.within_problem_auc(by_problem, labels)
  assert w["auc"] == 0.5 and w["pair_accuracy"] == 0.5 and w["problems"] == 3 and w["pairs"] == 3 + 3 + 3
  ranked = np.array([[0.9, 0.8, 0.7, 0.1], [0.2, 0.3, 0.1, 0.4], [0.3, 0.1, 0.2, 0.0]])
  w = bestofn.within_problem_auc(ranked, labels)
  assert w["auc"] == 1.0 and w["pair_accuracy"] == 1.0
  half = bestofn.within_problem_auc(np.array([[0.9, 0.1, 0.7, 0.6]]), np.array([[1, 0, 0, 1]], bool))
  assert half["pair_accuracy"] == pytest.approx(3 / 4) and half["auc"] == pytest.approx(3 / 4)
  assert bestofn.within_problem_auc(by_problem[:1], np.ones((1, 4), bool))["problems"] == 0


def test_disc_head_loss_decreases_on_a_separable_set():
  cfg = GPTConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32,
                  max_seq_len=8)
  model = verifiers.RewardModel(GPT(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 16, size=(32, 6)).astype(np.int32)
  labels = (tokens[:, 2] >= 10).astype(np.float32)  # the label is a function of one token
  batch = {"inputs": tokens, "last": np.full(32, 5, np.int32), "label": labels, "weight": np.ones(32, np.float32),
           "positions": np.tile(np.arange(6, dtype=np.int32), (32, 1)), "segment_ids": np.ones((32, 6), np.int32)}
  graphdef, params = nnx.split(model)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss(p):
      s, w, _ = verifiers.disc_loss(nnx.merge(graphdef, p), batch)
      return s / w
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  losses = []
  for _ in range(100):
    params, opt, value = step(params, opt)
    losses.append(float(value))
  assert losses[-1] < 0.3 * losses[0], losses[::20]
  _, _, metrics = verifiers.disc_loss(nnx.merge(graphdef, params), batch)
  assert float(metrics["accuracy"]) >= 30


def test_verification_rows_mask_only_the_verdict_and_the_rationale():
  task = reasoning_tasks.get("last_letter")
  record = task.records(1, seed=0, split="train")[0]
  good = {"text": record["solution"], **candidates.label(task, record, record["solution"])}
  bad_text = _corrupt("last_letter", record["solution"], 0)
  bad = {"text": bad_text, **candidates.label(task, record, bad_text)}
  tok = task.tokenizer
  for candidate, verdict in ((good, rationale.YES), (bad, rationale.NO)):
    row = data_lib.verification_row("direct", "last_letter", record, candidate, tok, 128)
    trained = np.flatnonzero(row["loss_mask"])
    assert len(trained) == 1 and tok.decode([row["targets"][trained[0]]]) == verdict
    row = data_lib.verification_row("cot", "last_letter", record, candidate, tok, 128)
    target = tok.decode(row["targets"][row["loss_mask"] > 0])
    assert target == rationale.rationale("last_letter", record, candidate["text"], candidate["correct"],
                                         candidate["first_error"])
    row = data_lib.verification_row("disc", "last_letter", record, candidate, tok, 128)
    assert row["label"] == float(verdict == rationale.YES) and row["loss_mask"].sum() == 0
    assert row["inputs"][row["last"]] != 0 and row["inputs"][row["last"] + 1] == 0


def _main(tmp_path, experiment, arg, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                         os.path.join(ROOT, f"experiments/{experiment}.py") + f":{arg}", "--workdir", workdir],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_smoke_solver_then_cot_verifier_end_to_end(tmp_path):
  result = _main(tmp_path, "genrm_solver", "scale=smoke,task=word_sort", "solver")
  assert result.returncode == 0, result.stderr[-3000:]
  assert set(json.loads((tmp_path / "solver" / "metrics.json").read_text())) >= {"test", "hard"}
  result = _main(tmp_path, "genrm", "scale=smoke,task=word_sort,verifier=cot,base=solver", "cot")
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((tmp_path / "cot" / "metrics.json").read_text())
  assert m["kind"] == "cot" and m["test"]["n"] == [1, 2, 4] and set(m["test"]["cot_k"]) == {"1", "2"}
  assert len(m["test"]["answer"]["verifier"]) == 3 and (tmp_path / "cot" / "bestofn_hard.png").stat().st_size > 1000
  run = json.loads((tmp_path / "cot" / "lwjax_run.json").read_text())  # what made the run, beside its metrics
  assert run["config"]["verifier"]["kind"] == "cot" and run["config"]["seed"] == m["seed"] and "--config" in run["argv"]
  with gzip.open(tmp_path / "cot" / "scores_test.jsonl.gz", "rt") as f:  # the raw data recomputes the metrics
    raw = [json.loads(line) for line in f]
  scores, answer_ok = np.array([r["score"] for r in raw]), np.array([r["answer_correct"] for r in raw])
  assert len(raw) == m["test"]["num_problems"] and np.array([r["rationale_scores"] for r in raw]).shape[-1] == 2
  assert bestofn.best_of_n(scores, answer_ok, 4, draws=8, seed=m["seed"])[0] == pytest.approx(
      m["test"]["answer"]["verifier"][-1][0], abs=1e-6)
  assert bestofn.roc_auc(scores, np.array([r["correct"] for r in raw])) == pytest.approx(m["test"]["auc"], abs=1e-4,
                                                                                        nan_ok=True)
  rows = report.table(report.load_runs(str(tmp_path)), "test").splitlines()
  assert rows[2].startswith("| cot (cot) |") and rows[-1].startswith("| first sample |")
  candidates_dir = tmp_path / "runs/genrm_smoke/candidates"
  problems, metadata = candidates.read(str(candidates_dir / "word_sort_test_3x4_t0.8_s0.arrayrecord"))
  assert len(problems) == 3 and all(len(p["candidates"]) == 4 for p in problems)
  assert metadata["stats"]["n"] == 4 and metadata["settings"]["task"] == "word_sort"


@pytest.mark.parametrize("scale", ("smoke", "cpu", "gpu", "paper"))
@pytest.mark.parametrize("task", reasoning_tasks.GENERATED_NAMES)
def test_every_scale_task_and_verifier_validates(scale, task):
  from experiments import genrm, genrm_solver
  from lwjax import jobs
  for kind in ("judge", "disc", "direct", "cot", "unified"):
    jobs.get(genrm.get_config(f"scale={scale},task={task},verifier={kind}"))
  if task != "igsm":
    jobs.get(genrm_solver.get_config(f"scale={scale},task={task}"))


def test_report_over_seeds_is_the_mean_and_standard_error_of_each_seed(tmp_path):
  def metrics(kind, verifier, majority, k_acc=None):
    split = {"n": [1, 4], "auc": 0.5, "answer": {"verifier": [[v, 0.01] for v in verifier],
                                                  "majority": [[v, 0.01] for v in majority],
                                                  "pass": [[0.5, 0.0], [0.9, 0.0]], "first": [0.3, 0.01]}}
    split["full"] = split["answer"]
    if k_acc is not None:
      split["cot_k"] = {"1": [k_acc[0], 0.0], "4": [k_acc[1], 0.0]}
    return {"kind": kind, "test": split, "hard": split}

  for seed, (a, b) in enumerate(((0.40, 0.60), (0.50, 0.80))):
    for kind, k_acc in (("direct", None), ("cot", (a, b))):
      run = tmp_path / f"s{seed}" / kind
      run.mkdir(parents=True)
      (run / "metrics.json").write_text(json.dumps(metrics(kind, [0.3, b], [0.3, a], k_acc)))
  sweeps = [report.load_runs(str(tmp_path / f"s{s}")) for s in (0, 1)]
  rows = report.seeds_table(sweeps, "test").splitlines()
  # Best-of-4: 60 and 80 -> 70 ± 10; self-consistency 40 and 50 -> 45 ± 5.
  assert rows[2] == "| direct | 30.0 ± 0.0 | 70.0 ± 10.0 | 0.500 |" and rows[3].startswith("| cot | 30.0 ± 0.0 |")
  assert rows[4] == "| self-consistency | 30.0 ± 0.0 | 45.0 ± 5.0 | |"
  assert rows[-1] == "| first sample | 30.0 ± 0.0 | 30.0 ± 0.0 | |"
  assert report.cot_k_table(sweeps, "test").splitlines()[-1] == "| Best-of-4 | 45.0 ± 5.0 | 70.0 ± 10.0 |"
  report.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--png", str(tmp_path / "c.png")])
  assert (tmp_path / "c_test.png").stat().st_size > 1000
