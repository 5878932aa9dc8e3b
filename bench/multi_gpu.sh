#!/usr/bin/env bash
# Data-parallel scaling on one host: 1 GPU vs DDP on 2 GPUs vs FSDP on 2 GPUs, Yi-6B-shaped random-init model,
# same per-GPU micro-batch (packed, 4608 tokens). Plus 1 GPU with grad-accum 2 = the 2-GPU global batch, for the
# loss comparison. Usage (on a machine with >= 2 GPUs): bash bench/multi_gpu.sh [OUTDIR]
# Needs bench/workload/yi-6b-shape (config.json + tokenizer), made by `python bench/train_speed.py` once.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${1:-bench/results/multi_gpu}
STEPS=${STEPS:-30}
PY=${PYTHON:-python3}
COMMON=(--model bench/workload/yi-6b-shape --random-init --data data/huanhuan.json --val-size 0 --max-steps "$STEPS"
        --packing --tokens-per-batch 4608 --lora-dropout 0 --logging-steps 5 --save-steps 100000 --dtype bf16
        --lr 1e-4 --warmup-ratio 0)
run() {  # name, launcher..., -- extra flags
  local name=$1; shift
  echo "== $name"
  timeout 240 "$@" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$OUT/$name.log"; }
}
mkdir -p "$OUT"
run single    $PY -m chatlora.cli train "${COMMON[@]}"
run ddp2      torchrun --standalone --nproc-per-node 2 -m chatlora.cli train "${COMMON[@]}"
run fsdp2     torchrun --standalone --nproc-per-node 2 -m chatlora.cli train "${COMMON[@]}" --fsdp
run single_ga2 $PY -m chatlora.cli train "${COMMON[@]}" --grad-accum 2
$PY bench/multi_gpu_report.py "$OUT"
