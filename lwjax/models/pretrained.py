"""One entry point for a pretrained model: a Hugging Face checkpoint directory or an lwjax training workdir ->
(model, tokenizer), its parameters placed straight onto a device mesh when given one.

Jobs take it as `model.pretrained=PATH`:
- a Hugging Face directory (`config.json` + safetensors, one file or sharded) of a family `hf_families` reads,
  with its tokenizer (`tokenizer.json`, or a sentencepiece `tokenizer.model`) beside it;
- an lwjax workdir (`checkpoints/`): its latest checkpoint, a Mamba hybrid when `hybrid.json` is beside it,
  and the tokenizer file the run wrote there (`tokenizer.json`, `tokenizer.model`), if any: runs on the
  synthetic tasks build theirs from the task, and get None.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
from flax import nnx
from jax.sharding import Mesh

from lwjax.config import ConfigError
from lwjax.data import hf_tokenizer, tokenizer as tokenizer_lib
from lwjax.models import hf_checkpoint, mamba_hybrid
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.models.logical import Rules

CHECKPOINTS_DIR = "checkpoints"
MERGED_DIR = "merged"  # where a finished LoRA run writes its merged model, a workdir of its own


class PretrainedError(ValueError):
  """A path that holds no model lwjax can load, or a model that cannot be loaded as asked: names path and fix."""


def is_hf_directory(path: str) -> bool:
  """Whether `path` holds a Hugging Face checkpoint's config.json."""
  return os.path.isfile(os.path.join(path, hf_checkpoint.CONFIG_FILE))


def kind(path: str) -> str:
  """"hf" (a Hugging Face checkpoint directory) or "workdir" (an lwjax run); PretrainedError otherwise."""
  if is_hf_directory(path):
    return "hf"
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return "workdir"
  if not os.path.isdir(path):
    raise PretrainedError(f"{path}: no such directory; give a Hugging Face checkpoint directory (config.json + "
                          "safetensors) or an lwjax workdir (checkpoints/)")
  raise PretrainedError(f"{path}: holds neither {hf_checkpoint.CONFIG_FILE} (a Hugging Face checkpoint) nor "
                        f"{CHECKPOINTS_DIR}/ (an lwjax workdir)")


def check(path: str) -> str:
  """What `load_pretrained` checks before any heavy work: the kind of `path`, and for a Hugging Face directory its
  config (family and options), its shards and tensor shapes (from the file headers) and its tokenizer. Returns
  the kind."""
  found = kind(path)
  if found == "hf":
    hf_checkpoint.check(path)
    tokenizer_file(path, required=True)
  return found


# What a job's `model` section still decides for a pretrained model: how it computes, not its shape.
RUNTIME_FIELDS = ("dtype", "remat", "attention_impl", "scan_layers")
# A training job's section decides the stored dtype too: `param_dtype` is then the dtype of the master weights the
# optimizer updates (float32 in every preset, as levanter and MaxText train), whatever the checkpoint's (often
# bfloat16); inference keeps the checkpoint's.
TRAINING_FIELDS = (*RUNTIME_FIELDS, "param_dtype")


def model_config(model_section, fields: tuple[str, ...] = RUNTIME_FIELDS) -> GPTConfig:
  """The `GPTConfig` a job's `model` section names: its own fields, or with `pretrained` set, the checkpoint's
  (read from its config.json or saved run config, no weights) with the section's `fields` applied."""
  path = model_section.get("pretrained") or ""
  if not path:
    return GPTConfig.from_dict(model_section)
  runtime = {k: model_section[k] for k in fields if k in model_section}
  if kind(path) == "hf":
    return hf_checkpoint.config_from_dir(path, **runtime)
  if os.path.isfile(os.path.join(path, mamba_hybrid.HYBRID_CONFIG_FILE)):
    raise PretrainedError(f"{path}: a Mamba hybrid; this job starts from a GPT (a Hugging Face directory or an "
                          "lwjax GPT workdir)")
  from lwjax.training import checkpoint
  path = run_model_dir(path)
  try:
    saved = checkpoint.load_config(os.path.join(path, CHECKPOINTS_DIR))
  except FileNotFoundError:
    raise PretrainedError(f"{path}/{CHECKPOINTS_DIR}: holds no complete checkpoint") from None
  return GPTConfig.from_dict({**saved["model"], **runtime})


def run_model_dir(path: str) -> str:
  """Where the model of run `path` is: `path` itself, or for a LoRA run (`train.lora.rank > 0`, whose checkpoints
  hold its adapters only) the merged model it writes when it finishes, `path/merged` (a PretrainedError when it
  has not finished). A Hugging Face directory, or a path holding no checkpoint yet, is returned as it is."""
  from lwjax.training import checkpoint
  if is_hf_directory(path) or not os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return path
  try:
    saved = checkpoint.load_config(os.path.join(path, CHECKPOINTS_DIR))
  except FileNotFoundError:
    return path
  if not ((saved.get("train") or {}).get("lora") or {}).get("rank"):
    return path
  merged = os.path.join(path, MERGED_DIR)
  if not os.path.isdir(os.path.join(merged, CHECKPOINTS_DIR)):
    raise PretrainedError(f"{path}: a LoRA run that has not finished: its checkpoints hold adapters only, and its "
                          f"merged model, {merged}, is written at the end; run it to the end (same --workdir)")
  return merged


def shape_for_compile(path: str, preset: str, field: str, preset_field: str,
                      fields: tuple[str, ...] = TRAINING_FIELDS, section=None) -> GPTConfig:
  """The shape of the model at `path` for an ahead-of-time compile (`lwjax.launch.compile`), where the weights
  need not be on this machine: the preset `preset` when one is named (a shape of `lwjax.models.presets`), else
  the config.json of a Hugging Face directory or the saved config of an lwjax run at `path` (no weights read);
  `section`'s `fields` (dtype, remat, ...) applied. Errors are ConfigErrors naming `preset_field` or `field`."""
  from lwjax.models import presets
  runtime = {k: section[k] for k in fields if section is not None and k in section}
  if preset:
    if preset not in presets.PRESETS:
      raise ConfigError(preset_field, f"unknown shape {preset!r}", ", ".join(presets.PRESETS))
    return GPTConfig.from_dict({**presets.PRESETS[preset].to_dict(), **runtime})
  if not (is_hf_directory(path) or os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))):
    raise ConfigError(preset_field, f"empty, and {field}={path!r} holds no model config to read the shape from",
                      f"a shape such as gemma2_9b, or a Hugging Face directory or trained workdir in {field}")
  try:
    return model_config({"pretrained": path, **runtime}, fields)
  except (PretrainedError, hf_checkpoint.CheckpointError) as e:
    raise ConfigError(field, str(e), "a Hugging Face checkpoint directory or an lwjax workdir") from None


def checked_model_config(model_section, fields: tuple[str, ...] = RUNTIME_FIELDS,
                         field: str = "model.pretrained") -> GPTConfig:
  """`model_config` after `check` (the checkpoint's config, shards, tensor shapes and tokenizer, before any heavy
  work): anything that cannot be loaded is a ConfigError naming `field`, or `model` for a bad shape."""
  try:
    if model_section.get("pretrained"):
      check(model_section["pretrained"])
    return model_config(model_section, fields)
  except (PretrainedError, hf_checkpoint.CheckpointError) as e:
    raise ConfigError(field, str(e), "a Hugging Face checkpoint directory or an lwjax workdir") from None
  except ValueError as e:
    raise ConfigError("model", str(e), "n_kv_heads dividing n_heads, even head_dim") from None


def checked_kind(path: str, field: str) -> str:
  """`check(path)` with anything that cannot be loaded as a ConfigError naming `field`: "hf" or "workdir"."""
  try:
    return check(path)
  except (PretrainedError, hf_checkpoint.CheckpointError) as e:
    raise ConfigError(field, str(e), "a Hugging Face checkpoint directory or an lwjax workdir") from None


def tokenizer_file(path: str, required: bool = False) -> str | None:
  """The tokenizer file in `path` (`tokenizer.json`, else a sentencepiece `tokenizer.model`); None, or with
  `required` a PretrainedError, when there is none."""
  for name in (hf_tokenizer.TOKENIZER_FILE, tokenizer_lib.MODEL_FILENAME):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  if required:
    raise PretrainedError(f"{path}: no tokenizer ({hf_tokenizer.TOKENIZER_FILE} or {tokenizer_lib.MODEL_FILENAME}); "
                          "copy the model's tokenizer files into the checkpoint directory")
  return None


TOKENIZER_FILES = (hf_tokenizer.TOKENIZER_FILE, hf_tokenizer.CONFIG_FILE, hf_tokenizer.SPECIAL_TOKENS_FILE,
                   hf_tokenizer.GENERATION_CONFIG_FILE, hf_tokenizer.CHAT_TEMPLATE_FILE, tokenizer_lib.MODEL_FILENAME)


def copy_tokenizer(path: str, workdir: str) -> None:
  """Copies the tokenizer files of checkpoint `path` into a run's `workdir`, so the run's checkpoints load with
  the tokenizer they were trained with (`load_pretrained(workdir)`)."""
  os.makedirs(workdir, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(path, name)) and os.path.abspath(path) != os.path.abspath(workdir):
      shutil.copyfile(os.path.join(path, name), os.path.join(workdir, name))


def load_tokenizer(path: str, required: bool = False):
  """The tokenizer stored in checkpoint directory `path` (see `tokenizer_file`), or None."""
  file = tokenizer_file(path, required)
  if file is None:
    return None
  return tokenizer_lib.load_tokenizer(path if file.endswith(".json") else file)


def load_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules | None = None,
                    dtype: str | None = None, param_dtype: str | None = None, **overrides):
  """(model, tokenizer) of a Hugging Face directory or an lwjax workdir (see the module docstring).

  `mesh`: each parameter is read and placed onto the sharding its logical axes get under `rules` (default
  `lwjax.training.mesh.DEFAULT_RULES`: weights over the fsdp and tensor axes); the whole model is never on one
  device. `dtype` (compute), `param_dtype` (stored; default the checkpoint's) and `overrides` replace
  `GPTConfig` fields, e.g. `max_seq_len`. A checkpoint that cannot be read raises an error naming file and key.
  The model comes with per-layer blocks (what the decode paths and layer-wise tools iterate), whatever layout a
  workdir was trained in; `scan_layers=True` gives the stacked layout (`lwjax.models.layer_stack`).
  """
  path = os.fspath(path)
  found = check(path)
  path = run_model_dir(path)  # a finished LoRA run: its merged model
  fields = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype, **overrides).items() if v is not None}
  tokenizer = load_tokenizer(path, required=found == "hf")
  if found == "hf":
    return hf_checkpoint.load(path, mesh=mesh, rules=rules, **fields), tokenizer
  if os.path.isfile(os.path.join(path, mamba_hybrid.HYBRID_CONFIG_FILE)):
    if mesh is not None or fields:
      raise PretrainedError(f"{path}: a Mamba hybrid loads on one device with its saved config; drop mesh and "
                            f"the GPTConfig overrides {sorted(fields)}")
    return mamba_hybrid.load(path), tokenizer
  from lwjax.training import checkpoint

  def build(saved):
    return GPT(GPTConfig.from_dict({**saved["model"], "scan_layers": False, **fields}), rngs=nnx.Rngs(0))
  try:
    model, _, _ = checkpoint.load_model(os.path.join(path, CHECKPOINTS_DIR), build, mesh=mesh, rules=rules)
  except FileNotFoundError:
    raise PretrainedError(f"{path}/{CHECKPOINTS_DIR}: holds no complete checkpoint") from None
  return model, tokenizer


def keep_tokenizer_with_merged(model_section, result: dict) -> None:
  """After `Trainer.fit` from `model_section.pretrained`: a finished LoRA run's merged model (`result["merged"]`)
  gets the checkpoint's tokenizer beside it, so it loads as a model of its own (`load_pretrained`)."""
  if "merged" not in result:
    return
  if model_section.get("pretrained") and jax.process_index() == 0:
    copy_tokenizer(model_section["pretrained"], result["merged"])
  logging.info("merged model (base + LoRA adapters) written to %s", result["merged"])


def finetune_start(model_section, workdir: str):
  """What a training job needs to start from `model_section.pretrained`: (GPTConfig, tokenizer, init_params).

  Without one: the section's own config, None (the job's own tokenizer), None (the model's initialisation). With
  one: the checkpoint's config with the section's `TRAINING_FIELDS`, written back into the section (the run's
  saved config then names the shape it trains); its tokenizer, copied into `workdir` (the run's checkpoints load
  with it, `load_pretrained(workdir)`); and `init_params(mesh, rules)`, which reads its weights onto the trainer's
  mesh (for `Trainer.fit`, called only when the run starts fresh)."""
  path = model_section.get("pretrained") or ""
  cfg = model_config(model_section, TRAINING_FIELDS)
  if not path:
    return cfg, None, None
  model_section.update(cfg.to_dict())
  if jax.process_index() == 0:
    copy_tokenizer(path, workdir)
  fields = {k: model_section[k] for k in TRAINING_FIELDS}

  def init_params(mesh: Mesh | None, rules: Rules | None) -> dict:
    logging.info("starting from %s", path)
    model, _ = load_pretrained(path, mesh=mesh, rules=rules, **fields)
    return nnx.to_pure_dict(nnx.state(model))
  return cfg, load_tokenizer(path, required=True), init_params
