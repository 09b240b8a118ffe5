#!/usr/bin/env bash
# BERT-large (Megatron's pre-LN variant is --set pre_ln=true), pre-training, then a
# classification fine-tune, on one node of 8 H100 80GB: data parallelism 8, bf16, 512-token
# sentence pairs, 256 pairs a step, 15% of the tokens masked (whole words) plus sentence order.
#   DATA=/data/wiki.jsonl TOKENIZER=hf:/models/bert-large-uncased TASK=/data/sst2 bash examples/bert-large.sh
# TASK: a folder with one sub-folder of text per class (python data.py inspect shows a source).
# 1,000,000 steps (BERT's schedule); a checkpoint every 5,000; then 3,000 fine-tuning steps.
# Planned per GPU (train.py --plan): 14.87 GiB of 80 GB.
set -euo pipefail
cd "$(dirname "$0")/.."  # (the repository's root)
NODES=1
DATA=${DATA:?a JSON Lines corpus, e.g. DATA=/data/corpus.jsonl}
TOKENIZER=${TOKENIZER:?the tokenizer of the model, e.g. TOKENIZER=hf:/models/bert-large-uncased}
TASK=${TASK:?a classification task folder, e.g. TASK=/data/sst2}
OUT=${OUT:-runs/bert-large}
TRAIN=(--model bert --config bert-large --precision bf16 --seq-len 512 --global-batch-size 256
       --micro-batch-size 32 --whole-word-masking --lr 1e-4 --warmup-steps 10000 --steps 1000000
       --weight-decay 0.01 --save-every 5000)
FINETUNE_TRAIN=(--precision bf16 --seq-len 128 --global-batch-size 32 --micro-batch-size 4 --lr 2e-5
                --warmup-steps 100 --steps 3000 --save-every 1000)
[ -f "$OUT/data.idx" ] || python data.py prepare "$DATA" "$OUT/data" --format megatron --tokenizer "$TOKENIZER"
CKPT="$OUT/ckpt" sbatch --nodes="$NODES" --wait scripts/slurm.sh "${TRAIN[@]}" --data "$OUT/data" \
    --tokenizer "$TOKENIZER" --metrics "$OUT/metrics.jsonl"
torchrun --nproc-per-node 8 train.py --load "$OUT/ckpt" --task "$TASK" "${FINETUNE_TRAIN[@]}" \
    --save "$OUT/classifier" --metrics "$OUT/classifier.jsonl"
