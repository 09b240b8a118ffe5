#!/usr/bin/env bash
# Everything only a GPU can show, in one command:
#
#   OUT=gpu-results bash scripts/gpu_check.sh          # the general checks, below
#   OUT=gpu-results bash scripts/gpu_check.sh mamba    # Mamba's (at the end of this file)
#   OUT=gpu-results bash scripts/gpu_check.sh bert     # BERT's
#   OUT=gpu-results bash scripts/gpu_check.sh t5       # T5's
#   OUT=gpu-results bash scripts/gpu_check.sh fp8      # FP8's: the GEMM and FP8 training
#   OUT=gpu-results bash scripts/gpu_check.sh memory   # the planner vs CUDA's peak; recompute
#   OUT=gpu-results bash scripts/gpu_check.sh mfu      # tokens/s and MFU of a ~1B llama: eager/compile
#
# 1. every test of tests/test_triton.py, tests/test_kernels.py and tests/test_ssm_kernels.py,
#    compiled on the GPU: the interpreter-sized cases (ragged lengths, decoding, windows,
#    padding, fp16, SSD's chunk and group shapes) and the `gpu` ones (bf16 at real shapes,
#    the chunked loss's peak memory, SSD at Mamba-2's shapes);
# 2. bf16 training steps of a 4-layer llama3-8b (head dim 128) and qwen2.5-0.5b (head dim
#    64) with the Triton kernels and with torch's: tokens/s and MFU from train.py;
# 3. bench.py kernels (attention TFLOP/s vs SDPA-flash; RMSNorm/SwiGLU GB/s vs HBM peak;
#    SSD vs ssd_chunked and, if installed, mamba_ssm).
# Most important first. Each step has its own time limit, so one slow step cannot eat the
# others, and writes its log (and JSON, and each test's duration) under $OUT as it goes;
# BENCHMARKS.md is written from these files, with the device, date and commit they name.
#
# At most 8.5 minutes in all. The limits are not measured yet: nothing here has run on a GPU.
# They are bounds from what the steps do: the tests compile each kernel once per distinct
# shape class and autotune configuration (on the CPU they take 60 s in Triton's
# interpreter), a training step of these sizes is well under a second on an H100 (start-up
# dominates), and bench.py kernels times ~20 cases. The first run on a GPU replaces them
# with its measured times (tests.log lists every test's duration) plus a margin.
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

if [ "${1:-}" = mamba ]; then
    # Mamba, at most 6 minutes: the SSD kernel tests compiled (the `gpu` ones at Mamba-2's
    # shapes); bf16 training steps of mamba2-130m with the Triton SSD and with the PyTorch
    # chunked form; Mamba-2 against a LLaMA of its size (162M vs 129M parameters) in time
    # and memory per token up to seq 16k.
    step ssm-tests 150 python3 -m pytest -q -rA --durations=0 -p no:cacheprovider tests/test_ssm_kernels.py
    for backend in triton torch; do
        step "train-mamba2-130m-$backend" 45 env KERNELS_BACKEND=$backend python3 train.py \
            --model mamba --config mamba2-130m --seq-len 2048 --global-batch-size 8 --steps 20 \
            --warmup-steps 5 --log-every 5 --eval-every 0 --eval-batches 1 --sample-tokens 0 \
            --metrics "$out/train-mamba2-130m-$backend.jsonl"
    done
    step bench-long-context 90 python3 bench.py long-context --seq-lens 1024 2048 4096 8192 16384 \
        --mamba-config mamba2-130m --mamba-set --llama-config tiny --llama-set dim=768 n_layers=12 \
        n_heads=12 n_kv_heads=12 ffn_dim=2048 vocab_size=50288 --json "$out/long-context.json"
    exit 0
fi

if [ "${1:-}" = mfu ]; then
    # One GPU's throughput, at most 4 minutes: bench.py mfu (a 1.5B LLaMA, LLaMA 3.2 1B's
    # shape, bf16, batch 2 x seq 4096), eager and compiled, torch and Triton kernels: tokens/s
    # and MFU of the datasheet peak, compile time apart; then 2048 for the shorter sequence.
    step bench-mfu-4096 150 python3 bench.py mfu --seq-len 4096 --json "$out/mfu-4096.json"
    step bench-mfu-2048 80 python3 bench.py mfu --seq-len 2048 --batch-size 4 --steps 5 \
        --json "$out/mfu-2048.json"
    exit 0
fi

if [ "${1:-}" = memory ]; then
    # Memory, at most 3 minutes: the planner's peak against torch.cuda.max_memory_allocated
    # for a 2-layer llama3-8b in bf16 (tests/test_memory.py's `gpu` test, numbers printed),
    # and recompute none / selective / full on the same shape: activations and step time.
    step memory-tests 120 python3 -m pytest -q -rA -s -m gpu -p no:cacheprovider tests/test_memory.py
    step bench-recompute 60 python3 bench.py recompute --config llama3-8b --set n_layers=2 \
        --seq-len 4096 --json "$out/recompute.json"
    exit 0
fi

if [ "${1:-}" = fp8 ]; then
    # FP8, at most 5 minutes: the FP8 GEMM tests compiled on the GPU (the interpreter-sized
    # cases: odd shapes, masks, strides, both pairs of formats, both kinds of scales; the
    # `gpu` ones at 4096^3 and an 8B model's projections against the fp64 product, the
    # reference and torch._scaled_mm, errors printed); the GEMM's TFLOP/s against
    # _scaled_mm and bf16 (target: ours >= 0.95x _scaled_mm). Compiling every autotuning
    # configuration of each case is most of the tests' time.
    step fp8-gemm-tests 140 python3 -m pytest -q -rA --durations=0 -p no:cacheprovider tests/test_fp8_matmul.py
    step bench-fp8-gemm 40 python3 bench.py fp8-gemm --json "$out/fp8-gemm.json"
    # FP8 training against bf16: a 4-layer llama3-8b (every layer FP8, Triton GEMMs), 20
    # steps each; tokens/s and MFU (of the bf16 peak) from train.py (target: fp8 >= 1.3x
    # bf16). Then the FP8 layer and training tests compiled (the Triton path of an FP8 linear).
    for precision in bf16 fp8; do
        step "train-llama3-8b-4l-$precision" 60 python3 train.py --model llama --config llama3-8b \
            --set n_layers=4 --seq-len 4096 --global-batch-size 4 --precision $precision \
            $([ $precision = fp8 ] && echo --fp8-bf16-layers 0) --steps 20 --warmup-steps 5 \
            --log-every 5 --eval-every 0 --eval-batches 1 --sample-tokens 0 \
            --metrics "$out/train-llama3-8b-4l-$precision.jsonl"
    done
    step fp8-training-tests 60 python3 -m pytest -q -rA --durations=0 -p no:cacheprovider \
        tests/test_fp8_training.py -k "triton or emulation"
    exit 0
fi

if [ "${1:-}" = t5 ]; then
    # T5, at most 3 minutes: the relative-position-bias attention tests compiled on the GPU
    # (the bias added inside the kernels, the table's gradient by atomic adds); bf16 training
    # steps of t5-base (head dim 64, padded encoder, causal decoder with its own buckets,
    # cross-attention) with the Triton kernels and with torch's (SDPA with the bias
    # materialized). The kernel's TFLOP/s against SDPA + materialized bias are bench.py
    # kernels' attention-t5 rows, in the general checks.
    step t5-attention-tests 80 python3 -m pytest -q -rA --durations=0 -p no:cacheprovider \
        tests/test_relative_attention.py
    for backend in triton torch; do
        step "train-t5-base-$backend" 50 env KERNELS_BACKEND=$backend python3 train.py \
            --model t5 --config t5-base --tokenizer byte --set vocab_size=384 --set \
            decoder_start_token_id=257 --seq-len 512 --global-batch-size 32 --steps 20 \
            --warmup-steps 5 --log-every 5 --eval-every 0 --eval-batches 1 \
            --metrics "$out/train-t5-base-$backend.jsonl"
    done
    exit 0
fi

if [ "${1:-}" = bert ]; then
    # BERT, at most 2 minutes: bf16 pre-training steps of bert-base (head dim 64, bidirectional
    # attention with padding, the masked-token head at the predicted tokens) with the Triton
    # kernels and with torch's. (The kernel's bf16 accuracy in this case, non-causal and
    # padded, is one of test_attention_bf16_gpu's, in the general checks.)
    for backend in triton torch; do
        step "train-bert-base-$backend" 55 env KERNELS_BACKEND=$backend python3 train.py \
            --model bert --config bert-base --seq-len 512 --global-batch-size 32 --steps 20 \
            --warmup-steps 5 --log-every 5 --eval-every 0 --eval-batches 1 \
            --metrics "$out/train-bert-base-$backend.jsonl"
    done
    exit 0
fi

step tests 270 python3 -m pytest -q -rA --durations=0 -p no:cacheprovider \
    tests/test_triton.py tests/test_kernels.py tests/test_ssm_kernels.py
for config in "llama3-8b --set n_layers=4 --seq-len 4096 --global-batch-size 4" \
              "qwen2.5-0.5b --seq-len 2048 --global-batch-size 8"; do
    name=$(echo "$config" | cut -d' ' -f1)
    for backend in triton torch; do
        # shellcheck disable=SC2086  # $config is several flags
        step "train-$name-$backend" 40 env KERNELS_BACKEND=$backend python3 train.py --model llama \
            --config $config --steps 20 --warmup-steps 5 --log-every 5 --eval-every 0 \
            --eval-batches 1 --sample-tokens 0 --metrics "$out/train-$name-$backend.jsonl"
    done
done
step bench-kernels 80 python3 bench.py kernels --json "$out/kernels.json"
