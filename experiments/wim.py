"""Writing in the Margins (arXiv 2408.14906): WiM against full-context and retrieval-only reading of the same
documents on the serving engine, on generated long-context tasks with a small reader trained here (retrieval,
multi-hop variable tracking, common-words aggregation; `lwjax/projects/wim/tasks.py`), or on a published set read by
a pretrained instruct model as it is, with the paper's prompts (HotpotQA, SQuAD v2, MultiHop-RAG, RULER's CWE).

  python main.py --config experiments/wim.py:scale=smoke --workdir runs/wim_smoke              # seconds
  python main.py --config experiments/wim.py:scale=cpu --workdir runs/wim_cpu                  # trains, then reads
  python main.py --config experiments/wim.py:scale=cpu,base=runs/wim_cpu --workdir runs/wim_cpu_eval  # reads only
  # the paper's setting: a published set, 16k/32k/64k-token documents, an instruct model read as it is
  python main.py --workdir runs/wim_hotpotqa --config experiments/wim.py:scale=paper,data=hotpotqa,\
path=/data/hotpotqa/hotpot_dev_distractor_v1.json,pretrained=/models/Meta-Llama-3-8B-Instruct
  python main.py --workdir runs/wim_squad --config experiments/wim.py:scale=paper,data=squad_v2,\
path=/data/squad/dev-v2.0.json,pretrained=/models/Meta-Llama-3-8B-Instruct
  python main.py --workdir runs/wim_multihop_rag --config experiments/wim.py:scale=paper,data=multihop_rag,\
path=/data/MultiHop-RAG/dataset,pretrained=/models/Meta-Llama-3-8B-Instruct
  python main.py --workdir runs/wim_cwe --config \
      experiments/wim.py:scale=paper,data=cwe,pretrained=/models/Meta-Llama-3-8B-Instruct

Arguments: `scale` smoke|cpu|gpu|paper; `data` generated (default at smoke/cpu) | hotpotqa (default at gpu/paper)
| squad_v2 | multihop_rag | cwe; `path` the published set's file or directory (`data.path`; HotpotQA's original
json or the Hub's parquet, SQuAD's nested json or the Hub's parquet, MultiHop-RAG's dataset directory; CWE is
generated); `pretrained` (`model.pretrained`): on a published set the reader, read as it is; on the generated tasks
the checkpoint the reader is finetuned from; `base` a trained reader's workdir (no training); `seed`.
cpu: a 4-layer GPT (d_model 128) trained on documents of 1-8 segments of 48 words (up to ~450 tokens), evaluated
on 1-32 segments: 16 and 32 are longer than any training document, where full-context reading degrades
(docs/RESULTS.md). gpu/paper on the generated tasks (`data=generated`): segments of 512 words, training documents
up to 16 segments (~9k tokens), evaluated up to 32. On a published set: segments of 4,096 tokens of the reader's
tokenizer (the paper's), documents of 1, 2, 4, 8 segments (gpu) or 4, 8, 16 (paper).
"""

import ml_collections

from configs import common, gpt, mesh

SCALES = ("smoke", "cpu", "gpu", "paper")
DATA = ("generated", "hotpotqa", "squad_v2", "multihop_rag", "cwe")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "data": ("", *DATA)}, scale="cpu", base="", seed="0",
                          data="", path="", pretrained="")
  scale = args["scale"]
  data = args["data"] or ("generated" if scale in ("smoke", "cpu") else "hotpotqa")
  config = ml_collections.ConfigDict()
  config.job = "wim"
  config.seed = int(args["seed"])
  config.base = args["base"]
  # max_seq_len: the positions the engine reads, past the training rows (RoPE has no table to outgrow).
  config.model = gpt.get("gpt_tiny", vocab_size=448, max_seq_len=3072, d_model=128, n_layers=4, n_heads=4,
                         n_kv_heads=4, head_dim=32, d_ff=512)
  config.task = ml_collections.ConfigDict({"names": "retrieval,multihop,aggregation", "segment_words": 48,
                                          "train_segments": "1,2,3,4,6,8"})
  # copy_fraction: copy rows among the training rows, the curriculum that forms the reader's lookup (RESULTS.md)
  # num_docs: 20,000 per task, so that 2,000 steps see each about once (4,000 were memorised: RESULTS.md)
  # set/path/split/segment_tokens: a published set's documents; seq_len/num_docs/copy_fraction: the training rows
  config.data = ml_collections.ConfigDict({"set": data, "path": args["path"], "split": "validation",
                                          "segment_tokens": 4096, "seq_len": 512, "num_docs": 20000,
                                          "copy_fraction": 0.3})
  config.eval = ml_collections.ConfigDict({"segments": "1,2,4,8,16,32", "num_docs": 50, "margin_tokens": 40,
                                          "answer_tokens": 12, "seed": 1})
  config.engine = ml_collections.ConfigDict({"num_pages": 1024, "page_size": 16, "max_num_seqs": 32,
                                            "max_batch_tokens": 1024, "prefill_chunk": 256})
  config.train = common.train(steps=2000, global_batch_size=16, log_every=50, eval_every=0, checkpoint_every=500,
                              lora=common.lora())  # LoRA (rank > 0) with model.pretrained
  config.optim = common.optim(learning_rate=2e-3, warmup_steps=100, weight_decay=0.1)
  config.mesh = mesh.get()
  config.distributed = common.distributed()
  if scale == "smoke":
    config.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, max_seq_len=320)
    config.task.update(segment_words=32, train_segments="1,2")
    config.data.update(seq_len=160, num_docs=8)
    config.eval.update(segments="1,2", num_docs=2, margin_tokens=8, answer_tokens=4)
    config.engine.update(num_pages=128, page_size=8, max_num_seqs=8, max_batch_tokens=128, prefill_chunk=64)
    config.train.update(steps=3, global_batch_size=4, log_every=1, checkpoint_every=3)
  elif scale in ("gpu", "paper"):
    config.model = gpt.get("gpt_125m", vocab_size=448, max_seq_len=20480)
    config.task.update(segment_words=512, train_segments="1,2,4,8,16")
    config.data.update(seq_len=9216, num_docs=50000)
    config.eval.update(segments="1,2,4,8,16,32", num_docs=200)
    config.engine.update(num_pages=8192, max_num_seqs=64, max_batch_tokens=8192, prefill_chunk=2048)
    config.train.update(steps=20000, global_batch_size=32, log_every=100, checkpoint_every=1000)
    config.optim.update(learning_rate=6e-4, warmup_steps=1000)
  config.model.pretrained = args["pretrained"]
  if data != "generated":  # a pretrained instruct model reads the set as it is, with the paper's prompts
    config.eval.update(margin_tokens=100, answer_tokens=100)  # the paper's code's limits
    if scale == "smoke":
      config.data.update(segment_tokens=64)
      config.eval.update(margin_tokens=8, answer_tokens=8)
      config.engine.update(num_pages=512)
    elif scale == "gpu":
      config.eval.update(segments="1,2,4,8")  # 4k to 32k tokens
    elif scale == "paper":
      config.eval.update(segments="4,8,16", num_docs=200)  # 16k, 32k and 64k tokens
    longest = max(int(n) for n in config.eval.segments.split(",")) * config.data.segment_tokens
    config.model.update(max_seq_len=longest + 1024, dtype="bfloat16" if scale in ("gpu", "paper") else "float32")
  return config
