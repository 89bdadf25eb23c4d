"""MaxText's own AOT train-step compile for a TPU slice, reported: run inside MaxText's venv (Python >= 3.12) by
benchmarks/maxtext_compare.py; lwjax never imports it.

  <maxtext venv>/bin/python benchmarks/maxtext_aot_report.py OUT_DIR <maxtext>/configs/base.yml \\
      compile_topology=v5p-8 compile_topology_num_slices=1 model_name=llama2-7b per_device_batch_size=4 ...

Runs `maxtext.trainers.pre_train.train_compile.main` unchanged, with its `jit_and_compile`, `validate_config` and
`get_topology_mesh` wrapped to keep the compiled step, the config and the mesh. Writes OUT_DIR/report.json (the
compiled step's memory analysis, XLA's cost analysis, the seconds of lowering + compiling and of the whole run, the
config's shape, the mesh, the versions) and OUT_DIR/train_step.hlo (the optimized HLO text, for the loop-aware
account of `lwjax.launch.hlo_cost`, which the caller applies).
"""

import json
import os
import sys
import time

_CONFIG_KEYS = ("model_name", "num_decoder_layers", "emb_dim", "mlp_dim", "num_query_heads", "num_kv_heads",
                "head_dim", "vocab_size", "max_target_length", "global_batch_size_to_train_on",
                "gradient_accumulation_steps", "per_device_batch_size", "dtype", "weight_dtype", "scan_layers",
                "remat_policy", "attention", "opt_type", "compile_topology")


def main(out_dir: str, argv: list[str]) -> None:
  # As lwjax.launch.aot: no GCE metadata query for an absent TPU VM, and no libtpu lock file refusing a second
  # process (this host compiles other TPU programs at the same time).
  for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(name, value)
  import importlib.util
  from importlib import metadata
  # This venv's libtpu, the one its jax is paired with: a TPU_LIBRARY_PATH inherited from a process that imported
  # another jax (lwjax's sets it to its own, older libtpu) would win, and that libtpu refuses this jax's Pallas
  # kernels ("no such field: 'debug_locations'").
  os.environ["TPU_LIBRARY_PATH"] = os.path.join(importlib.util.find_spec("libtpu").submodule_search_locations[0],
                                                "libtpu.so")

  from maxtext.trainers.pre_train import train_compile
  kept = {}

  def wrap(name):
    inner = getattr(train_compile, name)

    def wrapped(*args, **kwargs):
      start = time.perf_counter()
      result = inner(*args, **kwargs)
      kept[name] = (args, result, time.perf_counter() - start)
      return result
    setattr(train_compile, name, wrapped)
  for name in ("jit_and_compile", "validate_config", "get_topology_mesh"):
    wrap(name)
  start = time.perf_counter()
  train_compile.main(["train_compile", *argv])
  run_seconds = time.perf_counter() - start

  _, compiled, compile_seconds = kept["jit_and_compile"]
  config = kept["validate_config"][0][0]
  mesh = kept["get_topology_mesh"][1]
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  with open(os.path.join(out_dir, "train_step.hlo"), "w") as f:
    f.write(hlo)
  report = {
      "versions": {package: metadata.version(package) for package in ("maxtext", "jax", "jaxlib", "libtpu", "flax")},
      "python": sys.version.split()[0],
      "argv": argv,
      "config": {key: getattr(config, key, None) for key in _CONFIG_KEYS},
      "mesh": {axis: int(size) for axis, size in mesh.shape.items() if size > 1},
      "chips": int(mesh.devices.size),
      "bytes_per_chip": {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                         "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                         "peak": memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes},
      "xla_counted_once": {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))},
      "lower_and_compile_s": compile_seconds,
      "train_compile_s": run_seconds,
  }
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
  # Not this directory on the path: lwjax's benchmarks/kernels.py would shadow the `kernels` package MaxText's
  # dependencies import.
  sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
  main(sys.argv[1], sys.argv[2:])
