"""iGSM retry-data experiments (Physics of LMs 2.2, arXiv 2408.16293): accuracy vs retry rate, retry_weak,
label masking, and LoRA vs full finetuning of the r = 0 model on retry data.

  python main.py --config experiments/igsm_retry.py:scale=smoke --workdir runs/igsm_smoke   # seconds
  # the whole cpu sweep, resumable, two arms at once (one core each), finished arms' result files copied
  # to the committed results/ folder (lora/full finetune runs/igsm_retry_cpu/r0, retrained when missing):
  nohup python -m lwjax.projects.retry.sweep --scale cpu --root runs/igsm_retry_cpu \
      --archive results/igsm_retry_cpu --workers 2 > runs/igsm_retry_cpu.log 2>&1 &
  python -m lwjax.projects.retry.report results/igsm_retry_cpu           # the table
  # one arm by hand:
  python main.py --config experiments/igsm_retry.py:scale=cpu,run=r0.5,seed=1 --workdir runs/igsm_retry_cpu/r0.5_s1
  python main.py --config experiments/igsm_retry.py:scale=gpu,run=r0.5 --workdir runs/igsm_retry_gpu/r0.5
  python main.py --config experiments/igsm_retry.py:scale=paper,run=r0.5,preset=hard \
      --workdir runs/igsm_retry_paper_hard/r0.5

Arguments: `scale` in smoke|cpu|gpu|paper; `run` one of RUNS: rR pretrains with retry rate R, weakR with
retry_weak, maskR with the wrong steps masked out of the loss, lora / full finetune the r = 0 run of the
same scale (`base`, default runs/igsm_retry_<scale>/r0) on retry data at rate 0.5; `seed` (model init and
data order); `preset` med|hard|small (default small at the smoke and cpu scales, med above).

The cpu scale is the CPU reasoning testbed (`configs/igsm.py`): compact iGSM (`fmt="compact"`), ops 1-3 of
our `small` preset, each pretraining arm with the weaker reference solver's shape and budget
(`experiments/igsm_solver.py:size=weak`; its r = 0 arm is that solver), tested on held-out templates at
ops 1-3 (in distribution) and 4-5 (beyond). The gpu scale keeps the English `pq` form on iGSM-med; the
paper scale is GPT-2-small shaped (12 layers, 768 wide) on the preset's training ops, tested at its max
training op and its eval ops.
"""

import ml_collections

from configs import common, gpt, igsm, mesh
from lwjax.data.igsm import PRESETS

SCALES = ("smoke", "cpu", "gpu", "paper")
FINETUNE_RATE = 0.5  # the retry rate of the data that lora/full finetune on (the paper's best rate)


def _parse_run(run: str) -> dict:
  """rR / weakR / maskR / lora / full -> data and finetune settings."""
  if run in ("lora", "full"):
    return {"retry_rate": FINETUNE_RATE, "retry_weak": False, "mask_retries": False, "mode": run}
  for prefix, weak, mask in (("weak", True, False), ("mask", False, True), ("r", False, False)):
    if run.startswith(prefix):
      try:
        rate = float(run[len(prefix):])
      except ValueError:
        break
      return {"retry_rate": rate, "retry_weak": weak, "mask_retries": mask, "mode": "none"}
  raise ValueError(f"run={run!r}: expected rR, weakR, maskR (R a retry rate, e.g. r0.2), lora or full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "preset": ("", *PRESETS)}, scale="cpu", run="r0",
                          preset="", base="", seed="0")
  scale = args["scale"]
  preset = args["preset"] or ("small" if scale in ("smoke", "cpu") else "med")
  run = _parse_run(args["run"])
  config = ml_collections.ConfigDict()
  config.job = "igsm_retry"
  config.seed = int(args["seed"])
  config.model = gpt.get("gpt_tiny", vocab_size=1152, max_seq_len=512)
  config.data = ml_collections.ConfigDict({
      "preset": preset, "fmt": "pq", "train_ops": "1-2", "num_train": 100000, "retry_rate": run["retry_rate"],
      "retry_weak": run["retry_weak"], "mask_retries": run["mask_retries"], "seq_len": 448,
      "shuffle_seed": int(args["seed"]), "pack": True,
  })
  config.eval = ml_collections.ConfigDict(
      {"ops": "1,3", "num_per_op": 4, "batch_size": 8, "max_new_tokens": 64, "seed": 1000, "curve_ops": "",
       "curve_num_per_op": 16})
  base = args["base"] or f"runs/igsm_retry_{scale}/r0"
  config.finetune = ml_collections.ConfigDict({"mode": run["mode"], "init_from": base if run["mode"] != "none" else ""})
  config.lora = ml_collections.ConfigDict({"rank": 8, "alpha": 16.0, "targets": "wq,wk,wv,wo,w_gate,w_up,w_down"})
  config.train = common.train()
  config.optim = common.optim()
  config.mesh = mesh.get()
  config.distributed = common.distributed()

  if scale == "smoke":  # the testbed's compact form, as the cpu scale
    config.model.vocab_size = igsm.VOCAB_SIZE
    config.data.fmt = "compact"
    config.train.update(steps=6, global_batch_size=4, log_every=2, eval_every=6, eval_steps=1,
                        checkpoint_every=6)
    config.optim.update(learning_rate=3e-3, warmup_steps=2)
  elif scale == "cpu":
    _, steps, lr = igsm.SOLVERS["weak"]
    config.model = igsm.solver_model("weak")
    config.data.update(igsm.CPU_DATA)
    config.eval.update(igsm.CPU_EVAL)
    config.train.update(steps=steps, global_batch_size=igsm.CPU_BATCH, log_every=50, eval_every=steps // 6,
                        eval_steps=4, checkpoint_every=steps // 6)
    config.optim.update(learning_rate=lr, warmup_steps=100, weight_decay=0.1)
  elif scale == "gpu":
    config.model.update(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=1536,
                        max_seq_len=1536, dtype="bfloat16")
    config.data.update(train_ops=f"1-{PRESETS[preset].max_train_op}", seq_len=1024)
    config.eval.update(ops=f"{PRESETS[preset].max_train_op},{PRESETS[preset].eval_ops[-1]}", num_per_op=256,
                       batch_size=128, max_new_tokens=512)
    config.train.update(steps=20000, global_batch_size=64, log_every=100, eval_every=2000, eval_steps=8,
                        checkpoint_every=2000)
    config.optim.update(learning_rate=1e-3, warmup_steps=500)
  else:  # paper: GPT-2 small shape (12 layers, 768 wide, 12 heads) with a Llama block, iGSM-med/hard
    config.model.update(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, d_ff=3072,
                        max_seq_len=2048, dtype="bfloat16")
    config.data.update(train_ops=f"1-{PRESETS[preset].max_train_op}", num_train=10_000_000, seq_len=1536)
    config.eval.update(ops=",".join(map(str, (PRESETS[preset].max_train_op, *PRESETS[preset].eval_ops))),
                       num_per_op=1024, batch_size=256, max_new_tokens=512)
    config.train.update(steps=100000, global_batch_size=512, log_every=100, eval_every=5000, eval_steps=8,
                        checkpoint_every=5000)
    config.optim.update(learning_rate=2e-3, warmup_steps=1000, schedule="warmup_cosine")
  if run["mode"] != "none":
    config.train.update(steps=max(config.train.steps // 4, 1))
    config.optim.update(learning_rate=config.optim.learning_rate / 2, warmup_steps=config.optim.warmup_steps // 4)
  return config
