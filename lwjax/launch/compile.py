"""Compile a config's real train step for a TPU slice on this machine: does it fit, how fast could it be.

  python -m lwjax.launch.compile --config experiments/lm_pretrain.py:scale=paper,model=llama3_8b --tpu v5p-256
  python -m lwjax.launch.compile --config experiments/lm_pretrain.py:scale=smoke --tpu v5e --topology 2x2 \\
      --config.mesh.shape.data=4 --config.mesh.shape.fsdp=1

The step is the one `main.py` runs (`Trainer.jitted_train_step`: its mesh, logical-axis shardings, donation),
lowered against the devices of the slice's topology (`jax.experimental.topologies`, libtpu from `jax[tpu]`, no
TPU needed) and compiled by XLA's TPU compiler. Printed: per-chip memory (arguments, outputs, temporaries, the
peak) against the chip's HBM; the program's FLOPs and bytes per chip by op class, every loop (micro-batches,
scanned layers, XLA's collective matmuls) counted as many times as it runs (`lwjax.launch.hlo_cost`; XLA's own
count, each loop body once, is kept as `xla_counted_once`); and a roofline step: compute (FLOPs over peak bf16
FLOP/s), memory (HBM bytes, collectives excluded, over HBM bandwidth) and collectives (bytes each chip sends over
ICI, over the chip's ICI bandwidth with every link busy). Collectives fully hidden behind compute and memory give
max of the three, a lower bound; not overlapped at all, max(compute, memory) + collectives, an upper bound. The
MFU each step would give uses the model's FLOPs (6 N per token plus attention for a GPT, its teacher GPT's for a
hybrid, three forward passes for the GameNGen UNet). Jobs:
`lm_pretrain` (the GPT's step), and those whose job module defines `aot_step(config, devices) -> AotStep`:
`mamba_distill` (the hybrid's first distillation stage, KL + CE to the teacher, whose shape is read from its
checkpoint or named by `--config.teacher.preset`) and `gamengen_diffusion` (the denoiser's step on latent
windows; the latent grid from the autoencoder's checkpoint, else from `autoencoder.geometry`), `genrm` (the
verifier's finetune, its shape from `--config.base_preset` or the config of `base`) and `compute_matched` (the
setup's finetune, its shape from `--config.models.finetuned_preset` or the finetuned model's config). A job with
no train step at its paper scale defines `aot_inference(config, devices) -> AotInference` instead, a jitted
function of (params, batch) with no optimizer, compiled with explicit in/out shardings on the slice's mesh and
reported alike (INFERENCE_JOBS): `lrp4rag` (LRP4RAG's relevance step: the AttnLRP matrix and the baselines'
signals of one padded batch of answers, `lwjax.projects.lrp4rag.job.aot_inference`; the shape from
`--config.model_preset`, then neither the checkpoint nor RAGTruth need be on this machine, or from the config.json
of `model.pretrained`; the command of the paper's row is in experiments/lrp4rag.py). `serve`
(experiments/serve.py) compiles the serving engine's decode step and its prefill (or mixed) call instead, tensor
parallel over `--config.mesh.shape.tensor` chips: weights and KV capacity per chip, a roofline decode step
(`lwjax.launch.serving_compile`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

from absl import app, flags

from lwjax.config import ConfigError
from lwjax.launch import hlo_cost, host_command, tpu_types

# Per chip: dense bf16 FLOP/s and HBM bandwidth (bytes/s), from the Cloud TPU system-architecture pages.
CHIP_PEAKS = {"v4": (275e12, 1228e9), "v5e": (197e12, 819e9), "v5p": (459e12, 2765e9), "v6e": (918e12, 1640e9)}
# Per chip: ICI bandwidth out of the chip, one direction, all links (bytes/s). v5e 1,600 Gbps, v5p 4,800 Gbps, v6e
# 3,584 Gbps: the "Interchip Interconnect BW" of the Cloud TPU pages (half the bidirectional figure they also give:
# v5e 400 GB/s, v5p 1,200 GB/s). v4, not on its page: 6 links x 45 GB/s one way (How to Scale Your Model, "All
# about TPUs"). A collective on one mesh axis uses that axis's links only: its time here is optimistic.
CHIP_ICI_BANDWIDTH = {"v4": 270e9, "v5e": 200e9, "v5p": 600e9, "v6e": 448e9}
JOBS = ("lm_pretrain", "mamba_distill", "gamengen_diffusion", "genrm", "compute_matched")
INFERENCE_JOBS = ("lrp4rag",)
PROG = "compile"


@dataclasses.dataclass(frozen=True)
class AotStep:
  """What a job hands the compile command: its `Trainer` on the slice's mesh, the global batch as
  {field: (shape, dtype)} (sharded like the trainer's batches), the model FLOPs of one step, and the batch in
  words for the report."""
  trainer: Any
  batch: dict[str, tuple[tuple[int, ...], Any]]
  model_flops: float
  batch_text: str


@dataclasses.dataclass(frozen=True)
class AotInference:
  """What a job with no train step hands the compile command: `fn(params, batch)` (pure; jitted with the mesh's
  logical-axis rules installed, so the model's activation constraints resolve), its abstract parameters placed by
  their logical axes on `mesh` (`abstract_params`), the global batch as {field: (shape, dtype)} (rows over the
  data-parallel axes, as the train step's), the model FLOPs of one call, the batch in words, the config key of the
  batch's rows, and what to change when the step does not fit."""
  fn: Callable[[Any, dict], Any]
  params: Any
  mesh: Any
  rules: tuple
  batch: dict[str, tuple[tuple[int, ...], Any]]
  model_flops: float
  batch_text: str
  rows_field: str
  fit_hint: str


def abstract_params(model_fn, mesh, rules) -> tuple[Any, Any]:
  """(graphdef, parameters as `ShapeDtypeStruct`s sharded by their logical axes under `rules` on `mesh`) of
  `model_fn(rngs)`, built as the Trainer builds its state: shapes only, no weight is made."""
  import jax
  from flax import nnx

  from lwjax.training import sharding
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
  params = nnx.to_pure_dict(state)  # the abstract model's arrays: shapes and dtypes, traced once
  shardings = sharding.param_shardings(params, sharding.logical_axes(state), mesh, rules)
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


def token_batch(batch: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The abstract batch of a token-sequence trainer (`lwjax.data.pipeline.BATCH_FIELDS`)."""
  import jax.numpy as jnp

  from lwjax.data.pipeline import BATCH_FIELDS
  return {name: ((batch, seq_len), jnp.float32 if name == "loss_mask" else jnp.int32) for name in BATCH_FIELDS}


def _lm_step(config, devices) -> AotStep:
  from lwjax.models.gpt import GPT, GPTConfig
  from lwjax.training import losses, mesh as mesh_lib, trainer as trainer_lib
  model_cfg = GPTConfig.from_dict(config.model)
  seq_len, batch = config.data.seq_len, config.train.global_batch_size
  mesh = mesh_lib.make_mesh(config.mesh.shape, devices)
  trainer = trainer_lib.Trainer(config, "/tmp/lwjax-compile-unused", model_fn=lambda rngs: GPT(model_cfg, rngs=rngs),
                                loss_fn=losses.lm_loss, flops_per_token=model_cfg.flops_per_token(seq_len),
                                seq_len=seq_len, mesh=mesh)
  return AotStep(trainer, token_batch(batch, seq_len), model_cfg.flops_per_token(seq_len) * batch * seq_len,
                 f"{batch} x {seq_len} tokens")


def compile_step(config, slice_: tpu_types.TpuSlice) -> dict:
  """The report of `config`'s step for `slice_`: an inference job's step (INFERENCE_JOBS), else the train step."""
  if config.job in INFERENCE_JOBS:
    return compile_inference_step(config, slice_)
  return compile_train_step(config, slice_)


def _devices(config, slice_: tpu_types.TpuSlice, jobs: tuple[str, ...]) -> tuple:
  """The slice's devices for lowering, once `config.job` is one of `jobs`."""
  from lwjax.launch import aot
  if config.job not in jobs:
    known = JOBS + INFERENCE_JOBS
    why = "has no train step to compile (compile_step)" if config.job in known else "has no compile report yet"
    raise ConfigError("job", f"{config.job!r} {why}", ", ".join(known))
  return aot.tpu_devices(f"{slice_.generation.name}:{slice_.topology}")


def compile_train_step(config, slice_: tpu_types.TpuSlice) -> dict:
  """Compiles `config`'s train step for `slice_`; returns the report (bytes, FLOPs, seconds per step)."""
  import jax

  from lwjax import kernels
  devices = _devices(config, slice_, JOBS)
  if config.job == "lm_pretrain":
    step = _lm_step(config, devices)
  else:  # a job module's own step (the job registry imports it lazily)
    from lwjax import jobs
    step = importlib.import_module(jobs.JOBS[config.job]).aot_step(config, devices)
  trainer = step.trainer
  abstract_batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
                    for name, (shape, dtype) in step.batch.items()}
  with kernels.target_platform("tpu"):  # "auto" kernels as on the TPU (the Pallas flash attention), not the host's
    lowered = trainer.jitted_train_step.lower(trainer.abstract_state, abstract_batch, trainer.base,
                                              trainer.reference)
  model_params = trainer.abstract_state["params"] if trainer.base is None else trainer.base  # LoRA: the base's
  num_params = int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(model_params)))
  base = {"slice": slice_.describe(), "mesh": dict(trainer.mesh.shape), "parameters": num_params,
          "global_batch": config.train.global_batch_size, "batch": step.batch_text,
          "grad_accum_steps": config.train.grad_accum_steps}
  return compiled_report(lowered, base, step.model_flops, slice_)


def compile_inference_step(config, slice_: tpu_types.TpuSlice) -> dict:
  """Compiles an inference job's step (`aot_inference` of its module) for `slice_`: params in their logical
  shardings, the batch's rows over the data-parallel axes, outputs likewise; returns the report of
  `compile_train_step`'s form, `step` "inference"."""
  import jax

  from lwjax import jobs, kernels
  from lwjax.models.logical import axis_rules
  from lwjax.training import sharding
  devices = _devices(config, slice_, INFERENCE_JOBS)
  step = importlib.import_module(jobs.JOBS[config.job]).aot_inference(config, devices)
  rows = next(iter(step.batch.values()))[0][0]
  rows_axes = sharding.batch_sharding(step.mesh, step.rules).spec[0]
  rows_axes = (rows_axes,) if isinstance(rows_axes, str) else tuple(rows_axes or ())
  split = math.prod(step.mesh.shape[axis] for axis in rows_axes)
  if rows % split:
    raise ConfigError(step.rows_field, f"{rows} rows do not split over the batch's mesh axes "
                      f"{' x '.join(rows_axes)} ({split} ways)",
                      f"a multiple of {split}, or fewer devices on {'/'.join(rows_axes)} (mesh.shape)")

  def rows_sharding(ndim: int):  # [rows, ...] over the data-parallel axes
    return sharding.batch_sharding(step.mesh, step.rules, ndim)
  abstract_batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=rows_sharding(len(shape)))
                    for name, (shape, dtype) in step.batch.items()}

  def run(params, batch):
    with axis_rules(step.mesh, step.rules):
      return step.fn(params, batch)
  replicated = jax.sharding.NamedSharding(step.mesh, jax.sharding.PartitionSpec())
  # Every trace under the TPU's kernels ("auto": the Pallas flash attention, not the host's): a trace is cached
  # whatever the platform, and the outputs' shapes come from one.
  with kernels.target_platform("tpu"):
    out_shardings = jax.tree.map(lambda out: rows_sharding(out.ndim) if out.ndim and out.shape[0] == rows
                                 else replicated, jax.eval_shape(run, step.params, abstract_batch))
    fn = jax.jit(run, in_shardings=(jax.tree.map(lambda a: a.sharding, step.params),
                                    {k: v.sharding for k, v in abstract_batch.items()}), out_shardings=out_shardings)
    lowered = fn.lower(step.params, abstract_batch)
  base = {"slice": slice_.describe(), "mesh": dict(step.mesh.shape), "step": "inference",
          "parameters": int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(step.params))),
          "global_batch": rows, "batch": step.batch_text, "fit_hint": step.fit_hint}
  return compiled_report(lowered, base, step.model_flops, slice_)


def compiled_report(lowered, base: dict, model_flops: float, slice_: tpu_types.TpuSlice) -> dict:
  """`base` with what compiling `lowered` for `slice_` tells: bytes per chip and whether they fit, the loop-aware
  FLOPs and bytes (`hlo_cost`), the roofline against `model_flops`; or, when XLA refuses the program over HBM,
  the temporaries it asked for."""
  import jax
  hbm = slice_.generation.hbm_gib * 2**30
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA refuses a program over HBM: that is the answer, not a crash
    needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    temporaries = float(needed.group(1)) * 1024 ** " KMGT".index(needed.group(2)) if needed else None
    return {**base, "bytes_per_chip": {"temporaries": temporaries, "hbm": hbm}, "fits": False,
            "flops_per_chip": None, "hbm_bytes_per_chip": None, "roofline_step_s": None, "bound": None,
            "roofline_mfu": None, "error": str(e).splitlines()[0]}
  memory = compiled.memory_analysis()
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  cost = hlo_cost.analyze(compiled.as_text())
  peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes \
      - memory.alias_size_in_bytes
  return {
      **base,
      "bytes_per_chip": {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                         "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                         "peak": peak, "hbm": hbm},
      "fits": peak <= hbm, "flops_per_chip": cost.flops, "hbm_bytes_per_chip": cost.hbm_bytes,
      "ici_bytes_per_chip": cost.total("ici_bytes"), "flops_lower_bound": cost.lower_bound,
      "xla_counted_once": {"flops": float(xla.get("flops", 0.0)), "bytes": float(xla.get("bytes accessed", 0.0))},
      "model_flops_per_chip": model_flops / slice_.chips, "hlo_cost": cost.to_dict(),
      **roofline(cost, model_flops, slice_),
  }


def roofline(cost: hlo_cost.HloCost, model_flops: float, slice_: tpu_types.TpuSlice) -> dict:
  """Step time per term and in all, collectives overlapped (a lower bound) or not (an upper bound), the term that
  binds, and the MFU at each step time."""
  peak_flops, bandwidth = CHIP_PEAKS[slice_.generation.name]
  terms = {"compute": cost.flops / peak_flops, "memory": cost.hbm_bytes / bandwidth,
           "collectives": cost.total("ici_bytes") / CHIP_ICI_BANDWIDTH[slice_.generation.name]}
  overlapped, serial = max(terms.values()), max(terms["compute"], terms["memory"]) + terms["collectives"]

  def mfu(step_s):
    return model_flops / (slice_.chips * peak_flops * step_s) if step_s else None
  return {"step_s_by_term": terms, "roofline_step_s": overlapped, "roofline_step_no_overlap_s": serial,
          "bound": max(terms, key=terms.get), "roofline_mfu": mfu(overlapped), "roofline_mfu_no_overlap": mfu(serial)}


def format_report(r: dict) -> str:
  gib = 2**30
  b = r["bytes_per_chip"]
  batch = (f"inference step (no optimizer), batch {r['batch']}" if r.get("step") == "inference" else
           f"batch {r['batch']} in {r['grad_accum_steps']} micro-batches")
  head = [r["slice"], f"mesh {r['mesh']}; {r['parameters']:,} parameters; {batch}"]
  if r.get("error"):
    need = f"{b['temporaries'] / gib:.1f} GiB of temporaries" if b["temporaries"] else "more than HBM"
    hint = r.get("fit_hint") or "more micro-batches: --config.train.grad_accum_steps, model.remat, or a larger slice"
    return "\n".join(head + [f"per chip: DOES NOT FIT: XLA needs {need}, the chip has {b['hbm'] / gib:.0f} GiB HBM "
                              f"({hint})"])
  t = r["step_s_by_term"]
  mfu = " to ".join(f"{m:.1%}" if m is not None else "n/a" for m in (r["roofline_mfu_no_overlap"], r["roofline_mfu"]))
  return "\n".join(head + [
      f"per chip: arguments {b['arguments'] / gib:.2f} GiB, outputs {b['outputs'] / gib:.2f} GiB, temporaries "
      f"{b['temporaries'] / gib:.2f} GiB, peak {b['peak'] / gib:.2f} of {b['hbm'] / gib:.0f} GiB HBM: "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
      f"per chip and step, every loop counted: {hlo_cost.quantity(r['flops_per_chip'], 'FLOP')}"
      + (" (a lower bound: a loop's trip count is unknown)" if r["flops_lower_bound"] else "")
      + f" (the model's {hlo_cost.quantity(r['model_flops_per_chip'], 'FLOP')}; XLA's, each loop body once, "
      f"{hlo_cost.quantity(r['xla_counted_once']['flops'], 'FLOP')}), "
      f"{hlo_cost.quantity(r['hbm_bytes_per_chip'], 'B')} HBM, {hlo_cost.quantity(r['ici_bytes_per_chip'], 'B')} ICI",
      hlo_cost.format_table(r["hlo_cost"]),
      f"roofline: compute {t['compute'] * 1e3:.3g} ms, HBM {t['memory'] * 1e3:.3g} ms, collectives "
      f"{t['collectives'] * 1e3:.3g} ms; step {r['roofline_step_s'] * 1e3:.3g} ms (collectives overlapped, "
      f"{r['bound']}-bound) to {r['roofline_step_no_overlap_s'] * 1e3:.3g} ms (not overlapped), MFU {mfu}",
  ])


def main(overrides) -> None:
  f = flags.FLAGS

  try:
    host_command.required(config=f.config, tpu=f.tpu)
    slice_ = tpu_types.parse(f.tpu, f.topology)
    config, _ = host_command.load_config(f.config, overrides)
    if config.job == "serve":  # an engine covers `tensor` chips, its replicas the rest: no mesh over every chip
      from lwjax.launch import serving_compile
      report = serving_compile.compile_serving_step(config, slice_)
      text = serving_compile.format_report(report)
    else:
      host_command.check_mesh(config, slice_)
      report = compile_step(config, slice_)
      text = format_report(report)
  except ConfigError as e:
    host_command.fail(e, PROG)
  print(text)
  if f.json_out:
    with open(f.json_out, "w") as out:
      json.dump(report, out, indent=2)


if __name__ == "__main__":
  flags.DEFINE_string("config", None, "Experiment config: experiments/<x>.py[:k=v,...], --config.a.b=v overrides.")
  flags.DEFINE_string("tpu", None, "Cloud TPU type (v5p-256, v5litepod-16, ...) or a generation with --topology.")
  flags.DEFINE_string("topology", "", "Slice topology such as 4x4x8; default: the standard one of --tpu.")
  flags.DEFINE_string("json_out", "", "Also write the report as JSON here.")
  app.run(main, flags_parser=host_command.flags_parser(PROG))
