#!/usr/bin/env bash
# Llama 3 8B, pre-training, on one node of 8 H100 80GB: tensor parallelism 2 (with sequence
# parallelism) x data parallelism 4 (ZeRO-1), bf16, 8k-token sequences of packed documents
# that attend only within themselves, 1M tokens a step.
#   DATA=/data/corpus.jsonl TOKENIZER=hf:/models/Meta-Llama-3-8B bash examples/llama3-8b.sh
# Data: a JSON Lines corpus (text under "text"), tokenized once into Megatron's .bin/.idx.
# 100,000 steps (~100B tokens); a checkpoint every 1,000; requeued at SLURM's time limit.
# Planned per GPU (train.py --plan): 52.00 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=1
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/Meta-Llama-3-8B}
OUT=${OUT:-runs/llama3-8b}
TRAIN=(--model llama --config llama3-8b --tp 2 --precision bf16 --seq-len 8192 --global-batch-size 128
       --micro-batch-size 1 --lr 3e-4 --warmup-steps 2000 --steps 100000 --weight-decay 0.1 --save-every 1000
       --reset-attention-mask --reset-position-ids)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
