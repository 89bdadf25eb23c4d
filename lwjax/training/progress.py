"""Training progress: log lines with steps/s, tokens/s, MFU and ETA; TensorBoard scalars; metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device (vendor datasheets); matched as a substring of `device.device_kind`.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of the device, or None where unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return None


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Reports training progress every `log_every` steps; only process 0 writes files."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tokens_per_step: int,
               flops_per_step: float | None, log_every: int):
    self.total_steps, self.log_every = total_steps, log_every
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    peak = peak_flops_per_device()
    self.peak_total = peak * jax.device_count() if peak else None
    self.is_writer = jax.process_index() == 0
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._pending: list = []
    self._writer = None
    if self.is_writer:
      from tensorboardX import SummaryWriter
      os.makedirs(workdir, exist_ok=True)
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def train_step(self, step: int, metrics) -> dict | None:
    """Records step `step`'s device metrics; every `log_every` steps fetches them and reports."""
    self._pending.append((step, metrics))
    if step % self.log_every and step != self.total_steps:
      return None
    fetched = jax.device_get(self._pending)
    self._pending = []
    now = time.perf_counter()
    steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    rates = {"steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * self.tokens_per_step}
    if self.flops_per_step and self.peak_total:
      rates["mfu"] = steps_per_s * self.flops_per_step / self.peak_total
    for s, m in fetched:
      self._write("train", s, {k: float(np.asarray(v)) for k, v in m.items()})
    self._write("perf", step, rates)
    last = {k: float(np.asarray(v)) for k, v in fetched[-1][1].items()}
    eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
    mfu = f" mfu {rates['mfu']:.1%}" if "mfu" in rates else ""
    logging.info("step %d/%d loss %.4f | %.2f steps/s %.0f tokens/s%s | eta %s", step, self.total_steps,
                 last.get("loss", float("nan")), steps_per_s, rates["tokens_per_s"], mfu,
                 _format_duration(eta))
    return {**last, **rates}

  def eval(self, step: int, metrics: dict) -> None:
    self._write("eval", step, metrics)
    logging.info("eval step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

  def reset_clock(self, step: int) -> None:
    """Restarts the rate measurement (after evaluation or checkpointing pauses)."""
    self._last_step, self._last_time = step, time.perf_counter()

  def _write(self, split: str, step: int, metrics: dict) -> None:
    if not self.is_writer:
      return
    for k, v in metrics.items():
      self._writer.add_scalar(f"{split}/{k}", v, step)
    self._jsonl.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")

  def close(self) -> None:
    if self.is_writer:
      self._writer.close()
      self._jsonl.close()
