"""Optax optimizer and learning-rate schedule from config (AdamW or Adafactor; warmup-cosine or constant)."""

from __future__ import annotations

import jax
import optax

from lwjax.config import Field, non_negative_int

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("warmup_cosine", "constant")
SCHEMA = {
    "name": Field(str, choices=OPTIMIZERS),
    "learning_rate": Field(float, min=0.0),
    "schedule": Field(str, choices=SCHEDULES),
    "warmup_steps": non_negative_int(),
    "min_lr_ratio": Field(float, min=0.0, max=1.0, doc="final lr / peak lr for warmup_cosine"),
    "weight_decay": Field(float, min=0.0),
    "b1": Field(float, min=0.0, max=1.0),
    "b2": Field(float, min=0.0, max=1.0),
    "eps": Field(float, min=0.0),
    "clip_norm": Field(float, min=0.0, doc="global-norm clipping; 0 disables it"),
}


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  if cfg.schedule == "constant":
    if cfg.warmup_steps:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
           optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.learning_rate)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only, not on norm scales or other vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer chain (clipping first) and its schedule, for `total_steps` of training."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  else:
    opt = optax.adafactor(schedule, decay_rate=cfg.b2, eps=cfg.eps or 1e-30,
                          weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=_decay_mask,
                          momentum=cfg.b1 or None, multiply_by_parameter_scale=False)
  if cfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt, schedule
