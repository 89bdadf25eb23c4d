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
  except flags.Error as e:
    _config_error(str(e).splitlines()[0])


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax's save machinery; its warnings and errors pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    _config_error(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    _config_error("--config and --workdir are required (valid: --config experiments/<x>.py --workdir DIR)")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  try:
    job = jobs.get(config)
  except ConfigError as e:
    _config_error(str(e))
  from lwjax.launch import distributed
  if _DISTRIBUTED.value or config.distributed.initialize:
    distributed.initialize(config.distributed)
  distributed.log_topology()
  logging.info("job %s, workdir %s", config.job, _WORKDIR.value)
  job.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
