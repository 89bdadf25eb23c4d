"""Solvers of GenRM's algorithmic tasks (arXiv 2408.15240, §4), the base checkpoints of `experiments/genrm.py`:
GPTs trained from scratch on last-letter concatenation or word sorting of 2-4 words (ours: generated
pseudo-words spelled letter by letter, `lwjax.data.algorithmic`) plus 2% of 5-6 words (ours: without them
the hard split is never solved), tested on held-out lists of 2-4 words and on 5-6 words.

  python main.py --config experiments/genrm_solver.py:scale=smoke,task=last_letter --workdir runs/genrm_solver_smoke
  python main.py --config experiments/genrm_solver.py:scale=cpu,task=last_letter \
      --workdir runs/genrm_solver_cpu/last_letter
  python main.py --config experiments/genrm_solver.py:scale=cpu,task=word_sort --workdir runs/genrm_solver_cpu/word_sort

  # from a pretrained checkpoint (a Hugging Face directory or an lwjax workdir), finetuned on the task's text
  # through its own tokenizer; compact iGSM too:
  python main.py --config experiments/genrm_solver.py:scale=gpu,task=igsm --workdir runs/genrm_solver_gemma2_2b \
      --config.model.pretrained=/models/gemma-2-2b
  # GSM8K or MATH from their published files (the paper's GSM8K solver, finetuned here on the train split):
  python main.py --config experiments/genrm_solver.py:scale=gpu,task=gsm8k,path=/data/gsm8k \
      --workdir runs/genrm_solver_gsm8k --config.model.pretrained=/models/gemma-2-9b

Arguments: `scale` smoke|cpu|gpu|paper; `task` last_letter|word_sort (igsm|gsm8k|math with `model.pretrained`);
`path` the data set's files (gsm8k, math); `seed`. The from-scratch compact iGSM solvers are
`experiments/igsm_solver.py`'s.
"""

import ml_collections

from configs import common, gpt, mesh

SCALES = ("smoke", "cpu", "gpu", "paper")
TASKS = ("last_letter", "word_sort", "igsm", "gsm8k", "math")
DATASETS = ("gsm8k", "math")  # read from `path`, through a pretrained model's tokenizer
VOCAB_SIZE = 64  # >= the algorithmic tokenizer's 49 ids


def task_config(name: str, path: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"name": name, "preset": "small", "train_ops": "1,2,3", "hard_ops": "4,5",
                                    "train_words": "2,3,4", "hard_words": "5,6", "path": path})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "task": TASKS}, scale="cpu", task="last_letter", seed="0",
                          path="")
  scale = args["scale"]
  config = ml_collections.ConfigDict()
  config.job = "genrm_solver"
  config.seed = int(args["seed"])
  config.task = task_config(args["task"], args["path"])
  config.model = gpt.get("gpt_tiny", vocab_size=VOCAB_SIZE, max_seq_len=512, d_model=128, n_layers=4, n_heads=4,
                         n_kv_heads=4, head_dim=32, d_ff=512)
  # Rows hold one problem: up to 6 words take < 110 tokens in last-letter and < 230 in word sorting.
  igsm = args["task"] in ("igsm", *DATASETS)  # a pretrained model's (model.pretrained): no hard lengths
  config.data = ml_collections.ConfigDict({"seq_len": {"last_letter": 128, "word_sort": 256}.get(args["task"], 512),
                                          "num_train": 50_000, "long_fraction": 0.0 if igsm else 0.02})
  config.eval = ml_collections.ConfigDict({"num": 200, "max_new_tokens": 320, "batch_prompts": 100})
  config.train = common.train(lora=common.lora())  # LoRA (rank > 0) with model.pretrained
  config.optim = common.optim(learning_rate=2e-3, warmup_steps=100, weight_decay=0.1)
  config.mesh = mesh.get()
  config.distributed = common.distributed()
  if scale == "smoke":
    config.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64)
    config.data.update(num_train=64, seq_len=128, long_fraction=0.0 if igsm else 0.05)
    config.eval.update(num=4, max_new_tokens=48, batch_prompts=4)
    config.train.update(steps=6, global_batch_size=4, log_every=2, eval_every=0, checkpoint_every=6)
  elif scale == "cpu":
    config.train.update(steps=800, global_batch_size=32, log_every=50, eval_every=0, checkpoint_every=400)
  else:  # gpu / paper: wider, longer, in bfloat16
    config.model.update(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=2048, dtype="bfloat16")
    config.data.update(num_train=1_000_000)
    config.eval.update(num=1000, batch_prompts=250)
    config.train.update(steps=20000 if scale == "gpu" else 100000, global_batch_size=128, log_every=100,
                        eval_every=0, checkpoint_every=2000)
    config.optim.update(learning_rate=1e-3, warmup_steps=500)
  return config
