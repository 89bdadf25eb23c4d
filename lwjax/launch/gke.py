"""JobSet manifests (jobset.x-k8s.io/v1alpha2) that run an experiment on one GKE TPU slice, one pod per host.

  python -m lwjax.launch.gke --config experiments/lm_pretrain.py:scale=paper --workdir gs://BUCKET/lm \
      --tpu v5p-64 --image REGISTRY/lwjax:TAG > jobset.yaml && kubectl apply -f jobset.yaml

Follows GKE's multi-host TPU JobSet example: pods select the slice's node pool by the
`cloud.google.com/gke-tpu-accelerator` / `gke-tpu-topology` labels and request the host's chips as
`google.com/tpu`; the exclusive-topology annotation keeps one slice's pods on one node pool. JobSet's headless
service names pod `<name>-slice-0-<i>` as `<name>-slice-0-<i>.<name>`, so process 0 is the coordinator; each
pod's process id is its Indexed-Job completion index, read through the downward API. The image must hold
this repository at its working directory with `.[tpu]` installed (docs/LAUNCH.md has a Dockerfile).
A failed pod restarts the whole JobSet (`--max_restarts`); the run resumes from the checkpoints in `--workdir`.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

from lwjax.config import ConfigError
from lwjax.launch import host_command, tpu_types
from lwjax.launch.tpu_types import TpuSlice

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "slice"
TPU_RUNTIME_PORT = 8471
_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def pod_spec(tpu: TpuSlice, image: str, args: list[str], *, command: list[str] | None = ("python", "main.py"),
             env: list[dict] = (), node_pool: str = "") -> dict:
  """The pod of one TPU host: node selectors of the slice, `google.com/tpu` = chips per host, the command."""
  node_selector = {"cloud.google.com/gke-tpu-accelerator": tpu.generation.gke_accelerator,
                   "cloud.google.com/gke-tpu-topology": tpu.topology}
  if node_pool:
    node_selector["cloud.google.com/gke-nodepool"] = node_pool
  container = {
      "name": "lwjax", "image": image, **({"command": list(command)} if command else {}), "args": list(args),
      "ports": [{"containerPort": TPU_RUNTIME_PORT}, {"containerPort": host_command.COORDINATOR_PORT}],
      "resources": {"limits": {"google.com/tpu": str(tpu.chips_per_host)}},
  }
  if env:
    container["env"] = list(env)
  # Host networking as in GKE's TPU examples: the hosts' collectives and the coordinator use the node's NICs.
  return {"restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
          "nodeSelector": node_selector, "containers": [container]}


def jobset(name: str, tpu: TpuSlice, image: str, args: list[str], *, node_pool: str = "",
           max_restarts: int = 3) -> dict:
  """The JobSet running `python main.py *args` on every host of `tpu`; "$(PROCESS_ID)" in args is the host's."""
  env = [{"name": "PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": _COMPLETION_INDEX}}}] if tpu.hosts > 1 else []
  return {
      "apiVersion": API_VERSION, "kind": "JobSet",
      "metadata": {"name": name,
                   "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          "failurePolicy": {"maxRestarts": max_restarts},
          "network": {"enableDNSHostnames": True},
          "replicatedJobs": [{
              "name": REPLICATED_JOB, "replicas": 1,
              "template": {"spec": {
                  "parallelism": tpu.hosts, "completions": tpu.hosts, "completionMode": "Indexed",
                  "backoffLimit": 0,
                  "template": {"spec": pod_spec(tpu, image, args, env=env, node_pool=node_pool)},
              }},
          }],
      },
  }


def manifest(config_arg: str, overrides: list[str], workdir: str, tpu: TpuSlice, image: str, name: str = "",
             node_pool: str = "", max_restarts: int = 3) -> dict:
  """The JobSet for an experiment after checking its config against the slice; ConfigError on a fault."""
  host_command.check_flags(workdir, tpu, overrides)
  name = run_name(name, config_arg, tpu.hosts)
  config, config_path = host_command.load_config(config_arg, overrides)
  host_command.check_mesh(config, tpu)
  coordinator = f"{name}-{REPLICATED_JOB}-0-0.{name}"
  args = host_command.main_args(config, config_path, overrides, workdir, tpu.hosts, coordinator, "$(PROCESS_ID)")
  return jobset(name, tpu, image, args, node_pool=node_pool, max_restarts=max_restarts)


def run_name(name: str, config_arg: str, hosts: int) -> str:
  """`--name`, default the config file's name, as a DNS label (`lm_pretrain` -> `lm-pretrain`) that keeps pod
  hostnames within 63 characters."""
  name = name or os.path.basename(config_arg.split(":")[0]).removesuffix(".py")
  label = name.lower().replace("_", "-")
  longest = len(f"{label}-{REPLICATED_JOB}-0-{hosts - 1}")
  if not _NAME.fullmatch(label) or longest > 63:
    raise ConfigError("--name", f"{name!r} cannot name the pods (longest hostname: {longest} characters)",
                      "lowercase letters, digits and '-', at most ~45 characters")
  return label


def main(overrides: list[str]) -> None:
  f = flags.FLAGS
  try:
    host_command.required(config=f.config, workdir=f.workdir, tpu=f.tpu, image=f.image)
    tpu = tpu_types.parse(f.tpu, f.topology)
    document = manifest(f.config, overrides, f.workdir, tpu, f.image, f.name, f.node_pool, f.max_restarts)
  except ConfigError as e:
    host_command.fail(e, "gke")
  import yaml

  print(f"# {tpu.describe()}", file=sys.stderr)
  yaml.safe_dump(document, sys.stdout, sort_keys=False)


if __name__ == "__main__":
  host_command.define_flags()
  flags.DEFINE_integer("max_restarts", 3, "JobSet restarts after a failure (the run resumes from --workdir).")
  app.run(main, flags_parser=host_command.flags_parser("gke"))
