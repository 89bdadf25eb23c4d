"""The retry-data experiments: pretrain the core GPT on iGSM with retry rate r, or finetune an r = 0 model
on retry data with LoRA or in full; then score greedy solutions on held-out templates
(Physics of LMs 2.2, arXiv 2408.16293, Results 2-8).

`finetune.mode`: "none" pretrains from scratch with the core `Trainer`; "lora" / "full" load the final
params of the run in `finetune.init_from` (same model config) and train adapters / all weights for
`train.steps` on this config's data, in a short jitted loop (no mid-run checkpoints). Every mode ends with
`<workdir>/metrics.json`: the train/eval loss and the checker metrics of `evaluate.score` per eval op.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import optax
from flax import nnx

from lwjax.config import ConfigError, Field, positive_int, validate as validate_schema
from lwjax.data import igsm, pipeline
from lwjax.data.igsm import tokenizer as igsm_tokenizer
from lwjax.launch import distributed
from lwjax.models.gpt import CONFIG_SCHEMA as MODEL_SCHEMA, GPT, GPTConfig
from lwjax.projects.retry import data as data_lib, evaluate
from lwjax.training import lora, losses, mesh, optim, trainer as trainer_lib


def _ops(value: str) -> str | None:
  try:
    data_lib.parse_ops(value)
  except ValueError as e:
    return str(e)
  return None


SCHEMA = {
    "job": Field(str), "seed": Field(int), "model": MODEL_SCHEMA,
    "data": {
        "preset": Field(str, choices=tuple(igsm.PRESETS)), "fmt": Field(str, choices=igsm.FORMATS),
        "train_ops": Field(str, check=_ops, doc="ops drawn uniformly, e.g. '1-4'"),
        "num_train": positive_int("distinct training problems (repeated)"),
        "retry_rate": Field(float, min=0.0, max=1.0), "retry_weak": Field(bool), "mask_retries": Field(bool),
        "seq_len": Field(int, min=2), "shuffle_seed": Field(int),
        "pack": Field(bool, doc="first-fit pack whole problems into the training rows"),
    },
    "eval": {
        "ops": Field(str, check=_ops, doc="held-out ops, in distribution and beyond, e.g. '2,4,6'"),
        "num_per_op": positive_int(), "batch_size": positive_int(), "max_new_tokens": positive_int(),
        "seed": Field(int),
        "curve_ops": Field(str, check=lambda v: _ops(v) if v else None,
                           doc="ops of the accuracy curve: greedy accuracy at every evaluation ('' = none)"),
        "curve_num_per_op": positive_int("held-out problems per curve op"),
    },
    "finetune": {"mode": Field(str, choices=("none", "lora", "full")),
                 "init_from": Field(str, doc="workdir of the r = 0 run (mode lora/full)")},
    "lora": lora.SCHEMA, "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA,
    "distributed": distributed.SCHEMA,
}


def validate(config) -> None:
  """Schema plus the cross-field rules; raises ConfigError naming the key."""
  validate_schema(config, SCHEMA)
  try:
    GPTConfig.from_dict(config.model)
  except ValueError as e:
    raise ConfigError("model", str(e), "n_kv_heads dividing n_heads, even head_dim") from None
  vocab = igsm_tokenizer.for_format(config.data.fmt).vocab_size
  if config.model.vocab_size < vocab:
    raise ConfigError("model.vocab_size", f"too small for the {config.data.fmt!r} iGSM tokenizer", f">= {vocab}")
  if config.data.seq_len + config.eval.max_new_tokens > config.model.max_seq_len:
    raise ConfigError("eval.max_new_tokens", "prompt (data.seq_len) plus new tokens exceed model.max_seq_len",
                      f"<= {config.model.max_seq_len - config.data.seq_len}")
  if config.train.global_batch_size % config.train.grad_accum_steps:
    raise ConfigError("train.grad_accum_steps", "must divide train.global_batch_size",
                      f"a divisor of {config.train.global_batch_size}")
  if config.finetune.mode != "none" and not config.finetune.init_from:
    raise ConfigError("finetune.init_from", f"required with finetune.mode={config.finetune.mode!r}",
                      "the workdir of a finished pretraining run")
  if config.finetune.mode == "lora" and config.lora.rank < 1:
    raise ConfigError("lora.rank", "must be >= 1 with finetune.mode='lora'", ">= 1")


def _train_source(config) -> igsm.IGSMSource:
  d = config.data
  return igsm.IGSMSource(d.num_train, seed=config.seed, preset=d.preset, fmt=d.fmt, split="train",
                         ops=data_lib.parse_ops(d.train_ops), retry_rate=d.retry_rate, retry_weak=d.retry_weak)


def _finetune(config, trainer: trainer_lib.Trainer, base, train_iter) -> tuple[dict, dict]:
  """Trains LoRA adapters or all weights of `base`; returns (params, last train metrics)."""
  mode, lora_cfg = config.finetune.mode, lora.LoRAConfig.from_dict(config.lora)
  trainable = lora.init(base, lora_cfg, jax.random.key(config.seed)) if mode == "lora" else base
  to_params = (lambda t: lora.merge(base, t, lora_cfg)) if mode == "lora" else (lambda t: t)
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  logging.info("finetune %s: %s trainable parameters", mode, f"{lora.num_params(trainable):,}")

  @jax.jit
  def step(trainable, opt_state, batch):
    def loss(t):
      loss_sum, weight, metrics = losses.lm_loss(nnx.merge(trainer.graphdef, to_params(t)), batch)
      return loss_sum / weight, metrics["accuracy"] / weight
    (value, accuracy), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, {"loss": value, "accuracy": accuracy}

  opt_state, start, metrics = tx.init(trainable), time.time(), {}
  for i in range(1, config.train.steps + 1):
    trainable, opt_state, metrics = step(trainable, opt_state, next(train_iter))
    if i % config.train.log_every == 0 or i == config.train.steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      logging.info("finetune step %d/%d: loss %.4f, accuracy %.3f, %.2f steps/s", i, config.train.steps,
                   metrics["loss"], metrics["accuracy"], i / (time.time() - start))
  return to_params(trainable), metrics


def _prompt_len(tok, questions: list[str], seq_len: int) -> int:
  """The prompt width of the greedy decoder: the longest prompt rounded up to 16, at most `seq_len`."""
  longest = max(1 + len(tok.encode(q)) for q in questions)
  return min(-(-longest // 16) * 16, seq_len) if longest <= seq_len else longest


def _accuracy_curve(config, trainer: trainer_lib.Trainer, tok, workdir: str):
  """An eval hook: greedy full-solution accuracy on held-out problems of `eval.curve_ops` at every evaluation,
  logged, appended to `<workdir>/curve.jsonl` and written to TensorBoard (`curve/<op>/accuracy`)."""
  d, e = config.data, config.eval
  records = data_lib.eval_records(data_lib.parse_ops(e.curve_ops), e.curve_num_per_op, seed=e.seed + 7919,
                                  preset=d.preset, fmt=d.fmt)
  questions = [r["question"] for r in records]
  prompt_len = _prompt_len(tok, questions, d.seq_len)
  decode = evaluate.make_greedy_decoder(trainer.graphdef, prompt_len=prompt_len, max_new_tokens=e.max_new_tokens)
  writer = None

  def hook(step: int, params) -> None:
    nonlocal writer
    solutions = evaluate.generate_solutions(decode, params, tok, questions, prompt_len=prompt_len,
                                            batch_size=e.batch_size)
    scores = evaluate.score(records, solutions)
    logging.info("step %d curve: %s", step, ", ".join(f"{k} accuracy {m['accuracy']:.3f} (answer "
                                                       f"{m['answer_accuracy']:.3f})" for k, m in scores.items()))
    if jax.process_index() != 0:
      return
    if writer is None:
      from tensorboardX import SummaryWriter
      writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    for key, m in scores.items():
      for name in ("accuracy", "answer_accuracy", "correct_prefix"):
        writer.add_scalar(f"curve/{key}/{name}", m[name], step)
    writer.flush()
    with open(os.path.join(workdir, "curve.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, "time": time.time(), "eval": scores}) + "\n")

  return hook


def run(config, workdir: str) -> dict:
  """Trains (or finetunes), evaluates with the checker, writes `<workdir>/metrics.json`; returns the metrics."""
  model_cfg, tok, d = GPTConfig.from_dict(config.model), igsm_tokenizer.for_format(config.data.fmt), config.data
  batch = config.train.global_batch_size
  train_ds = data_lib.make_dataset(_train_source(config), tok, seq_len=d.seq_len, batch_size=batch,
                                   mask_retries=d.mask_retries, shuffle_seed=d.shuffle_seed, pack=d.pack)
  eval_source = igsm.IGSMSource(batch * config.train.eval_steps, seed=config.eval.seed, preset=d.preset,
                                fmt=d.fmt, split="test", ops=data_lib.parse_ops(d.train_ops),
                                retry_rate=d.retry_rate, retry_weak=d.retry_weak)

  def eval_batches():
    ds = data_lib.make_dataset(eval_source, tok, seq_len=d.seq_len, batch_size=batch,
                               mask_retries=d.mask_retries, shuffle_seed=None, num_epochs=1)
    return pipeline.take_padded(iter(ds), config.train.eval_steps)

  trainer = trainer_lib.Trainer(config, workdir, model_fn=lambda rngs: GPT(model_cfg, rngs=rngs),
                                loss_fn=losses.lm_loss, flops_per_token=model_cfg.flops_per_token(d.seq_len),
                                seq_len=d.seq_len)
  if config.finetune.mode == "none":
    hook = _accuracy_curve(config, trainer, tok, workdir) if config.eval.curve_ops else None
    result = trainer.fit(iter(train_ds), eval_batches, seed=config.seed, eval_hook=hook)
    if result["step"] < config.train.steps:  # stopped by a signal: checkpointed, resumes in the same workdir
      logging.warning("stopped at step %d of %d: no evaluation; run again to resume", result["step"],
                      config.train.steps)
      return {}
    params, train_metrics = trainer.restore_params(), result["train"]
  else:
    base = trainer.restore_params(config.finetune.init_from)
    params, train_metrics = _finetune(config, trainer, base, iter(train_ds))
  eval_loss = trainer.evaluate(params, eval_batches())

  e = config.eval
  records = data_lib.eval_records(data_lib.parse_ops(e.ops), e.num_per_op, seed=e.seed, preset=d.preset, fmt=d.fmt)
  questions = [r["question"] for r in records]
  prompt_len = _prompt_len(tok, questions, d.seq_len)
  decode = evaluate.make_greedy_decoder(trainer.graphdef, prompt_len=prompt_len, max_new_tokens=e.max_new_tokens)
  solutions = evaluate.generate_solutions(decode, params, tok, questions, prompt_len=prompt_len,
                                          batch_size=e.batch_size)
  metrics = {"finetune": config.finetune.mode, "retry_rate": d.retry_rate, "retry_weak": d.retry_weak,
             "mask_retries": d.mask_retries, "steps": config.train.steps,
             "train_loss": train_metrics.get("loss"), "eval_loss": eval_loss["loss"],
             "eval": evaluate.score(records, solutions),
             "samples": [{"op": r["op"], "solution": s} for r, s in zip(records[:3], solutions[:3], strict=False)]}
  for key, m in metrics["eval"].items():
    logging.info("%s: accuracy %.3f, answer accuracy %.3f (constant answer %.3f), correct prefix %.3f, "
                 "[BACK] rate %.3f, length vs shortest %.3f (n=%d)", key, m["accuracy"], m["answer_accuracy"],
                 m["constant_answer_accuracy"], m["correct_prefix"], m["back_rate"], m["length_vs_shortest"],
                 m["n"])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
