"""Offline serving throughput (NanoFlow, arXiv 2408.12757): static batching vs the engine, % of optimal.

  python -m benchmarks.serving                                   # CPU: gpt_tiny-sized, lengths scaled down
  python -m benchmarks.serving --model llama3_8b --length_scale 1 --requests 512 --max_num_seqs 256 \
      --num_pages 8192 --page_size 16 --dtype bfloat16          # one GPU, random weights

For each workload (length statistics of Splitwise, LMSYS-Chat and ShareGPT from NanoFlow §6, and constant
512/512 and 1024/512; all lengths multiplied by --length_scale) it times, in one process:
  (a) static batching: batches of --max_num_seqs padded to the longest prompt and generated to the
      longest output (contiguous KV cache);
  (b) continuous batching: the engine without nano-batching or asynchronous scheduling;
  (c) the full engine (asynchronous scheduling, --nano_batches nano-batches);
  (d) Hugging Face `generate` on the same shape (random weights, static batches) when torch and
      transformers are importable.
It prints processed tokens/s (prompt + output, the unit of NanoFlow's optimum), output tokens/s, % of
optimal (peak FLOP/s measured by a matmul in this run / (2 x parameters)), p50/p99 request latency,
the ratio of each system to static batching, the engine's host time per iteration, and a multi-round chat
workload with and without KV offload. `--logprobs k` also times the full engine with every request asking for
its tokens' logprobs and k alternatives (the cost of logprobs; without it no request asks and none are computed);
`--penalties` the full engine with every request setting presence, frequency and repetition penalties and a
16-token logit_bias (the cost of logit processing; without it no request asks and the sampler runs without it).
Every system runs twice and only the second pass is timed; the
benchmark counts XLA compilations in the timed passes and fails if there is any (a shape not bucketed).
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import configs.gpt
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving.engine import Engine
from lwjax.serving.offload import KVOffloadStore
from lwjax.serving.sampling import SamplingParams

# (mean prompt tokens, mean output tokens); None spread = constant lengths.
WORKLOADS = {"splitwise": (1155, 211, 1.0), "lmsys_chat": (92, 207, 1.0), "sharegpt": (299, 324, 1.0),
             "const_512_512": (512, 512, None), "const_1024_512": (1024, 512, None)}

_MODEL = flags.DEFINE_string("model", "gpt_tiny", "Model preset of configs/gpt.py (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_REQUESTS = flags.DEFINE_integer("requests", 32, "Requests per workload.")
_SCALE = flags.DEFINE_float("length_scale", 1 / 16, "Multiplier on every workload length.")
_SEQS = flags.DEFINE_integer("max_num_seqs", 16, "Batch rows (static batch size, engine max sequences).")
_PAGES = flags.DEFINE_integer("num_pages", 1024, "KV pages.")
_PAGE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 64, "Prefill chunk.")
_BATCH_TOKENS = flags.DEFINE_integer("max_batch_tokens", 256, "Engine token budget per iteration (decodes + chunks).")
_NANO = flags.DEFINE_integer("nano_batches", 0, "Nano-batches of the full engine; 0: 2 on GPU/TPU, 1 on CPU "
                             "(XLA:CPU runs a step's ops in turn, so splitting the batch only adds work).")
_UNMIXED = flags.DEFINE_bool("compare_unmixed", False, "Also time the sync engine with one model call per group "
                              "of rows (decodes, prefill chunks) instead of one per iteration.")
_LOGPROBS = flags.DEFINE_integer("logprobs", -1, "Also time the full engine with every request asking for this many "
                                 "top logprobs per token (-1: not timed).")
_PENALTIES = flags.DEFINE_bool("penalties", False, "Also time the full engine with every request setting penalties "
                                "and a logit_bias.")
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
             "logit_bias": {str(t): 1.0 for t in range(3, 19)}}
_WORKLOADS = flags.DEFINE_list("workloads", list(WORKLOADS), "Workloads to run.")


def lengths(name: str, n: int, scale: float, max_len: int, seed: int = 0) -> list[tuple[int, int]]:
  """(prompt, output) lengths: lognormal around the workload's means (spread sigma), or constant."""
  mean_in, mean_out, sigma = WORKLOADS[name]
  rng = np.random.default_rng(seed)
  if sigma is None:
    pairs = [(mean_in, mean_out)] * n
  else:  # lognormal with the given mean: mu = log(mean) - sigma^2 / 2
    samples = (rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n) for mean in (mean_in, mean_out))
    pairs = list(zip(*samples, strict=True))
  out = []
  for p, o in pairs:
    p, o = max(1, int(p * scale)), max(1, int(o * scale))
    out.append((min(p, max_len // 2), min(o, max_len // 2)))
  return out


def measured_peak_flops() -> float:
  """FLOP/s of a large bf16 (GPU/TPU) or fp32 (CPU) matmul on this device."""
  n = 4096 if jax.default_backend() != "cpu" else 1024
  dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(10):
    a = f(a)
  a.block_until_ready()
  return 10 * 2 * n ** 3 / (time.perf_counter() - start)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _prefill(graphdef, state, tokens, cache, pad):
  logits, cache = nnx.merge(graphdef, state).prefill(tokens, cache, kv_start=pad)
  return jnp.argmax(logits[:, -1], -1), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode(graphdef, state, token, cache, pad):
  logits, cache = nnx.merge(graphdef, state).decode_step(token, cache, kv_start=pad)
  return jnp.argmax(logits, -1), cache


def static_batching(model: GPT, prompts, outputs, batch: int) -> tuple[float, list[float]]:
  """Pads each batch to its longest prompt (left, masked), decodes to its longest output; returns (seconds,
  latencies). Cache as long as the batch needs; greedy tokens picked inside the jitted steps."""
  graphdef, state = nnx.split(model)
  start, latencies = time.perf_counter(), []
  for i in range(0, len(prompts), batch):
    group, outs = prompts[i:i + batch], outputs[i:i + batch]
    width, steps = max(map(len, group)), max(outs)
    tokens = np.zeros((batch, width), np.int32)
    pad = np.full(batch, width, np.int32)  # rows past the group: all padding
    for row, p in enumerate(group):
      tokens[row, width - len(p):] = p  # left-padded; keys before `pad` are masked
      pad[row] = width - len(p)
    cache = model.init_cache(batch, width + steps)
    token, cache = _prefill(graphdef, state, jnp.asarray(tokens), cache, pad)
    for _ in range(steps - 1):
      token, cache = _decode(graphdef, state, token, cache, pad)
    token.block_until_ready()
    latencies += [time.perf_counter() - start] * len(group)
  return time.perf_counter() - start, latencies


def engine_run(model: GPT, prompts, outputs, logprobs: int | None = None, sampling: dict | None = None, **kwargs
               ) -> tuple[float, list[float], Engine]:
  engine = Engine(model, num_pages=_PAGES.value, page_size=_PAGE.value, max_num_seqs=_SEQS.value,
                  max_batch_tokens=_BATCH_TOKENS.value, prefill_chunk=_CHUNK.value, **kwargs)
  done_at = {}
  start = time.perf_counter()
  requests = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True, logprobs=logprobs,
                                                   **(sampling or {})))
              for p, o in zip(prompts, outputs, strict=False)]
  while engine.has_work():
    for r in engine.step():
      done_at[r.id] = time.perf_counter() - start
  return time.perf_counter() - start, [done_at[r.id] for r in requests], engine


def hf_generate(cfg: GPTConfig, prompts, outputs, batch: int):
  """Hugging Face LlamaForCausalLM.generate on the same shape, or None when unavailable."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  from lwjax.models.hf_llama import config_to_hf
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.LlamaForCausalLM(hf_cfg).to(device).eval()
  start, latencies = time.perf_counter(), []
  with torch.no_grad():
    for i in range(0, len(prompts), batch):
      group, outs = prompts[i:i + batch], outputs[i:i + batch]
      width = max(map(len, group))
      ids = torch.zeros((len(group), width), dtype=torch.long)
      mask = torch.zeros_like(ids)
      for row, p in enumerate(group):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
      model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(outs),
                     min_new_tokens=max(outs), do_sample=False, pad_token_id=0)
      latencies += [time.perf_counter() - start] * len(group)
  return time.perf_counter() - start, latencies


def multi_round(model: GPT, rounds: int = 4, conversations: int = 8, user: int = 24, answer: int = 8):
  """Chat rounds (each prompt = the whole conversation so far): prefill tokens computed and seconds."""
  results = {}
  for offload in (False, True, False, True):  # the first two passes compile
    store = KVOffloadStore(host_bytes=1 << 30) if offload else None
    # A pool too small to keep every conversation cached between its rounds.
    engine = Engine(model, num_pages=max(8, conversations * 2), page_size=_PAGE.value, max_num_seqs=_SEQS.value,
                    max_batch_tokens=_BATCH_TOKENS.value, prefill_chunk=_CHUNK.value, offload=store)
    rng = np.random.default_rng(0)
    history = [[] for _ in range(conversations)]
    start, total_prompt = time.perf_counter(), 0
    for _ in range(rounds):
      requests = []
      for c in range(conversations):
        history[c] += rng.integers(3, model.cfg.vocab_size, user).tolist()
        total_prompt += len(history[c])
        requests.append(engine.add_request(history[c], SamplingParams(temperature=0.0, max_tokens=answer,
                                                                      ignore_eos=True)))
      engine.run_until_done()
      for c, r in enumerate(requests):
        history[c] += r.output
    results[offload] = (time.perf_counter() - start, engine.scheduler.num_prefix_hit_tokens, total_prompt)
  return results


def main(argv):
  del argv
  cfg = dataclasses.replace(configs.gpt.PRESETS[_MODEL.value], dtype=_DTYPE.value)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  peak = measured_peak_flops()
  optimal = peak / (2 * cfg.num_params())
  print(f"device {jax.devices()[0].device_kind} x1; model {_MODEL.value} ({cfg.num_params():,} params, "
        f"{_DTYPE.value}); measured peak {peak / 1e12:.2f} TFLOP/s -> optimal {optimal:,.0f} tokens/s")
  print(f"{'workload':<16}{'system':<22}{'tok/s':>10}{'out tok/s':>11}{'% opt':>8}{'p50 s':>8}{'p99 s':>8}"
        f"{'vs static':>10}")
  nano = _NANO.value or (1 if jax.default_backend() == "cpu" else 2)
  rng = np.random.default_rng(1)
  compiles = _compile_counter()
  steady_compiles = 0
  for name in _WORKLOADS.value:
    pairs = lengths(name, _REQUESTS.value, _SCALE.value, cfg.max_seq_len)
    prompts = [rng.integers(3, cfg.vocab_size, p).tolist() for p, _ in pairs]
    outputs = [o for _, o in pairs]
    processed = sum(p + o for p, o in pairs)
    systems, host = {}, {}
    for warm in (True, False):  # the first pass compiles every shape; the second must compile nothing
      before = compiles[0]
      systems["static batching"] = static_batching(model, prompts, outputs, _SEQS.value)
      engines = [("continuous batching", {"async_scheduling": False}),
                 (f"engine (async, nano={nano})", {"nano_batches": nano})]
      if _UNMIXED.value:
        engines.insert(1, ("call per group", {"async_scheduling": False, "mixed_batches": False}))
      if _LOGPROBS.value >= 0:
        engines.append((f"engine, logprobs={_LOGPROBS.value}", {"nano_batches": nano, "logprobs": _LOGPROBS.value}))
      if _PENALTIES.value:
        engines.append(("engine, penalties", {"nano_batches": nano, "sampling": PENALTIES}))
      for system, kwargs in engines:
        seconds, latencies, engine = engine_run(model, prompts, outputs, **kwargs)
        systems[system] = seconds, latencies
        host[system] = (engine.host_seconds / engine.num_iterations, engine.num_iterations,
                        engine.num_model_calls)
      if warm:
        continue
      steady_compiles += compiles[0] - before
      hf = hf_generate(cfg, prompts, outputs, _SEQS.value)
      if hf is not None:
        systems["HF generate"] = hf
    base = processed / systems["static batching"][0]
    for system, (seconds, latencies) in systems.items():
      rate = processed / seconds
      extra = (f"  host {host[system][0] * 1e3:.1f} ms/iter x {host[system][1]}, {host[system][2]} model calls"
               if system in host else "")
      print(f"{name:<16}{system:<22}{rate:>10,.0f}{sum(outputs) / seconds:>11,.0f}{rate / optimal:>8.1%}"
            f"{np.percentile(latencies, 50):>8.2f}{np.percentile(latencies, 99):>8.2f}{rate / base:>9.2f}x"
            f"{extra}", flush=True)
  print(f"XLA compilations in the timed (second) passes: {steady_compiles}")
  rounds = multi_round(model)
  for offload, (seconds, hits, total) in rounds.items():
    print(f"multi-round chat, offload {'on ' if offload else 'off'}: {seconds:.2f} s, "
          f"{hits:,} of {total:,} prompt tokens served from cache")
  print(f"ratio (multi-round time, offload on / off): {rounds[True][0] / rounds[False][0]:.2f}x")
  if steady_compiles:
    raise SystemExit(f"{steady_compiles} XLA compilations after warm-up: a shape is not bucketed")


def _compile_counter() -> list[int]:
  """[n]: XLA backend compilations since the call (jax.monitoring events), updated as they happen."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  return count


if __name__ == "__main__":
  app.run(main)
