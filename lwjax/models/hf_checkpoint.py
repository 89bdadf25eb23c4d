"""Hugging Face checkpoints (`config.json` + safetensors, one file or sharded) to and from a `GPT`.

Reading is tensor by tensor: each safetensors tensor is read, laid out as the model holds it, cast, and
placed straight onto its sharding (from the parameter's logical axes and the rules, on `mesh`); the model is
never whole on one device or on the host. Writing goes one shard at a time. The families and their layouts
are `lwjax.models.hf_families`. Tensors pass through numpy: jax registers ml_dtypes' `bfloat16` with numpy,
which safetensors uses for BF16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors.numpy import save_file

from lwjax.models import hf_families, layer_stack
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.models.logical import Rules, logical_to_spec

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' `save_pretrained` default ("5GB")
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Non-persistent RoPE buffers that old checkpoints still carry; recomputed from the config.
_DERIVED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read: the message names the file and key."""


def read_config(path: str | os.PathLike) -> dict:
  """The `config.json` of a HF checkpoint directory, or a `CheckpointError` naming what is missing."""
  file = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(file):
    raise CheckpointError(f"{file}: not found; a Hugging Face checkpoint directory holds config.json")
  with open(file) as fh:
    try:
      return json.load(fh)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def config_from_dir(path: str | os.PathLike, **overrides) -> GPTConfig:
  """The `GPTConfig` of a HF checkpoint directory (`hf_families.config_from_hf` of its config.json)."""
  try:
    return hf_families.config_from_hf(read_config(path), **overrides)
  except hf_families.UnsupportedCheckpoint as e:
    raise CheckpointError(f"{os.path.join(os.fspath(path), CONFIG_FILE)}: {e}") from None


def _weight_files(path: str) -> dict[str, str]:
  """HF key -> safetensors file name, from the shard index or the single file's header."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as fh:
      weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map' dict")
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
    if missing:
      raise CheckpointError(f"{index}: lists shard(s) {missing} that are not in {path}")
    return dict(weight_map)
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
  with _SafetensorsFile(single) as f:
    return dict.fromkeys(f.keys(), SINGLE_FILE)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


class _SafetensorsFile:
  """Reads tensors of one safetensors file with `pread` into fresh arrays: unlike a memory map, the pages of
  tensors already placed do not stay in this process's resident memory."""

  def __init__(self, file: str):
    self.file = file
    self.fd = os.open(file, os.O_RDONLY)
    (size,) = np.frombuffer(os.pread(self.fd, 8, 0), "<u8")
    self.header = json.loads(os.pread(self.fd, int(size), 8))
    self.header.pop("__metadata__", None)
    self.data_start = 8 + int(size)

  def keys(self):
    return self.header.keys()

  def read(self, key: str) -> np.ndarray:
    entry = self.header[key]
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{self.file}: {key} has dtype {entry['dtype']}; allowed: {sorted(_SAFETENSORS_DTYPES)}")
    begin, end = entry["data_offsets"]
    out = np.empty(entry["shape"], _SAFETENSORS_DTYPES[entry["dtype"]])
    if out.nbytes != end - begin:
      raise CheckpointError(f"{self.file}: {key} holds {end - begin} bytes for shape {entry['shape']}")
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < out.nbytes:  # pread returns at most 2 GiB at a time
      n = os.preadv(self.fd, [view[done:]], self.data_start + begin + done)
      if n <= 0:
        raise CheckpointError(f"{self.file}: ends inside {key}")
      done += n
    return out

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    os.close(self.fd)


def _check_keys(path: str, layout: dict, available, cfg: GPTConfig) -> None:
  available = {k for k in available if not _DERIVED_KEY.fullmatch(k)}
  missing = sorted(set(layout) - available)
  if missing:
    raise CheckpointError(f"{path}: the checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
  unexpected = sorted(available - set(layout))
  if unexpected:
    hint = ""
    if cfg.tie_embeddings and "lm_head.weight" in unexpected:
      hint = " (lm_head.weight with tie_word_embeddings=true: load with tie_embeddings=False to keep it)"
    raise CheckpointError(f"{path}: the checkpoint has {len(unexpected)} unexpected tensor(s), "
                          f"e.g. {unexpected[:5]}{hint}")


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _placer(abstract_state, mesh: Mesh | None, rules: Rules | None):
  """path -> function placing a host array as that parameter: on its mesh sharding, or the default device."""
  if mesh is None:
    return lambda path, x: jnp.asarray(x)
  from lwjax.training import mesh as mesh_lib, sharding
  axes = sharding.logical_axes(abstract_state)
  rules = mesh_lib.DEFAULT_RULES if rules is None else rules

  def place(path, x):
    spec = logical_to_spec(_get(axes, path), rules, mesh, x.shape)
    return jax.device_put(x, NamedSharding(mesh, spec))
  return place


def check(path: str | os.PathLike, **overrides) -> GPTConfig:
  """Everything `load` checks before reading a weight: config.json (family, options), the shard index, and every
  tensor's presence, file and shape from the safetensors headers. Returns the config; CheckpointError naming the
  file and key otherwise."""
  return _plan(os.fspath(path), **overrides)[0]


def _plan(path: str, **overrides) -> tuple[GPTConfig, dict, dict[str, str]]:
  """(config, layout, HF key -> file) of a checkpoint directory, every check of `check` done."""
  cfg = config_from_dir(path, **overrides)
  layout = hf_families.tensor_layout(cfg, read_config(path).get("model_type", "llama"))
  files = _weight_files(path)
  _check_keys(path, layout, files, cfg)
  for file_name in sorted(set(files.values())):
    with _SafetensorsFile(os.path.join(path, file_name)) as f:
      for key in layout:
        if files[key] != file_name:
          continue
        if key not in f.header:
          raise CheckpointError(f"{key}: listed in {INDEX_FILE} under {file_name}, which does not contain it")
        shape = tuple(f.header[key]["shape"])
        if shape != layout[key].hf_shape:
          raise CheckpointError(f"{os.path.join(path, file_name)}: {key} has shape {shape}, expected "
                                f"{layout[key].hf_shape} from config.json")
  return cfg, layout, files


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules | None = None, **overrides) -> GPT:
  """Reads a HF checkpoint directory of a supported family into a `GPT`, tensor by tensor.

  `overrides` replace `GPTConfig` fields (e.g. `param_dtype="float32"`, `max_seq_len=8192`); parameters are
  cast to `param_dtype`. With `mesh`, each parameter goes straight onto the sharding its logical axes get
  under `rules` (default `lwjax.training.mesh.DEFAULT_RULES`: weights over the fsdp and tensor axes). With
  `scan_layers=True` the layers are read one by one, then stacked (`lwjax.models.layer_stack`).
  """
  path = os.fspath(path)
  cfg, layout, files = _plan(path, **overrides)

  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(dataclasses.replace(cfg, scan_layers=False),
                                                         rngs=nnx.Rngs(0))))
  values = nnx.to_pure_dict(state)
  place = _placer(state, mesh, rules)
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  by_file: dict[str, list[str]] = {}
  for key in layout:
    by_file.setdefault(files[key], []).append(key)
  for file_name, keys in by_file.items():
    with _SafetensorsFile(os.path.join(path, file_name)) as f:
      for key in keys:
        x, tensor = f.read(key), layout[key]
        for part in tensor.parts:
          _get(values, part.path[:-1])[part.path[-1]] = place(part.path, part.from_hf(x).astype(dtype, copy=False))
        del x
  if cfg.scan_layers:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    place = _placer(state, mesh, rules)
    stacked = layer_stack.stack_layers(values)["layers"]
    values["layers"] = jax.tree_util.tree_map_with_path(lambda p, x: place(("layers", *(k.key for k in p)), x),
                                                        stacked)
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _remove_stale_weights(path: str) -> None:
  """Deletes weights a previous save left, so an old index can't point the loader at old shards."""
  for name in os.listdir(path):
    if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(name):
      os.remove(os.path.join(path, name))


def save(model: GPT, path: str | os.PathLike, *, family: str | None = None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes `model` as a HF checkpoint of `family` (default: the one its options name): `config.json` and
  safetensors in `param_dtype`.

  Above `max_shard_bytes` the tensors go to `model-0000i-of-0000n.safetensors` shards with a
  `model.safetensors.index.json`, as `save_pretrained` does. Earlier weight files in `path` are removed.
  """
  values = layer_stack.to_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), stacked=False)
  layout = hf_families.tensor_layout(model.cfg, family or hf_families.family_of(model.cfg))

  def tensor(key):
    return layout[key].to_hf([np.asarray(jax.device_get(_get(values, p.path))) for p in layout[key].parts])
  _write(path, model.cfg, family, tensor, max_shard_bytes)


def save_random(cfg: GPTConfig, path: str | os.PathLike, *, family: str | None = None, seed: int = 0,
                scale: float = 0.02, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes a checkpoint of `cfg`'s shape with N(0, scale^2) weights (norm weights 1, or 0 where the family
  stores 1 + w), tensor by tensor, without building the model: for tests, and for benchmarks of models larger
  than the host holds twice."""
  rng = np.random.default_rng(seed)
  layout = hf_families.tensor_layout(cfg, family or hf_families.family_of(cfg))
  dtype = jnp.dtype(cfg.param_dtype)

  def tensor(key):
    shape = layout[key].hf_shape
    if key.endswith("norm.weight"):
      return np.full(shape, 0.0 if cfg.norm_offset else 1.0, dtype)
    return (scale * rng.standard_normal(shape, np.float32)).astype(dtype)
  _write(path, cfg, family, tensor, max_shard_bytes)


def _write(path, cfg: GPTConfig, family: str | None, tensor, max_shard_bytes: int) -> None:
  """config.json and the safetensors of `tensor(key)` for every key of the family's layout, shard by shard."""
  path = os.fspath(path)
  family = family or hf_families.family_of(cfg)
  hf_config = hf_families.config_to_hf(cfg, family)
  layout = hf_families.tensor_layout(cfg, family)
  itemsize = jnp.dtype(cfg.param_dtype).itemsize
  shards: list[list[str]] = [[]]
  shard_bytes, total = 0, 0
  for key, spec in layout.items():
    nbytes = int(np.prod(spec.hf_shape)) * itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(key)
    shard_bytes += nbytes
    total += nbytes

  os.makedirs(path, exist_ok=True)
  _remove_stale_weights(path)
  with open(os.path.join(path, CONFIG_FILE), "w") as fh:
    json.dump(hf_config, fh, indent=2)
  names = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, keys in zip(names, shards, strict=False):  # one shard on the host at a time
    save_file({key: tensor(key) for key in keys}, os.path.join(path, name),
              metadata={"format": "pt"})  # transformers needs the tag
  if len(shards) > 1:
    weight_map = {key: name for name, keys in zip(names, shards, strict=False) for key in keys}
    with open(os.path.join(path, INDEX_FILE), "w") as fh:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
