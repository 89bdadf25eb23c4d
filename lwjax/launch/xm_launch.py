"""XManager launcher: an experiment on a GKE TPU slice, one job per host, multi-host settings filled in.

  python -m lwjax.launch.xm_launch --config experiments/lm_pretrain.py:scale=paper --workdir gs://BUCKET/lm \
      --tpu v5p-32 --image REGISTRY/lwjax:TAG [--dry_run]

Without `--image` the image is built from this checkout (xm.python_container: base image + `pip install
.[tpu]`) and pushed to `--push_image_tag`. `--dry_run` prints, as JSON, the XManager requirements and the
Kubernetes Service and Jobs the launch would create, and contacts nothing (no credentials needed). The config
is loaded and validated here first, and its mesh checked against the slice's chips (lwjax.launch.host_command).

Job `host_i` runs in pod `<name>-i`, reachable as `<name>-i.<name>` through a headless Service; host 0 is the
coordinator. Each job carries its `process_id` and the TPU runtime's TPU_WORKER_ID / TPU_WORKER_HOSTNAMES
(GKE sets those only for Indexed Jobs; the JobSet of lwjax.launch.gke is the alternative that uses them).
The launch itself needs `pip install -e '.[launch]'`, a kubeconfig for the cluster and gcloud credentials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

from absl import app, flags

from lwjax.config import ConfigError
from lwjax.launch import gke, host_command, tpu_types
from lwjax.launch.tpu_types import TpuSlice

DEFAULT_BASE_IMAGE = "python:3.11-slim"


@dataclasses.dataclass(frozen=True)
class HostJob:
  """One host's job: its XManager job name, pod hostname, `python main.py` arguments and environment."""
  name: str
  hostname: str
  args: tuple[str, ...]
  env: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything the launch creates, computed without xmanager or any cloud service."""
  name: str
  tpu: TpuSlice
  image: str  # empty: build from this checkout
  base_image: str
  push_image_tag: str
  node_pool: str
  jobs: tuple[HostJob, ...]


def make_plan(config_arg: str, overrides: list[str], workdir: str, tpu: TpuSlice, *, name: str = "",
              image: str = "", base_image: str = DEFAULT_BASE_IMAGE, push_image_tag: str = "",
              node_pool: str = "") -> Plan:
  """The per-host jobs of an experiment on `tpu`, after checking its config; ConfigError on a fault."""
  host_command.check_flags(workdir, tpu, overrides)
  name = gke.run_name(name, config_arg, tpu.hosts)
  config, config_path = host_command.load_config(config_arg, overrides)
  host_command.check_mesh(config, tpu)
  hostnames = [f"{name}-{i}" for i in range(tpu.hosts)]
  jobs = []
  for i, hostname in enumerate(hostnames):
    env = {} if tpu.hosts == 1 else {"TPU_WORKER_ID": str(i),
                                     "TPU_WORKER_HOSTNAMES": ",".join(f"{h}.{name}" for h in hostnames)}
    args = host_command.main_args(config, config_path, overrides, workdir, tpu.hosts, f"{hostnames[0]}.{name}",
                                  str(i))
    jobs.append(HostJob(f"host_{i}", hostname, tuple(args), env))
  return Plan(name, tpu, image, base_image, push_image_tag, node_pool, tuple(jobs))


def main(overrides: list[str]) -> None:
  f = flags.FLAGS
  try:
    host_command.required(config=f.config, workdir=f.workdir, tpu=f.tpu)
    if f.image and f.push_image_tag:
      raise ConfigError("--push_image_tag", "only applies when building from source", "drop it, or drop --image")
    tpu = tpu_types.parse(f.tpu, f.topology)
    plan = make_plan(f.config, overrides, f.workdir, tpu, name=f.name, image=f.image, base_image=f.base_image,
                     push_image_tag=f.push_image_tag, node_pool=f.node_pool)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # xmanager's database layer logs each plugin at INFO
    try:
      from lwjax.launch import xm_gke
    except ImportError as e:
      raise ConfigError("xmanager", f"cannot import ({e})", "pip install -e '.[launch]'") from None
  except ConfigError as e:
    host_command.fail(e, "xm_launch")
  print(f"# {tpu.describe()}", file=sys.stderr)
  if f.dry_run:
    json.dump(xm_gke.dry_run(plan), sys.stdout, indent=2)
    print()
    return
  print(f"launched XManager experiment {xm_gke.launch(plan)}")


if __name__ == "__main__":
  host_command.define_flags()
  flags.DEFINE_string("base_image", DEFAULT_BASE_IMAGE, "Base image when building from source (no --image).")
  flags.DEFINE_string("push_image_tag", "", "Where to push the image built from source, e.g. "
                      "us-docker.pkg.dev/PROJECT/REPO/lwjax:TAG; default: gcr.io/<gcloud project>/...")
  flags.DEFINE_bool("dry_run", False, "Print the jobs as JSON; contact no cloud service.")
  app.run(main, flags_parser=host_command.flags_parser("xm_launch"))
