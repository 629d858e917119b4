#!/bin/bash
# distgan on one or many Slurm nodes: one `accelerate launch` per node, checkpoint and requeue on
# the time-limit warning. Submit from the repository root (or with distgan installed); the log
# folder must exist (Slurm does not create it: the job fails at launch without it).
#
#   mkdir -p logs
#   sbatch slurm/train.sh                                        # fashion_mnist, 1 node, CPU or its GPUs
#   CONFIG=cifar10.yaml sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 64 slurm/train.sh train.steps=100000
#
# Environment knobs (all optional):
#   CONFIG           config name or YAML path                  (fashion_mnist)
#   RUN_DIR          run folder shared by all nodes             (runs/<job name>-<job id>: the same after requeue)
#   GPUS_PER_NODE    GPUs to use per node                       (from the allocation, else nvidia-smi, else 0)
#   PROCS_PER_NODE   training processes per node                (GPUS_PER_NODE, or 1 on CPU)
#   THREADS_PER_PROC CPU threads per process                    (CPUs of the task / PROCS_PER_NODE)
#   MASTER_ADDR      address of the main node                   (NodeAddr of the first node)
#   MASTER_PORT      rendezvous port                            (20000 + job id % 20000)
#   MIXED_PRECISION  what the launcher asks for: no, fp16, bf16 (no: the config's train.mixed_precision decides)
#
#SBATCH --job-name=distgan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# No GPU request by default, so the same script runs on CPU nodes: add --gpus-per-node=N to sbatch.

set -euo pipefail

# --- Network knobs: uncomment when needed --------------------------------------------------------
# export NCCL_DEBUG=INFO                        # NCCL hangs or slow init: log rings, transports, errors
# export NCCL_SOCKET_IFNAME=ib0                 # several interfaces and NCCL picks one other nodes cannot reach
# export GLOO_SOCKET_IFNAME=eth0                # the same for gloo (CPU runs, and the c10d store's helpers)
# export NCCL_IB_DISABLE=1                      # no working InfiniBand/RoCE: force TCP sockets
# export NCCL_P2P_DISABLE=1                     # GPUs hang on peer-to-peer copies (some PCIe/VM setups)
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a dead rank aborts the others instead of hanging (default on in recent torch)
# export TORCH_NCCL_BLOCKING_WAIT=1             # collectives raise after the process group timeout (debugging hangs)
# export TORCH_DISTRIBUTED_DEBUG=DETAIL         # DDP: report unused parameters and mismatched collectives

log() { echo "train.sh [$(date +%T)] $*"; }
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "train.sh: SLURM_JOB_ID is not set: submit it with sbatch (see the top of this file)" >&2
    exit 2
fi

CONFIG=${CONFIG:-fashion_mnist}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
case $RUN_DIR in /*) ;; *) RUN_DIR="$SLURM_SUBMIT_DIR/$RUN_DIR" ;; esac
STOP_FILE="$RUN_DIR/STOP"
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# GPUs per node: what Slurm allocated, else what this node shows, else none (CPU).
if [[ -z ${GPUS_PER_NODE:-} ]]; then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        GPUS_PER_NODE=${SLURM_GPUS_PER_NODE##*:}        # "a100:8" -> 8
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    else
        GPUS_PER_NODE=0
    fi
fi
if (( GPUS_PER_NODE > 0 )); then
    PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
else
    PROCS_PER_NODE=${PROCS_PER_NODE:-1}
    export ACCELERATE_USE_CPU=1                        # with --multi_gpu: gloo DDP over CPU processes
fi
NUM_PROCESSES=$(( NNODES * PROCS_PER_NODE ))
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
THREADS_PER_PROC=${THREADS_PER_PROC:-$(( CPUS_PER_TASK / PROCS_PER_NODE > 0 ? CPUS_PER_TASK / PROCS_PER_NODE : 1 ))}

# Main node: the first of the allocation, by the address Slurm itself reaches it at.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_NODE=${NODES[0]}
if [[ -z ${MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$(scontrol show node "$MAIN_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    MASTER_ADDR=${MASTER_ADDR:-$MAIN_NODE}
    if [[ $MASTER_ADDR == localhost ]]; then MASTER_ADDR=127.0.0.1; fi
fi
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

LAUNCH_ARGS=(--num_machines "$NNODES" --num_processes "$NUM_PROCESSES"
             --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
             --num_cpu_threads_per_process "$THREADS_PER_PROC"
             --mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no)
if (( NUM_PROCESSES > 1 )); then
    LAUNCH_ARGS+=(--multi_gpu)                         # DDP; on CPU too, given ACCELERATE_USE_CPU=1
elif (( GPUS_PER_NODE == 0 )); then
    LAUNCH_ARGS+=(--cpu)
fi
TRAIN_ARGS=(--config "$CONFIG" --resume auto "run.dir=$RUN_DIR" "train.cpu_threads=$THREADS_PER_PROC" "$@")

mkdir -p "$RUN_DIR"
rm -f "$STOP_FILE"                                     # a stale STOP must not stop a fresh start

# On USR1 (the time-limit warning, --signal=B:USR1@T) or TERM: ask training to checkpoint and stop.
# Only the batch shell gets USR1: sent to the job step it would kill the accelerate launcher.
# Set before the first log line, so a signal is never lost to bash's default action (exit).
STOP_SIGNAL=""
# shellcheck disable=SC2317  # invoked by the traps below
on_signal() {
    log "got SIG$1: asking training to checkpoint and stop ($STOP_FILE)"
    STOP_SIGNAL=$1
    touch "$STOP_FILE"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NNODES node(s) x" \
    "$PROCS_PER_NODE process(es), $GPUS_PER_NODE GPU(s)/node, main $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# How this script tells "finished" from "stopped on request" (both exit 0): a finished run writes
# (replaces) its exported generator, a stopped one does not. Inode and mtime: no clock comparison.
EXPORT="$RUN_DIR/generator_ema.safetensors"
export_stamp() { stat -c '%i %y' "$EXPORT" 2>/dev/null || echo none; }
last_checkpoint() {
    local found=("$RUN_DIR"/checkpoints/step-*/state.json)      # zero-padded steps: sorted by the glob
    if [[ -e ${found[-1]} ]]; then echo "${found[-1]%/state.json}"; else echo "none"; fi
}
EXPORT_BEFORE=$(export_stamp)

# One launcher per node; --machine_rank must expand per task, hence the single quotes.
# --kill-on-bad-exit: a task that fails (a crashed or killed rank) ends the whole step at once.
# shellcheck disable=SC2016
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-launch \
    "${LAUNCH_ARGS[@]}" -m distgan.train "${TRAIN_ARGS[@]}" &
SRUN_PID=$!

# A trapped signal ends `wait` early: wait again until srun has really exited. Once a stop is asked
# for, keep STOP in place until then: training deletes a STOP file it finds while it starts (to it,
# one left from an earlier run), so a signal in the first seconds would otherwise be lost.
while kill -0 "$SRUN_PID" 2>/dev/null; do
    if [[ -n $STOP_SIGNAL ]]; then
        [[ -e $STOP_FILE ]] || touch "$STOP_FILE"
        sleep 1
    else
        wait "$SRUN_PID" || true
    fi
done
STATUS=0
wait "$SRUN_PID" || STATUS=$?
rm -f "$STOP_FILE"
STOPPED_EARLY=0
if [[ $(export_stamp) == "$EXPORT_BEFORE" ]]; then STOPPED_EARLY=1; fi
CHECKPOINT=$(last_checkpoint)
RESUBMIT="to continue: RUN_DIR=$RUN_DIR CONFIG=$CONFIG sbatch ... slurm/train.sh (same overrides)"

if (( STATUS == 0 && STOPPED_EARLY )) && [[ $STOP_SIGNAL == USR1 ]]; then
    log "training checkpointed and stopped ($CHECKPOINT): requeueing job $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        log "scontrol requeue failed (is requeueing allowed on this cluster? JobRequeue, --requeue); $RESUBMIT"
        exit 1
    fi
    exit 0
elif (( STATUS == 0 && STOPPED_EARLY )); then
    log "training stopped on request${STOP_SIGNAL:+ (SIG$STOP_SIGNAL)} at checkpoint $CHECKPOINT; not requeued; $RESUBMIT"
elif (( STATUS == 0 )); then
    log "training finished; run dir $RUN_DIR"
elif [[ -n $STOP_SIGNAL ]]; then
    # scancel and the time limit send TERM to the job step too: the launcher passes it on to training,
    # which checkpoints, and then exits non-zero itself. The job ends CANCELLED or TIMEOUT.
    log "stopped by SIG$STOP_SIGNAL (scancel, time limit or preemption): launcher status $STATUS; last checkpoint" \
        "$CHECKPOINT; not requeued; $RESUBMIT"
else
    log "training FAILED (srun exit status $STATUS): a training process exited with an error or was killed" \
        "(the 'srun: error:' lines above name its node and task; --kill-on-bad-exit ended the others)." \
        "Not requeued. Last checkpoint: $CHECKPOINT; $RESUBMIT"
fi
exit "$STATUS"
