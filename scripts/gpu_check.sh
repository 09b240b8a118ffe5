#!/usr/bin/env bash
# Everything only a GPU can show, in one command, for the sessions that are lent one:
#
#   OUT=gpu-results bash scripts/gpu_check.sh
#
# 1. the GPU tests (bf16 kernels at real shapes against their references; the chunked
#    cross-entropy's peak memory against the logits-at-once reference),
# 2. bench.py kernels (attention TFLOP/s vs SDPA-flash; RMSNorm/SwiGLU GB/s vs HBM peak),
# 3. a bf16 training step of qwen2.5-0.5b (head dim 64) and a 4-layer llama3-8b (head dim
#    128) with the Triton kernels and with torch's, tokens/s and MFU from train.py.
# Each step has its own time limit, so one slow step cannot eat the others, and writes its
# log (and JSON) under $OUT as it goes. BENCHMARKS.md is written from these files, with
# the device, date and commit they name.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
} 2>&1 | tee "$out/device.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}

step gpu-tests 240 python3 -m pytest -q -m gpu tests/test_triton.py tests/test_kernels.py
step bench-kernels 240 python3 bench.py kernels --json "$out/kernels.json"
for backend in triton torch; do
    step "train-qwen-$backend" 90 env KERNELS_BACKEND=$backend python3 train.py --model llama \
        --config qwen2.5-0.5b --seq-len 2048 --global-batch-size 8 --steps 30 --warmup-steps 5 \
        --log-every 10 --eval-every 0 --eval-batches 1 --sample-tokens 0 \
        --metrics "$out/train-qwen-$backend.jsonl"
    step "train-llama-$backend" 90 env KERNELS_BACKEND=$backend python3 train.py --model llama \
        --config llama3-8b --set n_layers=4 --seq-len 4096 --global-batch-size 4 --steps 30 \
        --warmup-steps 5 --log-every 10 --eval-every 0 --eval-batches 1 --sample-tokens 0 \
        --metrics "$out/train-llama-$backend.jsonl"
done
