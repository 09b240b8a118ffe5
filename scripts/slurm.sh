#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, torchrun starts one process per GPU.
#
#   CKPT=/shared/runs/llama sbatch --nodes=2 --time=24:00:00 scripts/slurm.sh \
#       --model llama --config llama3-8b --data /data/prepared --steps 100000 --save-every 1000
#
# Everything after the script name is passed to train.py, with `--save $CKPT --load $CKPT`:
# the same command starts the run and, once $CKPT holds a checkpoint, resumes it.
#
# Time limits and preemption: five minutes before the limit SLURM sends SIGUSR1 to this
# script (--signal below), which passes it on to the training processes. They finish the
# step they are in, save a checkpoint and exit 0; the script then requeues the job, and the
# requeued job resumes from that checkpoint. A job preempted with SIGTERM (scancel, a
# preempting partition) also saves before it exits, if it gets the time to: train.py stops
# after its current step.
#SBATCH --job-name=train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
: "${CKPT:?set CKPT to the checkpoint directory, e.g. CKPT=/shared/runs/llama sbatch scripts/slurm.sh ...}"

# The first node of the allocation hosts the rendezvous (c10d store).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}

# SIGUSR1 reaches this script only (B:); send it to every process of the training step.
# torchrun itself ignores it (the `trap '' USR1` below: an ignored signal stays ignored
# across exec, and torchrun would otherwise die of it); train.py handles it.
requeue=0
on_time_limit() {
    requeue=1
    scancel --signal=USR1 "$SLURM_JOB_ID.0"
}
trap on_time_limit USR1

set +e
srun bash -c 'trap "" USR1; exec "$@"' _ \
    torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$gpus_per_node" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_node:29500" \
    train.py "$@" --save "$CKPT" --load "$CKPT" &
training=$!
wait "$training"
status=$?
while kill -0 "$training" 2>/dev/null; do  # the trap interrupted `wait`: training is saving
    wait "$training"
    status=$?
done
set -e

if [ "$requeue" = 1 ] && [ "$status" = 0 ]; then
    echo "time limit near: checkpoint saved in $CKPT; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
