"""The `serve` job: loads a model (random; `model.pretrained`: a Hugging Face directory of a supported family
with its tokenizer and chat template, or an lwjax workdir) and serves it over the OpenAI-compatible API on
127.0.0.1 (NanoFlow §4 front end). `weights.source` / `weights.path` name a checkpoint the older way.

An lwjax checkpoint directory with a `hybrid.json` beside its checkpoints/ (a stage of the Mamba
distillation, e.g. `runs/distill_cpu50/attention/sft`) is served as the hybrid it holds (loaded on one device, then
placed on the mesh: its recurrent states over heads).

`mesh` is training's group: `--config.mesh.shape.tensor=8` serves tensor parallel over the first 8 devices
(`lwjax.serving.tensor_parallel`), the weights read straight onto their shardings under `mesh.rules` (the
experiment's default: `SERVING_RULES`); `--config.mesh.shape.data=2` serves two independent engine replicas behind
the one API (`lwjax.serving.replicas`: each on its own `tensor` devices, requests to the least-loaded). fsdp stays
1."""

from __future__ import annotations

import logging
import os

import jax
from flax import nnx

from lwjax.config import ConfigError, Field, non_negative_int, positive_int, validate as validate_schema
from lwjax.data import hf_tokenizer, tokenizer as tokenizer_lib
from lwjax.models import hf_checkpoint, mamba_hybrid, pretrained
from lwjax.models.gpt import CONFIG_SCHEMA as MODEL_SCHEMA, GPT, GPTConfig
from lwjax.serving import replicas, tensor_parallel
from lwjax.training import checkpoint, mesh as mesh_lib, sharding

TAKES_PRETRAINED = True
MESH_COVERS_ALL_DEVICES = False  # the engine's mesh is the first devices its shape covers (main.py checks no more)
SOURCES = ("random", "lwjax_checkpoint", "hf_checkpoint")
SCHEMA = {
    "job": Field(str), "seed": Field(int), "model": MODEL_SCHEMA, "mesh": mesh_lib.SCHEMA,
    "weights": {
        "source": Field(str, choices=SOURCES),
        "path": Field(str, doc="lwjax workdir (its checkpoints/) or HF directory; unused for random"),
    },
    "tokenizer": {"kind": Field(str, choices=("bytes", "sentencepiece", "hf")),
                  "path": Field(str, doc="sentencepiece model (kind=sentencepiece); a Hugging Face tokenizer "
                                         "directory, e.g. the checkpoint's (kind=hf: tokenizer.json with the chat "
                                         "template and stop ids, or only a sentencepiece tokenizer.model)")},
    "engine": {
        "num_pages": positive_int(), "page_size": positive_int(), "max_num_seqs": positive_int(),
        "max_batch_tokens": positive_int(), "prefill_chunk": positive_int(), "max_model_len": positive_int(),
        "nano_batches": positive_int("split each batch into this many nano-batches (NanoFlow §3; 1 on CPU)"),
        "async_scheduling": Field(bool, doc="prepare iteration i + 1 on the host while the device runs i"),
        "mixed_batches": Field(bool, doc="an iteration's decodes and prefill chunks in one model call (off: one "
                                         "call per group; hybrids and nano-batches always run one per group)"),
        "kv_offload": {
            "host_bytes": non_negative_int("host memory for offloaded KV blocks (per data-parallel replica); 0 turns "
                                           "offload off"),
            "disk_dir": Field(str, doc="directory for blocks spilled from host memory; empty: none"),
            "disk_bytes": non_negative_int("disk space for spilled blocks"),
        },
    },
    "server": {
        "host": Field(str), "port": Field(int, min=0, max=65535), "model_name": Field(str),
        "max_queued": positive_int("requests waiting or running before new ones get 429"),
        "drain_seconds": Field((int, float), min=0, doc="on SIGTERM: how long running requests may take to finish "
                               "before they are answered 503 and the server exits"),
        "ignore_unknown_fields": Field(bool, doc="ignore request fields the API does not know (vLLM's behaviour; "
                                       "logged once per field) instead of answering 400"),
        "api_key": Field(str, doc="required as 'Authorization: Bearer <key>' on every endpoint but /health; empty: "
                         "the LWJAX_API_KEY environment variable, or none"),
    },
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  if config.engine.prefill_chunk > config.engine.max_batch_tokens:
    raise ConfigError("engine.prefill_chunk", "exceeds engine.max_batch_tokens",
                      f"<= {config.engine.max_batch_tokens}")
  offload = config.engine.kv_offload
  if offload.disk_bytes and not offload.disk_dir:
    raise ConfigError("engine.kv_offload.disk_dir", "is empty while disk_bytes > 0", "a directory, or disk_bytes=0")
  if offload.disk_dir and not offload.host_bytes:
    raise ConfigError("engine.kv_offload.host_bytes", "is 0 while disk_dir is set (blocks reach disk through "
                      "host memory)", "> 0, or disk_dir=''")
  if config.model.get("pretrained"):
    if config.weights.source != "random":
      raise ConfigError("weights.source", f"{config.weights.source!r} as well as model.pretrained",
                        "one of them: model.pretrained=PATH alone")
    try:
      pretrained.check(config.model.pretrained)
    except (pretrained.PretrainedError, hf_checkpoint.CheckpointError) as e:
      raise ConfigError("model.pretrained", str(e), "a Hugging Face checkpoint directory or an lwjax workdir") from None
  if config.weights.source != "random" and not os.path.exists(config.weights.path):
    raise ConfigError("weights.path", f"{config.weights.path!r} does not exist", "an existing directory")
  if _is_hybrid(config):
    if config.engine.nano_batches != 1:
      raise ConfigError("engine.nano_batches", "a hybrid (Mamba) model serves without nano-batches", "1")
    if offload.host_bytes:
      raise ConfigError("engine.kv_offload.host_bytes", "a hybrid (Mamba) model keeps no prefix cache to offload",
                        "0")
  _check_mesh(config)
  if config.tokenizer.kind == "sentencepiece" and not os.path.exists(config.tokenizer.path):
    raise ConfigError("tokenizer.path", f"{config.tokenizer.path!r} does not exist", "a sentencepiece model file")
  hf_files = (hf_tokenizer.TOKENIZER_FILE, tokenizer_lib.MODEL_FILENAME)
  if config.tokenizer.kind == "hf" and not any(os.path.isfile(os.path.join(config.tokenizer.path, name))
                                               for name in hf_files):
    raise ConfigError("tokenizer.path", f"{config.tokenizer.path!r} is not a directory holding {' or '.join(hf_files)}",
                      f"a Hugging Face tokenizer directory ({hf_tokenizer.TOKENIZER_FILE}, {hf_tokenizer.CONFIG_FILE}; "
                      "e.g. the hf_checkpoint's weights.path)")


def _check_mesh(config) -> None:
  """The mesh is replicas over `data`, each split over `tensor` alone, and that split divides the model's sizes
  (read from the checkpoint's config, no weights): a ConfigError before anything loads."""
  shape = config.mesh.shape.to_dict()
  replicas.check_mesh(shape)
  if shape["tensor"] == 1:
    return
  source, path = _weights(config)
  if _is_hybrid(config):
    cfg = mamba_hybrid.load_config(path).gpt
  else:
    try:
      cfg = pretrained.model_config({**config.model.to_dict(), "pretrained": "" if source == "random" else path})
    except (pretrained.PretrainedError, hf_checkpoint.CheckpointError) as e:
      raise ConfigError("weights.path", str(e), "a Hugging Face checkpoint directory or an lwjax workdir") from None
  tensor_parallel.check_shapes(cfg, shape, sharding.rules_from_config(config.mesh.rules))


def make_mesh(config) -> jax.sharding.Mesh | None:
  """The serving mesh `config.mesh` names (`tensor_parallel.serving_mesh`; replicas along `data`), or None for one
  device."""
  mesh = tensor_parallel.serving_mesh(config.mesh.shape)
  return mesh if mesh.size > 1 else None


def _weights(config) -> tuple[str, str]:
  """(source, path) of the served weights: `model.pretrained` (its kind read from the directory), else
  `config.weights`."""
  path = config.model.get("pretrained") or ""
  if path:
    return ("hf_checkpoint" if pretrained.kind(path) == "hf" else "lwjax_checkpoint"), path
  return config.weights.source, config.weights.path


def _is_hybrid(config) -> bool:
  source, path = _weights(config)
  return source == "lwjax_checkpoint" and os.path.isfile(os.path.join(path, mamba_hybrid.HYBRID_CONFIG_FILE))


def load_model(config, mesh: jax.sharding.Mesh | None = None) -> GPT | mamba_hybrid.HybridGPT:
  """The served model from `model.pretrained` or `config.weights`: random (`config.model`), an HF directory,
  or the latest checkpoint of an lwjax training workdir (its model shape comes from the config saved beside
  it). With `mesh`, each parameter is read (or initialised) straight onto its sharding under `mesh.rules`."""
  source, path = _weights(config)
  rules = sharding.rules_from_config(config.mesh.rules)
  if source == "hf_checkpoint":
    return hf_checkpoint.load(path, mesh=mesh, rules=rules, **{k: config.model[k] for k in pretrained.RUNTIME_FIELDS})
  if source == "random":
    return random_model(GPTConfig.from_dict(config.model), config.seed, mesh, rules)
  if _is_hybrid(config):
    logging.info("serve: a hybrid (%s)", mamba_hybrid.HYBRID_CONFIG_FILE)
    return mamba_hybrid.load(path)
  try:
    model, _, step = checkpoint.load_model(os.path.join(path, "checkpoints"),
                                           lambda saved: GPT(GPTConfig.from_dict(saved["model"]), rngs=nnx.Rngs(0)),
                                           mesh=mesh, rules=rules)
  except FileNotFoundError:
    raise ConfigError("weights.path", f"no checkpoint under {path}/checkpoints", "an lwjax training workdir") from None
  logging.info("serve: restored step %d of %s", step, path)
  return model


def random_model(cfg: GPTConfig, seed: int, mesh: jax.sharding.Mesh | None, rules) -> GPT:
  """A randomly initialised GPT (the weights `GPT(cfg, rngs=nnx.Rngs(seed))` has); with `mesh`, initialised by one
  jitted call straight onto the parameters' shardings, never whole on one device."""
  if mesh is None:
    return GPT(cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed))))
  state = jax.jit(lambda: nnx.state(GPT(cfg, rngs=nnx.Rngs(seed))),
                  out_shardings=tensor_parallel.param_shardings(abstract, mesh, rules))()
  return nnx.merge(graphdef, state)


def load_tokenizer(config):
  """The checkpoint's own tokenizer with `model.pretrained` (when it holds one), else `config.tokenizer`'s."""
  if config.model.get("pretrained"):
    tokenizer = pretrained.load_tokenizer(config.model.pretrained)
    if tokenizer is not None:
      return tokenizer
  if config.tokenizer.kind == "bytes":
    return tokenizer_lib.ByteTokenizer()
  if config.tokenizer.kind == "hf":
    return tokenizer_lib.load_tokenizer(config.tokenizer.path)
  return tokenizer_lib.load(config.tokenizer.path)


def make_engine(config, model: GPT, tokenizer, mesh: jax.sharding.Mesh | None = None):
  """The engine `config.engine` describes: its sizes, nano-batches, asynchronous scheduling, mixed batches, KV
  offload; tensor parallel over `mesh` (`make_mesh`) under `config.mesh.rules`; with `data` > 1, that many
  replicas behind one front (`replicas.EngineReplicas`), each with its own KV offload store."""
  from lwjax.serving.engine import Engine
  from lwjax.serving.offload import KVOffloadStore
  settings = config.engine.to_dict()
  offload = settings.pop("kv_offload")

  def store(replica: int | None = None):
    if not offload["host_bytes"]:
      return None
    disk_dir = offload["disk_dir"] or None
    if disk_dir and replica is not None:  # a replica evicts its own files only
      disk_dir = os.path.join(disk_dir, f"replica{replica}")
    return KVOffloadStore(host_bytes=offload["host_bytes"], disk_dir=disk_dir, disk_bytes=offload["disk_bytes"])
  settings.update(eos_id=tokenizer.eos_id, stop_ids=getattr(tokenizer, "eos_ids", ()), detokenize=tokenizer.decode,
                  rules=sharding.rules_from_config(config.mesh.rules))
  if mesh is not None and mesh.shape[replicas.REPLICA_AXIS] > 1:
    return replicas.EngineReplicas.build(model, mesh, offload=store, **settings)
  return Engine(model, offload=store(), mesh=mesh, **settings)


def run(config, workdir: str) -> None:
  from lwjax.serving.server import create_app, make_server
  tokenizer = load_tokenizer(config)
  mesh = make_mesh(config)
  if mesh is not None:
    logging.info("serve: %d replicas (data), each tensor parallel over %d devices", mesh.shape["data"],
                 mesh.shape["tensor"])
  engine = make_engine(config, load_model(config, mesh), tokenizer, mesh)
  api_key = config.server.api_key or os.environ.get("LWJAX_API_KEY", "")
  if not api_key and config.server.host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("serving on %s without an API key: anyone who reaches it can use it (set server.api_key or "
                    "LWJAX_API_KEY)", config.server.host)
  app = create_app(engine, tokenizer, model_name=config.server.model_name, max_queued=config.server.max_queued,
                   drain_seconds=config.server.drain_seconds,
                   ignore_unknown_fields=config.server.ignore_unknown_fields, api_key=api_key or None)
  logging.info("serving %s on http://%s:%d/v1", config.server.model_name, config.server.host, config.server.port)
  make_server(app, host=config.server.host, port=config.server.port).run()
