"""XManager on GKE TPU slices: the `GkeTpu` executor and the experiment that `xm_launch` builds with it.

xmanager's own `xm_local.Kubernetes` executor requests no TPU chips and sets no TPU node selectors (its TPU
path targets the retired TPU-node API), and `xm_local.Vertex` knows TPU v2/v3 only. `GkeTpu` is that
Kubernetes executor with the pod of `lwjax.launch.gke.pod_spec` (TPU node selectors, `google.com/tpu` per
host) plus a hostname under the run's headless Service, registered with xm_local so that
`experiment.add(...)` launches it. Needs `pip install -e '.[launch]'` (xmanager, kubernetes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING

import attr
from kubernetes import client as k8s
from xmanager import xm, xm_local
from xmanager.cloud import kubernetes as xm_kubernetes
from xmanager.xm import utils
from xmanager.xm_local import executables, executors, registry

from lwjax.launch import gke, host_command
from lwjax.launch.tpu_types import TpuSlice

if TYPE_CHECKING:  # xm_launch imports this module when it needs xmanager
  from lwjax.launch.xm_launch import Plan

RUN_LABEL = "lwjax/run"
NAMESPACE = "default"


@attr.s(auto_attribs=True)
class GkeTpu(executors.Kubernetes):
  """One TPU host of a GKE slice: `requirements` name the slice (e.g. tpu_v5p='2x2x4'); the pod asks its chips."""
  tpu: TpuSlice | None = None
  hostname: str = ""
  subdomain: str = ""  # the run's headless Service
  node_pool: str = ""
  command: list[str] | None = None  # None: the image's entrypoint (images built from source run main.py)

  def __attrs_post_init__(self):
    registry.register(GkeTpu, launch=_launch)


def packageable(plan: Plan, staging: str) -> xm.Packageable:
  """The prebuilt `--image`, or this checkout (staged under `staging`) built with `pip install .[tpu]`."""
  if plan.image:
    return xm.container(executor_spec=GkeTpu.Spec(), image_path=plan.image)
  return xm.python_container(
      executor_spec=GkeTpu.Spec(push_image_tag=plan.push_image_tag or None), path=stage_source(staging),
      base_image=plan.base_image, entrypoint=xm.CommandList(["python main.py"]),
      docker_instructions=["COPY lwjax/ /lwjax", "WORKDIR /lwjax", "RUN python -m pip install '.[tpu]'"])


def stage_source(directory: str) -> str:
  """Copies the files git tracks or would track into `directory`/lwjax: the build context, without the
  virtual environment, runs/ and .git that xmanager would otherwise copy whole."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=host_command.ROOT, capture_output=True, check=True).stdout.decode().split("\0")
  target = os.path.join(directory, "lwjax")
  for name in listed:
    if os.path.isfile(source := os.path.join(host_command.ROOT, name)):  # tracked files deleted here are listed too
      os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
      shutil.copy2(source, os.path.join(target, name))
  return target


def job_group(plan: Plan, executable: xm.Executable) -> xm.JobGroup:
  """One `xm.Job` per host, named host_0..host_{n-1}."""
  command = ["python", "main.py"] if plan.image else None
  return xm.JobGroup(**{job.name: xm.Job(
      executable, args=list(job.args), env_vars=job.env,
      executor=GkeTpu(requirements=xm.JobRequirements(**{plan.tpu.xm_resource: plan.tpu.topology}), tpu=plan.tpu,
                      hostname=job.hostname, subdomain=plan.name, node_pool=plan.node_pool, command=command))
      for job in plan.jobs})


def service_body(subdomain: str) -> dict:
  """The headless Service that gives each pod of the run the DNS name `<hostname>.<subdomain>`."""
  return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": subdomain, "labels": {RUN_LABEL: subdomain}},
          "spec": {"clusterIP": "None", "selector": {RUN_LABEL: subdomain}, "publishNotReadyAddresses": True}}


def job_body(job: xm.Job) -> dict:
  """The Kubernetes Job that runs one `GkeTpu` job."""
  executor, executable = job.executor, job.executable
  env = [{"name": k, "value": v} for k, v in {**executable.env_vars, **job.env_vars}.items()]
  args = xm.merge_args(executable.args, job.args).to_list(utils.ARGV_ESCAPER)
  pod = gke.pod_spec(executor.tpu, executable.image_path, args, command=executor.command, env=env,
                     node_pool=executor.node_pool)
  pod.update(hostname=executor.hostname, subdomain=executor.subdomain)
  return {"apiVersion": "batch/v1", "kind": "Job",
          "metadata": {"name": executor.hostname, "labels": {RUN_LABEL: executor.subdomain}},
          "spec": {"backoffLimit": 0,
                   "template": {"metadata": {"labels": {RUN_LABEL: executor.subdomain}}, "spec": pod}}}


def submit(jobs: list[xm.Job], api_client: k8s.ApiClient) -> list[k8s.V1Job]:
  """Creates the run's Service (once) and one Kubernetes Job per host; returns the created Jobs."""
  core, batch = k8s.CoreV1Api(api_client), k8s.BatchV1Api(api_client)
  for subdomain in sorted({job.executor.subdomain for job in jobs}):
    try:
      core.create_namespaced_service(NAMESPACE, service_body(subdomain))
    except k8s.ApiException as e:
      if e.status != 409:  # 409: the Service of an earlier run of this name; its selector is the same
        raise
  return [batch.create_namespaced_job(NAMESPACE, job_body(job)) for job in jobs]


async def _launch(local_experiment_unit, job_group: xm.JobGroup) -> list[xm_kubernetes.KubernetesHandle]:
  jobs = xm.job_operators.collect_jobs_by_filter(job_group, lambda job: isinstance(job.executor, GkeTpu))
  if not jobs:
    return []
  handle = xm_kubernetes.KubernetesHandle(jobs=submit(jobs, xm_kubernetes.client().api_client))
  # xm_local records (and waits on) the handles of its own executor classes only, so record ours here.
  handle.save_to_storage(local_experiment_unit.experiment_id, local_experiment_unit.work_unit_id)
  return [handle]


def dry_run(plan: Plan) -> dict:
  """What `launch(plan)` would create, as JSON-able data; builds the XManager objects, contacts nothing."""
  image = plan.image or f"<built from {host_command.ROOT} on {plan.base_image}>"
  group = job_group(plan, executables.GoogleContainerRegistryImage(name="lwjax", image_path=image))
  return {
      "experiment": plan.name, "tpu": plan.tpu.accelerator_type, "topology": plan.tpu.topology,
      "hosts": plan.tpu.hosts, "chips_per_host": plan.tpu.chips_per_host, "hbm_gib_per_chip":
      plan.tpu.generation.hbm_gib, "image": image, "push_image_tag": plan.push_image_tag,
      "service": service_body(plan.name),
      "jobs": [{"name": name, "requirements": repr(job.executor.requirements), "kubernetes": job_body(job)}
               for name, job in group.jobs.items()],
  }


def launch(plan: Plan) -> int:
  """Packages (or builds) the image and launches the experiment; returns its XManager id."""
  with tempfile.TemporaryDirectory() as staging, xm_local.create_experiment(experiment_title=plan.name) as experiment:
    [executable] = experiment.package([packageable(plan, staging)])
    experiment.add(job_group(plan, executable))
  return experiment.experiment_id
