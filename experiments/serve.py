"""Serve a GPT or a Mamba/attention hybrid over the OpenAI-compatible API (NanoFlow-style engine).

  python main.py --config experiments/serve.py:scale=smoke --workdir runs/serve     # random gpt_tiny, bytes
  # the GPT of `python main.py --config experiments/lm_pretrain.py:scale=cpu --workdir runs/lm_cpu`:
  python main.py --config experiments/serve.py:scale=cpu --workdir runs/serve \
      --config.weights.source=lwjax_checkpoint --config.weights.path=runs/lm_cpu \
      --config.tokenizer.kind=sentencepiece --config.tokenizer.path=runs/lm_cpu/tokenizer.model
  # a distilled Mamba/attention hybrid (a stage directory of experiments/mamba_distill.py, with its hybrid.json):
  python main.py --config experiments/serve.py:scale=cpu --workdir runs/serve \
      --config.weights.source=lwjax_checkpoint --config.weights.path=runs/distill_cpu50/attention/sft \
      --config.tokenizer.kind=sentencepiece --config.tokenizer.path=runs/lm_cpu/tokenizer.model
  # a Hugging Face checkpoint with its own tokenizer (tokenizer.json): chats use its chat template and stop at
  # any of its stop ids (generation_config's eos_token_id, e.g. Llama-3's <|eot_id|>):
  python main.py --config experiments/serve.py:scale=gpu --workdir runs/serve \
      --config.weights.source=hf_checkpoint --config.weights.path=/ckpt/Llama-3.2-1B-Instruct \
      --config.tokenizer.kind=hf --config.tokenizer.path=/ckpt/Llama-3.2-1B-Instruct
  # tensor parallel over 8 GPUs (heads, kv heads, MLP hidden and vocabulary split; the KV pool over kv heads),
  # each weight read straight onto its shard:
  python main.py --config experiments/serve.py:scale=paper --workdir runs/serve \
      --config.model.pretrained=/ckpt/Llama-2-70b-chat-hf --config.mesh.shape.tensor=8
  # two engine replicas behind one API, each tensor parallel over 4 of 8 GPUs (requests to the least-loaded):
  python main.py --config experiments/serve.py:scale=gpu --workdir runs/serve \
      --config.model.pretrained=/ckpt/Llama-3.1-8B-Instruct --config.mesh.shape.data=2 --config.mesh.shape.tensor=4

  curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
      -d '{"model": "lwjax", "prompt": "Once", "max_tokens": 16}'

Arguments: `scale` in smoke|cpu|gpu|paper, `model` a preset of configs/gpt.py. `tokenizer.kind`: bytes (default),
sentencepiece (`tokenizer.path` a model file) or hf (`tokenizer.path` a Hugging Face tokenizer directory:
tokenizer.json, or only a sentencepiece tokenizer.model; see docs/API.md "Chat templates").
"""

import ml_collections

from configs import common, gpt, mesh
from lwjax.training.mesh import SERVING_RULES

SCALES = ("smoke", "cpu", "gpu", "paper")
_DEFAULT_MODEL = {"smoke": "gpt_tiny", "cpu": "gpt_tiny", "gpu": "gpt_1b", "paper": "llama3_8b"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES}, scale="smoke", model="")
  scale = args["scale"]
  config = ml_collections.ConfigDict()
  config.job = "serve"
  config.seed = 0
  config.model = gpt.get(args["model"] or _DEFAULT_MODEL[scale])
  # One device; --config.mesh.shape.tensor=N: tensor parallel over the first N (lwjax.serving.tensor_parallel);
  # --config.mesh.shape.data=D: D engine replicas of N devices each behind one front (lwjax.serving.replicas).
  config.mesh = mesh.get(data=1, fsdp=1, tensor=1, rules=SERVING_RULES)
  config.weights = {"source": "random", "path": ""}
  config.tokenizer = {"kind": "bytes", "path": ""}
  config.engine = {"num_pages": 256, "page_size": 16, "max_num_seqs": 16, "max_batch_tokens": 256,
                   "prefill_chunk": 64, "max_model_len": 128, "nano_batches": 1, "async_scheduling": True,
                   "mixed_batches": True,
                   "kv_offload": {"host_bytes": 0, "disk_dir": "", "disk_bytes": 0}}
  config.server = {"host": "127.0.0.1", "port": 8000, "model_name": "lwjax", "max_queued": 256, "drain_seconds": 30.0,
                   "ignore_unknown_fields": False, "api_key": ""}
  if scale == "cpu":
    config.model.update(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                        d_ff=384, max_seq_len=256)
    config.engine.update(max_model_len=256)
  elif scale in ("gpu", "paper"):
    config.model.update(dtype="bfloat16")
    config.engine.update(num_pages=4096, page_size=16, max_num_seqs=64, max_batch_tokens=2048,
                         prefill_chunk=512, max_model_len=4096, nano_batches=2)
  return config
