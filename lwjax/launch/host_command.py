"""The `python main.py ...` command each host of a TPU slice runs, checked on the launching machine first.

Both launchers (`xm_launch`, `gke`) share it: the config is loaded exactly as main.py loads it (same file,
same `--config.a.b=v` overrides) and validated, its mesh is resolved against the slice's chip count, and the
multi-host settings main.py reads (`config.distributed.*`, or `--distributed` for configs without that
group) are filled in. A fault is a `ConfigError` whose text names the flag or key and what is allowed.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.launch.tpu_types import TpuSlice

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# JAX's own coordinator port on Cloud TPU (jax._src.clusters.cloud_tpu_cluster).
COORDINATOR_PORT = 8482
_DISTRIBUTED_KEYS = ("initialize", "coordinator_address", "num_processes", "process_id")


def flags_parser(prog: str):
  """An absl `flags_parser` that keeps `--config.a.b=v` overrides apart (main.py checks them) and returns them."""

  def parse(argv: list[str]) -> list[str]:
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    try:
      positional = flags.FLAGS([a for a in argv if a not in overrides])[1:]
    except flags.Error as e:
      fail(ConfigError("flags", str(e).splitlines()[0]), prog)
    if positional:
      fail(ConfigError("flags", f"unexpected arguments {positional}", "--flag=value, --config.a.b=value"), prog)
    return overrides

  return parse


def load_config(config_arg: str, overrides: list[str]):
  """(config, path for main.py): `experiments/x.py:k=v` loaded and overridden as main.py does, validated."""
  path, colon, arg = config_arg.partition(":")
  absolute = os.path.abspath(path)
  if not os.path.isfile(absolute):
    raise ConfigError("--config", f"no file {path}", "experiments/<x>.py[:k=v,...]")
  relative = os.path.relpath(absolute, ROOT)
  if relative.startswith(".."):
    raise ConfigError("--config", f"{path} is outside {ROOT}, so the image does not have it",
                      "a config file of this repository")
  if bad := [o for o in overrides if "=" not in o]:
    raise ConfigError(bad[0], "override without a value", "--config.a.b=value")
  argv = ["launcher", f"--config={absolute}{colon}{arg}", *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  try:
    flag_values(argv)
    config = holder.value
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no key of the config
    lines = [line.strip("'\" ") for line in str(e).replace("\\n", "\n").replace("\\'", "'").splitlines()]
    hint = next((line for line in lines if "Did you mean" in line), "")
    key = next((o.split("=")[0] for o in overrides if lines[0] in o.split("=")[0].split(".")), "--config")
    raise ConfigError(key, "unknown key" + (f" ({hint})" if hint else ""), "a key of the config") from None
  except flags.Error as e:  # a value of the wrong type, or get_config itself raised (last line: its error)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    flag, _, why = lines[0].removeprefix("flag ").partition(": ")
    if len(lines) > 1:
      flag, why = "--config", lines[-1]
    raise ConfigError(flag.split("=")[0], why, "see the config file's docstring") from None
  jobs.get(config)
  return config, f"{relative}{colon}{arg}"


def check_flags(workdir: str, tpu: TpuSlice, overrides: list[str]) -> None:
  """Faults visible before loading the config: a workdir the hosts cannot share, distributed keys set by hand."""
  if tpu.hosts == 1:
    return
  if not workdir.startswith("gs://"):
    raise ConfigError("--workdir", f"{workdir!r} is not shared by the {tpu.hosts} hosts of {tpu.accelerator_type}",
                      "a gs://bucket/path every host can write")
  for override in overrides:
    key = override.split("=")[0]
    if key.startswith("--config.distributed.") and key.rsplit(".", 1)[-1] in _DISTRIBUTED_KEYS:
      raise ConfigError(key, "is filled in by the launcher for each host",
                        "drop it; use --config.distributed.cpu_collectives only")


def check_mesh(config, tpu: TpuSlice) -> None:
  """The config's mesh must cover the slice's chips exactly (main.py checks the same on the pod)."""
  from lwjax.training import mesh  # imports jax: faults in the flags are reported without waiting for it

  if "mesh" in config:
    mesh.resolve_shape(config.mesh.shape, tpu.chips)


def main_args(config, config_path: str, overrides: list[str], workdir: str, hosts: int, coordinator: str,
              process_id: str) -> list[str]:
  """Arguments of `python main.py` on one host; `process_id` may be a placeholder the pod expands."""
  args = [f"--config={config_path}", f"--workdir={workdir}", *overrides]
  if hosts == 1:
    return args
  if "distributed" not in config:  # main.py then calls jax.distributed.initialize() with auto-detection
    return [*args, "--distributed"]
  return [*args, "--config.distributed.initialize=True",
          f"--config.distributed.coordinator_address={coordinator}:{COORDINATOR_PORT}",
          f"--config.distributed.num_processes={hosts}", f"--config.distributed.process_id={process_id}"]


def define_flags() -> None:
  """The flags both launchers take (called by each entry point, so that importing defines none)."""
  flags.DEFINE_string("config", None, "Experiment config: experiments/<x>.py[:k=v,...]; --config.a.b=v overrides "
                      "are checked here and passed on to main.py.")
  flags.DEFINE_string("workdir", None, "Run directory, gs://... for a multi-host slice.")
  flags.DEFINE_string("tpu", None, "Cloud TPU type: v5p-32, v5litepod-16 (or v5e-16), v6e-8, v4-8; or a "
                      "generation with --topology.")
  flags.DEFINE_string("topology", "", "Slice topology such as 2x2x4 or 4x4; default: the standard one of --tpu.")
  flags.DEFINE_string("name", "", "Name of the run's pods and DNS entries; default: the config file's name.")
  flags.DEFINE_string("node_pool", "", "Also select this GKE node pool (cloud.google.com/gke-nodepool).")
  flags.DEFINE_string("image", "", "Container image with this repository at its working directory and .[tpu] "
                      "installed.")


def required(**values: str) -> None:
  """ConfigError for the first flag that was not given."""
  for flag, value in values.items():
    if not value:
      raise ConfigError(f"--{flag}", "missing", "see --help")


def fail(error: ConfigError, prog: str) -> None:
  """Exits 2 with the one line, as main.py does for a config error."""
  print(f"{prog}: {error}", file=sys.stderr)
  sys.exit(2)
