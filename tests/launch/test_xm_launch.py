"""XManager launcher: per-host plan, the XManager jobs and Kubernetes objects of the dry run, one-line errors.

The plan and the flag errors need neither xmanager nor a cloud; the XManager part skips without xmanager
(`pip install -e '.[launch]'`), and the launch path runs against fake Kubernetes APIs.
"""

import json
import os
import subprocess
import sys

import pytest

from lwjax.config import ConfigError
from lwjax.launch import host_command, tpu_types, xm_launch
from tests.launch.test_gke import as_kubernetes_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "experiments/lm_pretrain.py:scale=paper"
IMAGE = "us-docker.pkg.dev/my-project/lwjax/lwjax:test"


def _plan(tpu: str, workdir: str = "gs://bucket/run", **kwargs) -> xm_launch.Plan:
  return xm_launch.make_plan(CONFIG, ["--config.train.steps=10"], workdir, tpu_types.parse(tpu), **kwargs)


def test_single_host_plan_has_one_job_and_no_distributed_settings():
  plan = _plan("v5litepod-8", workdir="/tmp/local-is-fine-on-one-host", image=IMAGE)
  [job] = plan.jobs
  assert (job.name, job.hostname, job.env) == ("host_0", "lm-pretrain-0", {})
  assert job.args == (f"--config={CONFIG}", "--workdir=/tmp/local-is-fine-on-one-host", "--config.train.steps=10")


def test_multi_host_plan_fills_in_coordinator_process_count_and_ids():
  plan = _plan("v5p-32", name="lm_run")
  hostnames = [f"lm-run-{i}" for i in range(4)]
  assert [job.hostname for job in plan.jobs] == hostnames
  for i, job in enumerate(plan.jobs):
    assert job.name == f"host_{i}"
    assert job.args[3:] == ("--config.distributed.initialize=True",
                            f"--config.distributed.coordinator_address=lm-run-0.lm-run:{host_command.COORDINATOR_PORT}",
                            "--config.distributed.num_processes=4", f"--config.distributed.process_id={i}")
    assert job.env == {"TPU_WORKER_ID": str(i), "TPU_WORKER_HOSTNAMES": ",".join(f"{h}.lm-run" for h in hostnames)}


@pytest.mark.parametrize("tpu,workdir,kwargs,message", [
    ("v5p-32", "runs/local", {}, "--workdir: 'runs/local' is not shared by the 4 hosts of v5p-32"),
    ("v5litepod-16", "gs://b/x", {"name": "Not A Label"}, "--name: 'Not A Label' cannot name the pods"),
])
def test_plan_faults_name_the_flag(tpu, workdir, kwargs, message):
  with pytest.raises(ConfigError) as error:
    _plan(tpu, workdir, **kwargs)
  assert str(error.value).startswith(message)


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "lwjax.launch.xm_launch", *args], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), timeout=120)


@pytest.mark.parametrize("args,line", [
    (["--tpu", "v5p-32", "--workdir", "/tmp/run"],
     "xm_launch: --workdir: '/tmp/run' is not shared by the 4 hosts of v5p-32 (valid: a gs://bucket/path every host "
     "can write)"),
    (["--tpu", "tpu-v5", "--workdir", "gs://b/run"],
     "xm_launch: --tpu: unknown TPU type 'tpu-v5' (valid: a Cloud TPU name such as v4-N, v5litepod-N, v5p-N, v6e-N, "
     "e.g. v5p-32 or v5litepod-16)"),
])
def test_cli_bad_flags_exit_2_with_one_line(args, line):
  result = _cli("--config", CONFIG, "--dry_run", *args)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [line]


@pytest.fixture(scope="module")
def xm_gke():
  pytest.importorskip("xmanager")
  pytest.importorskip("kubernetes")
  from lwjax.launch import xm_gke

  return xm_gke


@pytest.mark.parametrize("tpu,requirement,hosts,chips", [
    ("v5litepod-8", "tpu_v5e=xm.Topology('2x4')", 1, 8),
    ("v5p-32", "tpu_v5p=xm.Topology('2x2x4')", 4, 4),
])
def test_dry_run_builds_xm_jobs_and_valid_kubernetes_objects(xm_gke, tpu, requirement, hosts, chips):
  plan = _plan(tpu, image=IMAGE, node_pool="pool-a")
  spec = xm_gke.dry_run(plan)
  assert (spec["hosts"], spec["chips_per_host"], spec["image"]) == (hosts, chips, IMAGE)
  service = as_kubernetes_model(spec["service"], "V1Service")
  assert service.spec.cluster_ip == "None" and service.spec.selector == {xm_gke.RUN_LABEL: "lm-pretrain"}
  assert [job["name"] for job in spec["jobs"]] == [f"host_{i}" for i in range(hosts)]
  for i, (job, host) in enumerate(zip(spec["jobs"], plan.jobs, strict=True)):
    assert requirement in job["requirements"]
    k8s_job = as_kubernetes_model(job["kubernetes"], "V1Job")
    assert k8s_job.metadata.name == host.hostname
    pod = k8s_job.spec.template.spec
    assert (pod.hostname, pod.subdomain) == (host.hostname, "lm-pretrain")
    assert k8s_job.spec.template.metadata.labels == service.spec.selector
    assert pod.node_selector["cloud.google.com/gke-nodepool"] == "pool-a"
    assert pod.node_selector["cloud.google.com/gke-tpu-topology"] == plan.tpu.topology
    [container] = pod.containers
    assert container.resources.limits == {"google.com/tpu": str(chips)}
    assert container.command == ["python", "main.py"] and tuple(container.args) == host.args
    assert {e.name: e.value for e in container.env or []} == host.env
    assert host.args[-1] == (f"--config.distributed.process_id={i}" if hosts > 1 else "--config.train.steps=10")


def test_images_are_prebuilt_or_built_from_this_checkout(xm_gke, tmp_path):
  from xmanager import xm

  assert isinstance(xm_gke.packageable(_plan("v5p-8", image=IMAGE), str(tmp_path)).executable_spec, xm.Container)
  assert not os.listdir(tmp_path)
  source = xm_gke.packageable(_plan("v5p-8", push_image_tag="us-docker.pkg.dev/p/r/lwjax:1"), str(tmp_path))
  assert isinstance(source.executable_spec, xm.PythonContainer) and source.executor_spec.push_image_tag.endswith(":1")
  staged = tmp_path / "lwjax"
  assert source.executable_spec.path == str(staged)
  assert (staged / "main.py").is_file() and (staged / "lwjax" / "launch" / "xm_gke.py").is_file()
  assert not (staged / ".venv").exists() and not (staged / ".git").exists()
  assert "RUN python -m pip install '.[tpu]'" in source.executable_spec.docker_instructions
  [job] = xm_gke.dry_run(_plan("v5p-8"))["jobs"]
  assert "command" not in job["kubernetes"]["spec"]["template"]["spec"]["containers"][0]  # the entrypoint runs main.py


class _FakeApi:
  """CoreV1Api / BatchV1Api that record what they are asked to create."""
  created = []

  def __init__(self, api_client):
    assert api_client == "api-client"

  def create_namespaced_service(self, namespace, body):
    self.created.append(("Service", namespace, body))

  def create_namespaced_job(self, namespace, body):
    from kubernetes import client

    self.created.append(("Job", namespace, body))
    return client.V1Job(metadata=client.V1ObjectMeta(name=body["metadata"]["name"], namespace=namespace))


def test_launch_records_the_experiment_and_submits_the_dry_run_objects(xm_gke, monkeypatch, tmp_path, request):
  """The whole xm_local path (experiment database, packaging, dispatch to GkeTpu) with fakes for the cloud."""
  from absl import flags
  from xmanager.cloud import auth, docker_lib, kubernetes as xm_kubernetes
  from xmanager.xm_local.storage import database

  if not flags.FLAGS.is_parsed():  # xmanager reads its own absl flags
    flags.FLAGS.mark_as_parsed()
    request.addfinalizer(flags.FLAGS.unparse_flags)
  db = database.Database(database.SqliteConnector, database.sqlite_settings(str(tmp_path / "xm.sqlite3")))
  monkeypatch.setattr(database, "database", lambda: db)
  monkeypatch.setattr(auth, "get_project_name", lambda: "my-project")
  monkeypatch.setattr(docker_lib, "is_docker_installed", lambda: False)  # the image is used as it is
  monkeypatch.setattr(xm_kubernetes, "client", lambda: type("Client", (), {"api_client": "api-client"}))
  monkeypatch.setattr(xm_gke.k8s, "CoreV1Api", _FakeApi)
  monkeypatch.setattr(xm_gke.k8s, "BatchV1Api", _FakeApi)
  monkeypatch.setattr(_FakeApi, "created", [])
  plan = _plan("v5p-16", image=IMAGE)
  experiment_id = xm_gke.launch(plan)
  spec = xm_gke.dry_run(plan)
  assert _FakeApi.created == [("Service", "default", spec["service"])] + [
      ("Job", "default", job["kubernetes"]) for job in spec["jobs"]]
  [work_unit] = db.get_experiment(experiment_id).work_units
  assert sorted(job.kubernetes.job_name for job in work_unit.jobs.values()) == ["lm-pretrain-0", "lm-pretrain-1"]


def test_cli_dry_run_prints_the_spec_as_json(xm_gke):
  env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the xmanager this test imported
  result = _cli("--config", CONFIG, "--workdir", "gs://bucket/lm", "--tpu", "v5p-32", "--image", IMAGE, "--dry_run",
                env=env)
  assert result.returncode == 0, result.stderr
  spec = json.loads(result.stdout)
  assert (spec["experiment"], spec["tpu"], spec["topology"], spec["hosts"]) == ("lm-pretrain", "v5p-32", "2x2x4", 4)
  assert len(spec["jobs"]) == 4 and "v5p-32 (v5p 2x2x4): 16 chips = 4 host(s) x 4 chips" in result.stderr
