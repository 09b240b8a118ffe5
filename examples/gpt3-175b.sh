#!/usr/bin/env bash
# GPT-3 175B, pre-training, on 8 nodes of 8 H100 80GB (64 GPUs): tensor parallelism 8 x
# pipeline parallelism 8 (Korthikanti et al.'s layout, sequence parallelism on), bf16, 2k-token
# sequences, the paper's batch of 256 sequences in micro-batches of one.
#   DATA=/data/pile.jsonl TOKENIZER=gpt2 bash examples/gpt3-175b.sh
# (GPT-2's encoding: tiktoken downloads it once, or finds it in TIKTOKEN_CACHE_DIR.)
# 300B tokens would be 572,000 steps; this runs 10,000 and saves every 250.
# Planned per GPU (train.py --plan): 56.31 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=8
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=gpt2}
OUT=${OUT:-runs/gpt3-175b}
TRAIN=(--model gpt --config gpt3-175b --tp 8 --pp 8 --precision bf16 --seq-len 2048 --global-batch-size 256
       --micro-batch-size 1 --lr 6e-5 --warmup-steps 375 --steps 10000 --weight-decay 0.1 --save-every 250)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" --tokenizer "$TOKENIZER" \
    --metrics "$OUT/metrics.jsonl"
