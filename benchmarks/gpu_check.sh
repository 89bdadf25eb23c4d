#!/usr/bin/env bash
# One call on a lent GPU: correctness checks, then timings; logs and summary.md go to the folder $1 (default $OUT).
#
# Here, first:   ../shared/tools/offline-gpu-wheels pytest pluggy iniconfig vizdoom gymnasium cloudpickle \
#                  farama-notifications tqdm   (fills .whl/, git-ignored; vizdoom etc. for the GameNGen imports)
# Then (device): bash benchmarks/gpu_check.sh "$OUT"   with carry=[".whl"], timeout_s ~ 540
# The device image has jax/flax/optax/orbax; grain, ml-collections and tensorboardX come from .whl/.
# Every step runs under its own timeout, all within 8 minutes; summary.md has each step's exit status and time,
# then the benchmark tables. Exits non-zero when a step failed.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
BUDGET_S=470
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
printf '# gpu_check %s\n\n| step | exit | seconds | last line |\n|---|---|---|---|\n' "$(date -u +%FT%TZ)" > "$OUT/summary.md"
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD with a timeout, output to the console and $OUT/NAME.log, a row to summary.md.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || FAILED=1
  echo "| $name | $rc$([ "$rc" -eq 124 ] && echo ' (timeout)') | $((SECONDS - start)) | $(tail -n 1 "$OUT/$name.log" | tr '|' '/') |" \
    >> "$OUT/summary.md"
}

step device 60 bash -c 'nvidia-smi; python3 -c "import jax; print(jax.__version__, jax.devices())"'

# Correctness on the GPU: KV-cache decode vs forward, packing, remat; every kernel test with impl="pallas"
# (compiled Triton kernels vs the reference; tests/kernels/conftest.py reads LWJAX_KERNEL_IMPL).
step tests 170 env JAX_PLATFORMS=cuda XLA_FLAGS= LWJAX_KERNEL_IMPL=pallas \
  python3 -m pytest -q -p no:cacheprovider tests/models/test_gpt.py tests/kernels

# Kernel timings at issue 3's target shapes, with the measured roofline and the XLA / cuDNN baselines.
step kernels 120 python3 -m benchmarks.kernels

# GameNGen real-time frame (sd14: SD-v1.4 UNet, 64-frame context, bf16): ms/FPS at k = 1, 4 DDIM steps, per-component
# ms and the roofline. The diffusers peer is off: compiling it takes minutes (its own call, with diffusers wheels).
step gamengen_fps 100 python3 -m benchmarks.gamengen_fps --steps 1,4 --iters 10 --peer off \
  --out "$OUT/gamengen_fps.json"

# Serving throughput at the Llama-3-8B shape (random weights, bf16, NanoFlow's LMSYS-Chat lengths unscaled): % of
# optimal and the ratio to static batching (and to HF generate when torch is there) in the same call.
step serving_llama3_8b 150 python3 -m benchmarks.serving --model llama3_8b --dtype bfloat16 --length_scale 1 \
  --requests 128 --max_num_seqs 64 --num_pages 8192 --page_size 16 --prefill_chunk 512 --max_batch_tokens 2048 \
  --workloads lmsys_chat

# Hybrid decoding at the Llama-3.2-1B shape (random weights, bf16): ms per decode step of the teacher GPT vs its
# 50% and 0% attention hybrids as the cache grows, then speculative decoding (random draft: exactness and timing).
step hybrid_decode_gpt_1b 90 python3 -m benchmarks.hybrid_decode --preset gpt_1b --dtype bfloat16 --rows 8 \
  --lengths 512,2048,4096 --prompts 2 --new_tokens 64

# Timing: gpt_1b (Llama-3.2-1B shape) on one card, bf16 compute with fp32 master weights; what is left of the budget.
step train_throughput_gpt_1b $((BUDGET_S - SECONDS > 30 ? BUDGET_S - SECONDS : 30)) python3 -m benchmarks.train_throughput \
  --config experiments/lm_pretrain.py:scale=gpu,model=gpt_1b \
  --config.train.global_batch_size=8 --config.data.seq_len=2048 --steps 10 --warmup 2 \
  --variants "model.remat=full;model.remat=dots;model.remat=none"

# Tensor-parallel serving on a machine of 8 GPUs (skipped on fewer, so not run on the one-GPU lent machine; after
# the one-GPU steps and outside BUDGET_S: give such a call ~10 more minutes). NanoFlow's own setting: the
# Llama-2-70B shape (random weights initialised straight onto their shards, bf16, 140 GB) on tensor=8, LMSYS-Chat
# lengths unscaled, static batching on the same 8 GPUs (XLA partitions it from the weights' shardings). Then the
# Llama-3-8B shape on tensor=8 and on tensor=4 x data=2 (two engine replicas behind one front).
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 8 ]; then
  step serving_llama2_70b_tp8 300 python3 -m benchmarks.serving --model llama2_70b --dtype bfloat16 --mesh tensor=8 \
    --length_scale 1 --requests 256 --max_num_seqs 128 --num_pages 16384 --page_size 16 --prefill_chunk 512 \
    --max_batch_tokens 2048 --workloads lmsys_chat
  for mesh in tensor=8 data=2,tensor=4; do
    step "serving_llama3_8b_${mesh//[=,]/_}" 150 python3 -m benchmarks.serving --model llama3_8b --dtype bfloat16 \
      --mesh "$mesh" --length_scale 1 --requests 256 --max_num_seqs 64 --num_pages 8192 --page_size 16 \
      --prefill_chunk 512 --max_batch_tokens 2048 --workloads lmsys_chat
  done
else
  echo "| serving_tensor_parallel | skipped | 0 | needs 8 GPUs, $(nvidia-smi -L 2>/dev/null | wc -l) here |" >> "$OUT/summary.md"
fi

{
  printf '\n## kernels\n\n```\n'; grep -v '^\s*$' "$OUT/kernels.log" | grep -v '^WARNING\|^I0\|^W0' | tail -n 40
  printf '```\n\n## gamengen_fps\n\n```\n'; grep -v '^WARNING\|^I0\|^W0' "$OUT/gamengen_fps.log" | tail -n 14
  printf '```\n\n## serving_llama3_8b\n\n```\n'; grep -v '^WARNING\|^I[0-9]\|^W[0-9]' "$OUT/serving_llama3_8b.log" | tail -n 12
  for log in "$OUT"/serving_llama2_70b_tp8.log "$OUT"/serving_llama3_8b_*.log; do
    [ -f "$log" ] || continue
    printf '```\n\n## %s\n\n```\n' "$(basename "$log" .log)"; grep -v '^WARNING\|^I[0-9]\|^W[0-9]' "$log" | tail -n 12
  done
  printf '```\n\n## hybrid_decode_gpt_1b\n\n```\n'; grep -v '^WARNING\|^I[0-9]\|^W[0-9]' "$OUT/hybrid_decode_gpt_1b.log" | tail -n 12
  printf '```\n\n## train_throughput_gpt_1b\n\n```\n'; tail -n 6 "$OUT/train_throughput_gpt_1b.log"; printf '```\n'
} >> "$OUT/summary.md"
cat "$OUT/summary.md"
exit $FAILED
