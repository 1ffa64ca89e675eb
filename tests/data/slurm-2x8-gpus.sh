#!/bin/bash
# bd3 training run `small`, written by `bd3 launch slurm`.
# After a failure, launch again with `--resume auto` added to the train command.
#SBATCH --job-name=bd3-small
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --partition=gpu
#SBATCH --account=bd3
#SBATCH --time=2-00:00:00
#SBATCH --chdir=/path/to/bd3
#SBATCH --output=/shared/runs/small/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -u
restarts=${SLURM_RESTART_COUNT:-0}
echo "bd3-slurm: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, SLURM_RESTART_COUNT=$restarts, $(date -u +%FT%TZ)"

train=(/path/to/bd3/target/debug/bd3 train --config configs/small.toml --set train.grad_accum=2 --set 'run.dir="/shared/runs"' --set 'data.dataset="s3://corpora/owt-1024"' --set 'checkpoint.url="s3://checkpoints/small"')
if [ "$restarts" -gt 0 ]; then
    # A requeued job goes on from the last committed checkpoint.
    train+=(--resume auto)
fi

# Shared memory between a node's ranks without the single-copy mechanism that containers'
# ptrace restrictions refuse (as `bd3 launch local` does).
export OMPI_MCA_btl_vader_single_copy_mechanism=none

# USR1 (--signal, or scancel --batch --signal=USR1): every rank saves a checkpoint after the
# step it is in and exits 0; then the job requeues itself (a time limit never requeues it).
usr1_received=0
forward_stop() {
    usr1_received=$((usr1_received + 1))
    echo "bd3-slurm: USR1: the ranks checkpoint and stop, then the job requeues"
    kill -USR1 "$srun_pid" 2>/dev/null # srun passes it on to every task
}
trap forward_stop USR1

# srun in the background: bash runs a trap only between commands, and `wait` is one that a
# trapped signal interrupts.
# Every task sees the node's GPUs; rank SLURM_LOCALID of a node trains on cuda:SLURM_LOCALID.
srun --mpi=pmix --label --kill-on-bad-exit=1 --cpus-per-task=12 "${train[@]}" &
srun_pid=$!
while :; do
    seen=$usr1_received
    wait "$srun_pid"
    status=$?
    # The trap ended `wait` early (128 + USR1) while srun goes on stopping the ranks: wait again
    # (which returns srun's status at once if it has ended meanwhile).
    [ "$usr1_received" -ne "$seen" ] && [ "$status" -eq 138 ] || break
done
echo "bd3-slurm: the ranks exited with status $status"
if [ "$usr1_received" -gt 0 ]; then
    echo "bd3-slurm: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
