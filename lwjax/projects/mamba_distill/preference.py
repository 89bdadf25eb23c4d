"""The distillation's last stage, as the paper's (arXiv 2408.15237, Sec. 3): DPO (`lwjax.training.dpo`) of the
finetuned hybrid on binarized UltraFeedback, against that hybrid frozen (the reference), and its evaluation on
held-out pairs. Pairs are padded rows of [2, data.seq_len] tokens (`chat_data.preference_rows`)."""

from __future__ import annotations

import logging

import numpy as np
from flax import nnx

from lwjax.data import rows as rows_lib
from lwjax.models import mamba_hybrid as mh
from lwjax.projects.mamba_distill import chat_data
from lwjax.training import dpo, trainer as trainer_lib


def train(config, stage, workdir: str, cfg: mh.HybridConfig, start: nnx.Module, tok) -> trainer_lib.Trainer:
  """DPO from hybrid `start` on train_prefs (`dpo.steps`, `dpo.beta`, its own learning rate and warmup), `start`
  frozen as the reference; `stage` is the run config with this stage's train section. Returns the finished
  trainer (a run restarted in `workdir` resumes it)."""
  stage.optim.update(learning_rate=config.dpo.learning_rate, warmup_steps=config.dpo.warmup_steps)
  trainer = trainer_lib.Trainer(stage, workdir, model_fn=lambda rngs: mh.HybridGPT(cfg, rngs=rngs),
                                loss_fn=dpo.loss_fn(config.dpo.beta), seq_len=2 * config.data.seq_len, reference=start)
  pairs = chat_data.preference_rows(config.data, tok, "train_prefs", config.dpo.num_pairs)
  logging.info("dpo: %d UltraFeedback pairs, beta %g", len(pairs), config.dpo.beta)
  batches = rows_lib.shuffled_batches(pairs, batch_size=config.train.global_batch_size, seed=config.seed + 200)
  trainer.fit(iter(batches), init_params=nnx.to_pure_dict(nnx.state(start)), seed=config.seed)
  mh.save_config(workdir, cfg)
  return trainer


def evaluate(config, trainer: trainer_lib.Trainer, params, tok) -> dict:
  """DPO's loss, the implicit rewards and the reward accuracy of `params` on test_prefs (against the trainer's
  reference). The last batch is filled with empty pairs, which weigh nothing."""
  pairs = chat_data.preference_rows(config.data, tok, "test_prefs", config.dpo.num_eval_pairs)
  count, size = len(pairs), config.train.global_batch_size
  pairs += [{k: np.zeros_like(v) for k, v in pairs[0].items()}] * (-count % size)
  batches = (rows_lib.stack(pairs[i:i + size]) for i in range(0, len(pairs), size))
  return {"pairs": count, **trainer.evaluate(params, batches)}
