#!/usr/bin/env bash
# Mamba-2 2.7B, pre-training, on one node of 8 H100 80GB: data parallelism 8 (ZeRO-1), bf16,
# 4k-token sequences, 512k tokens a step (the GPT-NeoX tokenizer, as the published models).
#   DATA=/data/pile.jsonl TOKENIZER=hf:/models/gpt-neox-20b bash examples/mamba2-2.7b.sh
# 100,000 steps; a checkpoint every 1,000.
# Planned per GPU (train.py --plan): 61.79 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=1
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/gpt-neox-20b}
OUT=${OUT:-runs/mamba2-2.7b}
TRAIN=(--model mamba --config mamba2-2.7b --precision bf16 --seq-len 4096 --global-batch-size 128
       --micro-batch-size 1 --lr 1.6e-4 --warmup-steps 2000 --steps 100000 --weight-decay 0.1 --save-every 1000)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
