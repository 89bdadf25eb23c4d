"""Training throughput (tokens/s) and MFU of an experiment's model, against a hand-written loop and PyTorch.

  python -m benchmarks.train_throughput --config experiments/lm_pretrain.py:scale=smoke
  python -m benchmarks.train_throughput --config experiments/lm_pretrain.py:scale=gpu,model=gpt_1b \
      --config.train.global_batch_size=8 --config.data.seq_len=2048 --variants "model.remat=full"
  python -m benchmarks.train_throughput --compare --vocab_size 1152 --d_model 128 --n_layers 4 \
      --batch 64 --seq_len 128                                           # trainer vs hand loop vs PyTorch

Times the jitted, sharded train step of `lwjax.training.Trainer` on random tokens (the input pipeline
is not measured), after `--warmup` steps that include compilation. Each `--variants` entry (";"
separated, each a ","-separated list of key=value overrides) is timed in the same process; the first
is the baseline of the ratio line. MFU = model FLOPs (6N + attention, counted from the config) /
(peak dense bf16 FLOP/s per device x devices); on CPU the peak is the fp32 matmul rate measured in the run.

`--compare` times, interleaved in rounds in one process so that a changing machine load hits all alike, each
round in the next order of the runners (each reported step time is the median over rounds; warm-up is one pass
per runner, then one interleaved):
the Trainer step; a minimal hand-written step on the same model and batch (`nnx.merge` + `losses.lm_loss`
+ `optax.adamw`, jitted with donation); and, when `torch` and `transformers` import, the PyTorch peer
(`LlamaForCausalLM` of the same shape, fp32, `torch.optim.AdamW`, `torch.set_num_threads` = cores). On
CPU the fp32 matmul peak is measured in the same run (a large jitted `jnp.dot`) and utilisation is model
FLOPs / that peak. The shape flags (`--d_model`, ...) override the config's model; heads, KV heads and
d_ff follow d_model unless given (head_dim kept, half as many KV heads as heads, d_ff = 3 d_model).
"""

import ast
import itertools
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.training import losses
from lwjax.training.progress import peak_flops_per_device
from lwjax.training.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/lm_pretrain.py:scale=smoke", "Experiment.")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps per variant (default 10; 15 with --compare).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation) per variant.")
_VARIANTS = flags.DEFINE_string("variants", "", "';'-separated variants of ','-separated key=value overrides.")
_COMPARE = flags.DEFINE_bool("compare", False, "Trainer vs a hand-written optax loop vs PyTorch, interleaved.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "--compare: the timed steps are split into this many rounds (a multiple "
                              "of 6 runs each order of three runners equally often).")
_SHAPE = {name: flags.DEFINE_integer(name, None, f"Overrides model.{name}.")
          for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")}
_BATCH = flags.DEFINE_integer("batch", None, "Overrides train.global_batch_size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Overrides data.seq_len (and model.max_seq_len if longer).")


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


def _with_shape_flags(config):
  """The config with the shape flags applied; heads, KV heads and d_ff follow a new d_model unless given."""
  config = config.copy_and_resolve_references()
  model = config.model
  given = {name: flag.value for name, flag in _SHAPE.items() if flag.value is not None}
  if "d_model" in given:
    head_dim = given.get("head_dim", model.head_dim)
    heads = given.get("n_heads", max(1, given["d_model"] // head_dim))
    given = {"n_heads": heads, "n_kv_heads": max(1, heads // 2), "d_ff": 3 * given["d_model"], **given}
  model.update(given)
  if _BATCH.value:
    config.train.global_batch_size = _BATCH.value
  if _SEQ_LEN.value:
    config.data.seq_len = _SEQ_LEN.value
    model.max_seq_len = max(model.max_seq_len, _SEQ_LEN.value)
  return config


def _random_batch(config):
  b, length, vocab = config.train.global_batch_size, config.data.seq_len, config.model.vocab_size
  tokens = np.random.default_rng(0).integers(3, vocab, size=(b, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, length), np.float32),
          "segment_ids": np.ones((b, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def _trainer_runner(config):
  """(Trainer, a function running n train steps and blocking on the result)."""
  model_cfg = GPTConfig.from_dict(config.model)
  length = config.data.seq_len
  trainer = Trainer(config, "/tmp/lwjax-benchmark", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs),
                    loss_fn=losses.lm_loss, flops_per_token=model_cfg.flops_per_token(length), seq_len=length)
  state = trainer.init_state(jax.random.key(0))
  batch = jax.device_put(_random_batch(config), trainer.batch_sharding)

  def run(n):
    nonlocal state
    for _ in range(n):
      state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
  return trainer, run


def _hand_loop_runner(config):
  """A minimal jitted AdamW step on the same model and batch: the floor the Trainer's overhead is judged by."""
  model_cfg = GPTConfig.from_dict(config.model)
  graphdef, params = nnx.split(GPT(model_cfg, rngs=nnx.Rngs(0)))
  opt = config.optim
  tx = optax.adamw(opt.learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  opt_state = tx.init(params)

  def loss(p, batch):
    loss_sum, weight, _ = losses.lm_loss(nnx.merge(graphdef, p), batch)
    return loss_sum / weight

  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  step = jax.jit(step, donate_argnums=(0, 1))
  batch = jax.device_put(_random_batch(config))

  def run(n):
    nonlocal params, opt_state
    for _ in range(n):
      params, opt_state, value = step(params, opt_state, batch)
    jax.block_until_ready(value)
  return run


def _torch_runner(config):
  """The PyTorch peer: HF `LlamaForCausalLM` of the same shape, fp32 AdamW; None when not importable."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  m, opt = config.model, config.optim
  hf_config = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
      max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
      tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False)
  model = transformers.LlamaForCausalLM(hf_config).to(torch.float32).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                                weight_decay=opt.weight_decay)
  batch = _random_batch(config)
  inputs, targets = torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long()

  def run(n):
    for _ in range(n):
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      if opt.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
      optimizer.step()
    float(loss.detach())
  return run


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """fp32 FLOP/s of a jitted [n, n] x [n, n] `jnp.dot` (best of `repeats`): the CPU's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(dot(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def measure(config, steps: int, cpu_peak: float | None = None) -> dict:
  trainer, run = _trainer_runner(config)
  run(_WARMUP.value)
  start = time.perf_counter()
  run(steps)
  seconds = (time.perf_counter() - start) / steps
  flops = trainer.flops_per_step / seconds
  peak = peak_flops_per_device() or cpu_peak
  return {"params": GPTConfig.from_dict(config.model).num_params(), "step_s": seconds,
          "tokens_per_s": trainer.tokens_per_step / seconds, "tflops_per_s": flops / 1e12,
          "mfu": flops / (peak * jax.device_count()) if peak else None}


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def compare(config, steps: int):
  """Trainer vs hand loop vs PyTorch on one model and batch, timed in interleaved rounds."""
  model_cfg = GPTConfig.from_dict(config.model)
  length, batch = config.data.seq_len, config.train.global_batch_size
  tokens = batch * length
  flops_per_step = model_cfg.flops_per_token(length) * tokens
  print(f"model: {model_cfg.num_params():,} parameters (vocab {model_cfg.vocab_size}, d_model {model_cfg.d_model}, "
        f"{model_cfg.n_layers} layers, heads {model_cfg.n_heads}/{model_cfg.n_kv_heads} x {model_cfg.head_dim}, "
        f"d_ff {model_cfg.d_ff}); batch {batch} x seq {length}; {steps} timed steps in {_ROUNDS.value} rounds")
  runners = {"lwjax Trainer": _trainer_runner(config)[1], "hand-written optax loop": _hand_loop_runner(config)}
  peer = _torch_runner(config)
  if peer is None:
    print("PyTorch peer skipped: torch/transformers not importable")
  else:
    runners["PyTorch (HF Llama + AdamW)"] = peer
  names = list(runners)
  for name in names * 2:  # compiles, then one interleaved pass so the shared heap reaches its steady size
    runners[name](_WARMUP.value)
  peak = matmul_peak_flops() if jax.default_backend() == "cpu" else None
  if peak:
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (jitted 2048^3 jnp.dot); load {_load()}")
  per_step = {name: [] for name in names}
  faults = {name: 0 for name in names}  # minor page faults while timed: a heap that grows or is trimmed shows here
  per_round = [steps // _ROUNDS.value + (i < steps % _ROUNDS.value) for i in range(_ROUNDS.value)]
  # Each round runs the runners in the next of all their orders, so that every runner follows every other one
  # equally often: a rotation made the Trainer always follow PyTorch, whose threads and heap it then paid for.
  orders = list(itertools.permutations(names))
  for i, n in enumerate(per_round):
    for name in orders[i % len(orders)]:
      time.sleep(0.5)  # the previous runner's worker threads go idle
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      runners[name](n)
      per_step[name].append((time.perf_counter() - start) / n)
      faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  print(f"load after timing: {_load()}")
  print(f"{'step':<28} {'ms/step':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'% peak':>7} {'vs Trainer':>10} "
        f"{'faults/step':>11}  rounds (ms/step)")
  seconds = {name: float(np.median(times)) for name, times in per_step.items()}
  for name, step_s in seconds.items():
    gflops = flops_per_step / step_s / 1e9
    share = f"{gflops * 1e9 / peak:.1%}" if peak else "n/a"
    print(f"{name:<28} {step_s * 1e3:>9.1f} {tokens / step_s:>10,.0f} {gflops:>9.1f} {share:>7} "
          f"{seconds['lwjax Trainer'] / step_s:>9.2f}x {faults[name] / steps:>11,.0f}  "
          + " ".join(f"{t * 1e3:.0f}" for t in per_step[name]))
  ratios = ", ".join(f"vs {name}: {step_s / seconds['lwjax Trainer']:.2f}x" for name, step_s in seconds.items()
                     if name != "lwjax Trainer")
  print(f"Trainer tokens/s {ratios}")
  sys.stdout.flush()


def main(argv):
  del argv
  base = _with_shape_flags(_CONFIG.value)
  if _COMPARE.value:
    compare(base, _STEPS.value or 15)
    return
  steps = _STEPS.value or 10
  variants = [v.strip() for v in _VARIANTS.value.split(";")] if _VARIANTS.value else [""]
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"batch {base.train.global_batch_size} x seq {base.data.seq_len}; {steps} timed steps; load {_load()}")
  cpu_peak = matmul_peak_flops() if peak_flops_per_device() is None and jax.default_backend() == "cpu" else None
  if cpu_peak:
    print(f"MFU against the measured fp32 matmul peak, {cpu_peak / 1e9:.1f} GFLOP/s (jitted 2048^3 jnp.dot)")
  print(f"{'variant':<40} {'params':>12} {'step ms':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7}")
  results = []
  for variant in variants:
    r = measure(_apply(base, variant), steps, cpu_peak)
    results.append(r)
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    print(f"{variant or 'config as given':<40} {r['params']:>12,} {r['step_s'] * 1e3:>10.2f} "
          f"{r['tokens_per_s']:>12,.0f} {r['tflops_per_s']:>9.3f} {mfu:>7}")
  if len(results) > 1:
    ratios = ", ".join(f"{v or 'base'}: {r['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x"
                       for v, r in zip(variants[1:], results[1:], strict=False))
    print(f"ratio (tokens/s vs {variants[0] or 'base'}): {ratios}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
