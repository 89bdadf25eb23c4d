"""LRP4RAG (arXiv 2408.15533): detecting RAG hallucinations from AttnLRP relevance, on a generated RAG task with
exact labels (lwjax/projects/lrp4rag/task.py: passages of symbolic facts, a question, answers from the passage or
from the parametric knowledge), or on RAGTruth's published responses. Trains the generator (or reuses one), labels
its greedy answers on held-out prompts, and cross-validates SVM / random forest / MLP / LSTM detectors on the
resampled relevance vectors and on the baselines (uncertainty, attention, gradient x input, self-consistency).

  python main.py --config experiments/lrp4rag.py:scale=smoke --workdir runs/lrp4rag_smoke    # seconds
  python main.py --config experiments/lrp4rag.py:scale=cpu --workdir runs/lrp4rag_cpu        # ~30 min, 2 cores
  python main.py --config experiments/lrp4rag.py:scale=cpu,seed=1,base=runs/lrp4rag_cpu --workdir runs/lrp4rag_cpu_s1
  python main.py --config experiments/lrp4rag.py:scale=gpu,data=generated --workdir runs/lrp4rag_gpu  # one GPU
  python main.py --workdir runs/lrp4rag_paper_generated --config \
      experiments/lrp4rag.py:scale=paper,data=generated,pretrained=/models/Llama-2-7b-chat-hf
  # the paper's setting: RAGTruth's QA responses of Llama-2-7b-chat, explained by that model
  python main.py --workdir runs/lrp4rag_ragtruth --config \
      experiments/lrp4rag.py:scale=paper,path=/data/RAGTruth/dataset,pretrained=/models/Llama-2-7b-chat-hf
  # its TPU step (one batch of signals at the largest bucket) compiled for a v5p-8 on this host, no weights read
  python -m lwjax.launch.compile --config experiments/lrp4rag.py:scale=paper --tpu v5p-8 \
      --config.model_preset=llama2_7b --json_out results/scaling/lrp4rag_llama2_7b_v5p-8.json

Arguments: `scale` smoke|cpu|gpu|paper; `data` generated (default at smoke/cpu) | ragtruth (default at gpu/paper);
`path` (`data.path`) RAGTruth's dataset directory (source_info.jsonl, response.jsonl; `--config.data.task_types=
QA,Data2txt,Summary`, `--config.data.models=` (empty: every model), `--config.data.splits=test` select the
responses); `seed` (training data and held-out prompts; the world is task.world_seed's); `base` the workdir of a
finished lrp4rag run whose generator is reused (no training; its task world must match); `pretrained`
(`model.pretrained`, required on RAGTruth and at the paper scale, taken at any): a Hugging Face checkpoint
directory with its tokenizer (a family whose options AttnLRP implements: Llama 2/3, Mistral without a window),
nothing downloaded, read as it is. On the generated task the paper's Llama-2-7b-chat answers the text-template
prompts untrained (it has no parametric knowledge of the world, so its hallucinations are answers to
absent/unknown prompts and passages it ignores); on RAGTruth it explains the given responses.
Results: <workdir>/metrics.json (and relevance_faithful.png, relevance_hallucinated.png on the generated task).
Compile only (`lwjax.launch.compile`, `lwjax.projects.lrp4rag.job.aot_inference`): `model_preset` names the
generator's shape when its checkpoint is not on the compiling machine; `eval.signal_batch` rows of
`eval.compile_length` tokens (0: the bucket of the model's context) with `eval.compile_answer_rows` answer rows
(0: that of eval.max_new_tokens; RAGTruth's scales set 2,048 and 512, the largest bucket of RAGTruth-like
responses, `lwjax.projects.lrp4rag.signals.bucket`).
"""

import ml_collections

from configs import common, gpt, mesh
from lwjax.projects.lrp4rag.task import TaskConfig

SCALES = ("smoke", "cpu", "gpu", "paper")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "data": ("", "generated", "ragtruth")}, scale="cpu", seed="0",
                          base="", pretrained="", data="", path="")
  scale = args["scale"]
  data = args["data"] or ("generated" if scale in ("smoke", "cpu") else "ragtruth")
  config = ml_collections.ConfigDict()
  config.job = "lrp4rag"
  config.seed = int(args["seed"])
  config.base = args["base"]
  config.model_preset = ""  # compile only: the generator's shape by name (lwjax.launch.compile)
  config.task = ml_collections.ConfigDict(TaskConfig().to_dict())
  config.eval = ml_collections.ConfigDict({"num": 1000, "batch_prompts": 250, "max_new_tokens": 4, "samples": 8,
                                           "temperature": 1.0, "signal_batch": 100, "relevance_chunk": 0,
                                           "compile_length": 0, "compile_answer_rows": 0})
  config.detect = ml_collections.ConfigDict({"folds": 5, "feature_length": 220, "svm_c": 1.0, "rf_trees": 200,
                                             "hidden": 32, "steps": 300, "learning_rate": 1e-2})
  config.mesh = mesh.get()
  config.distributed = common.distributed()
  if data == "ragtruth":  # RAGTruth's responses, explained by a pretrained model read as it is
    config.model = gpt.get("gpt_tiny", pretrained=args["pretrained"],
                           dtype="bfloat16" if scale in ("gpu", "paper") else "float32")
    # The paper: the QA responses of Llama-2-7b-chat, 5-fold CV, relevance vectors of 220 points.
    config.data = ml_collections.ConfigDict({"set": "ragtruth", "path": args["path"], "splits": "train,test",
                                             "task_types": "QA", "models": "llama-2-7b-chat"})
    config.eval.update(num=2000, signal_batch=8, relevance_chunk=4, compile_length=2048, compile_answer_rows=512)
    if scale == "smoke":
      config.eval.update(num=8, signal_batch=4, compile_length=64, compile_answer_rows=16)
      config.detect.update(feature_length=16, rf_trees=10, hidden=4, steps=20, folds=2)
    return config
  if scale == "paper" or args["pretrained"]:  # a pretrained model answers the text prompts untrained: its shape
    # comes from its checkpoint, and there are no data/train/optim groups
    config.model = gpt.get("gpt_tiny", pretrained=args["pretrained"],
                           dtype="bfloat16" if scale in ("gpu", "paper") else "float32")
    config.task.template = "text"
    config.eval.update(batch_prompts=32, max_new_tokens=8, signal_batch=8, relevance_chunk=4)
    if scale == "smoke":
      config.eval.update(num=20, batch_prompts=20, max_new_tokens=2, samples=2, signal_batch=10)
      config.detect.update(feature_length=16, rf_trees=10, hidden=4, steps=20, folds=2)
    return config
  # World of 64 entities x 4 attributes x 16 values (48 known: 192 facts to store, 24 popular); prompts of 3-6
  # passages take <= 29 tokens, so rows of 32 hold prompt + answer + eos.
  config.model = gpt.get("gpt_tiny", vocab_size=160, max_seq_len=64, d_model=128, n_layers=4, n_heads=4,
                         n_kv_heads=4, head_dim=32, d_ff=512)
  config.data = ml_collections.ConfigDict({"seq_len": 32, "num_train": 100_000})
  # ~3.5 steps/s measured on the 2 shared (busy) cores: 4000 steps take ~20 min there, less on idle ones.
  config.train = common.train(steps=4000, global_batch_size=64, log_every=100, eval_every=0, checkpoint_every=500)
  config.optim = common.optim(learning_rate=2e-3, warmup_steps=100, weight_decay=0.1)
  # Prompts of <= 29 tokens lose nothing at 64 points; 220 would only make the LSTM 3.4x slower (~13 s a fit
  # at 64 points, hidden 16, 200 steps, 800 examples, on the busy cores).
  config.detect.update(feature_length=64, hidden=16, steps=200)
  if scale == "smoke":  # a tiny world and model: exercises every stage, learns little
    config.task.update(entities=8, attributes=2, values=4, min_passages=2, max_passages=2)
    config.model.update(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64)
    config.data.update(seq_len=16, num_train=512)
    config.train.update(steps=60, global_batch_size=16, log_every=20, checkpoint_every=60)
    config.eval.update(num=40, batch_prompts=40, max_new_tokens=1, samples=4, signal_batch=40)
    config.detect.update(feature_length=8, rf_trees=10, hidden=4, steps=20)
  elif scale == "gpu":  # a bigger world and model, longer contexts
    config.task.update(entities=256, attributes=8, values=32, min_passages=4, max_passages=12)
    config.model.update(vocab_size=640, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, head_dim=64, d_ff=1536,
                        max_seq_len=128)
    config.data.update(seq_len=64, num_train=1_000_000)
    config.train.update(steps=20000, global_batch_size=256, log_every=200, checkpoint_every=2000)
    config.optim.update(learning_rate=1e-3, warmup_steps=500)
    config.eval.update(num=4000, batch_prompts=500, signal_batch=250)
    config.detect.update(feature_length=220, hidden=32, steps=300)
  return config
