"""GKE JobSet manifests for TPU slices: hosts, chips, selectors and the multi-host settings main.py reads.

The replicated Job template is checked against the `kubernetes` client's models (JobSet itself has none):
deserialised and serialised back unchanged, so a misspelt or misplaced field fails the test.
"""

import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from lwjax.config import ConfigError
from lwjax.launch import gke, host_command, tpu_types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "experiments/lm_pretrain.py:scale=paper"
IMAGE = "us-docker.pkg.dev/my-project/lwjax/lwjax:test"


def as_kubernetes_model(obj: dict, kind: str):
  """`obj` as the kubernetes client's model `kind`; asserts that it serialises back to `obj` unchanged."""
  client = pytest.importorskip("kubernetes.client")
  api = client.ApiClient()
  text = json.dumps(obj)
  if "response_text" in inspect.signature(api.deserialize).parameters:  # kubernetes >= 35
    model = api.deserialize(text, kind, "application/json")
  else:
    model = api.deserialize(SimpleNamespace(data=text), kind)
  assert api.sanitize_for_serialization(model) == obj
  return model


@pytest.mark.parametrize("tpu,topology,accelerator,expected_topology,hosts,chips_per_host", [
    ("v5litepod-8", "", "tpu-v5-lite-podslice", "2x4", 1, 8),
    ("v5litepod-16", "", "tpu-v5-lite-podslice", "4x4", 4, 4),
    ("v5e", "8x16", "tpu-v5-lite-podslice", "8x16", 32, 4),
    ("v5p-8", "", "tpu-v5p-slice", "2x2x1", 1, 4),
    ("v5p-16", "", "tpu-v5p-slice", "2x2x2", 2, 4),
    ("v5p", "4x4x4", "tpu-v5p-slice", "4x4x4", 16, 4),
    ("v6e-64", "", "tpu-v6e-slice", "8x8", 16, 4),
])
def test_manifest_runs_one_pod_per_host_with_the_slice_chips(tpu, topology, accelerator, expected_topology, hosts,
                                                             chips_per_host):
  document = gke.manifest(CONFIG, ["--config.train.steps=10"], "gs://bucket/run", tpu_types.parse(tpu, topology),
                          IMAGE)
  assert yaml.safe_load(yaml.safe_dump(document)) == document
  assert (document["apiVersion"], document["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  assert document["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == \
      "cloud.google.com/gke-nodepool"
  [replicated] = document["spec"]["replicatedJobs"]
  assert replicated["replicas"] == 1
  job = as_kubernetes_model(replicated["template"], "V1JobTemplateSpec").spec
  assert job.parallelism == job.completions == hosts and job.completion_mode == "Indexed"
  pod = job.template.spec
  assert pod.host_network and pod.dns_policy == "ClusterFirstWithHostNet"
  assert pod.node_selector == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                               "cloud.google.com/gke-tpu-topology": expected_topology}
  [container] = pod.containers
  assert container.image == IMAGE and container.command == ["python", "main.py"]
  assert container.resources.limits == {"google.com/tpu": str(chips_per_host)}
  assert container.args[:3] == [f"--config={CONFIG}", "--workdir=gs://bucket/run", "--config.train.steps=10"]
  distributed = [a for a in container.args if a.startswith("--config.distributed.")]
  if hosts == 1:
    assert distributed == [] and container.env is None
    return
  name = "lm-pretrain"
  assert distributed == [
      "--config.distributed.initialize=True",
      f"--config.distributed.coordinator_address={name}-slice-0-0.{name}:{host_command.COORDINATOR_PORT}",
      f"--config.distributed.num_processes={hosts}", "--config.distributed.process_id=$(PROCESS_ID)"]
  [env] = container.env
  assert env.name == "PROCESS_ID"
  assert env.value_from.field_ref.field_path == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_a_config_without_a_distributed_group_gets_auto_detection():
  import ml_collections

  config = ml_collections.ConfigDict({"job": "x"})
  assert host_command.main_args(config, "experiments/x.py", [], "gs://b/x", 4, "host0", "$(PROCESS_ID)") == \
      ["--config=experiments/x.py", "--workdir=gs://b/x", "--distributed"]


@pytest.mark.parametrize("tpu,topology,overrides,workdir,message", [
    ("v5p-32", "", [], "runs/local", "--workdir: 'runs/local' is not shared by the 4 hosts of v5p-32"),
    ("v5p-8", "", ["--config.mesh.shape.tensor=3"], "runs/local", "mesh.shape: 4 devices are not divisible by 3"),
    ("v5p-32", "", ["--config.distributed.process_id=1"], "gs://b/x", "--config.distributed.process_id: is filled"),
    ("v5p-32", "", ["--config.train.stepz=3"], "gs://b/x", "--config.train.stepz: unknown key"),
    ("v5p-32", "", ["--config.train.steps=many"], "gs://b/x", "--config.train.steps: invalid literal"),
    ("v5p-32", "", ["--config.optim.name=sgd"], "gs://b/x", "optim.name: 'sgd' is not a valid choice"),
])
def test_faults_against_the_slice_name_the_flag_or_key(tpu, topology, overrides, workdir, message):
  with pytest.raises(ConfigError) as error:
    gke.manifest(CONFIG, overrides, workdir, tpu_types.parse(tpu, topology), IMAGE)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("tpu,topology,message", [
    ("v7-8", "", "--tpu: unknown TPU type 'v7-8' (valid: a Cloud TPU name such as v4-N"),
    ("v5p-12", "", "--tpu: 'v5p-12' has no standard v5p topology (valid: v5p-8, v5p-16"),
    ("v5p", "", "--tpu: 'v5p' names no slice size"),
    ("v5e-16", "2x2x2", "--topology: '2x2x2' is not a v5e topology (valid: 1x1, 2x2, 2x4, 4x4"),
    ("v5p", "3x3x3", "--topology: '3x3x3' is not a v5p topology"),
    ("v5p-32", "2x2x2", "--topology: 2x2x2 has 8 chips but --tpu v5p-32 has 16"),
])
def test_unknown_tpu_types_and_topologies_name_the_flag(tpu, topology, message):
  with pytest.raises(ConfigError) as error:
    tpu_types.parse(tpu, topology)
  assert str(error.value).startswith(message)


def test_runs_are_named_by_their_config_file_unless_the_name_cannot_be_a_pod_hostname():
  assert gke.run_name("", "experiments/lm_pretrain.py:scale=paper", 64) == "lm-pretrain"
  assert gke.run_name("My_Run", "experiments/lm_pretrain.py", 4) == "my-run"
  with pytest.raises(ConfigError, match="--name: 'Run!'"):
    gke.run_name("Run!", "experiments/lm_pretrain.py", 4)
  with pytest.raises(ConfigError, match="--name"):
    gke.run_name("a" * 60, "experiments/lm_pretrain.py", 4)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lwjax.launch.gke", *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)


def test_cli_prints_the_jobset_yaml():
  result = _cli("--config", CONFIG, "--workdir", "gs://bucket/lm", "--tpu", "v5p-64", "--image", IMAGE)
  assert result.returncode == 0, result.stderr
  document = yaml.safe_load(result.stdout)
  assert document["kind"] == "JobSet" and document["metadata"]["name"] == "lm-pretrain"
  assert document["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 8
  assert "v5p-64 (v5p 2x4x4): 32 chips = 8 host(s) x 4 chips" in result.stderr


def test_cli_bad_flag_exits_2_with_one_line():
  result = _cli("--config", CONFIG, "--workdir", "gs://bucket/lm", "--tpu", "v5p-30", "--image", IMAGE)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      "gke: --tpu: 'v5p-30' has no standard v5p topology (valid: v5p-8, v5p-16, v5p-32, v5p-64, v5p-128, "
      "or add --topology)"]
