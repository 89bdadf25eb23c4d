"""Each Hugging Face family against transformers' own forward and greedy continuation, through the model, its KV
cache and the serving engine, from the checkpoints `tests/fixtures/hf/make_models.py` wrote with transformers;
export back to the family's format round-trips."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lwjax.models import hf_checkpoint, hf_families
from lwjax.serving import speculative
from lwjax.serving.engine import Engine
from lwjax.serving.sampling import SamplingParams
from tests.models.test_hf_checkpoint import read_tensors

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "hf"
FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "phi3")


def expected(path):
  return json.loads((path / "expected.json").read_text())


@functools.cache
def _load(name):
  path = FIXTURES / "models" / name
  return name, path, hf_checkpoint.load(path), expected(path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  return _load(request.param)


def test_config_names_the_family_options(family):
  name, _, model, _ = family
  cfg = model.cfg
  assert hf_families.family_of(cfg) == {"phi3": "mistral"}.get(name, name)
  if name == "gemma2":
    assert (cfg.norm_offset, cfg.post_norms, cfg.embed_scale, cfg.activation) == (1.0, True, True, "gelu_tanh")
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar) == (3.0, 4.0, 12.0)
    assert [cfg.layer_window(i) for i in range(cfg.n_layers)] == [5, None]
  if name in ("mistral", "phi3"):
    assert {cfg.layer_window(i) for i in range(cfg.n_layers)} == {cfg.sliding_window}
  assert cfg.qkv_bias == (name == "qwen2")


def test_logits_match_transformers(family):
  _, _, model, exp = family
  logits = np.asarray(model(np.asarray(exp["input_ids"], np.int32)))
  np.testing.assert_allclose(logits, np.asarray(exp["logits"], np.float32), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [f if f in ("mistral", "gemma2") else pytest.param(f, marks=pytest.mark.slow)
                                  for f in FAMILIES])
def test_greedy_continuation_matches_transformers_through_the_kv_cache(name):
  """Prefill and one decode step per token over the contiguous cache (what the jobs' samplers use): the families
  with a window and soft-capping in the default suite, the others slow (the engine test covers them)."""
  _, _, model, exp = _load(name)
  for prompt, want in zip(exp["prompt_ids"], exp["greedy_ids"], strict=True):
    assert speculative.greedy(model, prompt, len(want), fused=True).tolist() == want


def test_greedy_continuation_matches_transformers_through_the_engine(family):
  """Paged attention (the native CPU kernel) with the family's window and soft-cap; chunked prefill over pages
  of 4 so that the window spans page boundaries."""
  _, _, model, exp = family
  engine = Engine(model, num_pages=32, page_size=4, prefill_chunk=4, max_batch_tokens=16, max_num_seqs=2)
  n = len(exp["greedy_ids"][0])
  requests = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
              for p in exp["prompt_ids"]]
  engine.run_until_done()
  assert [r.output for r in requests] == exp["greedy_ids"]


def test_export_round_trips_to_the_same_files(family, tmp_path):
  name, path, model, _ = family
  hf_checkpoint.save(model, tmp_path, family=name)
  written, original = read_tensors(tmp_path), read_tensors(path)
  assert sorted(written) == sorted(original)
  for key, x in original.items():
    np.testing.assert_array_equal(written[key], x, strict=True, err_msg=key)
  assert hf_checkpoint.load(tmp_path).cfg == model.cfg
  source = json.loads((path / "config.json").read_text())
  config = json.loads((tmp_path / "config.json").read_text())
  for key in ("model_type", "architectures", "sliding_window", "attn_logit_softcapping", "query_pre_attn_scalar",
              "tie_word_embeddings", "layer_types"):
    assert config.get(key) == source.get(key), key


@pytest.mark.parametrize("change, key", [
    ({"model_type": "gpt_neox"}, "model_type"),
    ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
])
def test_unsupported_options_name_the_file_and_key(tmp_path, change, key):
  source = FIXTURES / "models" / ("qwen2" if "use_sliding_window" in change else "gemma2")
  config = {**json.loads((source / "config.json").read_text()), **change}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_checkpoint.CheckpointError, match=rf"config\.json: {key}"):
    hf_checkpoint.load(tmp_path)


def test_missing_shard_names_the_index(tmp_path):
  for file in (FIXTURES / "models" / "llama").iterdir():
    (tmp_path / file.name).write_bytes(file.read_bytes())
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"index\.json: lists shard.*00002-of-00002"):
    hf_checkpoint.load(tmp_path)


@pytest.mark.slow
def test_regenerated_fixtures_match(tmp_path):
  """Re-runs the fixture script with the installed transformers and checks every family against its output."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  script = FIXTURES / "make_models.py"
  subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env={**os.environ, "PYTHONPATH": ""})
  for name in FAMILIES:
    model, exp = hf_checkpoint.load(tmp_path / name), expected(tmp_path / name)
    logits = np.asarray(model(np.asarray(exp["input_ids"], np.int32)))
    np.testing.assert_allclose(logits, np.asarray(exp["logits"], np.float32), atol=1e-4, rtol=1e-4, err_msg=name)
    for prompt, want in zip(exp["prompt_ids"], exp["greedy_ids"], strict=True):
      assert speculative.greedy(model, prompt, len(want), fused=True).tolist() == want, name


def test_a_tensor_of_the_wrong_shape_is_found_from_the_headers(tmp_path):
  from safetensors.numpy import save_file
  for file in (FIXTURES / "models" / "qwen2").iterdir():
    (tmp_path / file.name).write_bytes(file.read_bytes())
  tensors = read_tensors(tmp_path)
  tensors["model.layers.1.self_attn.k_proj.bias"] = np.zeros(8, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"model\.safetensors: model\.layers\.1\.self_attn\.k_proj\.bias has shape \(8,\), expected"):
    hf_checkpoint.check(tmp_path)
