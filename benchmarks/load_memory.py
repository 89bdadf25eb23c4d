"""Peak host memory while loading a Hugging Face checkpoint tensor by tensor (`lwjax.models.hf_checkpoint.load`).

Writes a random checkpoint of a preset's shape (default `gpt_1b`, the Llama-3.2-1B shape, bfloat16) as
`save_pretrained` lays it out (2 GB shards with an index), one tensor at a time, then loads it in a fresh process
and reports that process's peak resident memory against the budget: the model's bytes, plus twice its largest
tensor (the tensor as read and its transposed copy), plus 1 GiB (Python, jax and XLA):

    python -m benchmarks.load_memory --dir runs/load_memory [--preset gpt_1b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np

from lwjax.models import hf_checkpoint, hf_families
from lwjax.models.presets import PRESETS

SHARD_BYTES = 2 * 2**30
GIB = 2**30


def write_checkpoint(path: str, preset: str, dtype: str) -> dict:
  """Random weights of `preset` in `dtype`, written shard by shard; returns the sizes the budget needs."""
  cfg = dataclasses.replace(PRESETS[preset], param_dtype=dtype)
  hf_checkpoint.save_random(cfg, path, max_shard_bytes=SHARD_BYTES)
  itemsize = jnp.dtype(dtype).itemsize
  sizes = [int(np.prod(t.hf_shape)) * itemsize for t in hf_families.tensor_layout(cfg).values()]
  return {"model_bytes": sum(sizes), "largest_tensor_bytes": max(sizes)}


def _peak_rss_bytes() -> int:
  """This process's peak resident set: VmHWM (ru_maxrss would carry the forking parent's peak over)."""
  with open("/proc/self/status") as fh:
    for line in fh:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_and_report(path: str) -> None:
  """In the child: load, then print the peak resident set as JSON."""
  start = time.perf_counter()
  before = _peak_rss_bytes()
  model = hf_checkpoint.load(path)
  seconds = time.perf_counter() - start
  peak = _peak_rss_bytes()
  print(json.dumps({"peak_rss_bytes": peak, "rss_before_load_bytes": before, "load_seconds": round(seconds, 1),
                    "n_layers": model.cfg.n_layers}))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default="runs/load_memory")
  parser.add_argument("--preset", default="gpt_1b", choices=sorted(PRESETS))
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _load_and_report(args.dir)
    return 0
  sizes_file = os.path.join(args.dir, "sizes.json")
  if not os.path.exists(sizes_file):
    sizes = write_checkpoint(args.dir, args.preset, args.dtype)
    with open(sizes_file, "w") as fh:
      json.dump(sizes, fh)
  with open(sizes_file) as fh:
    sizes = json.load(fh)
  child = subprocess.run([sys.executable, "-m", "benchmarks.load_memory", "--child", "--dir", args.dir],
                         check=True, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  result = {**sizes, **json.loads(child.stdout.strip().splitlines()[-1])}
  result["budget_bytes"] = sizes["model_bytes"] + 2 * sizes["largest_tensor_bytes"] + GIB
  result["within_budget"] = result["peak_rss_bytes"] <= result["budget_bytes"]
  for key in ("model_bytes", "largest_tensor_bytes", "rss_before_load_bytes", "peak_rss_bytes", "budget_bytes"):
    result[key.replace("_bytes", "_gib")] = round(result.pop(key) / GIB, 2)
  print(json.dumps(result, indent=1))
  return 0 if result["within_budget"] else 1


if __name__ == "__main__":
  sys.exit(main())
