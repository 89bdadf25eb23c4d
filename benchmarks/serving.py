"""Offline serving throughput (NanoFlow, arXiv 2408.12757): static batching vs the engine, % of optimal.

  python -m benchmarks.serving                                   # CPU: gpt_tiny-sized, lengths scaled down
  python -m benchmarks.serving --model llama3_8b --length_scale 1 --requests 512 --max_num_seqs 256 \
      --num_pages 8192 --page_size 16 --dtype bfloat16          # one GPU, random weights
  python -m benchmarks.serving --mesh tensor=2                   # the engine tensor parallel (CPU: 2 fake devices)
  python -m benchmarks.serving --mesh data=2,tensor=4            # 2 engine replicas of 4 devices each
  python -m benchmarks.serving --trace AzureLLMInferenceTrace_conv.csv --time_scale 0.1   # replay a trace

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
benchmark counts XLA compilations in the timed passes and fails if there is any (a shape not bucketed). With
arrival times the batches depend on timing: the warm-up repeats while it compiles (at most 3 passes), and what the
timed pass still compiles is reported, not failed.

`--mesh tensor=T[,data=D]` runs the engine systems on a mesh (`lwjax.serving.tensor_parallel`; with D > 1, D
replicas behind one front, `lwjax.serving.replicas`), the random weights initialised straight onto it; static
batching runs on the first T devices (XLA partitions its steps from the weights' shardings: with D > 1 it has a
D-th of the engine's devices), HF `generate` on one. On CPU
the D x T devices are fake ones (XLA_FLAGS=--xla_force_host_platform_device_count, set here before jax is
imported) sharing the machine's cores: the run checks that the sharded engine works and what it costs, not a speedup.

`--trace FILE` replays a published trace instead of the length statistics (`lwjax.serving.traces`: ShareGPT json,
LMSYS-Chat-1M parquet, Azure/Splitwise csv): its first --requests requests, their lengths (times --length_scale)
clipped to the model's context (the clipped rows counted), arriving at the trace's times (Splitwise; times
--time_scale) or at --rate requests/s (Poisson), else all at once. Text traces are measured with --tokenizer, or
estimated at 4 characters a token; the run prints which. Latency counts from a request's arrival. A trace that
cannot be read exits with status 2 and one line naming the file and the field.
"""

import math
import os
import sys


def _fake_cpu_devices(argv: list[str]) -> None:
  """Before jax is imported: as many host (CPU) devices as `--mesh` covers, unless XLA_FLAGS already says."""
  value = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--mesh=")), "")
  if not value and "--mesh" in argv[:-1]:
    value = argv[argv.index("--mesh") + 1]
  count = math.prod(int(size) for _, _, size in (part.partition("=") for part in value.split(",")) if size.isdigit())
  if count > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"


_fake_cpu_devices(sys.argv)

import dataclasses  # noqa: E402 - after the device count is set
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import configs.gpt  # noqa: E402
from lwjax.config import ConfigError  # noqa: E402
from lwjax.models.gpt import GPT, GPTConfig  # noqa: E402
from lwjax.serving import replicas, tensor_parallel, traces  # noqa: E402
from lwjax.serving.engine import Engine  # noqa: E402
from lwjax.serving.offload import KVOffloadStore  # noqa: E402
from lwjax.serving.sampling import SamplingParams  # noqa: E402
from lwjax.serving.serve import random_model  # noqa: E402
from lwjax.training.mesh import SERVING_RULES  # noqa: E402

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
MAX_WARM_PASSES = 3
_WORKLOADS = flags.DEFINE_list("workloads", list(WORKLOADS), "Workloads to run.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh of the engine systems, e.g. tensor=2 or data=2,tensor=2 (axes data, "
                            "fsdp, tensor; fsdp stays 1); empty: one device.")
_TRACE = flags.DEFINE_string("trace", "", "Replay this trace (ShareGPT .json, LMSYS-Chat-1M .parquet, Splitwise "
                             ".csv) instead of --workloads.")
_TRACE_FORMAT = flags.DEFINE_enum("trace_format", None, list(traces.FORMATS), "Format of --trace (default: by its "
                                  "extension).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer measuring a text trace's turns (sentencepiece model "
                                 "or Hugging Face directory); empty: 4 characters a token.")
_RATE = flags.DEFINE_float("rate", 0.0, "Poisson arrivals at this many requests/s (0: the trace's own times where it "
                           "has them, else all at once).")
_TIME_SCALE = flags.DEFINE_float("time_scale", 1.0, "Multiplier on a trace's inter-arrival times (0.1: ten times "
                                 "the rate).")


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


def _wait_until(start: float, seconds: float) -> None:
  time.sleep(max(0.0, start + seconds - time.perf_counter()))


def _batch_latencies(start: float, arrivals, first: int, count: int) -> list[float]:
  """Seconds from each arrival of a batch (requests first..first + count) to now, when the batch is done."""
  now = time.perf_counter() - start
  return [now - (arrivals[first + i] if arrivals else 0.0) for i in range(count)]


def static_batching(model: GPT, prompts, outputs, batch: int, arrivals=None) -> tuple[float, list[float]]:
  """Pads each batch to its longest prompt (left, masked), decodes to its longest output; returns (seconds,
  latencies). Cache as long as the batch needs; greedy tokens picked inside the jitted steps. With `arrivals`, a
  batch starts when its last request has arrived."""
  graphdef, state = nnx.split(model)
  start, latencies = time.perf_counter(), []
  for i in range(0, len(prompts), batch):
    group, outs = prompts[i:i + batch], outputs[i:i + batch]
    if arrivals:
      _wait_until(start, arrivals[i + len(group) - 1])
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
    latencies += _batch_latencies(start, arrivals, i, len(group))
  return time.perf_counter() - start, latencies


def make_engine(model: GPT, mesh, offload_bytes: int = 0, **kwargs) -> Engine | replicas.EngineReplicas:
  """The engine on one device, tensor parallel on `mesh`, or replicas along its `data` axis (each with its own KV
  offload store of `offload_bytes`, when > 0)."""
  def store(_=None):
    return KVOffloadStore(host_bytes=offload_bytes) if offload_bytes else None
  if mesh is not None and mesh.shape[replicas.REPLICA_AXIS] > 1:
    return replicas.EngineReplicas.build(model, mesh, offload=store, **kwargs)
  return Engine(model, mesh=mesh, offload=store(), **kwargs)


def engine_run(model: GPT, prompts, outputs, arrivals=None, mesh=None, logprobs: int | None = None,
               sampling: dict | None = None, **kwargs) -> tuple[float, list[float], Engine]:
  """Submits each request at its arrival (all at once without `arrivals`) and steps the engine until all are done;
  returns (seconds, latencies from arrival, the engine)."""
  engine = make_engine(model, mesh, num_pages=_PAGES.value, page_size=_PAGE.value, max_num_seqs=_SEQS.value,
                       max_batch_tokens=_BATCH_TOKENS.value, prefill_chunk=_CHUNK.value, **kwargs)
  arrivals = arrivals or [0.0] * len(prompts)
  params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True, logprobs=logprobs, **(sampling or {}))
            for o in outputs]
  done_at, requests = {}, []
  start = time.perf_counter()
  while len(requests) < len(prompts) or engine.has_work():
    now = time.perf_counter() - start
    while len(requests) < len(prompts) and arrivals[len(requests)] <= now:
      requests.append(engine.add_request(prompts[len(requests)], params[len(requests)]))
    if engine.has_work():
      for r in engine.step():
        done_at[r.id] = time.perf_counter() - start
    elif len(requests) < len(prompts):
      _wait_until(start, arrivals[len(requests)])
  return (time.perf_counter() - start, [done_at[r.id] - arrival for r, arrival in zip(requests, arrivals, strict=True)],
          engine)


def hf_generate(cfg: GPTConfig, prompts, outputs, batch: int, arrivals=None):
  """Hugging Face LlamaForCausalLM.generate on the same shape, or None when unavailable."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  from lwjax.models.hf_families import config_to_hf
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.LlamaForCausalLM(hf_cfg).to(device).eval()
  start, latencies = time.perf_counter(), []
  with torch.no_grad():
    for i in range(0, len(prompts), batch):
      group, outs = prompts[i:i + batch], outputs[i:i + batch]
      if arrivals:
        _wait_until(start, arrivals[i + len(group) - 1])
      width = max(map(len, group))
      ids = torch.zeros((len(group), width), dtype=torch.long)
      mask = torch.zeros_like(ids)
      for row, p in enumerate(group):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
      model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(outs),
                     min_new_tokens=max(outs), do_sample=False, pad_token_id=0)
      latencies += _batch_latencies(start, arrivals, i, len(group))
  return time.perf_counter() - start, latencies


def multi_round(model: GPT, mesh=None, rounds: int = 4, conversations: int = 8, user: int = 24, answer: int = 8):
  """Chat rounds (each prompt = the whole conversation so far): prefill tokens computed and seconds."""
  results = {}
  for offload in (False, True, False, True):  # the first two passes compile
    # A pool too small to keep every conversation cached between its rounds.
    engine = make_engine(model, mesh, offload_bytes=(1 << 30) * offload, num_pages=max(8, conversations * 2),
                         page_size=_PAGE.value, max_num_seqs=_SEQS.value, max_batch_tokens=_BATCH_TOKENS.value,
                         prefill_chunk=_CHUNK.value)
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
    hits = sum(e.scheduler.num_prefix_hit_tokens for e in engine.replicas)
    results[offload] = (time.perf_counter() - start, hits, total_prompt)
  return results


def build_models(cfg: GPTConfig, mesh) -> tuple[GPT, GPT]:
  """(the engines' model, static batching's). With a mesh, random weights initialised straight onto it, replicated
  over `data` (as `serve` does: never whole on one device), and static batching's on the first replica's devices,
  where XLA partitions its steps from the weights' shardings; the same weights as on one device."""
  if mesh is None:
    model = GPT(cfg, rngs=nnx.Rngs(0))
    return model, model
  model = random_model(cfg, 0, mesh, SERVING_RULES)
  first = replicas.replica_meshes(mesh)[0]
  if first.size == mesh.size:
    return model, model
  graphdef, state = nnx.split(model)
  placed = tensor_parallel.EngineShardings.build(state, cfg.n_kv_heads, first, SERVING_RULES).place_params(state)
  return model, nnx.merge(graphdef, placed)


def parse_mesh(value: str, cfg: GPTConfig):
  """The mesh `--mesh` names (axis=size pairs over data, fsdp, tensor), or None for one device; a ConfigError
  naming --mesh, or the model key its split does not divide."""
  if not value:
    return None
  shape = {axis: 1 for axis in ("data", "fsdp", "tensor")}
  for part in value.split(","):
    axis, _, size = part.partition("=")
    if axis not in shape or not size.isdigit() or int(size) < 1:
      raise ConfigError("--mesh", f"{part!r}", "axis=size pairs over data, fsdp, tensor, e.g. tensor=2 or "
                        "data=2,tensor=2")
    shape[axis] = int(size)
  replicas.check_mesh(shape)
  tensor_parallel.check_shapes(cfg, shape, SERVING_RULES)
  return tensor_parallel.serving_mesh(shape)


def arrival_times(n: int, trace: traces.Trace | None = None) -> tuple[list[float] | None, str]:
  """(arrival seconds of n requests, or None: all at once; how they were made)."""
  if _RATE.value > 0:
    return traces.poisson_arrivals(n, _RATE.value), f"Poisson at {_RATE.value:g} requests/s"
  if trace is not None and trace.has_arrivals:
    times = [r.arrival * _TIME_SCALE.value for r in trace.requests]
    return times, f"the trace's times x {_TIME_SCALE.value:g} (last at {times[-1]:.1f} s)"
  return None, "all at once"


def trace_workload(path: str, n: int, scale: float, max_len: int):
  """(name, (prompt, output) lengths, arrivals) of the trace's first `n` requests, lengths times `scale` and clipped
  to `max_len`; prints what was read."""
  count = None
  if _TOKENIZER.value:
    from lwjax.data import tokenizer as tokenizer_lib
    tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
  trace = traces.read(path, _TRACE_FORMAT.value, count, limit=n)
  scaled = [traces.TraceRequest(max(1, int(r.prompt_tokens * scale)), max(1, int(r.output_tokens * scale)))
            for r in trace.requests]
  fitted, clipped = traces.clip(scaled, max_len)
  arrivals, how = arrival_times(len(fitted), trace)
  print(f"trace {path} ({trace.format}): {len(fitted)} requests ({trace.skipped} rows skipped), lengths from "
        f"{trace.length_source} x {scale:g}, {clipped} of {len(fitted)} clipped to the model's {max_len} tokens; "
        f"arrivals: {how}")
  return f"{trace.format} trace", [(r.prompt_tokens, r.output_tokens) for r in fitted], arrivals


def main(argv):
  del argv
  cfg = dataclasses.replace(configs.gpt.PRESETS[_MODEL.value], dtype=_DTYPE.value)
  try:
    mesh = parse_mesh(_MESH.value, cfg)
  except ConfigError as e:
    print(f"benchmarks.serving: {e}", file=sys.stderr)
    sys.exit(2)
  if _TRACE.value:
    try:
      workloads = [trace_workload(_TRACE.value, _REQUESTS.value, _SCALE.value, cfg.max_seq_len)]
    except traces.TraceError as e:
      print(f"benchmarks.serving: {e}", file=sys.stderr)
      sys.exit(2)
  else:
    arrivals, how = arrival_times(_REQUESTS.value)
    workloads = [(name, lengths(name, _REQUESTS.value, _SCALE.value, cfg.max_seq_len), arrivals)
                 for name in _WORKLOADS.value]
    print(f"workloads: lognormal lengths around the traces' means x {_SCALE.value:g}; arrivals: {how}")
  model, static_model = build_models(cfg, mesh)
  peak = measured_peak_flops()
  optimal = peak / (2 * cfg.num_params())
  where = "x1" if mesh is None else (f"x{mesh.size}: the engine on mesh data={mesh.shape['data']} x tensor="
                                     f"{mesh.shape['tensor']}, static batching on tensor={mesh.shape['tensor']}, "
                                     "HF on one device")
  print(f"device {jax.devices()[0].device_kind} {where}; model {_MODEL.value} ({cfg.num_params():,} params, "
        f"{_DTYPE.value}); measured peak {peak / 1e12:.2f} TFLOP/s (one device) -> optimal {optimal:,.0f} tokens/s")
  print(f"{'workload':<16}{'system':<22}{'tok/s':>10}{'out tok/s':>11}{'% opt':>8}{'p50 s':>8}{'p99 s':>8}"
        f"{'vs static':>10}")
  nano = _NANO.value or (1 if jax.default_backend() == "cpu" else 2)
  rng = np.random.default_rng(1)
  compiles = _compile_counter()
  steady_compiles = 0
  for name, pairs, arrivals in workloads:
    prompts = [rng.integers(3, cfg.vocab_size, p).tolist() for p, _ in pairs]
    outputs = [o for _, o in pairs]
    processed = sum(p + o for p, o in pairs)
    systems, host = {}, {}
    warm, warm_passes = True, 0
    while True:  # the first pass compiles every shape; the timed one must compile nothing
      before = compiles[0]
      systems["static batching"] = static_batching(static_model, prompts, outputs, _SEQS.value, arrivals)
      engines = [("continuous batching", {"async_scheduling": False}),
                 (f"engine (async, nano={nano})", {"nano_batches": nano})]
      if _UNMIXED.value:
        engines.insert(1, ("call per group", {"async_scheduling": False, "mixed_batches": False}))
      if _LOGPROBS.value >= 0:
        engines.append((f"engine, logprobs={_LOGPROBS.value}", {"nano_batches": nano, "logprobs": _LOGPROBS.value}))
      if _PENALTIES.value:
        engines.append(("engine, penalties", {"nano_batches": nano, "sampling": PENALTIES}))
      for system, kwargs in engines:
        seconds, latencies, engine = engine_run(model, prompts, outputs, arrivals, mesh, **kwargs)
        systems[system] = seconds, latencies
        host[system] = (engine.host_seconds / engine.num_iterations, engine.num_iterations,
                        engine.num_model_calls)
      if warm:
        # With arrivals the batches (and so the shapes) depend on timing, and the first pass's compilations delay
        # it: warm up again while a pass compiles, at most MAX_WARM_PASSES times.
        warm_passes += 1
        warm = bool(arrivals) and compiles[0] > before and warm_passes < MAX_WARM_PASSES
        continue
      steady_compiles += compiles[0] - before
      hf = hf_generate(cfg, prompts, outputs, _SEQS.value, arrivals)
      if hf is not None:
        systems["HF generate"] = hf
      break
    base = processed / systems["static batching"][0]
    for system, (seconds, latencies) in systems.items():
      rate = processed / seconds
      extra = (f"  host {host[system][0] * 1e3:.1f} ms/iter x {host[system][1]}, {host[system][2]} model calls"
               if system in host else "")
      print(f"{name:<16}{system:<22}{rate:>10,.0f}{sum(outputs) / seconds:>11,.0f}{rate / optimal:>8.1%}"
            f"{np.percentile(latencies, 50):>8.2f}{np.percentile(latencies, 99):>8.2f}{rate / base:>9.2f}x"
            f"{extra}", flush=True)
  print(f"XLA compilations in the timed (last) passes: {steady_compiles}")
  rounds = multi_round(model, mesh)
  for offload, (seconds, hits, total) in rounds.items():
    print(f"multi-round chat, offload {'on ' if offload else 'off'}: {seconds:.2f} s, "
          f"{hits:,} of {total:,} prompt tokens served from cache")
  print(f"ratio (multi-round time, offload on / off): {rounds[True][0] / rounds[False][0]:.2f}x")
  if steady_compiles and any(arrivals for _, _, arrivals in workloads):
    print(f"with arrivals, {steady_compiles} batch shapes met first in the timed passes compiled there (their "
          "compile time is in the figures)")
  elif steady_compiles:
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
