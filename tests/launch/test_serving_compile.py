"""`python -m lwjax.launch.compile` on experiments/serve.py: the serving engine's programs compiled for a TPU slice."""

import importlib

import pytest

from lwjax.config import ConfigError
from lwjax.launch import aot, serving_compile, tpu_types

AVAILABLE, WHY = aot.libtpu_available()


def _serve_config(tensor: int, **engine):
  config = importlib.import_module("experiments.serve").get_config("scale=smoke")  # gpt_tiny, float32
  config.mesh.shape.tensor = tensor
  config.engine.update({"num_pages": 48, "page_size": 8, "max_num_seqs": 4, "max_batch_tokens": 64,
                        "prefill_chunk": 16, "max_model_len": 64, **engine})
  return config


@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_serving_step_compiles_with_weights_split_over_tensor_and_the_pool_it_was_given():
  config = _serve_config(tensor=2)
  report = serving_compile.compile_serving_step(config, tpu_types.parse("v5e", "2x2"))
  tiny = importlib.import_module("configs.gpt").PRESETS["gpt_tiny"]
  # Under SERVING_RULES every weight but the norms' scales is split over tensor=2 (float32: 4 bytes).
  norms = (2 * tiny.n_layers + 1) * tiny.d_model
  assert report["weight_bytes_per_chip"] == 4 * ((tiny.num_params() - norms) // 2 + norms) > 0
  kv = report["kv_pool"]
  assert kv["capacity_tokens"] == 48 * 8
  assert kv["bytes_per_chip"] == 2 * tiny.n_layers * (tiny.n_kv_heads // 2) * 48 * 8 * tiny.head_dim * 4
  assert report["mesh"]["tensor"] == 2 and report["replicas"] == 1 and report["fits"]
  assert set(report["programs"]) == {"decode", "mixed"}  # nano_batches=1: the engine mixes decodes and chunks
  decode = report["programs"]["decode"]
  # The engine's arguments: its weights, both pools (donated, so aliased to the outputs; in HBM padded to TPU
  # tiles: a head_dim of 16 fills a 128-lane tile) and small host arrays.
  assert decode["bytes_per_chip"]["aliased"] == kv["bytes_in_hbm_per_chip"] >= kv["bytes_per_chip"]
  assert decode["bytes_per_chip"]["arguments"] >= report["weight_bytes_per_chip"] + kv["bytes_in_hbm_per_chip"]
  assert decode["roofline_step_s"] > 0 and decode["xla_flops_per_chip"] > 0
  assert kv["max_pages_fitting"] > 48 and kv["max_capacity_tokens"] == kv["max_pages_fitting"] * 8
  assert "tokens/s per engine" in serving_compile.format_report(report)


def test_a_tensor_degree_that_does_not_divide_the_kv_heads_is_refused_before_lowering(monkeypatch):
  def no_lowering(topology):
    raise AssertionError("lowered before the mesh was checked")
  monkeypatch.setattr(aot, "tpu_devices", no_lowering)
  with pytest.raises(ConfigError, match=r"^model.n_kv_heads: 2 is not divisible by mesh axis tensor=4") as e:
    serving_compile.compile_serving_step(_serve_config(tensor=4), tpu_types.parse("v5e", "2x2"))
  assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_step_temporaries_do_not_grow_with_the_page_count_so_the_largest_pool_is_hbm_left_over():
  """The report's largest page count assumes the step's temporaries do not depend on the pool (donated, written
  in place). True for pools laid out as served models have them (bf16, head_dim 128, pages of 16 tokens); a
  float32 pool of head_dim 16 is copied by XLA (temporaries ~4x the pool), hence the realistic layout here. With
  nano-batches the chunks run as their own prefill program."""
  def report(pages):
    config = _serve_config(tensor=1, num_pages=pages, page_size=16, nano_batches=2)
    config.model.update(head_dim=128, dtype="bfloat16", param_dtype="bfloat16")
    return serving_compile.compile_serving_step(config, tpu_types.parse("v5e", "1x1"))
  small, large = report(256), report(2560)
  assert set(small["programs"]) == {"decode", "prefill"}
  growth = large["kv_pool"]["bytes_in_hbm_per_chip"] - small["kv_pool"]["bytes_in_hbm_per_chip"]
  assert growth == 9 * small["kv_pool"]["bytes_per_chip"]
  for name in ("decode", "prefill"):
    before, after = (r["programs"][name]["bytes_per_chip"]["temporaries"] for r in (small, large))
    assert abs(after - before) < 0.01 * growth
  assert large["kv_pool"]["max_pages_fitting"] == pytest.approx(small["kv_pool"]["max_pages_fitting"], rel=1e-3)


def test_the_abstract_decode_step_has_the_arguments_a_live_engine_passes():
  """The compiled decode step is the engine's own program at its largest shapes: a tiny engine decoding a full batch
  of rows calls it with arguments of exactly the shapes, dtypes and structure `engine_programs` lowers."""
  import jax
  from flax import nnx

  from lwjax.models.gpt import GPT, GPTConfig
  from lwjax.serving.engine import Engine
  from lwjax.serving.sampling import SamplingParams
  config = _serve_config(tensor=1)
  cfg = GPTConfig.from_dict(config.model)
  settings = {k: v for k, v in config.engine.to_dict().items() if k != "kv_offload"}
  engine = Engine(GPT(cfg, rngs=nnx.Rngs(0)), **settings)
  seen = []

  def layout(args):  # arrays as (shape, dtype); the static ints as they are
    return jax.tree.map(lambda a: (a.shape, a.dtype) if hasattr(a, "shape") else a, args)

  def recording(run):
    def call(*args):
      seen.append(layout(args))
      return run(*args)
    call._cache_size, call.clear_cache = run._cache_size, run.clear_cache  # the engine counts its programs
    return call
  engine._run = recording(engine._run)
  for i in range(settings["max_num_seqs"]):
    engine.add_request([1 + i] * 60, SamplingParams(max_tokens=3))  # the page table at max_model_len's width
  engine.run_until_done()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  decode = serving_compile.engine_programs(cfg, settings, graphdef, state, None, None)[0]
  assert decode.name == "decode"
  assert layout(decode.args) in seen
