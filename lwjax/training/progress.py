"""Training progress: log lines with steps/s, tokens/s, MFU and ETA; TensorBoard scalars; metrics.jsonl.

Also what a person watching a run wants between log lines: a live status bar (step, loss, rate, ETA) when
stderr is a terminal, and a line saying that XLA is compiling and how long compilation took (counted from
JAX's compile events, so a recompilation in steady state shows up in the log). The bar stays off in CI
(`CI` set), when stderr is not a terminal, and below INFO (`--verbosity=-1`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np
from absl import logging as absl_logging
from jax import monitoring

# JAX records one event of this name per XLA backend compilation (jax/_src/dispatch.py).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

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


def live_bar_enabled() -> bool:
  """Whether to draw a live status bar: process 0, stderr a terminal, not CI, logging at INFO or finer."""
  if os.environ.get("CI") or os.environ.get("LWJAX_NO_PROGRESS_BAR"):
    return False
  if absl_logging.get_verbosity() < absl_logging.INFO:
    return False
  return jax.process_index() == 0 and sys.stderr.isatty()


class CompileWatch:
  """Counts XLA backend compilations and their seconds while open (a context manager)."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    self._reported = (0, 0.0)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration

  def __enter__(self) -> CompileWatch:
    monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    monitoring.unregister_event_duration_listener(self._listen)

  def since_last(self) -> tuple[int, float]:
    """(compilations, seconds) since the previous call."""
    count, seconds = self.count - self._reported[0], self.seconds - self._reported[1]
    self._reported = (self.count, self.seconds)
    return count, seconds


class StatusBar:
  """A tqdm status line (step, rate, ETA, last loss) when `live_bar_enabled()`, else nothing."""

  def __init__(self, total: int, initial: int, unit: str, desc: str):
    self._bar = None
    if live_bar_enabled():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, leave=False,
                       smoothing=0.1)

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def compile_note(count: int, seconds: float) -> str:
  """' | XLA compiled 2 programs in 3.1 s' or '' when nothing compiled."""
  if not count:
    return ""
  return f" | XLA compiled {count} program{'s' if count > 1 else ''} in {seconds:.1f} s"


class Progress:
  """Reports training progress every `log_every` steps; only process 0 writes files.

  The first step is timed on its own (it includes XLA compilation, logged before and after) and left out
  of the rates and the ETA; later compilations are named in the log line of the interval they fell in.
  """

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
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115  writer held open, closed in close()
    self._compiles = CompileWatch().__enter__()
    self._first_step, self._first_seconds = True, 0.0
    self._bar = StatusBar(total_steps, start_step, "step", "train")
    if start_step < total_steps:
      logging.info("step %d/%d: compiling the train step (XLA), then training", start_step + 1, total_steps)

  def train_step(self, step: int, metrics) -> dict | None:
    """Records step `step`'s device metrics; every `log_every` steps fetches them and reports."""
    self._pending.append((step, metrics))
    if self._first_step:
      self._first_step = False
      start = self._last_time
      jax.block_until_ready(metrics)
      self._first_seconds = time.perf_counter() - start
      logging.info("step %d: first step took %.1f s%s", step, self._first_seconds,
                   compile_note(*self._compiles.since_last()))
      self.reset_clock(step)
    self._bar.update(1, tok_s=f"{self.tokens_per_step * self._bar_rate(step):.0f}")
    if step % self.log_every and step != self.total_steps:
      return None
    fetched = jax.device_get(self._pending)
    self._pending = []
    now = time.perf_counter()
    if step == self._last_step:  # only the first step since the clock started: its time, compile included
      steps_per_s = 1.0 / max(self._first_seconds, 1e-9)
    else:
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
    logging.info("step %d/%d loss %.4f | %.2f steps/s %.0f tokens/s%s | eta %s%s", step, self.total_steps,
                 last.get("loss", float("nan")), steps_per_s, rates["tokens_per_s"], mfu,
                 _format_duration(eta), compile_note(*self._compiles.since_last()))
    self._bar.update(0, loss=f"{last.get('loss', float('nan')):.4f}")
    return {**last, **rates}

  def _bar_rate(self, step: int) -> float:
    return (step - self._last_step) / max(time.perf_counter() - self._last_time, 1e-9)

  def eval(self, step: int, metrics: dict) -> None:
    self._write("eval", step, metrics)
    logging.info("eval step %d: %s%s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                 compile_note(*self._compiles.since_last()))

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
    self._bar.close()
    self._compiles.__exit__(None, None, None)
    if self.is_writer:
      self._writer.close()
      self._jsonl.close()
