"""lwjax entry point: `python main.py --config experiments/<x>.py[:k=v,...] --workdir DIR`.

Overrides: `--config.train.steps=100`. The config names the job it runs (`config.job`); the config is
validated before anything heavy starts, and a bad key or value exits with status 2 and one line.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lwjax import jobs
from lwjax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (also: config.distributed.initialize).")


def _config_error(message: str):
  print(f"config error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or ml_collections' AttributeError/KeyError for an unknown key
    _config_error(_describe_flag_error(argv, e))


def _describe_flag_error(argv, error: Exception) -> str:
  """One line for a bad flag; an unknown `--config.a.b` override is named with ml_collections' hint."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(error, (AttributeError, KeyError)):
    hint = next((line.strip("'\"") for line in lines if "Did you mean" in line), "")
    for arg in argv[1:]:
      key = arg.lstrip("-").split("=")[0]
      if key.startswith("config.") and any(f"'{part}'" in text for part in key.split(".")[1:]):
        return f"{key[len('config.'):]}: unknown key" + (f" ({hint})" if hint else "")
  if any(line.startswith("Traceback") for line in lines):  # raised inside the config file: first + last line
    lines = [lines[0].split("Traceback")[0], lines[-1]]
  return " ".join(lines)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax's save machinery; its warnings and errors pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


RUN_RECORD = "lwjax_run.json"  # not config.json: that name marks a Hugging Face checkpoint directory


def _record_run(workdir: str, config) -> None:
  """`<workdir>/lwjax_run.json`: the command line and the whole resolved config (seeds included) of this run,
  beside its metrics, so a result can be traced to what made it. Rewritten by each run (a resumed run's is the
  last)."""
  import json
  import os
  import sys
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RUN_RECORD)
  with open(path + ".tmp", "w") as f:
    json.dump({"argv": sys.argv, "config": json.loads(config.to_json_best_effort())}, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv):
  if len(argv) > 1:
    _config_error(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    _config_error("--config and --workdir are required (valid: --config experiments/<x>.py --workdir DIR)")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = _CONFIG.value
    job = jobs.get(config)
  except ConfigError as e:
    _config_error(str(e))
  except OSError as e:  # ml_collections reports a config file that failed to load on first use
    missing = [line.strip() for line in str(e).splitlines() if "No such file" in line]
    _config_error(f"config: {missing[0] if missing else str(e).splitlines()[0]} "
                  "(valid: an existing file, experiments/<x>.py[:k=v,...])")
  import jax

  from lwjax.launch import distributed
  from lwjax.training import mesh
  if _DISTRIBUTED.value or ("distributed" in config and config.distributed.initialize):
    distributed.initialize(config.distributed if "distributed" in config else None)
  distributed.log_topology()
  logging.info("job %s, workdir %s", config.job, _WORKDIR.value)
  if jax.process_index() == 0:
    _record_run(_WORKDIR.value, config)
  try:
    if "mesh" in config and getattr(job, "MESH_COVERS_ALL_DEVICES", True):
      mesh.resolve_shape(config.mesh.shape, jax.device_count())
    job.run(config, _WORKDIR.value)
  except ConfigError as e:  # faults only visible once devices or data are known
    _config_error(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
