"""The serving engine's step compiled for a TPU slice on this machine: weights per chip, KV capacity, a roofline.

  python -m lwjax.launch.compile --config experiments/serve.py:scale=paper,model=llama2_70b --tpu v5p-16 \\
      --config.mesh.shape.tensor=8 --config.model.param_dtype=bfloat16

The programs are the engine's own (`lwjax.serving.engine.compiled_step`, `compiled_mixed`: NanoFlow, arXiv
2408.12757, §4), jitted with the shardings `Engine(model, mesh=, rules=)` gives them (weights by their logical axes,
the paged KV pool over kv heads, the rest replicated: `lwjax.serving.tensor_parallel`), lowered for the first
`tensor` chips of the slice (one engine; `mesh.shape.data` replicas run the same program on the others) from an
abstract model: no weight is built, so a 70B shape compiles on a CPU host. Each program at its largest shapes:
`decode`, every row of `engine.max_num_seqs` (padded as the engine pads them) one token, page tables as wide as
`engine.max_model_len`; and a saturated iteration's prefill chunks, in one call with the decodes (`mixed`) where
the engine mixes them (nano_batches=1), else their own call (`prefill`, the token budget in chunks of
`engine.prefill_chunk`).

Per program: XLA's memory (arguments, outputs, temporaries, peak of HBM), FLOPs and bytes per chip, and a
roofline step: the larger of FLOPs over peak bf16 FLOP/s and bytes over HBM bandwidth, each term at least the
model's own count (XLA counts no cost for the Pallas paged-attention kernel): every weight read once, and the
keys and values the rows attend to, as many as the pool holds (at most `max_model_len` per row). The KV pool's
largest page count is what HBM leaves after the step's peak without the pool (the temporaries do not depend on the
page count: the pool is donated and written in place).
"""

from __future__ import annotations

import dataclasses
import math
import re

from lwjax.config import ConfigError
from lwjax.launch import tpu_types

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted engine program with its abstract arguments (positional, statics included), the tokens it runs
  (rows x width), the rows it samples, and at most how many cached keys its rows read (each row its context once)
  and its tokens attend to (the model's count of the attention FLOPs)."""
  name: str
  fn: object
  args: tuple
  tokens: int
  sampled_rows: int
  keys_read: int
  keys_attended: int
  text: str


def engine_mesh(config, devices):
  """(the mesh of one engine: the first `tensor` chips, as `lwjax.serving.replicas` cuts the serving mesh along
  data; the number of replicas). ConfigError naming `mesh.shape` when the mesh is not data x tensor or asks for
  more chips than the slice has."""
  from lwjax.serving import replicas
  from lwjax.training import mesh as mesh_lib
  shape = config.mesh.shape.to_dict()
  replicas.check_mesh(shape)
  if shape["tensor"] == -1:
    raise ConfigError("mesh.shape.tensor", "-1: a serving engine's tensor degree is chosen, not filled",
                      "a size >= 1 (mesh.shape.data=-1 fills the slice with replicas)")
  if shape["data"] == -1:
    shape["data"] = max(1, len(devices) // shape["tensor"])
  chips = math.prod(shape.values())
  if chips > len(devices):
    raise ConfigError("mesh.shape", f"{shape} needs {chips} chips, the slice has {len(devices)}",
                      f"data x tensor <= {len(devices)}")
  mesh = mesh_lib.make_mesh(shape, devices[:chips])
  return replicas.replica_meshes(mesh)[0], shape["data"]


def engine_programs(cfg, engine, graphdef, state, shardings, device_sharding) -> list[Program]:
  """The engine's programs at their largest shapes, with arguments laid out as `Engine._group_inputs` makes them."""
  import jax
  import jax.numpy as jnp

  from lwjax.serving import engine as engine_lib
  nano = engine["nano_batches"]
  max_model_len = engine["max_model_len"] or cfg.max_seq_len
  page_size, num_pages = engine["page_size"], engine["num_pages"]
  table_pages = -(-max_model_len // page_size)
  max_rows = engine_lib.padded_rows(engine["max_num_seqs"], engine["max_num_seqs"], nano)
  rest = device_sharding if shardings is None else shardings.replicated
  pool_sharding = device_sharding if shardings is None else shardings.kv_pool
  param_shardings = jax.tree.leaves(shardings.params) if shardings is not None else None

  def sds(shape, dtype, sharding=rest):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  leaves, treedef = jax.tree.flatten(state)
  params = jax.tree.unflatten(treedef, [sds(leaf.shape, leaf.dtype, param_shardings[i] if param_shardings else rest)
                                        for i, leaf in enumerate(leaves)])
  pool_shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
  kv_dtype = jnp.dtype(cfg.dtype)
  pools = tuple(sds(pool_shape, kv_dtype, pool_sharding) for _ in range(cfg.n_layers))
  previous_tokens = sds((2 * max_rows,), jnp.int32)
  pool_tokens = num_pages * page_size

  def group(rows, width, pages):  # tokens, sources, slot pages, slot offsets, page table, lengths, sampling, rows
    ints = [sds((rows, width), jnp.int32) for _ in range(4)]
    sampling = (sds((rows,), jnp.float32), sds((rows,), jnp.int32), sds((rows,), jnp.float32),
                sds((rows,), jnp.uint32), sds((rows,), jnp.int32))
    return (*ints, sds((rows, pages), jnp.int32), sds((rows,), jnp.int32), sampling, sds((rows,), jnp.int32))

  def keys(rows, width, sharing=None):  # (read, attended): a row's context is at most max_model_len, and its
    per_row = min(max_model_len, pool_tokens // (sharing or rows))  # share of the pool among the `sharing` rows
    return rows * per_row, rows * width * per_row

  step = engine_lib.compiled_step(graphdef, shardings)

  def run_args(rows, width):
    tokens, source, slot_pages, slot_offsets, table, lengths, sampling, sample_rows = group(rows, width, table_pages)
    return (params, tokens, pools, pools, slot_pages, slot_offsets, table, lengths, previous_tokens, source,
            sampling, sample_rows, nano, None, None, 0, None, None)

  programs = [Program("decode", step, run_args(max_rows, 1), max_rows, max_rows, *keys(max_rows, 1),
                      f"{max_rows} rows x 1 token, page tables of {table_pages} pages")]
  chunk = engine["prefill_chunk"]
  mixed = engine["mixed_batches"] and nano == 1
  budget = engine["max_batch_tokens"] - (engine["max_num_seqs"] if mixed else 0)
  chunk_rows = engine_lib.padded_rows(max(1, budget // chunk), engine["max_num_seqs"], nano)
  if mixed:
    decodes = (*group(max_rows, 1, table_pages), None)
    chunks = (*group(chunk_rows, chunk, table_pages), None)
    fn = engine_lib.compiled_mixed(graphdef, shardings)
    (decode_read, decode_attended), (chunk_read, chunk_attended) = (keys(max_rows, 1, max_rows + chunk_rows),
                                                                keys(chunk_rows, chunk, max_rows + chunk_rows))
    programs.append(Program("mixed", fn, (params, pools, pools, previous_tokens, (decodes, chunks), 0),
                            max_rows + chunk_rows * chunk, max_rows + chunk_rows, decode_read + chunk_read,
                            decode_attended + chunk_attended,
                            f"{max_rows} decode rows + {chunk_rows} prefill chunks of {chunk} tokens, one call"))
  else:
    programs.append(Program("prefill", step, run_args(chunk_rows, chunk), chunk_rows * chunk, chunk_rows,
                            *keys(chunk_rows, chunk), f"{chunk_rows} prefill chunks of {chunk} tokens"))
  return programs


def _compile(program: Program):
  """(compiled, None) or (None, the temporaries XLA says it would need, the error's first line) when it refuses a
  program over HBM."""
  import jax

  from lwjax import kernels
  with kernels.target_platform("tpu"):  # the Pallas paged attention the TPU would run, not the host's
    lowered = program.fn.lower(*program.args)
  try:
    return lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    temporaries = float(needed.group(1)) * 1024 ** " KMGT".index(needed.group(2)) if needed else None
    return None, (temporaries, str(e).splitlines()[0])


def compile_serving_step(config, slice_: tpu_types.TpuSlice) -> dict:
  """Compiles the engine's programs that `config` (experiments/serve.py) would run for `slice_`; the report."""
  import jax
  from flax import nnx

  from lwjax.launch import aot
  from lwjax.launch.compile import CHIP_PEAKS
  from lwjax.models import pretrained
  from lwjax.models.gpt import GPT
  from lwjax.serving import tensor_parallel
  from lwjax.training import sharding

  cfg = pretrained.checked_model_config(config.model)
  rules = sharding.rules_from_config(config.mesh.rules)
  tensor_parallel.check_shapes(cfg, config.mesh.shape.to_dict(), rules)  # before anything is lowered
  devices = aot.tpu_devices(f"{slice_.generation.name}:{slice_.topology}")
  mesh, num_replicas = engine_mesh(config, devices)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  # One device: the engine runs without a mesh (serve's make_mesh gives None), the arrays on that device.
  shardings = tensor_parallel.EngineShardings.build(state, cfg.n_kv_heads, mesh, rules) if mesh.size > 1 else None
  device_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  engine = config.engine.to_dict()
  programs = engine_programs(cfg, engine, graphdef, state, shardings, device_sharding)

  def per_chip(sds) -> int:
    return math.prod(sds.sharding.shard_shape(sds.shape)) * sds.dtype.itemsize
  params, pools = programs[0].args[0], programs[0].args[2]
  weight_bytes = sum(per_chip(leaf) for leaf in jax.tree.leaves(params))
  pool_bytes = 2 * sum(per_chip(pool) for pool in pools)  # keys and values
  kv_token_bytes = pool_bytes // (engine["num_pages"] * engine["page_size"])
  peak_flops, bandwidth = CHIP_PEAKS[slice_.generation.name]
  hbm = slice_.generation.hbm_gib * GIB
  matmul_params = cfg.num_params(include_embedding=False)  # the embedding is a gather; the head is counted apart
  reports, fixed, pools_in_hbm = {}, [], []
  for program in programs:
    compiled, refused = _compile(program)
    model_flops = (2 * matmul_params * program.tokens + 2 * cfg.d_model * cfg.vocab_size * program.sampled_rows
                   + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * program.keys_attended) / mesh.size
    model_bytes = weight_bytes + program.keys_read * kv_token_bytes
    base = {"shapes": program.text, "tokens": program.tokens, "model_flops_per_chip": model_flops,
            "model_bytes_per_chip": model_bytes}
    if compiled is None:
      temporaries, error = refused
      reports[program.name] = {**base, "bytes_per_chip": {"temporaries": temporaries, "hbm": hbm}, "fits": False,
                               "error": error, "roofline_step_s": None}
      continue
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes \
        - memory.alias_size_in_bytes
    # The pools are the donated (aliased) arguments: XLA's aliased bytes are their size in HBM, tiling included.
    pools_in_hbm.append(memory.alias_size_in_bytes)
    fixed.append(peak - memory.alias_size_in_bytes)
    compute_s = max(flops, model_flops) / peak_flops
    memory_s = max(accessed, model_bytes) / bandwidth
    step_s = max(compute_s, memory_s)
    reports[program.name] = {
        **base,
        "bytes_per_chip": {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                           "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                           "peak": peak, "hbm": hbm},
        "fits": peak <= hbm, "xla_flops_per_chip": flops, "xla_bytes_per_chip": accessed,
        "roofline_step_s": step_s, "bound": "compute" if compute_s >= memory_s else "memory",
        "roofline_weights_only_s": max(weight_bytes / bandwidth, 2 * matmul_params * program.tokens
                                       / mesh.size / peak_flops),
        "tokens_per_s_per_engine": program.tokens / step_s,
    }
  max_pages = None
  if fixed:  # the pool may grow into what the largest compiled program leaves (`max_pages_from` names them)
    max_pages = max(0, (hbm - max(fixed)) * engine["num_pages"] // max(pools_in_hbm))
  return {
      "slice": slice_.describe(), "mesh": dict(mesh.shape), "replicas": num_replicas,
      "chips_used": mesh.size * num_replicas, "parameters": cfg.num_params(),
      "param_dtype": cfg.param_dtype, "kv_dtype": cfg.dtype,
      "engine": {k: engine[k] for k in ("num_pages", "page_size", "max_num_seqs", "max_batch_tokens",
                                         "prefill_chunk", "max_model_len", "nano_batches", "mixed_batches")},
      "weight_bytes_per_chip": weight_bytes,
      "kv_pool": {"num_pages": engine["num_pages"], "page_size": engine["page_size"],
                  "capacity_tokens": engine["num_pages"] * engine["page_size"], "bytes_per_chip": pool_bytes,
                  "bytes_in_hbm_per_chip": max(pools_in_hbm) if pools_in_hbm else None,
                  "max_pages_fitting": max_pages,
                  "max_pages_from": [name for name, p in reports.items() if not p.get("error")],
                  "max_capacity_tokens": None if max_pages is None else max_pages * engine["page_size"]},
      "programs": reports, "fits": all(r["fits"] for r in reports.values()),
  }


def format_report(r: dict) -> str:
  kv = r["kv_pool"]
  lines = [r["slice"],
           f"engine mesh {r['mesh']} x {r['replicas']} replica(s); {r['parameters']:,} parameters in "
           f"{r['param_dtype']}, KV in {r['kv_dtype']}",
           f"per chip: weights {r['weight_bytes_per_chip'] / GIB:.2f} GiB; KV pool {kv['num_pages']} pages x "
           f"{kv['page_size']} = {kv['capacity_tokens']:,} tokens, {kv['bytes_per_chip'] / GIB:.2f} GiB"
           + ("" if kv["max_pages_fitting"] is None else
              f"; HBM holds at most {kv['max_pages_fitting']:,} pages ({kv['max_capacity_tokens']:,} tokens) beside "
              f"the {' and '.join(kv['max_pages_from'])} step")]
  for name, p in r["programs"].items():
    b = p["bytes_per_chip"]
    if p.get("error"):
      if b["temporaries"]:
        lines.append(f"{name} ({p['shapes']}): DOES NOT FIT: XLA needs {b['temporaries'] / GIB:.1f} GiB of "
                     f"temporaries, the chip has {b['hbm'] / GIB:.0f} GiB")
      else:  # e.g. a kernel's blocks over the chip's scoped VMEM, not HBM
        lines.append(f"{name} ({p['shapes']}): XLA refuses it: {p['error']}")
      continue
    lines.append(
        f"{name} ({p['shapes']}): arguments {b['arguments'] / GIB:.2f} GiB, outputs {b['outputs'] / GIB:.2f}, "
        f"temporaries {b['temporaries'] / GIB:.2f}, peak {b['peak'] / GIB:.2f} of {b['hbm'] / GIB:.0f} GiB HBM: "
        + ("fits" if p["fits"] else "DOES NOT FIT"))
    lines.append(
        f"  XLA {p['xla_flops_per_chip'] / 1e12:.3f} TFLOP, {p['xla_bytes_per_chip'] / 1e9:.2f} GB per chip (the "
        f"model's: {p['model_flops_per_chip'] / 1e12:.3f} TFLOP, {p['model_bytes_per_chip'] / 1e9:.2f} GB); roofline "
        f"{p['roofline_step_s'] * 1e3:.2f} ms ({p['bound']}-bound; weights only "
        f"{p['roofline_weights_only_s'] * 1e3:.2f} ms), {p['tokens_per_s_per_engine']:,.0f} tokens/s per engine")
  return "\n".join(lines)
