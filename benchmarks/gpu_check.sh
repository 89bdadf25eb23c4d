#!/usr/bin/env bash
# One call on a lent GPU: correctness checks, then timings; every log goes under $OUT.
#
# Here, first:   ../shared/tools/offline-gpu-wheels pytest pluggy iniconfig   (fills .whl/, git-ignored)
# Then (device): bash benchmarks/gpu_check.sh          with carry=[".whl"], timeout_s ~ 540
# The device image has jax/flax/optax/orbax; grain, ml-collections and tensorboardX come from .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi; python3 -c "import jax; print(jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/device.txt"

# Correctness on the GPU: KV-cache decode vs forward, packing, remat, attention reference.
JAX_PLATFORMS=cuda XLA_FLAGS= timeout 180 python3 -m pytest -q -p no:cacheprovider \
  tests/models/test_gpt.py tests/kernels 2>&1 | tee "$OUT/tests.log"

# Timing: gpt_1b (Llama-3.2-1B shape) on one card, bf16 compute with fp32 master weights.
timeout 300 python3 -m benchmarks.train_throughput \
  --config experiments/lm_pretrain.py:scale=gpu,model=gpt_1b \
  --config.train.global_batch_size=8 --config.data.seq_len=2048 --steps 10 --warmup 2 \
  --variants "model.remat=full;model.remat=dots;model.remat=none" 2>&1 | tee "$OUT/train_throughput_gpt_1b.log"
