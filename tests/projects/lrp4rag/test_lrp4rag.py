"""LRP4RAG: the RAG generator's labels are exact (planted answers and invariants of generated prompts); the
classifiers separate planted separable features; the signals match AttnLRP per example; configs validate with
one-line errors; the smoke run end to end through main.py."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from experiments import lrp4rag as experiment
from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.models import hf_checkpoint
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.lrp4rag import classifiers, detectors, signals
from lwjax.projects.lrp4rag.task import KINDS, Mix, Prompt, RagTask, TaskConfig
from lwjax.relevance import attnlrp, baselines
from lwjax.training import progress as progress_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SMALL = TaskConfig(entities=12, attributes=3, values=6, unknown_fraction=0.25, popular_fraction=0.5,
                   min_passages=2, max_passages=5)


# ---- the task: exact labels ----

def _planted(task: RagTask, kind: str, popular: bool | None = None) -> Prompt:
  """A prompt of `kind` about a chosen entity, with hand-picked passages."""
  known = kind in ("supported", "conflict", "absent")
  pool = [e for e in range(task.cfg.entities) if task.known[e] == known
          and (popular is None or task.popular[e] == popular)]
  entity, attribute = pool[0], 1
  memory = int(task.world[entity, attribute]) if known else None
  stated = {"supported": memory, "fresh": 2, "conflict": None if memory is None else (memory + 1) % task.cfg.values}
  value = stated.get(kind)
  other = (pool[1], 0, 3)
  passages = (other, (entity, attribute, value)) if value is not None else (other,)
  target = memory if (value is None or (kind == "conflict" and popular)) else value
  return Prompt(kind, passages, entity, attribute, value, memory, target)


def test_planted_answers_get_exact_labels_and_sources():
  task = RagTask(SMALL)
  word = task.value_word
  conflict = _planted(task, "conflict", popular=True)
  assert task.is_faithful(conflict, word(1, conflict.stated))
  assert not task.is_faithful(conflict, word(1, conflict.memory))
  assert task.source(conflict, word(1, conflict.memory)) == "memory"
  invented = next(v for v in range(SMALL.values) if v not in (conflict.stated, conflict.memory))
  assert not task.is_faithful(conflict, word(1, invented)) and task.source(conflict, word(1, invented)) == "other"
  # The exact form only: a repeated or extra word, another attribute's value or an empty answer is not faithful.
  for wrong in (f"{word(1, conflict.stated)} {word(1, conflict.stated)}", word(0, conflict.stated), ""):
    assert not task.is_faithful(conflict, wrong)
  supported = _planted(task, "supported")
  assert task.is_faithful(supported, word(1, supported.memory))
  assert task.source(supported, word(1, supported.memory)) == "passage"  # passage first when both agree
  absent, unknown = _planted(task, "absent"), _planted(task, "unknown")
  assert not task.is_faithful(absent, word(1, absent.memory))
  assert task.source(absent, word(1, absent.memory)) == "memory"
  assert not any(task.is_faithful(unknown, word(1, v)) for v in range(SMALL.values))
  fresh = _planted(task, "fresh")
  assert task.is_faithful(fresh, word(1, 2)) and fresh.memory is None
  # The text template reads the first word of a free-form answer.
  text_task = RagTask(dataclasses.replace(SMALL, template="text"))
  assert text_task.is_faithful(conflict, f"{word(1, conflict.stated)}. It says so in passage 2.")
  assert not text_task.is_faithful(conflict, f"I think {word(1, conflict.stated)}")


def test_generated_prompts_state_what_their_kind_says():
  task = RagTask(SMALL)
  prompts = task.prompts(600, mix=Mix(1, 1, 1, 1, 1), seed=3)
  assert {p.kind for p in prompts} == set(KINDS)
  for p in prompts:
    asked = [v for e, a, v in p.passages if (e, a) == (p.entity, p.attribute)]
    assert SMALL.min_passages <= len(p.passages) <= SMALL.max_passages
    assert len({(e, a) for e, a, _ in p.passages}) == len(p.passages)  # one passage per fact
    assert asked == ([] if p.stated is None else [p.stated])
    assert bool(task.known[p.entity]) == (p.kind in ("supported", "conflict", "absent"))
    if p.memory is not None:
      assert p.memory == task.world[p.entity, p.attribute]
    for e, a, v in p.passages:  # distractors about known entities are true
      if (e, a) != (p.entity, p.attribute) and task.known[e]:
        assert v == task.world[e, a]
    if p.kind == "supported":
      assert p.stated == p.memory and p.target == p.stated
    elif p.kind == "conflict":
      assert p.stated != p.memory
      assert p.target == (p.memory if task.popular[p.entity] else p.stated)
    elif p.kind == "fresh":
      assert p.target == p.stated
    elif p.kind == "absent":
      assert p.stated is None and p.target == p.memory
    else:
      assert p.stated is None and p.memory is None and p.target is None
    text = task.prompt_text(p)
    assert task.tokenizer.decode(task.tokenizer.encode(text)) == text
    assert task.is_faithful(p, task.value_word(p.attribute, p.stated)) == (p.stated is not None)


def test_the_mix_sets_the_kinds_and_training_rows_train_on_the_answer_only():
  task = RagTask(SMALL)
  prompts = task.prompts(4000, mix=Mix(supported=0.5, conflict=0.3, absent=0.2), seed=0)
  shares = {k: np.mean([p.kind == k for p in prompts]) for k in KINDS}
  assert shares["fresh"] == shares["unknown"] == 0
  assert abs(shares["supported"] - 0.5) < 0.03 and abs(shares["conflict"] - 0.3) < 0.03
  p = prompts[0]
  row = task.training_row(p, seq_len=32)
  tok = task.tokenizer
  n = int(row["segment_ids"].sum())
  masked = row["targets"][row["loss_mask"] > 0].tolist()
  assert masked == tok.encode(task.target_text(p)) + [tok.eos_id]
  assert row["inputs"][0] == tok.bos_id and n == len(tok.encode(task.prompt_text(p))) + 2
  assert task.training_row(_planted(task, "unknown"), seq_len=32) is None
  assert task.training_row(p, seq_len=4) is None


def test_the_world_is_fixed_by_world_seed():
  a, b = RagTask(SMALL), RagTask(SMALL)
  np.testing.assert_array_equal(a.world, b.world)
  np.testing.assert_array_equal(a.popular, b.popular)
  assert not np.array_equal(a.world, RagTask(dataclasses.replace(SMALL, world_seed=1)).world)
  assert not (a.popular & ~a.known).any()  # popular entities are known ones
  assert a.known.sum() == 9 and a.popular.sum() == round(0.5 * 9)


# ---- classifiers ----

def _separable(n=100, length=24, seed=0):
  """Sequences with a bump early (hallucinated, 1) or late (faithful, 0), plus noise; 30% positives."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.3).astype(np.int64)
  x = 0.3 * rng.standard_normal((n, length)).astype(np.float32)
  for i, y in enumerate(labels):
    start = 3 if y else 15
    x[i, start:start + 4] += 2.0
  return x, labels


@pytest.mark.parametrize("name", ["svm", "rf", "mlp", "lstm"])
def test_each_classifier_separates_planted_features(name):
  x, labels = _separable()
  cfg = classifiers.DetectConfig(feature_length=24, rf_trees=30, hidden=8, steps=150, learning_rate=3e-2)
  folds = classifiers.stratified_folds(labels, 5, seed=0)
  summary, predicted = classifiers.cross_validate(lambda: classifiers.make(name, cfg, pad_to=len(labels)), x,
                                                  labels, folds)
  assert summary["accuracy"]["mean"] >= 0.95, summary
  assert summary["f1"]["mean"] >= 0.9 and len(summary["f1"]["folds"]) == 5
  assert predicted.shape == labels.shape


def test_threshold_learns_the_cut_and_side_and_scores_are_hand_checked():
  agreement = np.array([0.0, 0.25, 0.25, 0.5, 1.0, 1.0, 0.75, 1.0])
  labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  clf = classifiers.make("threshold", classifiers.DetectConfig()).fit(agreement[:, None], labels)
  np.testing.assert_array_equal(clf.predict(agreement[:, None]), labels)
  np.testing.assert_array_equal(clf.predict(np.array([[0.6], [0.7]])), [1, 0])
  # 3 predicted positive, 2 of them right; 4 positives -> precision 2/3, recall 1/2.
  s = classifiers.scores([1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0])
  assert s == pytest.approx({"accuracy": 3 / 6, "precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7})


def test_folds_are_stratified_and_shared():
  labels = np.array([1] * 20 + [0] * 80)
  folds = classifiers.stratified_folds(labels, 5, seed=0)
  assert [int(labels[test].sum()) for _, test in folds] == [4] * 5
  assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(100))
  again = classifiers.stratified_folds(labels, 5, seed=0)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_detectors_skip_when_a_class_is_missing():
  x, _ = _separable(n=20)
  result = detectors.evaluate({"lrp": x}, np.zeros(20, np.int64), ["supported"] * 20, classifiers.DetectConfig(),
                              seed=0)
  assert "skipped" in result


# ---- signals and the heatmap ----

def _signal_model(n_layers=2):
  cfg = GPTConfig(vocab_size=40, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                  max_seq_len=32)
  return GPT(cfg, rngs=nnx.Rngs(0))


@nnx.jit(static_argnames="prompt_len")
def _unpadded_signals(model, tokens_1t, prompt_len):
  """The signals of one unpadded row by the plain formulas: AttnLRP's matrix, the GPT's log-probabilities and
  attention weights at the answer positions, gradient x input of each answer token."""
  answer, at = tokens_1t.shape[1] - prompt_len, slice(prompt_len - 1, tokens_1t.shape[1] - 1)
  logits, acts = attnlrp.lrp_forward(model, tokens_1t)
  logp = jax.nn.log_softmax(logits[0, at], axis=-1)
  gxi = [baselines.gradient_x_input(model, tokens_1t, prompt_len - 1 + j, tokens_1t[0, prompt_len + j])[0]
         for j in range(answer)]
  return {"relevance": attnlrp.answer_relevance(model, tokens_1t, prompt_len)[0],
          "logprob": jnp.sum(logp[jnp.arange(answer), tokens_1t[0, prompt_len:]]),
          "entropy": jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1)),
          "attention": jnp.mean(jnp.stack([p[0, :, :, at, :prompt_len] for p in acts["probs"]]), axis=(0, 1, 2, 3)),
          "gradient_x_input": (sum(gxi) / answer)[:prompt_len]}


def test_signals_of_rows_of_different_lengths_match_each_unpadded_row():
  """Prompts and answers of different lengths share a padded bucket and a batch; every signal equals the one
  computed on the unpadded row."""
  model, rng = _signal_model(), np.random.default_rng(0)
  shapes = [(9, 3), (6, 4)]  # (prompt, answer) lengths: one bucket (16 tokens, 4 answer rows)
  prompts = [[1] + rng.integers(4, 40, size=p - 1).tolist() for p, _ in shapes]
  answers = [rng.integers(4, 40, size=a).tolist() for _, a in shapes]
  rows = signals.extract(model, prompts, answers, batch=3)  # the batch filled with a copy of the first row
  for p, a, row in zip(prompts, answers, rows, strict=True):
    expected = _unpadded_signals(model, jnp.asarray([p + a]), prompt_len=len(p))
    assert row["relevance"].shape == (len(a), len(p)) and row["attention"].shape == (len(p),)
    for name, value in expected.items():
      np.testing.assert_allclose(row[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_responses_of_six_lengths_compile_two_programs():
  """Six answers of six lengths to one prompt fall in 2 buckets of (total, answer) length: 2 programs, where
  grouping by exact shape compiled 6."""
  model, rng = _signal_model(n_layers=1), np.random.default_rng(2)
  prompt = [1] + rng.integers(4, 40, size=7).tolist()  # 8 tokens; totals 11..16 -> 16
  answers = [rng.integers(4, 40, size=n).tolist() for n in range(3, 9)]  # 3, 4 -> 4; 5..8 -> 8
  with progress_lib.CompileWatch() as watch:
    rows = signals.extract(model, [prompt] * len(answers), answers, batch=2)
  assert watch.count == 2
  assert [r["relevance"].shape for r in rows] == [(n, 8) for n in range(3, 9)]


def test_extract_buckets_and_returns_rows_in_order(monkeypatch):
  def fake(model, tokens_bt, prompt_len_b, answer_len_b, answer_rows, relevance_chunk):  # signals = the tokens
    tokens = np.asarray(tokens_bt)
    return {"relevance": np.broadcast_to(tokens[:, None, :], (len(tokens), answer_rows, tokens.shape[1])),
            "attention": tokens, "gradient_x_input": -tokens,
            "logprob": tokens[np.arange(len(tokens)), np.asarray(prompt_len_b) + np.asarray(answer_len_b) - 1],
            "entropy": np.asarray(answer_len_b)}
  monkeypatch.setattr(signals, "_signals_jit", fake)
  rng = np.random.default_rng(1)
  prompts = [[1] + rng.integers(4, 40, size=n).tolist() for n in (6, 8, 6, 6, 3)]
  answers = [rng.integers(4, 40, size=a).tolist() for a in (1, 2, 1, 3, 1)]
  rows = signals.extract(None, prompts, answers, batch=2)  # buckets (8, 1) x3, (16, 2), (16, 4)
  for p, a, row in zip(prompts, answers, rows, strict=True):
    assert row["relevance"].shape == (len(a), len(p)) and row["attention"].tolist() == p
    assert row["gradient_x_input"].tolist() == [-t for t in p]
    assert row["logprob"] == a[-1] and row["entropy"] == len(a)


# ---- configs ----

@pytest.mark.parametrize("scale", ["smoke", "cpu", "gpu"])
def test_every_trained_scale_validates(scale):
  jobs.get(experiment.get_config(f"scale={scale},data=generated"))


def test_config_errors_name_the_key(tmp_path):
  def error(config):
    with pytest.raises(ConfigError) as info:
      jobs.get(config)
    return str(info.value)
  paper = "scale=paper,data=generated"
  assert error(experiment.get_config(paper)).startswith("model.pretrained:")
  assert error(experiment.get_config(f"{paper},pretrained={tmp_path}")).startswith("model.pretrained:")
  hf = _hf_generator(tmp_path / "hf")
  jobs.get(experiment.get_config(f"{paper},pretrained={hf}"))
  os.remove(os.path.join(hf, "tokenizer.json"))
  assert "no tokenizer" in error(experiment.get_config(f"{paper},pretrained={hf}"))
  qwen = _hf_generator(tmp_path / "qwen", qkv_bias=True)  # a Qwen2 checkpoint: q/k/v biases
  message = error(experiment.get_config(f"{paper},pretrained={qwen}"))
  assert message.startswith("model.pretrained: AttnLRP does not implement") and "qkv_bias" in message
  config = experiment.get_config(f"{paper},pretrained={qwen}")
  config.train = experiment.get_config("scale=smoke").train
  assert error(config).startswith("model.pretrained:")  # the model is checked first
  config = experiment.get_config("scale=smoke")
  config.task.train_mix.unknown = 0.1
  assert error(config).startswith("task.train_mix.unknown:")
  config = experiment.get_config("scale=smoke")
  config.task.template = "text"
  assert error(config).startswith("task.template:")
  config = experiment.get_config("scale=smoke")
  config.data.seq_len = 12
  assert error(config).startswith("data.seq_len:")
  assert error(experiment.get_config(f"scale=smoke,base={tmp_path}")).startswith("base: no checkpoints/")


def _hf_generator(path, **options) -> str:
  """A tiny random Hugging Face checkpoint (Llama, or the family `options` need) with a Llama-3-style tokenizer
  beside it."""
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers", "llama3_style"), path,
                  ignore=shutil.ignore_patterns("expected.json"))
  cfg = GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  max_seq_len=1024, **options)
  hf_checkpoint.save_random(cfg, path, scale=0.3)
  return str(path)


# ---- end to end ----

def _main(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)


def test_smoke_run_end_to_end(tmp_path):
  result = _main(tmp_path, "--config", os.path.join(ROOT, "experiments/lrp4rag.py") + ":scale=smoke",
                 "--workdir", "run")
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stderr
  assert log.index("competence:") < log.index("class balance:") < log.index("detectors (")
  run = tmp_path / "run"
  metrics = json.loads((run / "metrics.json").read_text())
  assert metrics["n"] == 40 and 0 < metrics["hallucinated"] < 40
  assert metrics["by_group"]["absent"]["hallucinated"] == 1.0  # nothing in the passages: never faithful
  assert set(metrics["detectors"]) == {f"{f}/{c}" for f, names in detectors.CLASSIFIERS.items() for c in names}
  for summary in metrics["detectors"].values():
    for m in classifiers.METRICS:
      assert 0 <= summary[m]["mean"] <= 1 and len(summary[m]["folds"]) == metrics["folds"]
  for name in ("faithful", "hallucinated"):
    assert Image.open(run / f"relevance_{name}.png").size[0] > 100
  # Conservation measured on the trained generator: every rule but the softmax one conserves (up to epsilon), so
  # the input relevance is the logit less what the softmax rule absorbs.
  c = metrics["conservation"]
  assert c["n"] == 40 and len(c["rule_error_median"]) == len(c["layer_error_median"]) == 2
  assert np.isfinite(np.hstack(list(c.values()))).all()
  assert max(c["rule_error_median"]) < 1e-4 and c["head_error_median"] < 1e-4
  assert c["input_sum_over_logit_median"] == pytest.approx(1 - c["softmax_absorbed_share_median"], abs=1e-3)


@pytest.mark.slow
def test_a_reused_base_gives_the_same_answers_and_another_world_is_refused(tmp_path):
  config = os.path.join(ROOT, "experiments/lrp4rag.py") + ":scale=smoke"
  assert _main(tmp_path, "--config", config, "--workdir", "run").returncode == 0
  again = _main(tmp_path, "--config", config + ",base=run", "--workdir", "reuse")
  assert again.returncode == 0, again.stderr[-3000:]
  first, second = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("run", "reuse"))
  assert first["by_group"] == second["by_group"] and second["generator"]["source"] == "base"
  other = _main(tmp_path, "--config", config + ",base=run", "--workdir", "other", "--config.task.world_seed=5")
  assert other.returncode == 2 and "base:" in other.stderr and "world_seed" in other.stderr


@pytest.mark.slow
def test_smoke_run_from_a_pretrained_generator(tmp_path):
  """`pretrained=`: a Hugging Face checkpoint answers the prompts as it is (nothing trained), its answers are
  labelled and explained by AttnLRP through its own tokenizer. (Slow: a tokenizer's prompts have many lengths,
  which take several padded shapes, each compiled.)"""
  hf = _hf_generator(tmp_path / "hf")
  result = _main(tmp_path, "--config", os.path.join(ROOT, "experiments/lrp4rag.py") + f":scale=smoke,pretrained={hf}",
                 "--workdir", "run", "--config.eval.num=8", "--config.eval.batch_prompts=8")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 1/" not in result.stderr  # nothing trained
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["generator"] == {"source": "pretrained", "checkpoint": hf} and metrics["n"] == 8
  assert metrics["conservation"]["n"] == 8 and metrics["conservation"]["head_error_median"] < 1e-4
  assert metrics["task"]["template"] == "text"
