"""Smaller, Weaker, Yet Better (arXiv 2408.16737): training data sampled from the testbed's weaker-cheaper (WC)
and stronger-expensive (SE) compact-iGSM solvers at the same sampling FLOPs, its coverage, diversity and
false-positive rate, and the paper's three finetuning setups on each source.

  # smoke (seconds; any two solver workdirs, e.g. the testbed's smoke solver twice: an untrained solver gives
  # no right answer, so there is nothing to finetune on and the run says so)
  python main.py --config experiments/igsm_solver.py:scale=smoke --workdir runs/igsm_solver_smoke
  python main.py --workdir runs/compute_matched_smoke/self --config \
      experiments/compute_matched.py:scale=smoke,setup=self,wc=runs/igsm_solver_smoke,se=runs/igsm_solver_smoke
  # cpu: the two solvers of the testbed (31 and 50 min on 2 cores), then every setup at two seeds; the
  # candidates are sampled once per seed (under runs/compute_matched_cpu/candidates) and shared by the setups
  python main.py --config experiments/igsm_solver.py:scale=cpu,size=weak --workdir runs/igsm_solver_cpu/weak
  python main.py --config experiments/igsm_solver.py:scale=cpu,size=strong --workdir runs/igsm_solver_cpu/strong
  for seed in 0 1; do for setup in self w2s kd; do
    python main.py --config experiments/compute_matched.py:scale=cpu,setup=$setup,seed=$seed \
        --workdir runs/compute_matched_cpu/${setup}_s$seed
  done; done
  python -m lwjax.projects.compute_matched.report runs/compute_matched_cpu --png docs/img/compute_matched_coverage.png

Arguments: `scale` smoke|cpu|gpu|paper; `setup` kd (a third model, the student, finetuned on either source) |
self (WC on its own data vs on SE data) | w2s (SE on WC data vs on its own); `budget` the finetuning data's
budget in SE samples per problem; `wc`, `se`, `student` workdirs or Hugging Face directories (defaults:
runs/igsm_solver_<scale>/weak and /strong; the student is the weak solver's checkpoint at `student_step`, an earlier
and weaker model than WC: ours, where the paper's student is a smaller pretrained LM); `task` igsm (default) |
gsm8k | math, the data sets read from `path` through the models' own tokenizers; `fewshot` k exemplars in a data
set's prompt (4: the papers' GSM8K and Minerva MATH prompts; 0: the bare question); `seed`. A data set has no
step checker: its false-positive rate is an LLM judge's over an OpenAI-compatible endpoint, when
`--config.judge.base_url` (and `.model`, `.api_key_env`) names one; on iGSM the judge is checked against the
checker.

  # the paper's setting: MATH, Gemma-2 9B (WC) and 27B (SE) sampling 4-shot, Gemma-7B the student; the
  # false-positive rate judged by a strong model behind any OpenAI-compatible endpoint
  python main.py --config experiments/compute_matched.py:scale=gpu,setup=kd,task=math,path=/data/math,fewshot=4,\
wc=/models/gemma-2-9b,se=/models/gemma-2-27b,student=/models/gemma-7b --workdir runs/compute_matched_math \
      --config.judge.base_url=https://api.openai.com/v1 --config.judge.model=gpt-4o \
      --config.judge.api_key_env=OPENAI_API_KEY
"""

import ml_collections

from configs import common, igsm, mesh
from lwjax import judge
from lwjax.projects.compute_matched.job import SETUPS, TASKS

SCALES = ("smoke", "cpu", "gpu", "paper")
DATASET_TRAIN_ROWS = {"gsm8k": 7473, "math": 7500}  # the published training splits' sizes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "setup": SETUPS, "task": TASKS}, scale="cpu", setup="self",
                          budget="", wc="", se="", student="", student_step="", seed="0", task="igsm", path="",
                          fewshot="0")
  scale = args["scale"]
  wc = args["wc"] or f"runs/igsm_solver_{scale}/weak"
  config = ml_collections.ConfigDict()
  config.job = "compute_matched"
  config.seed = int(args["seed"])
  config.setup = args["setup"]
  config.models = ml_collections.ConfigDict({
      "wc": wc, "se": args["se"] or f"runs/igsm_solver_{scale}/strong", "student": args["student"] or wc,
      "student_step": int(args["student_step"] or (1600 if scale == "cpu" else 0)),
      "finetuned_preset": ""})  # compile only: the finetuned model's shape when its checkpoint is not here
  config.task = ml_collections.ConfigDict({"name": args["task"], "preset": "small", "train_ops": "1,2,3",
                                           "hard_ops": "4,5", "path": args["path"], "fewshot": int(args["fewshot"])})
  config.candidates = ml_collections.ConfigDict({
      "dir": f"runs/compute_matched_{scale}/candidates", "num_train": 500, "temperature": 0.8,
      "max_new_tokens": igsm.CPU_EVAL["max_new_tokens"], "batch_prompts": 25, "record_seed": 0})
  config.budget = ml_collections.ConfigDict({"se_samples": "1,2,4", "finetune": int(args["budget"] or 4)})
  # The paper judged 50 solutions per source; '' base_url: no judge.
  config.judge = ml_collections.ConfigDict({"base_url": "", "model": "", "prompt": judge.DEFAULT_PROMPT,
                                           "max_tokens": 256, "workers": 4, "api_key_env": "",
                                           "max_candidates": 50})
  config.data = ml_collections.ConfigDict({"seq_len": 320})
  config.eval = ml_collections.ConfigDict({"num_test": 300, "num_hard": 100, "max_new_tokens": 160,
                                          "batch_prompts": 100, "seed": 1})
  config.train = common.train(steps=150, global_batch_size=32, log_every=25, eval_every=0, checkpoint_every=150,
                              lora=common.lora())  # LoRA finetunes: --config.train.lora.rank=8
  config.optim = common.optim(learning_rate=3e-4, warmup_steps=15, weight_decay=0.0)
  config.mesh = mesh.get()
  config.distributed = common.distributed()
  if scale == "smoke":
    config.models.student_step = int(args["student_step"] or 0)
    config.candidates.update(num_train=6, max_new_tokens=24, batch_prompts=3)
    config.budget.update(se_samples="1,2", finetune=int(args["budget"] or 2))
    config.data.seq_len = 160
    config.eval.update(num_test=4, num_hard=2, max_new_tokens=24, batch_prompts=4)
    config.train.update(steps=3, global_batch_size=4, log_every=1, checkpoint_every=3)
  elif scale in ("gpu", "paper"):  # the paper on MATH: 1 and 10 SE samples per problem (3 and 30 of WC), 7.5k problems
    config.candidates.update(num_train=7500, batch_prompts=128)
    config.budget.update(se_samples="1,3,10", finetune=int(args["budget"] or 10))
    config.eval.update(num_test=1000, num_hard=500, batch_prompts=256)
    config.train.update(steps=2000, global_batch_size=64, log_every=100, checkpoint_every=500)
    if args["task"] in DATASET_TRAIN_ROWS:  # the whole published training split, less the few-shot exemplars
      config.candidates.num_train = DATASET_TRAIN_ROWS[args["task"]] - int(args["fewshot"])
      # Natural-language solutions through a pretrained tokenizer: MATH's run to several hundred tokens.
      config.candidates.max_new_tokens = 512
      config.eval.max_new_tokens = 512
      config.data.seq_len = 1024
      if args["task"] == "gsm8k":  # its hard split (test problems of 5+ solution lines) is the smaller
        config.eval.num_hard = 250
  return config
