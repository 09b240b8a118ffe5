#!/usr/bin/env bash
# T5-base, span-corruption pre-training, on one node of 8 H100 80GB: data parallelism 8, bf16,
# 512-token inputs, 128k input tokens a step (T5's tokenizer: its pad, 0, starts the decoder).
#   DATA=/data/c4.jsonl TOKENIZER=hf:/models/t5-base bash examples/t5-base.sh
# 100,000 steps; a checkpoint every 1,000.
# Planned per GPU (train.py --plan): 6.96 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=1
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/t5-base}
OUT=${OUT:-runs/t5-base}
TRAIN=(--model t5 --config t5-base --precision bf16 --seq-len 512 --global-batch-size 256 --micro-batch-size 32
       --lr 1e-3 --warmup-steps 1000 --steps 100000 --save-every 1000)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
