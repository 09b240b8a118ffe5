#!/usr/bin/env bash
# Everything only a GPU can show, in one command per mode, each sized for a GPU lent for
# about 15 minutes (start-up included):
#
#   OUT=gpu-results bash scripts/gpu_check.sh          # general: kernels, llama training, speed
#   OUT=gpu-results bash scripts/gpu_check.sh t5       # T5's relative-position attention
#   OUT=gpu-results bash scripts/gpu_check.sh mamba    # Mamba-2's SSD kernels and training
#   OUT=gpu-results bash scripts/gpu_check.sh bert     # BERT's training, Triton vs torch
#   OUT=gpu-results bash scripts/gpu_check.sh fp8      # the FP8 GEMM and FP8 training
#   OUT=gpu-results bash scripts/gpu_check.sh memory   # the planner vs CUDA's peak; recompute
#   OUT=gpu-results bash scripts/gpu_check.sh mfu      # tokens/s and MFU of a ~1B llama
#
# What it writes, under $OUT/MODE/ ($OUT defaults to gpu-results), at most 8 files, each
# as soon as its step ends: summary.txt (date, commit, nvidia-smi, the versions of Python,
# torch, triton and the pytest plugins, then one line per step: pass / fail / timeout,
# seconds, limit), tests.log (pytest's output and summary), train.log and train.jsonl
# (train.py's output and --metrics of every run, each run's records after its header),
# bench.log and one JSON file per bench.py mode (rows written as they are measured).
# BENCHMARKS.md is written from these files, with the device, date and commit they name.
#
# Never stops at a failure: each step runs under `timeout -k` (SIGTERM at its limit, SIGKILL
# 10 s later: train.py catches SIGTERM to save, and a step stuck compiling must still end),
# pytest runs with workers (-n) and a per-test --timeout and always prints its summary.
#
# Time limits come from counting compilations, not from a GPU run (none has happened yet):
# scripts/count_compiles.py runs each step's command on the CPU under Triton's interpreter
# and counts the distinct kernel specializations it launches, which is what Triton compiles
# on a GPU. Each limit below is written as start-up + compiles x 2 s + run time (the sum,
# rounded up): 2 s per compile is twice and more the 0.8 s per compile `bench.py
# kernels-compile` measures on this project's 2-core CPU machine (104 in 80 s, one worker,
# ptxas included); tests compile in 8 workers (pytest -n 8, of the machine's 16 cores); a
# step's start (Python, torch, CUDA) is taken as 20 s. Correctness steps run with
# KERNELS_AUTOTUNE=first (one configuration per kernel, nothing timed); bench.py steps
# autotune, compiling each kernel once per configuration of the Hopper list. The general
# checks: at most 8 minutes by this count; each other mode: at most 5.
#
# GPU_CHECK_DRY_RUN=1 runs the same steps, writing the same files, on the CPU: kernels in
# Triton's interpreter, test-size models, a few selected tests (tests/test_gpu_check.py
# runs it in the suite, so the plumbing is tested before any GPU sees it).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-general}
case $mode in general | t5 | mamba | bert | fp8 | memory | mfu) ;;
    *) echo "error: unknown mode '$mode'; choose general, t5, mamba, bert, fp8, memory or mfu" >&2; exit 2 ;;
esac
out=${OUT:-gpu-results}/$mode
mkdir -p "$out"
summary=$out/summary.txt
export PYTHONUNBUFFERED=1 KERNELS_AUTOTUNE=first
workers=8

# A dry run appends these to each command (argparse and pytest take the last value given).
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    workers=0  # (xdist's flag, its workers left out: a few tests)
    TESTS_SMALL=(-m "not gpu" -k "rmsnorm_matches_reference or ssd_triton_stages_forward or dispatch or \
position_bias_under_autocast or optimizer_state_with_and_without_zero1 or fp8_linear_through_the_triton")
    TRAIN_SMALL=(--config test --seq-len 32 --global-batch-size 2 --micro-batch-size 2 --steps 1
        --warmup-steps 0 --log-every 1 --device cpu)
    BENCH_SMALL=(--device cpu)
else
    TESTS_SMALL=() TRAIN_SMALL=() BENCH_SMALL=()
fi
small() {  # small GPU_VALUE DRY_VALUE: a size for the GPU, or for the dry run
    if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then echo "$2"; else echo "$1"; fi
}

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "mode: $mode$([ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && echo ' (dry run: CPU, interpreter)')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
    python3 - <<'EOF'
import importlib.metadata as md, platform
versions = {}
for name in ("torch", "triton", "pytest", "pytest-xdist", "pytest-timeout", "transformers"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = "not installed"
print("python", platform.python_version(), "|", " | ".join(f"{k} {v}" for k, v in versions.items()))
EOF
} > "$summary" 2>&1
cat "$summary"

lines=()
step() {  # step NAME LIMIT LOG COMMAND...: at most LIMIT seconds, output appended to $out/LOG
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit} s): $*" | tee -a "$out/$log"
    local start=$SECONDS
    timeout -k "${kill_after:-10}" "$limit" "$@" >> "$out/$log" 2>&1
    local rc=$? verdict=pass
    if [ $rc = 124 ] || [ $rc = 137 ]; then verdict=timeout; elif [ $rc != 0 ]; then verdict="fail ($rc)"; fi
    tail -n 12 "$out/$log"
    lines+=("$(printf '%-28s %-10s %4d s of %4d s' "$name" "$verdict" $((SECONDS - start)) "$limit")")
    echo "step: ${lines[-1]}" | tee -a "$summary"
}
tests() {  # tests NAME LIMIT FILES-AND-FLAGS...: pytest in workers, a per-test limit, summary always
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" tests.log python3 -m pytest -q -rfEs --durations=15 -p no:cacheprovider \
        -n "$workers" --timeout 120 "$@" "${TESTS_SMALL[@]}"
}
train() {  # train NAME LIMIT [ENV=VALUE...] -- TRAIN.PY FLAGS...: steps of train.py, metrics in train.jsonl
    local name=$1 limit=$2
    shift 2
    local env=()
    while [ "$1" != -- ]; do env+=("$1"); shift; done
    shift
    step "$name" "$limit" train.log env "${env[@]}" python3 train.py "$@" --warmup-steps 5 --log-every 5 \
        --eval-every 0 --eval-batches 1 --sample-tokens 0 --metrics "$out/train.jsonl" "${TRAIN_SMALL[@]}"
}
bench() {  # bench NAME LIMIT MODE FLAGS...: a bench.py mode, its rows in NAME.json as measured
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" bench.log env KERNELS_AUTOTUNE=all python3 bench.py "$@" --json "$out/$name.json" \
        "${BENCH_SMALL[@]}"
}

case $mode in
general)
    # 1. The kernel tests compiled on the GPU: the interpreter-sized cases (ragged lengths,
    #    decoding, windows, padding, documents, fp16, SSD's chunk and group shapes) and the
    #    `gpu` ones (bf16 at real shapes, SSD at Mamba-2's shapes). Compiles: 85
    #    (test_triton.py) + 72 (test_ssm_kernels.py) counted, + about 104 in the `gpu` tests,
    #    which need CUDA and so cannot be counted on a CPU (12 attention cases x 4 kernels,
    #    RMSNorm 3 x 2, SwiGLU 2, a bf16 llama 8, SSD 4 cases x about 10) = 261, in 8 workers;
    #    60 s of running: 20 + 261 x 2 / 8 + 60 = 145 -> 150 s.
    tests kernel-tests 150 tests/test_triton.py tests/test_kernels.py tests/test_ssm_kernels.py
    # 2. bf16 training, 20 steps: a 4-layer llama3-8b (head dim 128) with the Triton kernels
    #    and with torch's, and qwen2.5-0.5b (head dim 64) with Triton's; tokens/s and MFU from
    #    train.py (step 1 reported apart). Compiles per Triton run: 8 (attention forward,
    #    backward preprocess, dq, dkdv; RMSNorm and SwiGLU forward and backward): 20 + 8 x 2 +
    #    20 steps x 0.5 s = 46 -> 50 s; with torch's kernels none: 20 + 10 = 30 -> 35 s.
    train llama3-8b-4l-triton 50 KERNELS_BACKEND=triton -- --model llama --config llama3-8b --set n_layers=4 \
        --seq-len "$(small 4096 32)" --global-batch-size 4 --steps 20
    train llama3-8b-4l-torch 35 KERNELS_BACKEND=torch -- --model llama --config llama3-8b --set n_layers=4 \
        --seq-len "$(small 4096 32)" --global-batch-size 4 --steps 20
    train qwen2.5-0.5b-triton 50 KERNELS_BACKEND=triton -- --model llama --config qwen2.5-0.5b \
        --seq-len "$(small 2048 32)" --global-batch-size 8 --steps 20
    # 3. Kernel speed, autotuned: attention vs SDPA-flash, T5's attention vs SDPA with the
    #    bias materialized, RMSNorm and SwiGLU vs the HBM peak, the chunked loss, SSD vs
    #    ssd_chunked; --quick: sequences of 1k and 4k; no torch.compile baselines (about 40 s
    #    of Inductor). Compiles: 17 specializations counted (bench.py kernels under the
    #    interpreter), the 3 attention kernels' 12 over 4 Hopper configurations: 53; SSD's 9
    #    kernels, 5 of them over 2-3: about 15; 68 in all: 20 + 68 x 2 + 30 = 186 -> 190 s.
    bench kernels 190 kernels --quick --no-compile $(small "" "--seq-lens 64 --reps 1")
    ;;
t5)
    # The relative-position-bias attention tests compiled (the bias added inside the kernels,
    # the table's gradient by atomic adds, the autotuner's reset of it). Compiles: 51
    # counted, + 2 `gpu` cases x 4 = 59, in 8 workers: 20 + 59 x 2 / 8 + 40 = 75 -> 80 s.
    tests t5-attention-tests 80 tests/test_relative_attention.py
    # bf16 training steps of t5-base (head dim 64, padded encoder, causal decoder with its
    # own buckets, cross-attention), Triton kernels and torch's (SDPA with the bias
    # materialized). Compiles: 12 with Triton's (attention forward, dq and dkdv for the
    # encoder, the decoder and cross-attention; preprocess; RMSNorm): 20 + 12 x 2 + 20 = 64
    # -> 65 s; with torch's none: 20 + 20 = 40 s.
    for backend_limit in triton:65 torch:40; do
        train "t5-base-${backend_limit%:*}" "${backend_limit#*:}" KERNELS_BACKEND="${backend_limit%:*}" -- \
            --model t5 --config t5-base --tokenizer byte --set vocab_size=384 \
            --set decoder_start_token_id=257 --seq-len "$(small 512 32)" --global-batch-size 32 --steps 20
    done
    ;;
mamba)
    # The SSD kernel tests compiled (the `gpu` ones at Mamba-2's shapes). Compiles: 72
    # counted + about 40 in the `gpu` tests = 112, in 8 workers: 20 + 112 x 2 / 8 + 40 = 88 -> 90 s.
    tests ssm-tests 90 tests/test_ssm_kernels.py
    # bf16 training of mamba2-130m, the Triton SSD and the PyTorch chunked form. Compiles:
    # 12 with Triton's (the SSD's 9 kernels forward and backward, one of them twice; the
    # gated RMSNorm forward and backward): 20 + 12 x 2 + 15 = 59 -> 60 s; none with torch's: 40 s.
    for backend_limit in triton:60 torch:40; do
        train "mamba2-130m-${backend_limit%:*}" "${backend_limit#*:}" KERNELS_BACKEND="${backend_limit%:*}" -- \
            --model mamba --config mamba2-130m --seq-len "$(small 2048 32)" --global-batch-size 8 --steps 20
    done
    # Mamba-2 against a LLaMA of its size (162M vs 129M parameters) in time and memory per
    # token at seq 1k, 4k and 16k, autotuned. Compiles: 18 specializations counted; the 3
    # attention kernels over 4 configurations (12), SSD's 5 tuned ones over 2-3 (13), 9
    # untuned: 34: 20 + 34 x 2 + 20 = 108 -> 110 s.
    bench long-context 110 long-context --seq-lens $(small "1024 4096 16384" "16 32") \
        --mamba-config mamba2-130m --mamba-set $(small "" "n_layers=1 dim=64 vocab_size=512") \
        --llama-config tiny --llama-set $(small "dim=768 n_layers=12 n_heads=12 n_kv_heads=12 \
        ffn_dim=2048 vocab_size=50288" "n_layers=1") --reps $(small 3 1)
    ;;
bert)
    # bf16 pre-training steps of bert-base (head dim 64, bidirectional attention with
    # padding, the masked-token head), Triton kernels and torch's. Compiles: 4 with Triton's
    # (the attention kernels; LayerNorm is torch's): 20 + 4 x 2 + 20 = 48 -> 50 s; none with
    # torch's: 40 s.
    for backend_limit in triton:50 torch:40; do
        train "bert-base-${backend_limit%:*}" "${backend_limit#*:}" KERNELS_BACKEND="${backend_limit%:*}" -- \
            --model bert --config bert-base --seq-len "$(small 512 32)" --global-batch-size 32 --steps 20
    done
    ;;
fp8)
    # The FP8 GEMM tests compiled (odd shapes, masks, strides, both format pairs, both
    # kinds of scales; the `gpu` ones at 4096^3 and an 8B model's projections). Compiles: 39
    # counted + 4 x 3 shapes in the `gpu` tests = 51, in 8 workers: 20 + 51 x 2 / 8 + 30 = 63 -> 65 s.
    tests fp8-gemm-tests 65 tests/test_fp8_matmul.py
    # The GEMM's TFLOP/s against _scaled_mm and bf16 (target: ours >= 0.95x _scaled_mm),
    # autotuned: 4 format/scale variants x 4 Hopper configurations = 16 compiles:
    # 20 + 16 x 2 + 15 = 67 -> 70 s.
    bench fp8-gemm 70 fp8-gemm $(small "" "--shapes 64x32x48 --reps 1")
    # FP8 training against bf16: a 4-layer llama3-8b, every layer FP8 (Triton GEMMs), 20
    # steps each (target: fp8 >= 1.3x bf16's tokens/s). Compiles: 8 for bf16 (as in the
    # general checks): 20 + 8 x 2 + 15 = 51 -> 55 s; 11 for FP8 (bf16's 8 and the GEMM's
    # forward, dgrad and wgrad): 20 + 11 x 2 + 15 = 57 -> 60 s.
    train llama3-8b-4l-bf16 55 -- --model llama --config llama3-8b --set n_layers=4 \
        --seq-len "$(small 4096 32)" --global-batch-size 4 --precision bf16 --steps 20
    train llama3-8b-4l-fp8 60 -- --model llama --config llama3-8b --set n_layers=4 \
        --seq-len "$(small 4096 32)" --global-batch-size 4 --precision fp8 --fp8-bf16-layers 0 --steps 20
    # The FP8 layer and training tests compiled (the Triton path of an FP8 linear).
    # Compiles: 10 counted: 20 + 10 x 2 / 8 + 20 = 43 -> 45 s.
    tests fp8-training-tests 45 tests/test_fp8_training.py -k "triton or emulation"
    ;;
memory)
    # The planner's peak against torch.cuda.max_memory_allocated for a 2-layer llama3-8b in
    # bf16 with the Triton kernels (tests/test_memory.py's `gpu` test, numbers printed).
    # Compiles: 8: 20 + 8 x 2 + 30 = 66 -> 70 s.
    tests memory-tests 70 -s -m gpu tests/test_memory.py
    # Recompute none / selective / full on the same shape: activations and step time.
    # Compiles: 8 specializations, the 3 attention kernels autotuned over 4 configurations:
    # 17: 20 + 17 x 2 + 30 = 84 -> 90 s.
    bench recompute 90 recompute --config llama3-8b --set n_layers=2 --seq-len "$(small 4096 64)" \
        $(small "" "--config test --reps 1")
    ;;
mfu)
    # One GPU's throughput: bench.py mfu (a 1.5B LLaMA, LLaMA 3.2 1B's shape, bf16, batch 2 x
    # seq 4096), eager and compiled (torch.compile per layer: about 40 s of Inductor each),
    # torch and Triton kernels: tokens/s and MFU of the datasheet peak, compile time apart.
    # Compiles: 8 Triton specializations x up to 4 configurations = 20 (3 of them tuned) -> 20 x 2
    # + 2 x 40 s of Inductor + 4 runs x 12 steps x 1 s + 20 = 188 -> 190 s; then seq 2048 with
    # fewer steps: 100 s.
    bench mfu-4096 190 mfu --seq-len "$(small 4096 32)" $(small "" "--steps 1 --warmup 1")
    bench mfu-2048 100 mfu --seq-len "$(small 2048 32)" --batch-size 4 --steps $(small 5 1) $(small "" "--warmup 1")
    ;;
esac

echo "== summary ($mode)" | tee -a "$summary"
printf '%s\n' "${lines[@]}" | tee -a "$summary"
