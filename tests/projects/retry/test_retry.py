"""The iGSM retry project: exact tokenizer, loss masks, every scale validates, smoke end to end (main.py),
and (slow) a small model beats the constant-answer baseline measured on the same held-out problems."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from lwjax import jobs
from lwjax.data import igsm
from lwjax.data.igsm.tokenizer import IGSMTokenizer
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.retry import data as data_lib, evaluate, report, sweep
from lwjax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
from experiments import igsm_retry  # noqa: E402


def test_tokenizer_is_exact_and_word_level_on_igsm_text():
  tok = IGSMTokenizer()
  source = igsm.IGSMSource(20, seed=3, ops=range(1, 12), retry_rate=0.5)
  for i in range(len(source)):
    text = source[i]["question"] + " " + source[i]["solution"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert min(ids) >= 260 and len(ids) < len(text) / 3  # no byte fallback, whole names as tokens
  odd = "Ünïcode ~ text\twith Define"
  assert tok.decode(tok.encode(odd)) == odd


def test_rows_train_the_solution_and_mask_only_the_wrong_steps():
  tok = IGSMTokenizer()
  record = igsm.IGSMSource(1, seed=0, ops=(4,), retry_rate=1.0)[0]
  assert record["num_retries"] > 0
  plain = data_lib.encode_example(record, tok, 1024, mask_retries=False)
  masked = data_lib.encode_example(record, tok, 1024, mask_retries=True)
  n_prompt = 1 + len(tok.encode(record["question"]))
  trained = plain["targets"][plain["loss_mask"] > 0]
  assert tok.decode(trained) == " " + record["solution"] and plain["loss_mask"][:n_prompt - 1].sum() == 0
  kept = tok.decode(masked["targets"][masked["loss_mask"] > 0])
  assert igsm.BACK in kept and record["solution"].count("Define") - kept.count("Define") == record["num_retries"]
  assert data_lib.encode_example(record, tok, 64, mask_retries=False) is None


def test_packed_rows_hold_whole_problems_as_segments_with_their_loss_masks():
  tok = IGSMTokenizer()
  source = igsm.IGSMSource(24, seed=1, ops=(1, 2, 3, 4), retry_rate=0.5)
  expected = [data_lib.encode_tokens(source[i], tok, 512, mask_retries=True) for i in range(len(source))]
  batches = list(data_lib.make_dataset(source, tok, seq_len=512, batch_size=4, mask_retries=True,
                                       shuffle_seed=None, num_epochs=1, pack=True))
  found = []
  for batch in batches:
    assert batch["inputs"].shape[1:] == (512,) and len(batch["inputs"]) <= 4  # the last batch may be short
    for row in range(len(batch["inputs"])):
      seg, pos = batch["segment_ids"][row], batch["positions"][row]
      assert (batch["loss_mask"][row][seg == 0] == 0).all()
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all() and (pos[where] == np.arange(len(where))).all()  # contiguous, from 0
        found.append({k: batch[k][row][where] for k in ("inputs", "targets", "loss_mask")})
  # Every problem lands whole in exactly one segment (first-fit may reorder them).
  key = lambda e: tuple(e["inputs"])  # noqa: E731
  assert sorted(map(key, found)) == sorted(map(key, expected))
  by_inputs = {key(e): e for e in expected}
  for e in found:
    np.testing.assert_array_equal(e["targets"], by_inputs[key(e)]["targets"])
    np.testing.assert_array_equal(e["loss_mask"], by_inputs[key(e)]["loss_mask"])
  assert sum(len(b["inputs"]) for b in batches) < len(expected)  # vs one problem per padded row


def test_score_gives_partial_credit_for_the_correct_prefix():
  records = data_lib.eval_records((3,), 4, seed=5, preset="small", fmt="pq")
  exact = evaluate.score(records, [r["solution"] for r in records])["all"]
  assert exact["accuracy"] == exact["correct_prefix"] == 1.0
  first_step_only = [r["solution"].split(". ")[0] + ". Answer: 0." for r in records]
  partial = evaluate.score(records, first_step_only)["all"]
  shortest = [len(igsm.problem_of(r).solution_order) for r in records]
  assert partial["accuracy"] == 0.0 and partial["correct_prefix"] == pytest.approx(np.mean([1 / n for n in shortest]))


@pytest.mark.parametrize("scale", igsm_retry.SCALES)
@pytest.mark.parametrize("run", ["r0", "r0.2", "weak0.5", "mask0.5", "lora", "full"])
def test_every_scale_and_run_validates(scale, run):
  jobs.get(igsm_retry.get_config(f"scale={scale},run={run}"))


def _main(tmp_path, workdir, arg, *overrides, experiment="igsm_retry"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config",
       os.path.join(ROOT, f"experiments/{experiment}.py") + f":{arg}", "--workdir", workdir, *overrides],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_smoke_pretrains_evaluates_and_lora_finetunes_end_to_end(tmp_path, capsys):
  """The testbed's solver (experiments/igsm_solver.py, the r = 0 pretraining) then a LoRA finetune of it."""
  result = _main(tmp_path, "r0", "scale=smoke,size=weak", experiment="igsm_solver")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((tmp_path / "r0" / "metrics.json").read_text())
  assert metrics["steps"] == 6 and set(metrics["eval"]) == {"op1", "op3", "all"} and metrics["retry_rate"] == 0
  assert metrics["eval"]["all"]["n"] == 8 and "[BACK] rate" in result.stderr
  assert 0.0 <= metrics["eval"]["all"]["correct_prefix"] <= 1.0
  curve = [json.loads(line) for line in (tmp_path / "r0" / "curve.jsonl").read_text().splitlines()]
  assert [c["step"] for c in curve] == [6] and curve[0]["eval"]["op1"]["n"] == 2
  model, config, step = checkpoint.load_model(str(tmp_path / "r0" / "checkpoints"),
                                              lambda c: GPT(GPTConfig.from_dict(c["model"]), rngs=nnx.Rngs(0)))
  assert step == 6 and config["data"]["fmt"] == "compact" and model.cfg.vocab_size >= 162
  result = _main(tmp_path, "lora", "scale=smoke,run=lora,base=r0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "finetune lora" in result.stderr
  assert json.loads((tmp_path / "lora" / "metrics.json").read_text())["finetune"] == "lora"
  rows = report.table(report.load_runs(str(tmp_path))).splitlines()
  assert len(rows) == 5 and rows[2].startswith("| r0 | pretrain r=0 | 6 |") and "lora finetune" in rows[3]
  assert rows[0].count("acc %") == 3 and rows[4].startswith("| constant |")
  report.curve_png(str(tmp_path), str(tmp_path / "curve.png"))
  assert (tmp_path / "curve.png").stat().st_size > 1000
  # The sweep skips finished arms (both are) and ends with the same table.
  assert sweep.main(["--scale", "smoke", "--root", str(tmp_path), "--arms", "r0,lora"]) == 0
  assert report.table(report.load_runs(str(tmp_path))) in capsys.readouterr().out


@pytest.mark.slow
def test_small_model_beats_the_constant_answer_baseline(tmp_path):
  # op 1 problems: the answer is one sum, product or copy of constants in the question.
  result = _main(tmp_path, "run", "scale=smoke,run=r0", "--config.data.train_ops=1",
                 "--config.eval.ops=1", "--config.eval.num_per_op=64", "--config.eval.batch_size=32",
                 "--config.train.steps=400", "--config.train.global_batch_size=16",
                 "--config.train.eval_every=400", "--config.train.checkpoint_every=400")
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]["op1"]
  assert m["answer_accuracy"] > m["constant_answer_accuracy"] + 0.05, m
  assert np.isfinite(m["length_vs_shortest"])


def test_sweep_plans_resumes_archives_and_runs_workers_pinned(tmp_path, monkeypatch):
  """The scheduler with the arm runs faked: done arms (workdir or archive) skipped, r0 trained again when a
  finetuning arm lacks its checkpoint and waited for, result files archived, each worker on its own cores."""
  root, archive = tmp_path / "runs", tmp_path / "archive"
  scores = {k: 0.5 for k in ("accuracy", "answer_accuracy", "constant_answer_accuracy", "correct_prefix",
                             "back_rate", "length_vs_shortest")}
  metrics = json.dumps({"finetune": "none", "retry_rate": 0.0, "retry_weak": False, "mask_retries": False,
                        "steps": 8, "eval_loss": 1.0, "eval": {"all": scores | {"n": 4}}})
  for name in ("r0", "r0.5"):
    (archive / name).mkdir(parents=True)
    (archive / name / "metrics.json").write_text(metrics)
  assert sweep.parse_arm("r0.5_s1") == ("r0.5", 1) and sweep.parse_arm("weak0.5") == ("weak0.5", 0)
  # r0 is archived but its checkpoint is not here: the finetuning arms need it, so it runs first.
  assert sweep.plan(sweep.ARMS[:4], str(root), str(archive)) == ["r0", "lora", "full"]
  calls = []

  def fake_run_arm(scale, run, seed, root_dir, extra, cpus=None):
    name = sweep.arm_name(run, seed)
    if name in sweep.FINETUNE_RUNS:  # started only once r0 has finished
      assert any(c[0] == "r0" and c[2] for c in calls), calls
    entry = [name, cpus, False]
    calls.append(entry)
    workdir = os.path.join(root_dir, name)
    os.makedirs(os.path.join(workdir, "checkpoints", "8"), exist_ok=True)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      f.write(metrics)
    with open(os.path.join(workdir, "run.log"), "w") as f:
      f.write("log\n")
    entry[2] = True
    return 0

  monkeypatch.setattr(sweep, "run_arm", fake_run_arm)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  assert sweep.main(["--root", str(root), "--archive", str(archive), "--arms", "r0,r0.5,lora,full,r0.1",
                     "--workers", "2"]) == 0
  assert sorted(c[0] for c in calls) == ["full", "lora", "r0", "r0.1"]
  assert {frozenset(c[1]) for c in calls} <= {frozenset({0}), frozenset({1})}
  for name in ("r0", "lora", "full", "r0.1"):
    assert (archive / name / "metrics.json").is_file() and (archive / name / "run.log").read_text() == "log\n"
  calls.clear()
  assert sweep.main(["--root", str(root), "--archive", str(archive), "--arms", "r0,lora"]) == 0 and not calls
  with pytest.raises(ValueError, match="--workers 3"):
    sweep.main(["--root", str(root), "--workers", "3", "--arms", "r0.2"])
