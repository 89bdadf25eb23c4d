"""Reference solvers of the CPU reasoning testbed: GPTs trained from scratch on compact iGSM (ours: the
problems of Physics of LMs 2.1, Sec. 2, written with symbolic tokens, `lwjax.data.igsm.compact`), at two
sizes that later projects reuse by path (GenRM, compute-matched sampling, the Mamba distillation, ...).

  python main.py --config experiments/igsm_solver.py:scale=smoke --workdir runs/igsm_solver_smoke   # seconds
  python main.py --config experiments/igsm_solver.py:scale=cpu,size=weak --workdir runs/igsm_solver_cpu/weak
  python main.py --config experiments/igsm_solver.py:scale=cpu,size=strong --workdir runs/igsm_solver_cpu/strong
  python main.py --config experiments/igsm_solver.py:scale=gpu,size=strong --workdir runs/igsm_solver_gpu/strong

Arguments: `scale` smoke|cpu|gpu|paper; `size` weak (weaker-cheaper) | strong (stronger-expensive);
`seed`; `preset` (default small at the smoke and cpu scales, med above). The cpu scale trains on ops 1-3
of our `small` preset (train-split templates), packed 256-token rows, batches of 32, and evaluates greedy
full-solution accuracy (every step checked by `igsm.check`) on held-out test-split templates at ops 1-3
(in distribution) and 4-5 (beyond); the accuracy curve at ops 2 and 3 is logged at every evaluation
(`curve.jsonl`, TensorBoard `curve/`). A solver is the retry rate 0 run of the `igsm_retry` job: its
workdir holds `checkpoints/` (the final params), `metrics.json` (accuracy by op) and the config, which
`lwjax.training.checkpoint.load_model` reads back. Measured on 2 cores (docs/RESULTS.md): weak 1.1M
parameters, 31 min, 24% of held-out ops 1-3 solved; strong 4.3M parameters, 50 min, 76%.
"""

import ml_collections

from configs import igsm
from experiments import igsm_retry

SCALES = igsm_retry.SCALES
SIZES = tuple(igsm.SOLVERS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  from configs import common
  args = common.parse_arg(arg, choices={"scale": SCALES, "size": SIZES}, scale="cpu", size="weak", seed="0",
                          preset="")
  scale, size = args["scale"], args["size"]
  config = igsm_retry.get_config(f"scale={scale},run=r0,preset={args['preset']},seed={args['seed']}")
  config.data.fmt = "compact"
  if scale == "smoke":
    config.eval.update(curve_ops="1", curve_num_per_op=2)
    return config
  if scale == "cpu":
    _, steps, lr = igsm.SOLVERS[size]
    config.model = igsm.solver_model(size)
    config.data.update(igsm.CPU_DATA)
    config.eval.update(igsm.CPU_EVAL)
    config.train.update(steps=steps, global_batch_size=igsm.CPU_BATCH, log_every=50, eval_every=steps // 6,
                        eval_steps=4, checkpoint_every=steps // 6)
    config.optim.update(learning_rate=lr, warmup_steps=100, weight_decay=0.1, schedule="warmup_cosine")
    return config
  # gpu / paper: the retry experiments' shapes in the compact form; the weaker solver at half the width.
  config.model.vocab_size = igsm.VOCAB_SIZE
  if size == "weak":
    config.model.update(d_model=config.model.d_model // 2, d_ff=config.model.d_ff // 2,
                        head_dim=config.model.head_dim // 2)
  config.eval.update(curve_ops=config.eval.ops.split(",")[0], curve_num_per_op=128)
  return config
