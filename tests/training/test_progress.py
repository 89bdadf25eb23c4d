"""Progress reporting: compile notice and duration, rates that leave the first (compiling) step out, the bar's
off switch."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax.training import progress as progress_lib


def _log_text(caplog):
  return "\n".join(r.getMessage() for r in caplog.records)


def test_compile_watch_counts_compilations():
  with progress_lib.CompileWatch() as watch:
    f = jax.jit(lambda x: x * 3 + 1)
    f(np.ones(5)).block_until_ready()
    f(np.ones(5)).block_until_ready()  # cached: no new compilation
    first = watch.since_last()
    f(np.ones(7)).block_until_ready()  # new shape: one more
    second = watch.since_last()
  assert first[0] >= 1 and first[1] > 0
  assert second[0] == 1
  assert progress_lib.compile_note(0, 0.0) == ""
  assert progress_lib.compile_note(2, 3.14) == " | XLA compiled 2 programs in 3.1 s"


def test_progress_reports_compilation_and_eta(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  step_fn = jax.jit(lambda x: {"loss": jnp.sum(x)})
  prog = progress_lib.Progress(str(tmp_path), total_steps=6, start_step=0, tokens_per_step=10,
                               flops_per_step=None, log_every=3)
  outs = [prog.train_step(s, step_fn(np.full(4, float(s)))) for s in range(1, 4)]
  prog.train_step(4, jax.jit(lambda x: {"loss": x.sum() * 2})(np.ones(3)))  # a recompilation in steady state
  prog.train_step(5, step_fn(np.ones(4)))
  last = prog.train_step(6, step_fn(np.ones(4)))
  prog.close()
  text = _log_text(caplog)
  assert "compiling the train step" in text
  assert "first step took" in text and "XLA compiled 1 program" in text
  assert outs[:2] == [None, None] and outs[2]["tokens_per_s"] > 0
  # the interval of steps 4-6 names the extra compilation
  assert any("step 6/6" in r.getMessage() and "XLA compiled 1 program" in r.getMessage() for r in caplog.records)
  assert last["loss"] == pytest.approx(4.0)
  assert (tmp_path / "metrics.jsonl").read_text().count('"split": "train"') == 6


def test_progress_first_step_is_last(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  prog = progress_lib.Progress(str(tmp_path), total_steps=1, start_step=0, tokens_per_step=4,
                               flops_per_step=None, log_every=10)
  out = prog.train_step(1, {"loss": np.float32(1.5)})
  prog.close()
  assert out["steps_per_s"] > 0 and "eta 0:00:00" in _log_text(caplog)


def test_live_bar_off_in_ci(monkeypatch):
  monkeypatch.setenv("CI", "true")
  assert not progress_lib.live_bar_enabled()
  bar = progress_lib.StatusBar(10, 0, "step", "train")
  bar.update(1, loss="1.0")  # a no-op, not an error
  bar.close()
