"""Exact resume: N steps, SIGTERM, restart in the same workdir to 2N == 2N uninterrupted steps."""

import importlib
import json
import os
import signal

import numpy as np

from lwjax.projects.lm import pretrain
from lwjax.training import trainer as trainer_lib

lm_pretrain = importlib.import_module("experiments.lm_pretrain")
STEPS, STOP_AT = 12, 5


def _config():
  config = lm_pretrain.get_config("scale=smoke")
  config.train.update(steps=STEPS, log_every=1, eval_every=0, checkpoint_every=100)
  config.mesh.shape.update(data=2, fsdp=2, tensor=2)
  return config


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_sigterm_checkpoints_and_the_same_workdir_resumes_exactly(tmp_path, monkeypatch):
  pretrain.run(_config(), str(tmp_path / "uninterrupted"))
  reference = _train_losses(tmp_path / "uninterrupted")
  assert sorted(reference) == list(range(1, STEPS + 1))

  original_init = trainer_lib.Trainer.__init__

  def init_with_signal(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    step_fn, calls = self.train_step, []

    def step_then_signal(state, batch):
      calls.append(1)
      if len(calls) == STOP_AT:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(state, batch)
    self.train_step = step_then_signal

  workdir = str(tmp_path / "interrupted")
  with monkeypatch.context() as m:
    m.setattr(trainer_lib.Trainer, "__init__", init_with_signal)
    first = pretrain.run(_config(), workdir)
  assert first["step"] == STOP_AT
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(STOP_AT)]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed again

  second = pretrain.run(_config(), workdir)
  assert second["step"] == STEPS
  resumed = _train_losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  # Same program, same data order, same state: bit-identical losses.
  np.testing.assert_array_equal([resumed[s] for s in range(1, STEPS + 1)],
                                [reference[s] for s in range(1, STEPS + 1)])
