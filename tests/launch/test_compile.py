"""`python -m lwjax.launch.compile`: main.py's train step compiled for a multi-chip TPU topology on CPU."""

import importlib

import pytest

from lwjax.config import ConfigError
from lwjax.launch import aot, compile as compile_lib, tpu_types

AVAILABLE, WHY = aot.libtpu_available()


@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_train_step_compiles_for_a_4_chip_slice_and_reports_memory_and_roofline():
  config = importlib.import_module("experiments.lm_pretrain").get_config("scale=smoke")
  config.mesh.shape.update(data=2, fsdp=2, tensor=1)
  report = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  b = report["bytes_per_chip"]
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and report["fits"]
  # fp32 params + two Adam moments, fsdp-sharded over 2 of the 4 chips: at least 1.5x the params' bytes per chip.
  assert b["arguments"] >= 1.5 * report["parameters"] * 4 and b["peak"] < b["hbm"]
  assert report["flops_per_chip"] > 0 and report["roofline_step_s"] > 0 and 0 < report["roofline_mfu"] < 1
  # Collectives overlapped (the roofline) or not: the second step is longer, its MFU lower.
  assert report["roofline_step_no_overlap_s"] >= report["roofline_step_s"] == max(report["step_s_by_term"].values())
  assert 0 < report["roofline_mfu_no_overlap"] <= report["roofline_mfu"] and report["bound"] in report["step_s_by_term"]
  assert report["hlo_cost"]["totals"]["flops"] == report["flops_per_chip"] and not report["flops_lower_bound"]
  assert report["ici_bytes_per_chip"] > 0  # fsdp gathers the weights, data parallelism reduces the gradients
  text = compile_lib.format_report(report)
  assert "v5litepod-4" in text and "fits" in text and "matmul (dot/conv)" in text and "collectives" in text
  # The same global batch in 2 micro-batches: XLA counts the loop's body once; the report counts the step.
  config.train.grad_accum_steps = 2
  accumulated = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  assert accumulated["xla_counted_once"]["flops"] < 0.6 * report["flops_per_chip"]
  assert accumulated["flops_per_chip"] == pytest.approx(report["flops_per_chip"], rel=0.02)
  assert [loop["trip_count"] for loop in accumulated["hlo_cost"]["loops"]] == [2]


@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_hybrid_distillation_step_compiles_for_tpu_with_the_teacher_shape_by_name():
  """The Mamba/attention hybrid's stage-1 step (SSD scan lowered for TPU, KL to an abstract teacher)."""
  config = importlib.import_module("experiments.mamba_distill").get_config("scale=smoke,teacher=/nonexistent")
  config.mesh.shape.update(data=2, fsdp=2, tensor=1)
  with pytest.raises(ConfigError, match="^teacher.preset: empty"):
    compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  config.teacher.preset = "gpt_tiny"
  report = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  gpt_tiny = importlib.import_module("configs.gpt").PRESETS["gpt_tiny"]
  # The hybrid has the teacher's parameters plus each Mamba layer's gate, dt, conv, A, D and norm.
  assert report["parameters"] > gpt_tiny.num_params() and report["fits"] and report["flops_per_chip"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_hybrid_dpo_step_compiles_for_tpu():
  """The distillation's last stage: the final hybrid on pairs of answers, against itself frozen."""
  config = importlib.import_module("experiments.mamba_distill").get_config("scale=smoke,teacher=/nonexistent")
  config.mesh.shape.update(data=2, fsdp=2, tensor=1)
  config.teacher.update(preset="gpt_tiny", compile_stage="dpo")
  dpo = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  assert dpo["fits"] and "pairs x 2" in dpo["batch"] and dpo["flops_per_chip"] > 0


@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_lrp4rag_relevance_step_compiles_for_tpu_as_an_inference_step_from_a_named_shape():
  """LRP4RAG has no train step at its paper scale: its TPU step is the signals of one padded batch (AttnLRP's
  backward passes in a loop of relevance_chunk, gradient x input through the model's own flash attention),
  compiled with no optimizer; RAGTruth and the checkpoint need not be here when `model_preset` names the shape."""
  from lwjax import jobs
  config = importlib.import_module("experiments.lrp4rag").get_config("scale=smoke,data=ragtruth")
  config.model_preset = "nonesuch"
  with pytest.raises(ConfigError, match="^model_preset: unknown shape 'nonesuch'"):
    jobs.get(config)
  with pytest.raises(ConfigError, match="^model_preset: unknown shape 'nonesuch'"):
    compile_lib.compile_step(config, tpu_types.parse("v5e", "2x2"))
  config.model_preset = "mistral_7b"
  with pytest.raises(ConfigError, match="^model_preset: AttnLRP does not implement GPTConfig.sliding_window"):
    jobs.get(config)
  config.model_preset = "gpt_tiny"
  jobs.get(config)
  report = compile_lib.compile_step(config, tpu_types.parse("v5e", "2x2"))
  e = config.eval
  assert report["step"] == "inference" and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and report["fits"]
  assert report["batch"].startswith(f"{e.signal_batch} x {e.compile_length} tokens, {e.compile_answer_rows} answer")
  classes = report["hlo_cost"]["classes"]
  assert classes["matmul"]["flops"] > 0 and classes["attention"]["count"] > 0  # the Mosaic flash kernel
  # The LRP backward passes run relevance_chunk at a time: one loop of answer rows / chunk trips, each counted.
  assert [loop["trip_count"] for loop in report["hlo_cost"]["loops"]] == [e.compile_answer_rows // e.relevance_chunk]
  assert report["flops_per_chip"] > report["model_flops_per_chip"] > 0 and 0 < report["roofline_mfu"] < 1
  text = compile_lib.format_report(report)
  assert "inference step (no optimizer)" in text and "attention (Pallas)" in text and "fits" in text


def test_unsupported_job_is_refused():
  config = importlib.import_module("experiments.wim").get_config("scale=smoke")
  with pytest.raises(ConfigError, match="^job: 'wim' has no compile report yet"):
    compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_genrm_verifier_and_compute_matched_finetune_steps_compile_for_tpu_from_a_named_shape(tmp_path):
  """The GenRM verifier's finetune (the disc head's fields in the batch) and compute-matched's finetune of the
  model its setup names, their shapes named by preset (the checkpoints are not on the compiling machine)."""
  gpt_tiny = importlib.import_module("configs.gpt").PRESETS["gpt_tiny"]
  config = importlib.import_module("experiments.genrm").get_config(f"scale=smoke,verifier=disc,base={tmp_path}")
  config.mesh.shape.update(data=2, fsdp=2, tensor=1)
  with pytest.raises(ConfigError, match="^base_preset: empty"):
    compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  config.base_preset = "gpt_tiny"
  report = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  assert report["parameters"] > gpt_tiny.num_params() and report["fits"] and "disc verifier" in report["batch"]
  config = importlib.import_module("experiments.compute_matched").get_config(f"scale=smoke,setup=w2s,se={tmp_path}")
  config.mesh.shape.update(data=2, fsdp=2, tensor=1)
  config.models.finetuned_preset = "nonesuch"
  with pytest.raises(ConfigError, match="^models.finetuned_preset: unknown shape"):
    compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  config.models.finetuned_preset = "gpt_tiny"
  report = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  assert report["parameters"] == gpt_tiny.num_params() and report["fits"] and "se finetuned" in report["batch"]


@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_a_step_over_hbm_is_reported_as_not_fitting_not_a_crash():
  config = importlib.import_module("experiments.lm_pretrain").get_config("scale=smoke")
  config.train.global_batch_size, config.data.seq_len = 1024, 4096  # ~18 GiB of logits alone on one v5e chip
  config.model.max_seq_len = 4096
  report = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "1x1"))
  assert not report["fits"] and report["bytes_per_chip"]["temporaries"] > report["bytes_per_chip"]["hbm"]
  assert "DOES NOT FIT" in compile_lib.format_report(report) and "grad_accum_steps" in compile_lib.format_report(report)


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_gamengen_denoiser_step_compiles_for_tpu_from_the_configured_latent_grid():
  """No autoencoder checkpoint: the latent grid comes from `autoencoder.geometry` (smoke: 96x64 images, 12x8)."""
  config = importlib.import_module("experiments.gamengen_diffusion").get_config(
      "scale=smoke,autoencoder=/nonexistent")
  config.mesh.shape.update(data=4, fsdp=1, tensor=1)
  report = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  assert report["batch"] == "4 windows of 4 + 1 latents 8x12x4", report["batch"]
  assert report["fits"] and report["flops_per_chip"] > 0 and 0 < report["roofline_mfu"] < 1
  assert "latents 8x12x4" in compile_lib.format_report(report)


@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu unavailable: {WHY}")
def test_auto_kernels_resolve_for_the_target_platform_not_the_host():
  """Lowered for a TPU on this CPU host, "auto" attention is the Pallas (Mosaic) kernel the TPU would run."""
  import jax
  import jax.numpy as jnp

  from lwjax import kernels
  mesh = jax.sharding.Mesh(aot.tpu_devices("v5e:1x1"), ("x",))
  on_tpu = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16, sharding=on_tpu)

  def lowered_text():  # a fresh jit each time: a traced function is cached whatever the platform
    return jax.jit(lambda q, k, v: kernels.attention(q, k, v, causal=True)).lower(q, q, q).as_text()
  assert "tpu_custom_call" not in lowered_text()  # the host's own choice: the reference
  with kernels.target_platform("tpu"):
    assert kernels.backend() == "tpu"
    assert "tpu_custom_call" in lowered_text()
  assert kernels.backend() == jax.default_backend()


def test_target_platform_is_per_thread():
  """One thread lowering for a TPU does not change the kernels another thread resolves meanwhile."""
  import threading

  import jax

  from lwjax import kernels
  inside, seen = threading.Event(), []

  def other():
    inside.wait(10)
    seen.append(kernels.backend())
  thread = threading.Thread(target=other)
  thread.start()
  with kernels.target_platform("tpu"):
    inside.set()
    thread.join(10)
    assert kernels.backend() == "tpu"
  assert seen == [jax.default_backend()]
