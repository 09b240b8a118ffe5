#!/usr/bin/env bash
# Llama 3 70B, pre-training, on 8 nodes of 8 H100 80GB (64 GPUs): tensor parallelism 8 within
# a node x pipeline parallelism 4 across nodes x data parallelism 2, bf16, 8k-token
# sequences, 1M tokens a step (Megatron's layout for this size).
#   DATA=/data/corpus.jsonl TOKENIZER=hf:/models/Meta-Llama-3-70B bash examples/llama3-70b.sh
# 100,000 steps (~100B tokens); a checkpoint every 500.
# Planned per GPU (train.py --plan): 46.37 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=8
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/Meta-Llama-3-70B}
OUT=${OUT:-runs/llama3-70b}
TRAIN=(--model llama --config llama3-70b --tp 8 --pp 4 --precision bf16 --seq-len 8192 --global-batch-size 128
       --micro-batch-size 1 --lr 1.5e-4 --warmup-steps 2000 --steps 100000 --weight-decay 0.1 --save-every 500)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
