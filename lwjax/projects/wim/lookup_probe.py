"""Can the WiM reader's shape learn the lookup its tasks rest on, at a CPU budget? (Writing in the Margins,
arXiv 2408.14906, needs a reader that finds a fact in a segment; this probe measures that skill alone.)

A GPT of the reader's shape is trained from scratch on rows of facts and questions in the WiM vocabulary, every
fact asked in turn, the loss on the answers only; it reports the answer accuracy on held-out rows every
`--every` steps, with the accuracy a reader gets by elimination alone (picking uniformly among the facts not yet
asked: the floor to beat), and `--copy` as the control every causal LM learns fast (repeat a random sequence).

  python -m lwjax.projects.wim.lookup_probe --steps 2000                       # value-first `? get v42 ans` -> k17
  python -m lwjax.projects.wim.lookup_probe --steps 1500 --adjacent --key_first --no_ans   # MQAR: `? get k17` -> v42
  python -m lwjax.projects.wim.lookup_probe --steps 500 --copy                 # the control
  python -m lwjax.projects.wim.lookup_probe --steps 500 --adjacent --key_first --no_ans --mix_copy 0.5  # + copy rows
  python -m lwjax.projects.wim.lookup_probe --steps 1000 --aggregation first --mix_copy 0.3  # common words

Rows: `section` then 2-16 facts (`k17 = v42 .`, or `k17 v42 .` with `--adjacent`) without filler, or
(`--filler`) one 48-word segment of `tasks.retrieval` holding 4 facts (`v42 k17 .`) among filler sentences,
packed in order into `--seq_len` rows; `--mix_copy` mixes copy rows into training (held-out rows are fact rows).
`--aggregation` replaces the facts by one common-words segment asked `? common ans` (the aggregation task's skill
alone), its answer alphabetical or in order of first appearance; no elimination floor is computed for it.
The reader's model shape and peak learning rate; the optimizer is the probe's own (optax AdamW with its
defaults, b2 0.999, weight decay 0.1 on every parameter, warmup 100, cosine to 0, clipping 1.0), not the
reader's `training.optim` chain (b2 0.95, no decay on norms and biases, cosine to 0.1x): the figures in
docs/RESULTS.md were measured with it.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.projects.wim import tasks
from lwjax.training import losses


def probe_row(rng: random.Random, tok: tasks.WiMTokenizer, args, num_keys: int) -> tuple[list[int], list[int]]:
  """(tokens, 1 where the token is an answer) of one probe row: a copy row, a common-words segment
  (`--aggregation`), or facts and their questions."""
  keys, values = tasks.KEYS[:num_keys], tasks.VALUES[:num_keys]
  if args.copy or (args.mix_copy and rng.random() < args.mix_copy):
    seq = " ".join(rng.choice(values) for _ in range(rng.randint(4, 24)))
    n = len(seq.split())
    return [tok.bos_id] + tok.encode(f"{seq} ? {seq}"), [0] * (n + 2) + [1] * n
  if args.aggregation:  # one aggregation segment, `? common ans` -> its repeated words in the chosen order
    record = tasks.aggregation(rng, 1, 48)
    words = f"{tasks.SECTION} {record.segments[0]}".split()
    answer = list(record.answer) if args.aggregation == "sorted" else sorted(record.answer, key=words.index)
    tokens = [tok.bos_id] + tok.encode(" ".join(words) + " ? common ans")
    return tokens + tok.encode(" ".join(answer)), [0] * len(tokens) + [1] * len(answer)
  if args.filler:  # the task's own layout, `v42 k17 .`
    words = f"{tasks.SECTION} {tasks.retrieval(rng, 1, 48).segments[0]}".split()
    facts = [(key, value) for value, key in tasks.assignments(" ".join(words))]
  else:
    n = rng.randint(2, min(16, num_keys))
    facts = zip(rng.sample(keys, n), rng.sample(values, n), strict=True)
    words = [tasks.SECTION] + [w for k, v in facts for w in ((k, v, ".") if args.adjacent else (k, "=", v, "."))]
    facts = [(words[i - (1 if args.adjacent else 2)], w) for i, w in enumerate(words) if w in tasks.VALUES]
  rng.shuffle(facts)
  tokens = [tok.bos_id] + tok.encode(" ".join(words))
  is_answer = [0] * len(tokens)
  for k, v in facts:
    question = tok.encode(f"? get {k if args.key_first else v}" + ("" if args.no_ans else " ans"))
    tokens += question + tok.encode(v if args.key_first else k)
    is_answer += [0] * len(question) + [1]
  return tokens, is_answer


def batch(rng: random.Random, tok: tasks.WiMTokenizer, args, num_keys: int) -> dict:
  """`args.batch` rows of `args.seq_len`, each packed with whole fact rows (segment ids and positions per row)."""
  shape = (args.batch, args.seq_len)
  out = {k: np.zeros(shape, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  out["loss_mask"] = np.zeros(shape, np.float32)
  for b in range(args.batch):
    t, segment = 0, 1
    while True:
      tokens, is_answer = probe_row(rng, tok, args, num_keys)
      n = len(tokens) - 1
      if t + n > args.seq_len:
        break
      out["inputs"][b, t:t + n], out["targets"][b, t:t + n] = tokens[:-1], tokens[1:]
      out["loss_mask"][b, t:t + n] = is_answer[1:]
      out["segment_ids"][b, t:t + n], out["positions"][b, t:t + n] = segment, np.arange(n)
      t, segment = t + n, segment + 1
  return out


def elimination_accuracy(rows: dict) -> float:
  """Expected answer accuracy of a reader that picks uniformly among the facts of its row not yet asked."""
  hits = total = 0.0
  for mask, seg in zip(rows["loss_mask"], rows["segment_ids"], strict=True):
    for s in set(seg[seg > 0].tolist()):
      n = int(mask[seg == s].sum())
      hits += sum(1.0 / i for i in range(1, n + 1))
      total += n
  return hits / max(total, 1.0)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--width", type=int, default=128, help="d_model (heads of 32, d_ff 4x, 4 layers: the reader's)")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--learning_rate", type=float, default=2e-3)
  p.add_argument("--num_keys", type=int, default=len(tasks.VALUES), help="keys and values drawn from the first N")
  p.add_argument("--every", type=int, default=250)
  p.add_argument("--mix_copy", type=float, default=0.0,
                 help="fraction of training rows that are copy rows (a curriculum: copying random sequences forms "
                      "induction heads); held-out rows are all fact rows")
  for flag, doc in (("filler", "facts inside a 48-word retrieval segment"), ("adjacent", "`k17 v42` (no `=`)"),
                    ("key_first", "ask the key, answer the value"), ("no_ans", "the answer right after the query"),
                    ("copy", "control: repeat a random sequence")):
    p.add_argument(f"--{flag}", action="store_true", help=doc)
  p.add_argument("--aggregation", choices=("sorted", "first"), default=None,
                 help="rows are one common-words segment instead of facts, its answer in alphabetical order (the "
                      "task's) or in order of first appearance; accuracy is per answer word, teacher-forced")
  args = p.parse_args(argv)
  if args.width % 32 or not 2 <= args.num_keys <= len(tasks.VALUES) or args.steps < 1:
    p.error("--width must be a multiple of 32, --num_keys in [2, 100], --steps >= 1")
  tok = tasks.WiMTokenizer()
  num_keys = min(args.num_keys, len(tasks.KEYS))
  heads = args.width // 32
  cfg = GPTConfig(vocab_size=tok.vocab_size, max_seq_len=args.seq_len, d_model=args.width, n_layers=args.layers,
                  n_heads=heads, n_kv_heads=heads, head_dim=32, d_ff=4 * args.width)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, min(100, args.steps // 10), args.steps)
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1)),
                      wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt, rows):
    def mean_loss(m):
      loss_sum, weight, _ = losses.lm_loss(m, rows)
      return loss_sum / jnp.maximum(weight, 1.0)
    loss, grads = nnx.value_and_grad(mean_loss)(model)
    opt.update(model, grads)
    return loss

  @nnx.jit
  def accuracy(model, rows):
    _, weight, metrics = losses.lm_loss(model, rows)
    return metrics["accuracy"] / weight

  held_out = batch(random.Random(99), tok, argparse.Namespace(**{**vars(args), "mix_copy": 0.0}), num_keys)
  floor = elimination_accuracy(held_out) if not (args.copy or args.aggregation) else 0.0
  rng, start, curve = random.Random(0), time.perf_counter(), []
  for step in range(1, args.steps + 1):
    loss = train_step(model, opt, {k: jnp.asarray(v) for k, v in batch(rng, tok, args, num_keys).items()})
    if step % args.every == 0 or step == args.steps:
      point = {"step": step, "loss": float(loss), "accuracy": float(accuracy(model, held_out)),
               "elimination": floor, "seconds": time.perf_counter() - start}
      curve.append(point)
      print(json.dumps(point), flush=True)
  return curve


if __name__ == "__main__":
  main()
