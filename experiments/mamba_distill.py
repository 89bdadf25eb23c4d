"""Distill a trained GPT into Mamba/attention hybrids (The Mamba in the Llama, arXiv 2408.15237, Sec. 2-3).

The teacher is a finished `lm_pretrain` run; make it first (about 3 minutes on 2 cores at the cpu scale):

  python main.py --config experiments/lm_pretrain.py:scale=cpu --workdir runs/lm_cpu
  python main.py --config experiments/mamba_distill.py:scale=cpu,teacher=runs/lm_cpu \\
      --workdir runs/distill_cpu/attention
  python main.py --config experiments/mamba_distill.py:scale=cpu,teacher=runs/lm_cpu,init=random \\
      --workdir runs/distill_cpu/random        # the paper's baseline: Mamba layers randomly initialised
  python main.py --config experiments/mamba_distill.py:scale=smoke,teacher=runs/lm_smoke --workdir runs/distill_smoke

The paper's setting (Llama-3-8B-Instruct or Zephyr teacher, chat data, SFT then DPO) from a Hugging Face checkpoint
with a chat template and the Hub's UltraChat and UltraFeedback snapshots (their parquet files, or jsonl):

  python main.py --config experiments/mamba_distill.py:scale=paper,teacher=/models/Meta-Llama-3-8B-Instruct \\
      --workdir runs/distill_llama3 --config.data.sft_path=/data/ultrachat_200k \\
      --config.data.dpo_path=/data/ultrafeedback_binarized

Arguments: `scale` smoke|cpu|gpu|paper; `teacher` the lm_pretrain workdir or a Hugging Face checkpoint directory;
`data` documents|chat (default documents at smoke and cpu: the teacher's corpus, or data.train_files /
data.eval_files; chat at gpu and paper: UltraChat at data.sft_path for the pseudo-label prompts, SFT and
evaluation, UltraFeedback at data.dpo_path for DPO, through the teacher's chat template); `init` attention|random;
`schedule` the attention fractions of the progressive stages separated by '-' (default 0.5-0.25-0); `seed`.
cpu: the 4-layer teacher of lm_pretrain's cpu scale; stages 50% (Mamba in layers 0, 2), 25% (0, 1, 2),
0% (all), 300 steps each on 2,048 teacher-sampled sequences, then 300 steps of SFT on the real documents.
paper: the Llama-3-8B shape's schedule (50%, 25%, 12.5%, 0%) on a pod slice; chat rows of 2,048 tokens; DPO with
the paper's recipe (beta 0.01, learning rate 5e-7).
"""

import ml_collections

from configs import common, mesh

SCALES = ("smoke", "cpu", "gpu", "paper")
SOURCES = ("documents", "chat")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "init": ("attention", "random")}, scale="cpu",
                          teacher="", data="", init="attention", schedule="0.5-0.25-0", seed="0")
  scale = args["scale"]
  data = args["data"] or ("chat" if scale in ("gpu", "paper") else "documents")
  if data not in SOURCES:
    raise ValueError(f"data={data!r}: expected one of {', '.join(SOURCES)}")
  # chat data needs a checkpoint with a chat template: no lm_pretrain run to default to
  teacher = args["teacher"] or ("runs/lm_cpu" if data == "documents" else "")
  config = ml_collections.ConfigDict()
  config.job = "mamba_distill"
  config.seed = int(args["seed"])
  config.teacher = ml_collections.ConfigDict({"workdir": teacher,
                                              "preset": "llama3_8b" if scale == "paper" else "",
                                              "compile_stage": "distill"})  # or dpo: what the compile command lowers
  config.hybrid = ml_collections.ConfigDict({"schedule": args["schedule"].replace("-", ","), "init": args["init"],
                                             "d_conv": 4, "chunk_size": 64, "scan_impl": "auto"})
  config.data = ml_collections.ConfigDict({"source": data, "seq_len": 128, "num_train_docs": 20000,
                                           "num_eval_docs": 400, "train_files": "", "eval_files": "",
                                           "sft_path": "", "dpo_path": ""})
  config.distill = ml_collections.ConfigDict({"kl_weight": 0.1, "ce_weight": 1.0, "freeze_mlp": True,
                                              "prompt_len": 16, "temperature": 1.0, "num_sequences": 2048,
                                              "steps": 300})
  config.sft = ml_collections.ConfigDict({"steps": 300})
  config.dpo = ml_collections.ConfigDict({"steps": 300 if data == "chat" else 0, "beta": 0.1, "learning_rate": 1e-4,
                                          "warmup_steps": 30, "num_pairs": 20000, "num_eval_pairs": 400})
  config.eval = ml_collections.ConfigDict({"batch_size": 40})
  config.train = common.train(global_batch_size=32, log_every=25, eval_every=0, checkpoint_every=100)
  config.optim = common.optim(learning_rate=1e-3, warmup_steps=30, weight_decay=0.0)
  config.mesh = mesh.get()
  if scale == "smoke":
    config.data.update(seq_len=48, num_train_docs=200, num_eval_docs=16)
    config.distill.update(num_sequences=64, steps=4, prompt_len=8)
    config.sft.steps = 2
    config.dpo.update(steps=2 if data == "chat" else 0, num_pairs=64, num_eval_pairs=16, warmup_steps=1)
    config.eval.batch_size = 8
    config.train.update(global_batch_size=8, log_every=2, checkpoint_every=4)
    config.hybrid.chunk_size = 16
  elif scale == "gpu":
    config.data.update(seq_len=1024, num_train_docs=200000, num_eval_docs=2000)
    config.distill.update(num_sequences=50000, steps=5000, prompt_len=256 if data == "chat" else 64)
    config.sft.steps = 5000
    config.dpo.update(steps=1000 if data == "chat" else 0, num_pairs=61135, num_eval_pairs=2000, beta=0.01,
                      learning_rate=5e-7, warmup_steps=100)
    config.train.update(global_batch_size=64, log_every=50, checkpoint_every=1000)
    config.hybrid.chunk_size = 128
  elif scale == "paper":
    config.hybrid.schedule = args["schedule"].replace("-", ",") if args["schedule"] != "0.5-0.25-0" \
        else "0.5,0.25,0.125,0"
    config.data.update(seq_len=2048, num_train_docs=1000000, num_eval_docs=5000)
    config.distill.update(num_sequences=1000000, steps=20000, prompt_len=512 if data == "chat" else 128)
    config.sft.steps = 20000
    # the paper's DPO recipe (its code's config for the Llama-3 hybrids): beta 0.01, learning rate 5e-7, 10%
    # warmup; here about one epoch of train_prefs (61,135 pairs) at 256 pairs a step
    config.dpo.update(steps=240 if data == "chat" else 0, num_pairs=61135, num_eval_pairs=2000, beta=0.01,
                      learning_rate=5e-7, warmup_steps=24)
    config.train.update(global_batch_size=256, log_every=100, checkpoint_every=2000)
    config.optim.update(learning_rate=8e-5, warmup_steps=500)
    config.hybrid.chunk_size = 256
    config.mesh = mesh.get(data=1, fsdp=-1, tensor=1)
  return config
