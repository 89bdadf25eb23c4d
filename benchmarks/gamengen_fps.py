"""GameNGen real-time frame speed: ms and FPS of k guided DDIM steps + decode, per component, the roofline, a
PyTorch/diffusers peer, and XLA's estimate for a TPU chip (GameNGen, arXiv 2408.14837, sec. 3.3 and 5.2.1).

  python -m benchmarks.gamengen_fps                                  # sd14 at 256x320, bf16, k = 1, 2, 4
  python -m benchmarks.gamengen_fps --steps 1,4 --out /tmp/gamengen_fps.json
  JAX_PLATFORMS=cpu python -m benchmarks.gamengen_fps --iters 0 --steps 4 --tpu_aot v5e:1x1 --nounroll  # sd14
      # for a v5e chip from a CPU host (2 cores: 7 minutes, 6.3 GB of RAM)
  JAX_PLATFORMS=cpu python -m benchmarks.gamengen_fps --unet unet_tiny --autoencoder ae_tiny --context 4 \
      --downsample 4 --pad_multiple 32 --tpu_aot v5e:1x1 --out /tmp/gamengen_fps_smoke.json   # CPU smoke

One frame is `WorldModel.bound_frame_fn(k)`, as `NeuralEngine` plays it (the parameters compiled in as
constants; "frame k=K (args)" is `frame_fn(k)`, taking them as arguments): k DDIM steps, each one UNet call of
batch 2 x --batch (classifier-free guidance on the context), then one decode; random weights
(`random_params`), stored and computed in --dtype (inference keeps no fp32 master copy). It is timed frame by
frame after warm-up (`block_until_ready`: latency, not throughput), as are one UNet call and one decode; k x
UNet + decode vs the frame is the sampler's overhead.
FLOPs and bytes are XLA's `cost_analysis()` of the compiled programs (plus k - 1 UNet calls where the k steps
stay a loop, whose body XLA counts once); the roofline is max(FLOPs / peak bf16
FLOP/s, bytes / HBM bandwidth) for known devices (none on CPU). Pallas attention kernels (the "auto" choice
on GPU and TPU) are custom calls that XLA counts by their declared cost estimate.
The peer (--peer auto, when torch and diffusers import) is the same frame built from diffusers'
`UNet2DConditionModel` and `AutoencoderKL` with the same widths (the action tokens become random
encoder_hidden_states), in --dtype, on the GPU when torch sees one and else on this CPU (torch's threads set to
the cores this process may use), eager, with the UNet and `vae.decode` under `torch.compile` (on a GPU
mode="reduce-overhead", CUDA graphs; compiling SD's UNet takes minutes; on CPU inductor's C++ code), and
compiled with inductor's `freezing` (weights as constants), as ours are in the played frame.
--tpu_aot compiles the frame, the UNet call and the decode (--tpu_programs: some of them) for a TPU topology on
this host (`lwjax.launch.aot`, libtpu, "auto" kernels resolved for the TPU) and prints the loop-aware account of
each optimized program (`lwjax.launch.hlo_cost`: every loop's trips, FLOPs, and the bytes that cross HBM - arrays
XLA keeps in VMEM excluded - per op class) beside XLA's own "bytes accessed" (which counts VMEM traffic too), the
roofline ms and FPS from the loop-aware FLOPs and HBM bytes, and the memory footprint.
--iters 0 skips the timing on this device (what a CPU host does for sd14).
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import configs.autoencoder
import configs.unet
from lwjax import kernels
from lwjax.launch import aot, hlo_cost
from lwjax.models.autoencoder import Autoencoder, AutoencoderConfig
from lwjax.models.diffusion_blocks import DTYPES
from lwjax.models.unet_diffusion import UNet, UNetConfig
from lwjax.projects.gamengen.diffusion import ALPHAS_CUMPROD
from lwjax.projects.gamengen.frames import FrameGeometry
from lwjax.projects.gamengen.sampler import ddim_timesteps
from lwjax.projects.gamengen.world_model import SampleSettings, WorldModel
from lwjax.training.progress import peak_flops_per_device

_UNET = flags.DEFINE_string("unet", "sd14", "UNet preset of configs/unet.py.")
_AUTOENCODER = flags.DEFINE_string("autoencoder", "sd14", "Autoencoder preset of configs/autoencoder.py.")
_CONTEXT = flags.DEFINE_integer("context", 64, "Past frames conditioned on (the UNet takes 4 x (context + 1)).")
_STEPS = flags.DEFINE_list("steps", ["1", "2", "4"], "DDIM step counts k, one frame row each.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", DTYPES, "Compute and parameter dtype of both networks.")
_ITERS = flags.DEFINE_integer("iters", None, "Timed calls per row (default 20 on an accelerator, 3 on CPU; "
                              "0: no timing here, only --tpu_aot).")
_BATCH = flags.DEFINE_integer("batch", 1, "Frames made at once (1: the interactive latency).")
_GUIDANCE = flags.DEFINE_float("guidance", 1.5, "Guidance on past frames (the paper's 1.5; 1.0: no CFG batch).")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 1, "FrameGeometry.downsample (1: the paper's 240x320).")
_PAD_MULTIPLE = flags.DEFINE_integer("pad_multiple", 64, "FrameGeometry.pad_multiple (64: 256x320 images).")
_ATTENTION = flags.DEFINE_enum("attention_impl", "auto", kernels.IMPLS, "Attention kernel of both networks.")
_UNROLL = flags.DEFINE_bool("unroll", True, "The k DDIM steps as straight-line code (--nounroll: a loop, "
                             "compiled once: quicker to compile for sd14 on a TPU topology).")
_TPU_AOT = flags.DEFINE_string("tpu_aot", "", "TPU topology to AOT-compile for, e.g. v5e:1x1 (empty: off).")
_TPU_PROGRAMS = flags.DEFINE_list("tpu_programs", [], "With --tpu_aot, only these programs (unet, decode, frame; "
                                   "default: all).")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "With --tpu_aot, write each compiled program's HLO text here.")
_PEER = flags.DEFINE_enum("peer", "auto", ["auto", "off"], "Time the PyTorch/diffusers frame when importable.")
_OUT = flags.DEFINE_string("out", "", "Write every number to this JSON file.")

# HBM bandwidth (bytes/s) by device_kind substring, first match wins; dense bf16 peaks are in progress.PEAK_FLOPS.
HBM_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12), ("L4", 300e9), ("TPU v6", 1640e9), ("TPU v5p", 2765e9), ("TPU v5 lite", 819e9),
    ("TPU v5e", 819e9), ("TPU v4", 1200e9),
)


def hbm_bandwidth(device) -> float | None:
  return next((bw for name, bw in HBM_BANDWIDTH if name in device.device_kind), None)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def random_params(abstract, seed: int):
  """Random weights made on the host: N(0, 1/fan_in) kernels, unit norm scales, zero biases. (Jitting the
  models' own initialisers costs a minute of compilation on a CPU even for the tiny presets.)"""
  rng = np.random.default_rng(seed)

  def make(path, x):
    if x.ndim == 1:
      value = np.full(x.shape, "['scale']" in jax.tree_util.keystr(path), np.float32)
    else:
      value = rng.standard_normal(x.shape, np.float32) / np.sqrt(np.prod(x.shape[:-1]))
    return jax.device_put(value.astype(x.dtype))
  return jax.tree_util.tree_map_with_path(make, abstract)


def _num_params(module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _cost(compiled, steps: int, rows: dict, looped: bool = False) -> dict:
  """XLA's FLOPs and bytes of a program. XLA counts a while loop's body once: a frame whose k steps stay a
  loop (`looped`: --nounroll) gets the other k - 1 UNet calls of the UNet row in `rows` added."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  out = {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}
  if steps > 1 and looped:
    unet = next(r for name, r in rows.items() if name.startswith("unet"))
    out = {key: value + (steps - 1) * unet[key] for key, value in out.items()}
    out["loop_counted_once"] = True
  return out


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f: int(getattr(m, f, 0) or 0) for f in fields}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
                        - out["alias_size_in_bytes"])
  return out


def _roofline_s(cost, peak, bandwidth) -> float | None:
  return max(cost["flops"] / peak, cost["bytes"] / bandwidth) if peak and bandwidth else None


def _stats(seconds: list[float]) -> dict:
  return {"median_ms": float(np.median(seconds)) * 1e3, "p90_ms": float(np.percentile(seconds, 90)) * 1e3,
          "fps": 1.0 / float(np.median(seconds)), "iters": len(seconds)}


def _latency(fn, args, iters, sync=jax.block_until_ready, warmup=2) -> dict:
  """Median and p90 over `iters` calls, each waited for; `warmup` untimed calls first."""
  for _ in range(warmup):
    sync(fn(*args))
  seconds = []
  for _ in range(iters):
    start = time.perf_counter()
    sync(fn(*args))
    seconds.append(time.perf_counter() - start)
  return _stats(seconds)


def programs(wm: WorldModel, steps: list[int], batch: int, latent_hwc, key, *, bound: bool = False) -> dict:
  """name -> (jitted fn, args, k): one UNet call, one decode, the frames, each taking the world model's parameters
  as arguments. `bound` adds each frame as `NeuralEngine` plays it (`WorldModel.bound_frame_fn`: the parameters
  compiled in; needs concrete parameters), named "frame k=K" while the argument-taking one becomes "frame k=K
  (args)". jit drops the parameters a program does not read (`keep_unused=False`): they cost it nothing."""
  cfg, (h, w, c) = wm.cfg, latent_hwc
  k1, k2, k3 = jax.random.split(key, 3)
  context = jax.random.normal(k1, (batch, cfg.context_frames, h, w, c), jnp.float32)
  actions = jax.random.randint(k2, (batch, cfg.context_frames), 0, cfg.num_actions, jnp.int32)
  unet_batch = 2 * batch if wm.settings.guidance != 1.0 else batch
  unet_args = (jax.random.normal(k3, (unet_batch, h, w, cfg.in_channels), jnp.float32),
               jnp.full((unet_batch,), 999, jnp.int32), jnp.zeros((unet_batch,), jnp.int32),
               jnp.tile(actions, (unet_batch // batch, 1)))
  params = (wm.unet_params, wm.ae_params)
  frame_args = (context, actions, jax.random.key(0))
  out = {f"unet b={unet_batch}": (jax.jit(lambda u, a, *x: wm.denoise(u, *x)), (*params, *unet_args), 1),
         f"decode b={batch}": (jax.jit(lambda u, a, z: wm.decode(a, z)), (*params, context[:, -1]), 1)}
  for k in steps:
    if bound:
      out[f"frame k={k}"] = (wm.bound_frame_fn(k), frame_args, k)
    out[f"frame k={k}" + (" (args)" if bound else "")] = (wm.frame_fn(k), (*params, *frame_args), k)
  return out


def time_here(wm, progs, iters) -> dict:
  """Compiles each program for the default device, times it and prints its row as it is done."""
  device = jax.devices()[0]
  peak, bandwidth = peak_flops_per_device(device), hbm_bandwidth(device)
  print(f"device: {device.device_kind} ({jax.default_backend()}); {iters} timed calls per row; peak "
        f"{_fmt(peak and peak / 1e12, '.0f')} TFLOP/s bf16, HBM {_fmt(bandwidth and bandwidth / 1e9, '.0f')} GB/s")
  print(f"{'program':<12} {'median ms':>10} {'p90 ms':>9} {'FPS':>8} {'GFLOP':>9} {'GB':>7} {'TFLOP/s':>8} "
        f"{'%peak':>6} {'roof ms':>8} {'%roof':>6}", flush=True)
  rows = {}
  for name, (fn, args, steps) in progs.items():
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    looped = not wm.settings.unroll
    r = {"compile_s": time.perf_counter() - start, **_cost(compiled, steps, rows, looped),
         **_latency(compiled, args, iters)}
    seconds = r["median_ms"] / 1e3
    r["tflops_per_s"], r["gb_per_s"] = r["flops"] / seconds / 1e12, r["bytes"] / seconds / 1e9
    if peak:
      r["pct_peak_flops"] = 100 * r["flops"] / seconds / peak
    roofline = _roofline_s(r, peak, bandwidth)
    if roofline:
      r["roofline_ms"], r["pct_roofline"] = roofline * 1e3, 100 * roofline / seconds
    rows[name] = r
    print(f"{name:<12} {r['median_ms']:>10.3f} {r['p90_ms']:>9.3f} {r['fps']:>8.2f} {r['flops'] / 1e9:>9.2f} "
          f"{r['bytes'] / 1e9:>7.3f} {r['tflops_per_s']:>8.3f} {_fmt(r.get('pct_peak_flops'), '6.1f')} "
          f"{_fmt(r.get('roofline_ms'), '8.3f')} {_fmt(r.get('pct_roofline'), '6.1f')}", flush=True)
  return rows


def tpu_aot(wm, progs, topology: str, hlo_dir: str = "") -> dict:
  """Compiles each program for `topology` on this host ("auto" kernels as the chip runs them: the Pallas flash
  attention); prints the loop-aware account of its optimized HLO (`lwjax.launch.hlo_cost`: FLOPs, HBM bytes -
  what stays in VMEM excluded - per op class) beside XLA's own estimate, the roofline ms and FPS, and the memory
  footprint. `hlo_dir`: also write each program's HLO text there."""
  ok, why = aot.libtpu_available()
  if not ok:
    print(f"tpu_aot {topology}: skipped (libtpu cannot load: {why})")
    return {"skipped": f"libtpu cannot load: {why}"}
  device = aot.tpu_devices(topology)[0]
  peak, bandwidth = peak_flops_per_device(device), hbm_bandwidth(device)
  out = {"topology": topology, "device_kind": device.device_kind, "peak_flops": peak, "hbm_bytes_per_s": bandwidth}
  print(f"tpu_aot {topology} ({device.device_kind}): XLA's estimate at {_fmt(peak and peak / 1e12, '.0f')} "
        f"TFLOP/s, {_fmt(bandwidth and bandwidth / 1e9, '.0f')} GB/s")
  print(f"{'program':<12} {'GFLOP':>9} {'HBM GB':>7} {'XLA GB':>7} {'compute ms':>10} {'memory ms':>9} {'FPS':>7} "
        f"{'HBM GiB':>8} {'compile s':>9}", flush=True)
  for name, (fn, args, _) in progs.items():
    start = time.perf_counter()
    with kernels.target_platform("tpu"):  # "auto" kernels as the chip runs them (the Pallas flash attention)
      compiled = aot.compile_for_tpu(fn, *_abstract(args), topology=topology)
    text = compiled.as_text()
    account = hlo_cost.analyze(text)
    r = {"compile_s": time.perf_counter() - start, "flops": account.flops, "hbm_bytes": account.hbm_bytes,
         "lower_bound": account.lower_bound, "hlo_cost": account.to_dict(),
         "xla_counted_once": _cost(compiled, 1, {}), "memory": _memory(compiled)}
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, f"{topology.replace(':', '_')}_{name.replace(' ', '_')}.hlo"), "w") as f:
        f.write(text)
    if peak and bandwidth:
      r["compute_ms"], r["memory_ms"] = r["flops"] / peak * 1e3, r["hbm_bytes"] / bandwidth * 1e3
      r["roofline_ms"] = max(r["compute_ms"], r["memory_ms"])
      r["fps_at_roofline"] = 1e3 / r["roofline_ms"]
    out[name] = r
    xla_gb = r["xla_counted_once"]["bytes"] / 1e9
    print(f"{name:<12} {r['flops'] / 1e9:>9.2f} {r['hbm_bytes'] / 1e9:>7.3f} {xla_gb:>7.3f} "
          f"{_fmt(r.get('compute_ms'), '10.3f')} {_fmt(r.get('memory_ms'), '9.3f')} "
          f"{_fmt(r.get('fps_at_roofline'), '7.2f')} {r['memory']['total_bytes'] / 2 ** 30:>8.3f} "
          f"{r['compile_s']:>9.1f}" + (" (a loop's trip count unknown: a lower bound)" if r["lower_bound"] else ""),
          flush=True)
    print(hlo_cost.format_table(account), flush=True)
  return out


def peer(ucfg: UNetConfig, acfg: AutoencoderConfig, latent_hwc, steps, batch, guidance, dtype, iters) -> dict:
  """The same frame from diffusers' UNet2DConditionModel + AutoencoderKL, eager and compiled: on a CUDA device
  when torch sees one, else on this host's CPU cores."""
  try:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
  except ImportError as e:
    return {"skipped": f"torch/diffusers not importable ({e})"}
  device, tdtype, (h, w, c) = "cuda" if torch.cuda.is_available() else "cpu", getattr(torch, dtype), latent_hwc
  if device == "cpu":  # the cores this process may run on, as XLA's CPU client counts them (taskset included)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  unet = UNet2DConditionModel(
      sample_size=(h, w), in_channels=ucfg.in_channels, out_channels=ucfg.latent_channels,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in ucfg.attention_levels),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in ucfg.attention_levels[::-1]),
      block_out_channels=ucfg.block_out_channels, layers_per_block=ucfg.layers_per_block,
      norm_num_groups=ucfg.norm_groups, cross_attention_dim=ucfg.cross_attention_dim,
      attention_head_dim=ucfg.num_heads)  # diffusers' SD-1.x name for the number of heads
  n = len(acfg.block_out_channels)
  vae = AutoencoderKL(in_channels=acfg.image_channels, out_channels=acfg.image_channels,
                      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                      block_out_channels=acfg.block_out_channels, layers_per_block=acfg.layers_per_block,
                      latent_channels=acfg.latent_channels, norm_num_groups=acfg.norm_groups)
  unet, vae = (m.to(device=device, dtype=tdtype).eval() for m in (unet, vae))
  print(f"peer: torch {torch.__version__}, diffusers UNet {sum(p.numel() for p in unet.parameters()):,} params, "
        f"on {device}" + ("" if device == "cuda" else f" ({torch.get_num_threads()} threads)"), flush=True)
  gen = torch.Generator(device).manual_seed(0)
  context = torch.randn(batch, c * ucfg.context_frames, h, w, generator=gen, device=device)
  tokens = torch.randn(batch, ucfg.context_frames, ucfg.cross_attention_dim, generator=gen, device=device)
  noise = torch.randn(batch, c, h, w, generator=gen, device=device)

  def make_frame(k, unet_fn, decode_fn):
    timesteps = [int(t) for t in ddim_timesteps(k)]

    def frame(context, tokens, noise):
      x, halves = noise, 1 if guidance == 1.0 else 2  # as `sampler.guided_v`: one call of batch 2b, or b
      tokens = torch.cat([tokens] * halves).to(tdtype)
      for i, t in enumerate(timesteps):  # the sampler's DDIM on v-prediction, trailing spacing
        model_in = torch.cat([torch.cat([x, c], 1) for c in (context, torch.zeros_like(context))[:halves]])
        t_b = torch.full((halves * batch,), t, device=device)
        v = unet_fn(model_in.to(tdtype), t_b, tokens).sample.float()
        if halves == 2:
          v_cond, v_uncond = v.chunk(2)
          v = v_uncond + guidance * (v_cond - v_uncond)
        a = float(ALPHAS_CUMPROD[t])
        a_prev = float(ALPHAS_CUMPROD[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        x0, eps = a ** 0.5 * x - (1 - a) ** 0.5 * v, a ** 0.5 * v + (1 - a) ** 0.5 * x
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
      return decode_fn((x / acfg.scaling_factor).to(tdtype)).sample
    return frame

  def sync(_):
    if device == "cuda":
      torch.cuda.synchronize()

  # As diffusers' pipelines are sped up: the UNet and the decoder compiled (on a GPU one CUDA graph each, shared
  # by every k and step), the DDIM arithmetic between them eager. "frozen" adds inductor's `freezing`: the weights
  # become constants of the compiled code (folded, and prepacked for oneDNN on a CPU), as ours are in the frame
  # `NeuralEngine` plays.
  import torch._dynamo
  import torch._inductor.config

  mode = "reduce-overhead" if device == "cuda" else "default"
  variants = {"eager": None, "compiled": False, "frozen": True}
  out = {name: {} for name in variants}
  with torch.inference_mode():
    for name, freezing in variants.items():
      torch._dynamo.reset()  # each variant compiles afresh, under its own inductor settings
      unet_fn, decode_fn = ((unet, vae.decode) if freezing is None else
                            (torch.compile(unet, mode=mode), torch.compile(vae.decode, mode=mode)))
      with torch._inductor.config.patch(freezing=bool(freezing)):
        for k in steps:
          try:  # CUDA graphs (and inductor's first calls) need a few calls before the timed ones
            out[name][k] = _latency(make_frame(k, unet_fn, decode_fn), (context, tokens, noise), iters, sync,
                                    warmup=3)
          except Exception as e:  # no Triton, an inductor bug: report what ran
            out[name][k] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
  return out


def _fmt(value, spec):
  return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def main(argv):
  del argv
  steps = [int(k) for k in _STEPS.value]
  on_cpu = jax.default_backend() == "cpu"
  iters = (3 if on_cpu else 20) if _ITERS.value is None else _ITERS.value
  numerics = dict(dtype=_DTYPE.value, param_dtype=_DTYPE.value, attention_impl=_ATTENTION.value)
  ucfg = UNetConfig.from_dict(configs.unet.get(_UNET.value, context_frames=_CONTEXT.value, **numerics))
  acfg = AutoencoderConfig.from_dict(configs.autoencoder.get(_AUTOENCODER.value, **numerics))
  if ucfg.latent_channels != acfg.latent_channels:
    sys.exit(f"--unet {_UNET.value} has {ucfg.latent_channels} latent channels, --autoencoder "
             f"{_AUTOENCODER.value} {acfg.latent_channels}")
  geometry = FrameGeometry(downsample=_DOWNSAMPLE.value, pad_multiple=_PAD_MULTIPLE.value)
  latent_hwc = geometry.latent_shape(acfg.latent_channels, acfg.downsample_factor)
  unet = nnx.eval_shape(lambda: UNet(ucfg, rngs=nnx.Rngs(0)))
  ae = nnx.eval_shape(lambda: Autoencoder(acfg, rngs=nnx.Rngs(1)))
  wm = WorldModel(unet, ae, geometry, SampleSettings(guidance=_GUIDANCE.value, unroll=_UNROLL.value))
  unet_n, decoder_n = _num_params(unet), _num_params(ae.decoder) + _num_params(ae.post_quant_conv)
  results = {"unet": _UNET.value, "autoencoder": _AUTOENCODER.value, "context": ucfg.context_frames,
             "steps": steps, "dtype": _DTYPE.value, "batch": _BATCH.value, "guidance": _GUIDANCE.value,
             "image_hw": geometry.image_shape[:2], "latent_hwc": latent_hwc, "unet_params": unet_n,
             "decoder_params": decoder_n, "device_kind": jax.devices()[0].device_kind,
             "backend": jax.default_backend(), "iters": iters}
  key = jax.random.key(0)
  print(f"GameNGen frame: UNet {_UNET.value} ({unet_n:,} params, {ucfg.in_channels} input channels) + decoder "
        f"{_AUTOENCODER.value} ({decoder_n:,} params) = {unet_n + decoder_n:,}; image {geometry.image_shape[:2]}, "
        f"latents {latent_hwc}, {_DTYPE.value}, batch {_BATCH.value}, guidance {_GUIDANCE.value}")
  ours = {}
  if iters > 0:  # random weights, then every program, the played frames with them compiled in
    wm.unet_params, wm.ae_params = random_params(wm.unet_params, 0), random_params(wm.ae_params, 1)
    ours = results["here"] = time_here(wm, programs(wm, steps, _BATCH.value, latent_hwc, key, bound=True), iters)
    unet_ms = next(r["median_ms"] for n, r in ours.items() if n.startswith("unet"))
    decode_ms = next(r["median_ms"] for n, r in ours.items() if n.startswith("decode"))
    results["overhead"] = {k: ours[f"frame k={k}"]["median_ms"] / (k * unet_ms + decode_ms) for k in steps}
    for k in steps:
      print(f"frame k={k}: {k} x UNet + decode = {k * unet_ms + decode_ms:.3f} ms, measured "
            f"{ours[f'frame k={k}']['median_ms']:.3f} ms ({results['overhead'][k]:.3f}x)")

  if _PEER.value == "off" or iters == 0:
    results["peer"] = {"skipped": "--peer off" if _PEER.value == "off" else "--iters 0"}
  else:
    results["peer"] = peer(ucfg, acfg, latent_hwc, steps, _BATCH.value, _GUIDANCE.value, _DTYPE.value, iters)
  if "skipped" in results["peer"]:
    print(f"peer: skipped ({results['peer']['skipped']})")
  else:
    for mode, rows in results["peer"].items():
      for k, r in rows.items():
        print(f"peer {mode:<8} k={k}: " + (f"skipped ({r['skipped']})" if "skipped" in r else
                                          f"{r['median_ms']:.3f} ms median, {r['p90_ms']:.3f} p90, {r['fps']:.2f} FPS"))

  if _TPU_AOT.value:
    progs = programs(wm, steps, _BATCH.value, latent_hwc, key)
    if _TPU_PROGRAMS.value:
      progs = {name: prog for name, prog in progs.items() if name.split()[0] in _TPU_PROGRAMS.value}
    results["tpu_aot"] = tpu_aot(wm, progs, _TPU_AOT.value, _HLO_DIR.value)

  ratios = [f"frame / (k x UNet + decode) k={k}: {v:.3f}x" for k, v in results.get("overhead", {}).items()]
  for mode, rows in ({} if "skipped" in results["peer"] else results["peer"]).items():
    ratios += [f"peer {mode} / ours k={k}: {r['median_ms'] / ours[f'frame k={k}']['median_ms']:.3f}x (>1: ours faster)"
               for k, r in rows.items() if "median_ms" in r]
  if ratios:
    print("ratio: " + "; ".join(ratios))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1, default=str)
    print(f"wrote {_OUT.value}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
