#!/usr/bin/env bash
# Qwen3-30B-A3B (128 experts, 8 per token, 3.3B active), pre-training, on 2 nodes of 8 H100
# 80GB: expert parallelism 8 x tensor parallelism 2 (the dense layers; 4 KV heads, 2 a rank)
# x data parallelism 8, bf16, 4k-token sequences, 512k tokens a
# step; DeepSeek-V3's routing: sigmoid scores and the auxiliary-loss-free expert bias.
#   DATA=/data/corpus.jsonl TOKENIZER=hf:/models/Qwen3-30B-A3B bash examples/qwen3-30b-a3b.sh
# 50,000 steps; a checkpoint every 500.
# Planned per GPU (train.py --plan): 63.56 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=2
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/Qwen3-30B-A3B}
OUT=${OUT:-runs/qwen3-30b-a3b}
TRAIN=(--model mixtral --config qwen3-30b-a3b --ep 8 --tp 2 --precision bf16 --seq-len 4096 --global-batch-size 128
       --micro-batch-size 1 --lr 3e-4 --warmup-steps 1000 --steps 50000 --weight-decay 0.1 --save-every 500
       --moe-router-score-function sigmoid --moe-router-bias-update-rate 0.001 --moe-aux-loss-coef 0.0001)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
