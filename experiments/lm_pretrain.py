"""Language-model pretraining of the core GPT (the `make demo` experiment).

  python main.py --config experiments/lm_pretrain.py:scale=smoke --workdir runs/lm_smoke   # seconds
  python main.py --config experiments/lm_pretrain.py:scale=cpu --workdir runs/lm_cpu       # minutes, 2 cores
  python main.py --config experiments/lm_pretrain.py:scale=gpu --workdir runs/lm_gpu       # one GPU
  python main.py --config experiments/lm_pretrain.py:scale=paper,model=llama3_8b --workdir gs://.../lm \
      --config.data.source=tfds --config.data.tfds_name=lm1b                               # pod slice

Arguments: `scale` in smoke|cpu|gpu|paper, `model` a preset of configs/gpt.py (default per scale).
Overrides: `--config.train.steps=100`, `--config.mesh.shape.fsdp=4`, ...
From a checkpoint: `--config.model.pretrained=PATH` (a Hugging Face directory or an lwjax workdir) finetunes all its
weights in `--config.model.param_dtype` (default float32); add `--config.train.lora.rank=8` (and `.alpha`, `.targets`)
to train LoRA adapters instead, the merged model written to `<workdir>/merged`.
The gpu and paper scales scan their layers (`model.scan_layers`: one compiled layer, one layer's temporaries; the
workdir loads per-layer with `load_pretrained`, or scanned with `scan_layers=True`); smoke and cpu unroll them.
The smoke and cpu scales train on a generated corpus (lwjax.data.corpus) that the run writes into its
workdir; the cpu scale's eval loss lands far below the unigram cross-entropy of the held-out text.
"""

import ml_collections

from configs import common, gpt, mesh

SCALES = ("smoke", "cpu", "gpu", "paper")
_DEFAULT_MODEL = {"smoke": "gpt_tiny", "cpu": "gpt_tiny", "gpu": "gpt_125m", "paper": "gpt_1b"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES}, scale="cpu", model="")
  scale = args["scale"]
  config = ml_collections.ConfigDict()
  config.job = "lm_pretrain"
  config.seed = 0
  config.model = gpt.get(args["model"] or _DEFAULT_MODEL[scale])
  config.data = ml_collections.ConfigDict({
      "source": "generated", "train_files": "", "eval_files": "", "num_train_docs": 20000,
      "num_eval_docs": 500, "tfds_name": "lm1b", "tfds_train_split": "train", "tfds_eval_split": "test",
      "text_key": "text", "tokenizer": "sentencepiece", "tokenizer_path": "", "seq_len": 128,
      "shuffle_seed": 0, "num_shards": 0,
  })
  config.train = common.train(lora=common.lora())
  config.optim = common.optim()
  config.mesh = mesh.get()
  config.distributed = common.distributed()

  if scale == "smoke":
    config.data.update(tokenizer="bytes", num_train_docs=400, num_eval_docs=40, seq_len=64)
    config.train.update(steps=20, global_batch_size=8, log_every=5, eval_every=20, eval_steps=2,
                        checkpoint_every=10)
    config.optim.update(learning_rate=3e-3, warmup_steps=5)
  elif scale == "cpu":
    config.model.update(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                        d_ff=384, max_seq_len=256)
    config.data.update(num_train_docs=20000, num_eval_docs=400, seq_len=128)
    config.train.update(steps=400, global_batch_size=32, log_every=25, eval_every=200, eval_steps=8,
                        checkpoint_every=200)
    config.optim.update(learning_rate=3e-3, warmup_steps=40)
  elif scale == "gpu":
    config.model.update(dtype="bfloat16", vocab_size=8192, scan_layers=True)
    config.data.update(num_train_docs=200000, num_eval_docs=2000, seq_len=1024)
    config.train.update(steps=5000, global_batch_size=64, log_every=50, eval_every=1000, eval_steps=20,
                        checkpoint_every=1000)
    config.optim.update(learning_rate=1e-3, warmup_steps=200)
  else:  # paper: gpt_1b / llama3_8b shapes, sharded over a slice
    config.model.update(dtype="bfloat16", remat="full", scan_layers=True)
    config.data.update(source="tfds", tokenizer="sentencepiece", seq_len=4096)
    config.train.update(steps=100000, global_batch_size=512, log_every=100, eval_every=5000,
                        eval_steps=50, checkpoint_every=2000)
    config.optim.update(learning_rate=3e-4, warmup_steps=2000)
    config.mesh = mesh.get(data=1, fsdp=-1, tensor=1)
  return config
