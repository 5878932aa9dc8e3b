#!/usr/bin/env bash
# Data-parallel scaling on one host, Yi-6B-shaped random-init model, same per-GPU micro-batch (packed, 4608 tokens):
#   single      1 GPU
#   ddp2        DDP on 2 GPUs through torchrun
#   ddp2_accel  the same through `accelerate launch`
#   fsdp2       FSDP FULL_SHARD on 2 GPUs (--fsdp)
#   single_ga2  1 GPU with grad-accum 2 = the 2-GPU global batch, for the loss comparison
#   single_ga2_data1  the same with another data order (--data-seed 1): how far two equally valid runs drift apart
# Usage (on a machine with >= 2 GPUs): bash bench/multi_gpu.sh [OUTDIR]. Builds bench/workload/yi-6b-shape
# (config.json + tokenizer, from bench/tokenizer/) if missing.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${1:-bench/results/multi_gpu}
STEPS=${STEPS:-30}
PY=${PYTHON:-python3}
MODEL=bench/workload/yi-6b-shape
[ -f "$MODEL/config.json" ] || $PY -c "import sys; sys.path.insert(0, 'bench'); import train_speed as t; t.yi6b_dir(t.load_workload()[1])"
COMMON=(--model "$MODEL" --random-init --data data/huanhuan.json --val-size 0 --max-steps "$STEPS"
        --packing --tokens-per-batch 4608 --lora-dropout 0 --logging-steps 5 --save-steps 100000 --dtype bf16
        --lr 1e-4 --warmup-ratio 0 --overwrite)
run() {  # name, launcher... (the train flags follow)
  local name=$1; shift
  echo "== $name"
  timeout 200 "$@" "${COMMON[@]}" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$OUT/$name.log"; }
}
mkdir -p "$OUT"
TORCHRUN=(torchrun --standalone --nproc-per-node 2 -m chatlora.cli train)
ACCEL=(accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no
       -m chatlora train)
run single           $PY -m chatlora.cli train
run ddp2             "${TORCHRUN[@]}"
run ddp2_accel       "${ACCEL[@]}"
run fsdp2            "${TORCHRUN[@]}" --fsdp
run single_ga2       $PY -m chatlora.cli train --grad-accum 2
run single_ga2_data1 $PY -m chatlora.cli train --grad-accum 2 --data-seed 1
$PY bench/multi_gpu_report.py "$OUT"
