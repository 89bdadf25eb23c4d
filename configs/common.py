"""Config groups every training experiment shares: train loop, LoRA, optimizer, distributed start-up."""

import ml_collections


def train(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "steps": 1000, "global_batch_size": 32, "grad_accum_steps": 1, "log_every": 50, "eval_every": 500,
      "eval_steps": 10, "checkpoint_every": 500, "keep_checkpoints": 3, "async_checkpointing": True,
  })
  config.update(overrides)
  return config


def lora(**overrides) -> ml_collections.ConfigDict:
  """`train.lora` (lwjax.training.lora): off at rank 0. The targets are PEFT's default for Llama-style models and
  the paper's choice at a fixed budget (Hu et al. 2021, Section 7.1): the query and value projections."""
  config = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "targets": "wq,wv"})
  config.update(overrides)
  return config


def optim(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-4, "schedule": "warmup_cosine", "warmup_steps": 100,
      "min_lr_ratio": 0.1, "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0,
  })
  config.update(overrides)
  return config


def distributed(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "initialize": False, "coordinator_address": "", "num_processes": -1, "process_id": -1,
      "cpu_collectives": "gloo",
  })
  config.update(overrides)
  return config


def parse_arg(arg: str | None, *, choices: dict | None = None, **defaults) -> dict:
  """`"scale=cpu,model=gpt_125m"` -> {"scale": "cpu", "model": "gpt_125m"} over `defaults`.

  `choices` maps an argument to its allowed values; anything else raises ValueError naming them.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected one of {', '.join(f'{k}=...' for k in defaults)}")
    values[key] = value
  for key, allowed in (choices or {}).items():
    if values[key] not in allowed:
      raise ValueError(f"{key}={values[key]!r}: expected one of {', '.join(allowed)}")
  return values
