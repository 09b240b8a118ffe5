#!/usr/bin/env bash
# A Nemotron-H-style 8B hybrid (Mamba-2 layers, a few attention layers, MLPs), pre-training,
# on one node of 8 H100 80GB: tensor parallelism 4 x data parallelism 2, bf16, 8k-token
# sequences with selective recomputation, 1M tokens a step.
#   DATA=/data/corpus.jsonl TOKENIZER=hf:/models/Nemotron-H-8B-Base-8K bash examples/nemotron-h-8b.sh
# 100,000 steps; a checkpoint every 1,000.
# Planned per GPU (train.py --plan): 42.01 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=1
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/Nemotron-H-8B-Base-8K}
OUT=${OUT:-runs/nemotron-h-8b}
TRAIN=(--model mamba --config nemotron-h-8b --tp 4 --precision bf16 --seq-len 8192 --global-batch-size 128
       --micro-batch-size 1 --recompute selective --lr 3e-4 --warmup-steps 2000 --steps 100000 --weight-decay 0.1
       --save-every 1000)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
