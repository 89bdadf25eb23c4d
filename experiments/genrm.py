"""GenRM (Generative Verifiers, arXiv 2408.15240): verifiers trained from a solver checkpoint on its own
labelled candidates, compared by Best-of-N with self-consistency, pass@N and LLM-as-judge in the same run.

  # smoke (seconds; trains its own tiny solver first):
  python main.py --config experiments/genrm_solver.py:scale=smoke,task=last_letter --workdir runs/genrm_smoke/solver
  python main.py --config \
      experiments/genrm.py:scale=smoke,task=last_letter,verifier=direct,base=runs/genrm_smoke/solver \
      --workdir runs/genrm_smoke/direct
  # cpu: the solvers (compact iGSM: the testbed's weak solver; algorithmic tasks: experiments/genrm_solver.py)
  python main.py --config experiments/igsm_solver.py:scale=cpu,size=weak --workdir runs/igsm_solver_cpu/weak
  python main.py --config experiments/genrm_solver.py:scale=cpu,task=last_letter \
      --workdir runs/genrm_solver_cpu/last_letter
  # then every verifier on the same candidates (sampled once by the first run, under runs/genrm_cpu/candidates):
  for v in judge disc direct cot unified; do
    python main.py --config experiments/genrm.py:scale=cpu,task=igsm,verifier=$v,base=runs/igsm_solver_cpu/weak \
        --workdir runs/genrm_cpu/igsm/$v
  done
  python -m lwjax.projects.genrm.report runs/genrm_cpu/igsm --png runs/genrm_cpu/igsm/bestofn.png
  # a second seed of the verifiers (same candidates), then the table over both seeds:
  for v in judge disc direct cot unified; do
    python main.py --config \
        experiments/genrm.py:scale=cpu,task=igsm,verifier=$v,base=runs/igsm_solver_cpu/weak,seed=1 \
        --workdir runs/genrm_cpu/igsm_s1/$v
  done
  python -m lwjax.projects.genrm.report runs/genrm_cpu/igsm runs/genrm_cpu/igsm_s1 --png docs/img/genrm_igsm_cpu.png

  # GSM8K from its published files, verifiers of a solver finetuned from a pretrained model:
  python main.py --config \
      experiments/genrm.py:scale=gpu,task=gsm8k,path=/data/gsm8k,verifier=direct,base=runs/genrm_solver_gsm8k \
      --workdir runs/genrm_gsm8k/direct
  # GenRM-CoT there: the rationales written by a strong model over any OpenAI-compatible API, graded against
  # the reference, 4 per candidate, those whose verdict disagrees with the label dropped (the paper's §4.1)
  python main.py --config \
      experiments/genrm.py:scale=gpu,task=gsm8k,path=/data/gsm8k,verifier=cot,base=runs/genrm_solver_gsm8k \
      --config.rationales.base_url=https://api.openai.com/v1 --config.rationales.model=gpt-4o \
      --config.rationales.api_key_env=OPENAI_API_KEY --workdir runs/genrm_gsm8k/cot

Arguments: `scale` smoke|cpu|gpu|paper; `task` igsm|last_letter|word_sort|gsm8k|math; `verifier` judge|disc|
direct|cot|unified; `base` the solver's workdir or a Hugging Face directory (default runs/igsm_solver_<scale>/weak
for iGSM, runs/genrm_solver_<scale>/<task> otherwise); `path` the data set's files (gsm8k, math); `lam` the unified
verifier's lambda; `fewshot` k exemplars in a data set's prompt for a pretrained `base` (4: the papers' GSM8K
and Minerva MATH prompts; 0: the bare question, what a finetuned solver reads); `seed`.

  # GSM8K candidates of a pretrained model prompted 4-shot, judged by the same model (LLM-as-a-judge)
  python main.py --config experiments/genrm.py:scale=gpu,task=gsm8k,path=/data/gsm8k,fewshot=4,verifier=judge,\
base=/models/gemma-2-9b --workdir runs/genrm_gsm8k/judge_4shot
"""

import ml_collections

from configs import common, mesh
from experiments import genrm_solver
from lwjax.projects.genrm import api_rationales
from lwjax.projects.genrm.job import KINDS

SCALES = ("smoke", "cpu", "gpu", "paper")
TASKS = ("igsm", "last_letter", "word_sort", "gsm8k", "math")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "task": TASKS, "verifier": KINDS}, scale="cpu",
                          task="igsm", verifier="direct", base="", lam="1.0", seed="0", path="",
                          fewshot="0")
  scale, task = args["scale"], args["task"]
  default_base = (f"runs/igsm_solver_{scale}/weak" if task == "igsm" else f"runs/genrm_solver_{scale}/{task}")
  config = ml_collections.ConfigDict()
  config.job = "genrm"
  config.seed = int(args["seed"])
  config.base = args["base"] or default_base
  config.base_preset = ""  # compile only: the base's shape when the base is not on this machine
  config.task = genrm_solver.task_config(task, args["path"])
  config.task.fewshot = int(args["fewshot"])
  config.candidates = ml_collections.ConfigDict({
      "dir": f"runs/genrm_{scale}/candidates", "num_train": 400, "n_train": 8, "num_test": 100, "n_test": 16,
      "temperature": 0.8, "max_new_tokens": {"igsm": 160, "math": 512}.get(task, 320), "batch_prompts": 25,
      "seed": 0})
  config.verifier = ml_collections.ConfigDict({
      "kind": args["verifier"], "per_class": 4, "unified_lambda": float(args["lam"]), "unified_base": "direct",
      "cot_k": "1,2,4", "cot_temperature": 0.7, "cot_max_new_tokens": 64 if task != "word_sort" else 160})
  # CoT rationales: the step checker's on the generated tasks; on a data set a model's over the API, graded
  # against the reference and kept when their verdict agrees with the label (--config.rationales.base_url=...).
  config.rationales = ml_collections.ConfigDict({
      "source": "api" if task in ("gsm8k", "math") else "checker", "base_url": "", "model": "",
      "prompt": api_rationales.DEFAULT_PROMPT, "samples": 4, "temperature": 0.7, "max_tokens": 1024, "workers": 8,
      "api_key_env": ""})
  # Training rows: a problem of the training split, its candidate and the verification (scoring fits any length).
  config.data = ml_collections.ConfigDict({"seq_len": 320})
  config.eval = ml_collections.ConfigDict({"ns": "1,2,4,8,16", "draws": 64, "batch_size": 64})
  config.train = common.train(steps=400, global_batch_size=32, log_every=50, eval_every=0, checkpoint_every=400,
                              lora=common.lora())  # LoRA verifiers: --config.train.lora.rank=8
  config.optim = common.optim(learning_rate=5e-4, warmup_steps=40, weight_decay=0.0)
  config.mesh = mesh.get()
  config.distributed = common.distributed()
  if scale == "smoke":
    config.candidates.update(num_train=6, n_train=4, num_test=3, n_test=4, max_new_tokens=40, batch_prompts=3)
    config.verifier.update(per_class=2, cot_k="1,2", cot_max_new_tokens=16)
    config.data.seq_len = 160
    config.eval.update(ns="1,2,4", draws=8, batch_size=8)
    config.train.update(steps=4, global_batch_size=4, log_every=2, checkpoint_every=4)
  elif scale in ("gpu", "paper"):  # the paper's N = 32 candidates and K = 32 rationales
    config.candidates.update(num_train=5000, n_train=16, num_test=500, n_test=32, batch_prompts=64)
    config.verifier.update(per_class=8, cot_k="1,2,4,8,16,32")
    if task in ("gsm8k", "math"):  # natural-language rationales, and solutions that long
      config.verifier.cot_max_new_tokens = 512
      config.data.seq_len = 2048
    config.eval.update(ns="1,2,4,8,16,32", batch_size=256)
    config.train.update(steps=3000, global_batch_size=64, log_every=100, checkpoint_every=1000)
  return config
