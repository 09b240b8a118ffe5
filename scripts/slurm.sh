#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, torchrun starts one process per GPU.
#
#   sbatch --nodes=2 scripts/slurm.sh --model llama --config llama3-8b --data /data/prepared
#
# Everything after the script name is passed to train.py.
#SBATCH --job-name=train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail

# The first node of the allocation hosts the rendezvous (c10d store).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}

srun torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$gpus_per_node" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_node:29500" \
    train.py "$@"
