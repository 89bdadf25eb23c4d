"""Compile a config's real train step for a TPU slice on this machine: does it fit, how fast could it be.

  python -m lwjax.launch.compile --config experiments/lm_pretrain.py:scale=paper,model=llama3_8b --tpu v5p-256
  python -m lwjax.launch.compile --config experiments/lm_pretrain.py:scale=smoke --tpu v5e --topology 2x2 \\
      --config.mesh.shape.data=4 --config.mesh.shape.fsdp=1

The step is the one `main.py` runs (`Trainer.jitted_train_step`: its mesh, logical-axis shardings, donation),
lowered against the devices of the slice's topology (`jax.experimental.topologies`, libtpu from `jax[tpu]`, no
TPU needed) and compiled by XLA's TPU compiler. Printed: per-chip memory (arguments, outputs, temporaries, the
peak) against the chip's HBM, XLA's FLOP and byte counts per chip (its count of the micro-batch loop's body
times grad_accum_steps), a roofline step time (the larger of FLOPs - XLA's, or the model's where XLA counts
fewer - over peak bf16 FLOP/s and bytes over HBM bandwidth) and the MFU that step time would give (model FLOPs: 6 N
per token for a GPT, its teacher GPT's for a hybrid, three forward passes for the GameNGen UNet). Jobs:
`lm_pretrain` (the GPT's step), and those whose job module defines `aot_step(config, devices) -> AotStep`:
`mamba_distill` (the hybrid's first distillation stage, KL + CE to the teacher, whose shape is read from its
checkpoint or named by `--config.teacher.preset`) and `gamengen_diffusion` (the denoiser's step on latent
windows; the latent grid from the autoencoder's checkpoint, else from `autoencoder.geometry`), `genrm` (the
verifier's finetune, its shape from `--config.base_preset` or the config of `base`) and `compute_matched` (the
setup's finetune, its shape from `--config.models.finetuned_preset` or the finetuned model's config). `serve`
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
from typing import Any

from absl import app, flags

from lwjax.config import ConfigError
from lwjax.launch import host_command, tpu_types

# Per chip: dense bf16 FLOP/s and HBM bandwidth (bytes/s), from the Cloud TPU system-architecture pages.
CHIP_PEAKS = {"v4": (275e12, 1228e9), "v5e": (197e12, 819e9), "v5p": (459e12, 2765e9), "v6e": (918e12, 1640e9)}
JOBS = ("lm_pretrain", "mamba_distill", "gamengen_diffusion", "genrm", "compute_matched")
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


def compile_train_step(config, slice_: tpu_types.TpuSlice) -> dict:
  """Compiles `config`'s train step for `slice_`; returns the report (bytes, FLOPs, seconds per step)."""
  import jax

  from lwjax import kernels
  from lwjax.launch import aot
  if config.job not in JOBS:
    raise ConfigError("job", f"{config.job!r} has no compile report yet", ", ".join(JOBS))
  devices = aot.tpu_devices(f"{slice_.generation.name}:{slice_.topology}")
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
  peak_flops, bandwidth = CHIP_PEAKS[slice_.generation.name]
  model_params = trainer.abstract_state["params"] if trainer.base is None else trainer.base  # LoRA: the base's
  num_params = int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(model_params)))
  hbm = slice_.generation.hbm_gib * 2**30
  base = {"slice": slice_.describe(), "mesh": dict(trainer.mesh.shape), "parameters": num_params,
          "global_batch": config.train.global_batch_size, "batch": step.batch_text,
          "grad_accum_steps": config.train.grad_accum_steps}
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA refuses a program over HBM: that is the answer, not a crash
    needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    temporaries = float(needed.group(1)) * 1024 ** " KMGT".index(needed.group(2)) if needed else None
    return {**base, "bytes_per_chip": {"temporaries": temporaries, "hbm": hbm}, "fits": False,
            "xla_flops_per_chip": None, "xla_bytes_per_chip": None, "roofline_step_s": None, "bound": None,
            "roofline_mfu": None, "error": str(e).splitlines()[0]}
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  raw_flops, raw_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  # XLA counts a loop body once: the micro-batch scan runs grad_accum_steps times (the optimizer update outside
  # it is over-counted by the same factor, a small part of a large model's step).
  accum = config.train.grad_accum_steps
  flops, accessed = raw_flops * accum, raw_bytes * accum
  # Loops XLA makes itself (collective matmuls over a large FSDP axis) are counted once too: the compute term
  # is at least the model's FLOPs at peak, so the roofline never promises more than 100% MFU.
  compute_flops = max(flops, step.model_flops / slice_.chips)
  step_s = max(compute_flops / peak_flops, accessed / bandwidth)
  model_flops = step.model_flops
  peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes \
      - memory.alias_size_in_bytes
  return {
      **base,
      "bytes_per_chip": {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                         "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                         "peak": peak, "hbm": hbm},
      "fits": peak <= hbm, "xla_flops_per_chip": flops, "xla_bytes_per_chip": accessed,
      "xla_counted_once": {"flops": raw_flops, "bytes": raw_bytes},
      "model_flops_per_chip": step.model_flops / slice_.chips,
      "roofline_step_s": step_s, "bound": "compute" if compute_flops / peak_flops >= accessed / bandwidth else "memory",
      "roofline_mfu": model_flops / (slice_.chips * peak_flops * step_s) if step_s else None,
  }


def format_report(r: dict) -> str:
  gib = 2**30
  b = r["bytes_per_chip"]
  head = [r["slice"], f"mesh {r['mesh']}; {r['parameters']:,} parameters; batch {r['batch']} in "
                      f"{r['grad_accum_steps']} micro-batches"]
  if r.get("error"):
    need = f"{b['temporaries'] / gib:.1f} GiB of temporaries" if b["temporaries"] else "more than HBM"
    return "\n".join(head + [f"per chip: DOES NOT FIT: XLA needs {need}, the chip has {b['hbm'] / gib:.0f} GiB HBM "
                              "(more micro-batches: --config.train.grad_accum_steps, model.remat, or a larger slice)"])
  mfu = f"{r['roofline_mfu']:.1%}" if r["roofline_mfu"] is not None else "n/a"
  return "\n".join(head + [
      f"per chip: arguments {b['arguments'] / gib:.2f} GiB, outputs {b['outputs'] / gib:.2f} GiB, temporaries "
      f"{b['temporaries'] / gib:.2f} GiB, peak {b['peak'] / gib:.2f} of {b['hbm'] / gib:.0f} GiB HBM: "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
      f"XLA per chip and step: {r['xla_flops_per_chip'] / 1e12:.2f} TFLOP (the model's: "
      f"{r['model_flops_per_chip'] / 1e12:.2f}), {r['xla_bytes_per_chip'] / 1e9:.2f} GB accessed; "
      f"roofline step {r['roofline_step_s'] * 1e3:.1f} ms ({r['bound']}-bound), MFU at that step {mfu}",
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
      report = compile_train_step(config, slice_)
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
