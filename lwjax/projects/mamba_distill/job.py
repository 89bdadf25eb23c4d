"""Distilling a trained GPT into Mamba/attention hybrids (The Mamba in the Llama, arXiv 2408.15237, Sec. 2-3).

Job "mamba_distill". The teacher is a finished `lm_pretrain` run (`teacher.workdir`: its checkpoint, the
run's config, its corpus and tokenizer), or a Hugging Face checkpoint of the paper's kind (Llama-3, Zephyr:
Mistral) with its tokenizer. `data.source` picks the data: `documents`, the lm_pretrain teacher's corpus or, for a
Hugging Face teacher, the text files `data.train_files` / `data.eval_files` (one document per line); or `chat`,
the paper's sets through the teacher's chat template (`chat_data`): UltraChat (`data.sft_path`) and binarized
UltraFeedback (`data.dpo_path`). Then, as the paper:
1. Pseudo-labels: the teacher continues the first `distill.prompt_len` tokens of training documents, or answers
   UltraChat prompts (temperature `distill.temperature`); these sequences are the stage-1 data
   (sequence-level distillation).
2. Progressive replacement: one stage per attention fraction in `hybrid.schedule` (e.g. 0.5, 0.25, 0.125,
   0.0): the layers that become Mamba at that stage are initialised from the teacher's attention at the same
   layer (V -> x, K -> B, Q -> C, O -> out; `hybrid.init=random` leaves them random: the paper's baseline),
   the rest continue from the previous stage. Loss: `kl_weight` x KL(teacher || hybrid) over the vocabulary
   at every position + `ce_weight` x cross-entropy on the teacher's tokens, MLPs frozen (`freeze_mlp`).
3. Supervised finetuning of the last stage on the real documents, or on UltraChat with the loss on the
   assistant's turns (`sft.steps`, everything trainable).
4. With chat data, DPO (`lwjax.training.dpo`) on UltraFeedback's train_prefs (`dpo.steps`, `dpo.beta`), against
   the student as it starts DPO, frozen; its held-out reward accuracy and margin on test_prefs go to the metrics.
Each stage is a core `Trainer` run in `<workdir>/<stage>/` (checkpoints, resume: a finished stage is skipped).
At the end the teacher and every stage's hybrid are evaluated on the same held-out documents, or test_sft
conversations on the assistant's tokens (next-token loss and accuracy, and agreement with the teacher's argmax)
into `<workdir>/metrics.json`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lwjax.config import ConfigError, Field, positive_int, validate as validate_schema
from lwjax.data import pipeline, rows as rows_lib, tokenizer as tokenizer_lib
from lwjax.models import hf_checkpoint, mamba_hybrid as mh, pretrained
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.mamba_distill import chat_data, preference
from lwjax.serving import batch_sampler
from lwjax.training import checkpoint, dpo, mesh, optim, trainer as trainer_lib

INITS = ("attention", "random")
SOURCES = ("documents", "chat")
SCHEMA = {
    "job": Field(str), "seed": Field(int),
    "teacher": {"workdir": Field(str, doc="a finished lm_pretrain run (python main.py --config "
                                          "experiments/lm_pretrain.py:scale=cpu --workdir runs/lm_cpu), or a "
                                          "Hugging Face checkpoint directory with its tokenizer (Llama, Mistral)"),
                "preset": Field(str, doc="the teacher's shape by name (lwjax.models.presets) where its workdir has "
                                         "no checkpoint yet: ahead-of-time compilation only; empty: the checkpoint's"),
                "compile_stage": Field(str, choices=("distill", "dpo"), has_default=True,
                                       doc="ahead-of-time compilation only: the first distillation stage's step, or "
                                           "DPO's (the final hybrid against itself frozen, on pairs)")},
    "hybrid": {
        "schedule": Field(str, doc="attention fractions of the stages, e.g. '0.5,0.25' (progressive)"),
        "init": Field(str, choices=INITS, doc="Mamba layers from the teacher's attention, or random"),
        "d_conv": positive_int(), "chunk_size": positive_int(),
        "scan_impl": Field(str, choices=("auto", "pallas", "interpret", "reference")),
    },
    "data": {
        "source": Field(str, choices=SOURCES, doc="documents: the teacher's corpus or data.train_files; chat: "
                        "UltraChat and UltraFeedback through the teacher's chat template"),
        "seq_len": Field(int, min=8, doc="tokens per row (one document or conversation per row, padded)"),
        "num_train_docs": positive_int("training documents or conversations read (pseudo-label prompts and SFT "
                                       "rows)"),
        "num_eval_docs": positive_int("held-out documents or conversations every model is evaluated on"),
        "train_files": Field(str, doc="text files, one document per line, for a Hugging Face teacher (an "
                             "lm_pretrain teacher brings its own corpus)"),
        "eval_files": Field(str, doc="held-out text files, one document per line, for a Hugging Face teacher"),
        "sft_path": Field(str, doc="chat: UltraChat (HuggingFaceH4/ultrachat_200k), a directory holding its "
                          "train_sft and test_sft files (jsonl or parquet)"),
        "dpo_path": Field(str, doc="chat: binarized UltraFeedback (HuggingFaceH4/ultrafeedback_binarized), a "
                          "directory holding its train_prefs and test_prefs files"),
    },
    "distill": {
        "kl_weight": Field(float, min=0.0), "ce_weight": Field(float, min=0.0),
        "freeze_mlp": Field(bool),
        "prompt_len": positive_int("document tokens the teacher continues; chat: the longest prompt it answers"),
        "temperature": Field(float, min=0.0), "num_sequences": positive_int("teacher sequences sampled"),
        "steps": positive_int("training steps per stage"),
    },
    "sft": {"steps": Field(int, min=0, doc="finetuning steps on the real documents after the last stage")},
    "dpo": {"steps": Field(int, min=0, doc="DPO steps after SFT (chat data; 0: no DPO stage)"),
            "beta": Field(float, min=0.0, doc="DPO's beta: how far the policy may move from the reference"),
            "learning_rate": Field(float, min=0.0, doc="peak learning rate of the DPO stage"),
            "warmup_steps": Field(int, min=0, doc="warmup steps of the DPO stage's learning rate"),
            "num_pairs": positive_int("train_prefs pairs read"),
            "num_eval_pairs": positive_int("test_prefs pairs the DPO'd model is evaluated on")},
    "eval": {"batch_size": positive_int()},
    "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA,
}


def aot_step(config, devices):
  """The first distillation stage's train step for ahead-of-time compilation (`lwjax.launch.compile`): the hybrid
  at the schedule's first attention fraction, KL + CE to an abstract teacher, MLPs frozen, on a mesh of
  `devices`. The teacher's shape comes from its checkpoint's config, else from `teacher.preset`. Model FLOPs are
  the teacher GPT's 6 N per token. Returns a `compile.AotStep`."""
  from lwjax.launch.compile import AotStep, token_batch
  from lwjax.training import mesh as mesh_lib
  gpt_cfg = pretrained.shape_for_compile(config.teacher.workdir, config.teacher.preset, "teacher.workdir",
                                         "teacher.preset")
  seq_len, batch = config.data.seq_len, config.train.global_batch_size
  mesh = mesh_lib.make_mesh(config.mesh.shape, devices)
  if config.teacher.get("compile_stage", "distill") == "dpo":  # the last stage: the final hybrid, pairs of answers
    import jax.numpy as jnp
    cfg = _hybrid_config(config, gpt_cfg, schedule(config)[-1])
    reference = nnx.eval_shape(lambda: mh.HybridGPT(cfg, rngs=nnx.Rngs(0)))
    def model_fn(rngs):
      return mh.HybridGPT(cfg, rngs=rngs)
    trainer = trainer_lib.Trainer(config, "/tmp/lwjax-compile-unused", model_fn=model_fn,
                                  loss_fn=dpo.loss_fn(config.dpo.beta),
                                  seq_len=2 * seq_len, flops_per_token=gpt_cfg.flops_per_token(seq_len), mesh=mesh,
                                  reference=reference)
    pairs = {name: ((batch, 2, seq_len), jnp.float32 if name == "loss_mask" else jnp.int32)
             for name in token_batch(1, 1)}
    # policy forward and backward (3x) plus the reference's forward (1x) over both answers
    return AotStep(trainer, pairs, gpt_cfg.flops_per_token(seq_len) * batch * 2 * seq_len * 4 / 3,
                   f"{batch} pairs x 2 x {seq_len} tokens (DPO)")
  cfg = _hybrid_config(config, gpt_cfg, schedule(config)[0])
  teacher = nnx.eval_shape(lambda: GPT(gpt_cfg, rngs=nnx.Rngs(0)))
  trainer = trainer_lib.Trainer(config, "/tmp/lwjax-compile-unused", model_fn=lambda rngs: mh.HybridGPT(cfg, rngs=rngs),
                                loss_fn=distill_loss(config.distill.kl_weight, config.distill.ce_weight),
                                seq_len=seq_len, flops_per_token=gpt_cfg.flops_per_token(seq_len),
                                mesh=mesh,
                                frozen=(lambda p: "mlp" in p) if config.distill.freeze_mlp else None, reference=teacher)
  return AotStep(trainer, token_batch(batch, seq_len), gpt_cfg.flops_per_token(seq_len) * batch * seq_len,
                 f"{batch} x {seq_len} tokens")


def schedule(config) -> list[float]:
  return [float(x) for x in config.hybrid.schedule.split(",") if x.strip()]


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  try:
    fractions = schedule(config)
  except ValueError:
    fractions = []
  if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions) or fractions != sorted(fractions, reverse=True):
    raise ConfigError("hybrid.schedule", f"{config.hybrid.schedule!r} is not a decreasing list of fractions",
                      "e.g. '0.5,0.25,0.125,0' (attention kept per stage)")
  teacher, chat = config.teacher.workdir, config.data.source == "chat"
  if config.dpo.steps and not chat:
    raise ConfigError("dpo.steps", "DPO trains on preference pairs, which data.source 'documents' has none of",
                      "0, or data.source=chat with data.dpo_path")
  if config.teacher.preset and not os.path.exists(teacher):
    return  # the teacher's shape by name, for ahead-of-time compilation on a host without it: nothing to check
  if pretrained.is_hf_directory(teacher):
    try:
      _check_teacher(hf_checkpoint.config_from_dir(teacher))
      pretrained.check(teacher)
    except (pretrained.PretrainedError, hf_checkpoint.CheckpointError) as e:
      raise ConfigError("teacher.workdir", str(e), "a Hugging Face checkpoint directory with its tokenizer") from None
    for key in () if chat else ("train_files", "eval_files"):
      if not glob.glob(config.data[key]):
        raise ConfigError(f"data.{key}", f"no file matches {config.data[key]!r} (a Hugging Face teacher brings no "
                          "corpus)", "a glob of text files, one document per line")
  elif not os.path.isdir(os.path.join(teacher, "checkpoints")):
    raise ConfigError("teacher.workdir", f"{teacher!r} holds no checkpoints",
                      "a finished lm_pretrain run's --workdir, or a Hugging Face checkpoint directory")
  if chat:
    chat_data.check(config, pretrained.load_tokenizer(teacher) if pretrained.is_hf_directory(teacher) else None)
  if config.distill.prompt_len >= config.data.seq_len:
    raise ConfigError("distill.prompt_len", "must be shorter than data.seq_len", f"< {config.data.seq_len}")


def _check_teacher(cfg: GPTConfig) -> None:
  """The options a Mamba layer cannot take over from the attention it replaces (the paper's teachers, Llama and
  Mistral/Zephyr, have none of them)."""
  for option, value in (("qkv_bias", cfg.qkv_bias), ("post_norms", cfg.post_norms)):
    if value:
      raise ConfigError("teacher.workdir", f"the teacher has {option} (a Qwen2 or Gemma-2 checkpoint), which the "
                        "Mamba layers initialised from its attention do not carry", "a Llama or Mistral teacher")


def load_teacher(workdir: str, data_config=None):
  """(teacher GPT, its run config, tokenizer, (train docs, eval docs)) of an lm_pretrain run, or of a Hugging Face
  checkpoint directory (its tokenizer; the documents of `data_config.train_files` / `eval_files`, None with chat
  data)."""
  if pretrained.is_hf_directory(workdir):
    teacher, tok = pretrained.load_pretrained(workdir)
    _check_teacher(teacher.cfg)
    docs = None if data_config.source == "chat" else tuple(
        pipeline.TextLineSource(data_config[key]) for key in ("train_files", "eval_files"))
    return teacher, {"model": teacher.cfg.to_dict(), "pretrained": workdir}, tok, docs
  teacher, run, _ = checkpoint.load_model(os.path.join(workdir, "checkpoints"),
                                          lambda saved: GPT(GPTConfig.from_dict(saved["model"]), rngs=nnx.Rngs(0)))
  data = run["data"]
  if data["tokenizer"] == "bytes":
    tok = tokenizer_lib.ByteTokenizer()
  else:
    tok = tokenizer_lib.load(data["tokenizer_path"] or os.path.join(workdir, "tokenizer.model"))
  if data["source"] == "generated":
    paths = os.path.join(workdir, "corpus", "train.txt"), os.path.join(workdir, "corpus", "eval.txt")
  elif data["source"] == "text_files":
    paths = data["train_files"], data["eval_files"]
  else:
    raise ConfigError("teacher.workdir", f"the teacher trained on {data['source']!r} data",
                      "a teacher trained on generated or text_files data")
  return teacher, run, tok, tuple(pipeline.TextLineSource(p) for p in paths)


def document_rows(docs, tok, seq_len: int, limit: int) -> list[dict]:
  """One document per row ([bos] + tokens + [eos], cut to seq_len + 1 tokens), the loss on every token."""
  bos = [] if tok.bos_id is None else [tok.bos_id]
  return [rows_lib.lm_row(bos, (tok.encode(docs[i]) + [tok.eos_id])[:seq_len], seq_len)
          for i in range(min(limit, len(docs)))]


def pseudo_label_rows(teacher, tok, prompts: Sequence[Sequence[int]], *, prompt_len: int, seq_len: int,
                      temperature: float, seed: int, batch: int = 128) -> list[dict]:
  """The teacher's continuations of `prompts` (each of at most `prompt_len` ids, bos first) as rows, the loss on
  the continuation, which ends at the first of the tokenizer's stop ids."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  padded_prompts = np.zeros((len(prompts), prompt_len), np.int32)  # right-padded, as the sampler reads them
  for i, prompt in enumerate(prompts):
    padded_prompts[i, :len(prompt)] = prompt
  stop_ids = list(getattr(tok, "eos_ids", None) or [tok.eos_id])
  graphdef, params = nnx.split(teacher)
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=prompt_len, max_new_tokens=seq_len + 1 - prompt_len,
                                        n=1, eos_id=tok.eos_id)
  rows = []
  for start in tqdm(range(0, len(prompts), batch), desc="teacher pseudo-labels", unit="batch"):
    chunk, chunk_lengths = padded_prompts[start:start + batch], lengths[start:start + batch]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
    padded_lengths = np.concatenate([chunk_lengths, np.repeat(chunk_lengths[:1], batch - len(chunk))])
    seeds = ((seed * 2**20 + start + np.arange(batch))[:, None] % 2**32).astype(np.uint32)
    out = np.asarray(sample_n(params, padded, padded_lengths, seeds,
                              np.float32(max(temperature, 1e-6)), np.float32(1.0)))[:len(chunk), 0]
    for prompt, length, cont in zip(chunk, chunk_lengths, out, strict=True):
      ends = np.flatnonzero(np.isin(cont, stop_ids))
      rows.append(rows_lib.lm_row(prompt[:length].tolist(), (cont[:ends[0] + 1] if len(ends) else cont).tolist(),
                                  seq_len))
  return rows


def _token_terms(logits, batch, teacher_logits=None):
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  if teacher_logits is None:
    return ce, correct, None, None
  t_logp = jax.nn.log_softmax(teacher_logits)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1)
  agree = (jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
  return ce, correct, kl, agree


def distill_loss(kl_weight: float, ce_weight: float):
  """Stage-1 loss (Sec. 3): kl_weight x KL(teacher || student) + ce_weight x CE on the (pseudo-)labels."""
  def loss_fn(model, batch, teacher):
    mask = batch["loss_mask"]
    ce, correct, kl, agree = _token_terms(model(batch["inputs"]), batch, teacher(batch["inputs"]))
    total = kl_weight * kl + ce_weight * ce
    return (jnp.sum(total * mask), jnp.sum(mask),
            {"ce": jnp.sum(ce * mask), "kl": jnp.sum(kl * mask), "accuracy": jnp.sum(correct * mask),
             "teacher_agreement": jnp.sum(agree * mask)})
  return loss_fn


def ce_loss(model, batch):
  mask = batch["loss_mask"]
  ce, correct, _, _ = _token_terms(model(batch["inputs"]), batch)
  return jnp.sum(ce * mask), jnp.sum(mask), {"accuracy": jnp.sum(correct * mask)}


@nnx.jit
def _eval_sums(model, teacher, batch):
  ce, correct, kl, agree = _token_terms(model(batch["inputs"]), batch, teacher(batch["inputs"]))
  m = batch["loss_mask"]
  return jnp.stack([jnp.sum(ce * m), jnp.sum(correct * m), jnp.sum(agree * m), jnp.sum(kl * m), jnp.sum(m)])


def evaluate(model, teacher, rows: dict, batch_size: int) -> dict:
  """Held-out next-token loss (nats), accuracy, and agreement with the teacher's argmax (all over real tokens);
  `rows` stacked ([n, seq_len] arrays)."""
  total = np.zeros(5)
  n = len(rows["inputs"]) // batch_size * batch_size
  for start in range(0, n, batch_size):
    total += np.asarray(_eval_sums(model, teacher, {k: rows[k][start:start + batch_size]
                                                    for k in ("inputs", "targets", "loss_mask")}))
  w = max(total[4], 1.0)
  return {"loss": total[0] / w, "accuracy": total[1] / w, "teacher_agreement": total[2] / w,
          "kl_to_teacher": total[3] / w, "tokens": int(total[4])}


def _stage_config(config, steps: int):
  stage = config.copy_and_resolve_references()
  with stage.unlocked():
    stage.train.steps = steps
    stage.train.eval_every = 0
  return stage


def _hybrid_config(config, gpt_cfg: GPTConfig, fraction: float) -> mh.HybridConfig:
  h = config.hybrid
  return mh.HybridConfig(gpt=gpt_cfg, mamba_layers=mh.every_other_layer(gpt_cfg.n_layers, fraction),
                         d_conv=h.d_conv, chunk_size=h.chunk_size, scan_impl=h.scan_impl)


def _stage_params(teacher, cfg: mh.HybridConfig, previous: dict | None, previous_mamba: tuple, init: str, seed: int):
  """This stage's starting params: new Mamba layers from the teacher (or random), the rest from `previous`."""
  model = mh.HybridGPT.from_teacher(teacher, cfg, rngs=nnx.Rngs(seed), attention_init=init == "attention")
  params = nnx.to_pure_dict(nnx.state(model))
  if previous is not None:
    for key, value in previous.items():
      if key != "layers":
        params[key] = value
    keys = {int(k): k for k in params["layers"]}
    for i, layer in previous["layers"].items():
      if int(i) in previous_mamba or int(i) not in cfg.mamba_layers:  # trained before, same kind of layer
        params["layers"][keys[int(i)]] = layer
  return params


def run(config, workdir: str) -> dict:
  teacher, run_config, tok, docs = load_teacher(config.teacher.workdir, config.data)
  gpt_cfg = teacher.cfg
  seq_len, d, chat = config.data.seq_len, config.distill, config.data.source == "chat"
  if seq_len > gpt_cfg.max_seq_len:
    raise ConfigError("data.seq_len", f"{seq_len} exceeds the teacher's max_seq_len", f"<= {gpt_cfg.max_seq_len}")
  if chat:
    eval_rows = rows_lib.stack(chat_data.sft_rows(config.data, tok, "test_sft", config.data.num_eval_docs))
    train_rows = chat_data.sft_rows(config.data, tok, "train_sft", config.data.num_train_docs)
  else:
    eval_rows = rows_lib.stack(document_rows(docs[1], tok, seq_len, config.data.num_eval_docs))
    train_rows = document_rows(docs[0], tok, seq_len, config.data.num_train_docs)

  labels_path = os.path.join(workdir, "pseudo_labels.npz")
  if os.path.exists(labels_path):
    stacked = dict(np.load(labels_path))
    pseudo = [{k: v[i] for k, v in stacked.items()} for i in range(len(stacked["inputs"]))]
  else:
    if chat:
      candidates = chat_data.prompts(config.data, tok, d.prompt_len, config.data.num_train_docs)
    else:
      candidates = [row["inputs"][:d.prompt_len].tolist() for row in train_rows]
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(candidates), size=d.num_sequences, replace=d.num_sequences > len(candidates))
    pseudo = pseudo_label_rows(teacher, tok, [candidates[i] for i in pick], prompt_len=d.prompt_len, seq_len=seq_len,
                               temperature=d.temperature, seed=config.seed)
    os.makedirs(workdir, exist_ok=True)
    np.savez(labels_path + ".tmp.npz", **rows_lib.stack(pseudo))
    os.replace(labels_path + ".tmp.npz", labels_path)
  logging.info("stage-1 data: %d teacher sequences, %.0f label tokens", len(pseudo),
               sum(r["loss_mask"].sum() for r in pseudo))

  results = {"teacher": evaluate(teacher, teacher, eval_rows, config.eval.batch_size)}
  logging.info("teacher: %s", results["teacher"])
  params, mamba_before, cfg = None, (), None
  batch = config.train.global_batch_size
  for index, fraction in enumerate(schedule(config)):
    cfg = _hybrid_config(config, gpt_cfg, fraction)
    name = f"stage{index}_attention{fraction:g}"
    start = _stage_params(teacher, cfg, params, mamba_before, config.hybrid.init, config.seed + index)
    trainer = trainer_lib.Trainer(_stage_config(config, d.steps), os.path.join(workdir, name),
                                  model_fn=lambda rngs, cfg=cfg: mh.HybridGPT(cfg, rngs=rngs),
                                  loss_fn=distill_loss(d.kl_weight, d.ce_weight), seq_len=seq_len,
                                  frozen=(lambda path: "mlp" in path) if d.freeze_mlp else None, reference=teacher)
    logging.info("%s: Mamba layers %s, attention layers %s", name, cfg.mamba_layers, cfg.attention_layers)
    mh.save_config(os.path.join(workdir, name), cfg)
    trainer.fit(iter(rows_lib.shuffled_batches(pseudo, batch_size=batch, seed=config.seed + index)), init_params=start,
                seed=config.seed)
    params = jax.device_get(trainer.restore_params())
    results[name] = {"mamba_layers": list(cfg.mamba_layers),
                     **evaluate(nnx.merge(trainer.graphdef, params), teacher, eval_rows, config.eval.batch_size)}
    logging.info("%s: %s", name, results[name])
    mamba_before = cfg.mamba_layers
  if config.sft.steps:
    trainer = trainer_lib.Trainer(_stage_config(config, config.sft.steps), os.path.join(workdir, "sft"),
                                  model_fn=lambda rngs: mh.HybridGPT(cfg, rngs=rngs), loss_fn=ce_loss,
                                  seq_len=seq_len)
    sft_rows = rows_lib.shuffled_batches(train_rows, batch_size=batch, seed=config.seed + 100)
    trainer.fit(iter(sft_rows), init_params=params, seed=config.seed)
    mh.save_config(os.path.join(workdir, "sft"), cfg)
    params = jax.device_get(trainer.restore_params())
    results["sft"] = {"mamba_layers": list(cfg.mamba_layers),
                      **evaluate(nnx.merge(trainer.graphdef, params), teacher, eval_rows, config.eval.batch_size)}
    logging.info("sft: %s", results["sft"])
  if config.dpo.steps:
    trainer = preference.train(config, _stage_config(config, config.dpo.steps), os.path.join(workdir, "dpo"), cfg,
                               nnx.merge(trainer.graphdef, params), tok)
    params = jax.device_get(trainer.restore_params())
    results["dpo"] = {"mamba_layers": list(cfg.mamba_layers),
                      **evaluate(nnx.merge(trainer.graphdef, params), teacher, eval_rows, config.eval.batch_size),
                      "test_prefs": preference.evaluate(config, trainer, params, tok)}
    logging.info("dpo: %s", results["dpo"])
  metrics = {"init": config.hybrid.init, "teacher_workdir": config.teacher.workdir,
             "teacher_step_config": {"model": run_config["model"]}, "eval_docs": len(eval_rows["inputs"]),
             "results": results}
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  return metrics
