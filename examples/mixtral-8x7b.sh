#!/usr/bin/env bash
# Mixtral 8x7B, pre-training, on 4 nodes of 8 H100 80GB (32 GPUs): expert parallelism 8 (one
# expert per GPU) x tensor parallelism 2 (dense layers), data parallelism 16, bf16, 4k-token
# sequences, 512k tokens a step, dropless routing with the load-balancing loss.
#   DATA=/data/corpus.jsonl TOKENIZER=hf:/models/Mixtral-8x7B-v0.1 bash examples/mixtral-8x7b.sh
# 50,000 steps; a checkpoint every 500.
# Planned per GPU (train.py --plan): 58.37 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=4
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/Mixtral-8x7B-v0.1}
OUT=${OUT:-runs/mixtral-8x7b}
TRAIN=(--model mixtral --config mixtral-8x7b --ep 8 --tp 2 --precision bf16 --seq-len 4096
       --global-batch-size 128 --micro-batch-size 1 --lr 2e-4 --warmup-steps 1000 --steps 50000
       --weight-decay 0.1 --save-every 500)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
