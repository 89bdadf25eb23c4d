"""Training throughput (tokens/s) and MFU of an experiment's model on the current devices.

  python -m benchmarks.train_throughput --config experiments/lm_pretrain.py:scale=smoke
  python -m benchmarks.train_throughput --config experiments/lm_pretrain.py:scale=gpu,model=gpt_1b \
      --config.train.global_batch_size=8 --config.data.seq_len=2048 --variants "model.remat=full"

Times the jitted, sharded train step of `lwjax.training.Trainer` on random tokens (the input pipeline
is not measured), after `--warmup` steps that include compilation. Each `--variants` entry (";"
separated, each a ","-separated list of key=value overrides) is timed in the same process; the first
is the baseline of the ratio line. MFU = model FLOPs (6N + attention, counted from the config) /
(peak dense bf16 FLOP/s per device x devices); it is reported only where the peak is known.
"""

import ast
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.training import losses
from lwjax.training.progress import peak_flops_per_device
from lwjax.training.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/lm_pretrain.py:scale=smoke", "Experiment.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation) per variant.")
_VARIANTS = flags.DEFINE_string("variants", "", "';'-separated variants of ','-separated key=value overrides.")


def _apply(config, overrides: str):
  config = config.copy_and_resolve_references()
  for item in filter(None, overrides.split(",")):
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.strip().split(".")
    for p in parents:
      node = node[p]
    try:
      node[leaf] = type(node[leaf])(ast.literal_eval(value))
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def _random_batch(config):
  b, length, vocab = config.train.global_batch_size, config.data.seq_len, config.model.vocab_size
  tokens = np.random.default_rng(0).integers(3, vocab, size=(b, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, length), np.float32),
          "segment_ids": np.ones((b, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def measure(config) -> dict:
  model_cfg = GPTConfig.from_dict(config.model)
  length = config.data.seq_len
  trainer = Trainer(config, "/tmp/lwjax-benchmark", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs),
                    loss_fn=losses.lm_loss, flops_per_token=model_cfg.flops_per_token(length), seq_len=length)
  state = trainer.init_state(jax.random.key(0))
  batch = jax.device_put(_random_batch(config), trainer.batch_sharding)
  for _ in range(_WARMUP.value):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / _STEPS.value
  flops = trainer.flops_per_step / seconds
  peak = peak_flops_per_device()
  return {"params": model_cfg.num_params(), "step_s": seconds, "tokens_per_s": trainer.tokens_per_step / seconds,
          "tflops_per_s": flops / 1e12, "mfu": flops / (peak * jax.device_count()) if peak else None}


def main(argv):
  del argv
  base = _CONFIG.value
  variants = [v.strip() for v in _VARIANTS.value.split(";")] if _VARIANTS.value else [""]
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"batch {base.train.global_batch_size} x seq {base.data.seq_len}; {_STEPS.value} timed steps")
  print(f"{'variant':<40} {'params':>12} {'step ms':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7}")
  results = []
  for variant in variants:
    r = measure(_apply(base, variant))
    results.append(r)
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    print(f"{variant or 'config as given':<40} {r['params']:>12,} {r['step_s'] * 1e3:>10.2f} "
          f"{r['tokens_per_s']:>12,.0f} {r['tflops_per_s']:>9.3f} {mfu:>7}")
  if len(results) > 1:
    ratios = ", ".join(f"{v or 'base'}: {r['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x"
                       for v, r in zip(variants[1:], results[1:]))
    print(f"ratio (tokens/s vs {variants[0] or 'base'}): {ratios}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
