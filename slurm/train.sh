#!/bin/bash
# distgan on one or many Slurm nodes: one `accelerate launch` per node, checkpoint and requeue on
# the time-limit warning. Submit from the repository root (or with distgan installed); logs/ is part
# of the repository (Slurm does not create the --output folder: a job fails at launch without it).
#
#   sbatch slurm/train.sh                                        # fashion_mnist, 1 node, CPU or its GPUs
#   CONFIG=cifar10_8gpu.yaml sbatch --nodes 4 --gpus-per-node 8 --cpus-per-task 72 slurm/train.sh train.steps=10000
#
# Arguments after the script are config overrides (section.key=value). CPUs: a node's training
# processes each need one, plus one per data worker (data.num_workers): 8 GPUs x (1 + 8 workers in
# cifar10.yaml) = --cpus-per-task 72; train.sh refuses fewer CPUs than processes and warns below that sum.
# (The default, 2, is fashion_mnist's 1 process + 1 worker.)
#
# Environment knobs (all optional; numbers are checked: anything else is refused):
#   CONFIG           config name or YAML path                  (fashion_mnist)
#   RUN_DIR          run folder shared by all nodes             (runs/<job name>-<job id>: the same after requeue;
#                                                                or a run.dir=... override, which must agree)
#   GPUS_PER_NODE    GPUs to use per node                       (the job's: SLURM_GPUS_ON_NODE, else the devices in
#                                                                CUDA_VISIBLE_DEVICES, else 0; never nvidia-smi -L,
#                                                                which lists GPUs the job was not given)
#   PROCS_PER_NODE   training processes per node                (GPUS_PER_NODE, or 1 on CPU)
#   THREADS_PER_PROC CPU threads per process                    (CPUs of the task / PROCS_PER_NODE)
#   MASTER_ADDR      address of the main node                   (NodeAddr of the first node)
#   MASTER_PORT      rendezvous port, 1024-65535                (20000 + job id % 10000: below Linux's ephemeral
#                                                                range, 32768-60999, where the OS picks client ports)
#   MIXED_PRECISION  what the launcher asks for: no, fp16, bf16 (bf16 when the config says auto and every node's
#                                                                GPUs have bf16 units, compute capability 8.0+;
#                                                                else no: the config's train.mixed_precision decides)
# On GPU nodes each process is pinned to the cores near its GPU (accelerate --enable_cpu_affinity).
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
# A user error: one line that names the value and the fix, exit status 2.
die() { echo "train.sh: $*" >&2; exit 2; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    die "SLURM_JOB_ID is not set: submit it with sbatch (see the top of this file)"
fi

# --- Check every value from the environment before using it. Bash evaluates a variable inside (( ))
# as an expression, so GPUS_PER_NODE='a[$(cmd)]' would run cmd: only plain decimal numbers get there.
check_number() {  # NAME MIN MAX: $NAME holds a decimal integer in [MIN, MAX] (compared as base 10)
    local name=$1 value=${!1}
    if ! [[ $value =~ ^[0-9]{1,6}$ ]] || (( 10#$value < $2 || 10#$value > $3 )); then
        die "$name='$value' is not a whole number from $2 to $3: set $name to one (or unset it for the default)"
    fi
    printf -v "$name" '%d' "$(( 10#$value ))"   # "08" -> 8: bash reads a leading 0 as octal
}
for name in GPUS_PER_NODE PROCS_PER_NODE THREADS_PER_PROC MASTER_PORT; do
    [[ -n ${!name:-} ]] || continue
    case $name in
        GPUS_PER_NODE) check_number "$name" 0 1024 ;;
        MASTER_PORT) check_number "$name" 1024 65535 ;;
        *) check_number "$name" 1 4096 ;;
    esac
done
for name in SLURM_JOB_ID SLURM_JOB_NUM_NODES SLURM_CPUS_PER_TASK SLURM_RESTART_COUNT; do   # Slurm's own
    [[ -z ${!name:-} ]] || check_number "$name" 0 999999
done
case ${MIXED_PRECISION:-no} in no|fp16|bf16) ;; *) die "MIXED_PRECISION='$MIXED_PRECISION' is not one of no, fp16, bf16: set one of them" ;; esac
if [[ -n ${MASTER_ADDR:-} && ! $MASTER_ADDR =~ ^[A-Za-z0-9.:_-]+$ ]]; then
    die "MASTER_ADDR='$MASTER_ADDR' is not a host name or IP address: set it to the main node's address"
fi
# The job name becomes a folder (runs/<name>-<id>) and a log file: no '/', no '..', nothing a shell reads.
JOB_NAME=${SLURM_JOB_NAME:-distgan}
if ! [[ $JOB_NAME =~ ^[A-Za-z0-9_-][A-Za-z0-9._-]*$ ]]; then
    die "job name '$JOB_NAME' may hold only letters, digits, '.', '_' and '-' (not first '.'): submit with --job-name=distgan or another such name"
fi

CONFIG=${CONFIG:-fashion_mnist}
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}

# On USR1 (the time-limit warning, --signal=B:USR1@T) or TERM: ask training to checkpoint and stop.
# Only the batch shell gets USR1: sent to the job step it would kill the accelerate launcher.
# Set before anything slow, so a signal is never lost to bash's default action (exit); the STOP
# file is (re)written once the run folder is known, and every second until training has exited.
STOP_SIGNAL=""
STOP_FILE=""
NODE_DOWN=""
# shellcheck disable=SC2317  # invoked by the traps below
on_signal() {
    log "got SIG$1: asking training to checkpoint and stop (${STOP_FILE:-RUN_DIR/STOP})"
    STOP_SIGNAL=$1
    if [[ -n $STOP_FILE ]]; then touch "$STOP_FILE"; fi
    # A node failure ends the job with TERM, and KillWait later SIGKILL, often before srun returns:
    # say it now, while this shell still runs.
    if [[ $1 == TERM ]] && declare -F say_node_failed >/dev/null; then
        NODE_DOWN=$(down_nodes) || NODE_DOWN=""
        if [[ -n $NODE_DOWN ]]; then say_node_failed "$NODE_DOWN" "srun still running"; fi
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# --- The run folder. train.sh writes STOP there and looks for the export there, so it must be the
# folder training uses: training takes the last run.dir=... it is given, and train.sh gives its own
# last. An override run.dir=... among the arguments therefore becomes RUN_DIR (refused when RUN_DIR
# names another folder). Loading the config here (0.2 s, no torch) also makes a bad CONFIG or
# override one line before anything is launched. Prints the absolute run folder and data.num_workers.
read -r -d '' RESOLVE_PY <<'PY' || true
import sys
from pathlib import Path

config, submit_dir, default, from_env, *overrides = sys.argv[1:]
try:
    from distgan.config import load_config
except ImportError as err:
    sys.exit(print(f"train.sh: cannot import distgan ({err}): submit from the repository root, or install distgan",
                   file=sys.stderr) or 2)
absolute = lambda path: str(Path(submit_dir, path))  # an absolute path stays as it is
try:
    given = load_config(config, [f"run.dir={default}", *overrides]).run.dir
    run_dir = absolute(from_env or default)
    if given != default:  # an override run.dir=... among the arguments
        if from_env and absolute(given) != run_dir:
            sys.exit(print(f"train.sh: RUN_DIR={from_env} and the override run.dir={given} name different run folders: "
                           "give only one of them", file=sys.stderr) or 2)
        run_dir = absolute(given)
    cfg = load_config(config, [*overrides, f"run.dir={run_dir}"])
    if cfg.run.dir != run_dir:
        sys.exit(print(f"train.sh: run folder {run_dir!r} reads back as {cfg.run.dir!r} (override values are YAML): "
                       "choose a plain path for RUN_DIR", file=sys.stderr) or 2)
except Exception as err:  # ConfigError, or YAML in an override: the message names the key and the fix
    sys.exit(print(f"train.sh: CONFIG={config} {' '.join(overrides)}: {err}".replace("\n", " "), file=sys.stderr) or 2)
print(run_dir)
print(cfg.data.num_workers)
print(cfg.train.mixed_precision)
PY
RESOLVED=$(python3 -c "$RESOLVE_PY" "$CONFIG" "$SUBMIT_DIR" "runs/$JOB_NAME-$SLURM_JOB_ID" "${RUN_DIR:-}" "$@") || exit $?
{ read -r RUN_DIR; read -r NUM_WORKERS; read -r CONFIG_PRECISION; } <<< "$RESOLVED"
STOP_FILE="$RUN_DIR/STOP"
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# --- What each node has: one task per node reports its GPUs and CPUs. The launcher starts the same
# number of processes on every node (accelerate: num_processes // num_machines), so an allocation
# whose nodes differ is refused rather than half used or oversubscribed.
# shellcheck disable=SC2016  # expanded by each task, on its node
# GPUs: the job's own (SLURM_GPUS_ON_NODE; else the devices Slurm's gres plugin or the user left visible), not
# nvidia-smi -L, which lists every GPU of the node. bf16: 1 when every GPU has compute capability 8.0 or more.
PROBE=$(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 bash -c '
    gpus=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $gpus && -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
        IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
        gpus=${#visible[@]}
    fi
    bf16=0
    if [[ ${gpus:-0} != 0 ]] && command -v nvidia-smi >/dev/null 2>&1; then
        caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true)
        if [[ -n $caps ]] && ! grep -qv "^\([89]\|[1-9][0-9]\)\." <<< "$caps"; then bf16=1; fi
    fi
    echo "$SLURMD_NODENAME ${gpus:-0} ${SLURM_CPUS_ON_NODE:-1} $bf16"')
NODE_GPUS=() NODE_CPUS=() SUMMARY="" ALL_BF16=1
while read -r node gpus cpus bf16; do
    [[ $gpus =~ ^[0-9]+$ && $cpus =~ ^[0-9]+$ ]] || { log "unexpected node report '$node $gpus $cpus'"; exit 1; }
    NODE_GPUS+=("$gpus") NODE_CPUS+=("$cpus") SUMMARY+="${SUMMARY:+, }$node: $gpus GPU(s) $cpus CPU(s)"
    [[ ${bf16:-0} == 1 ]] || ALL_BF16=0
done <<< "$PROBE"
MIN_GPUS=$(printf '%s\n' "${NODE_GPUS[@]}" | sort -n | head -1)
MAX_GPUS=$(printf '%s\n' "${NODE_GPUS[@]}" | sort -n | tail -1)
MIN_CPUS=$(printf '%s\n' "${NODE_CPUS[@]}" | sort -n | head -1)
if [[ -z ${GPUS_PER_NODE:-} ]]; then
    if (( MIN_GPUS != MAX_GPUS )); then
        die "the nodes have different GPU counts ($SUMMARY) and every node starts as many processes:" \
            "submit with --gpus-per-node=N, or set GPUS_PER_NODE=$MIN_GPUS"
    fi
    GPUS_PER_NODE=$MIN_GPUS
elif (( GPUS_PER_NODE > MIN_GPUS )); then
    die "GPUS_PER_NODE=$GPUS_PER_NODE but a node has fewer ($SUMMARY): set GPUS_PER_NODE=$MIN_GPUS or less"
fi
if (( GPUS_PER_NODE > 0 )); then
    PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
else
    PROCS_PER_NODE=${PROCS_PER_NODE:-1}
    export ACCELERATE_USE_CPU=1                        # not needed (distgan asks Accelerate for the CPU itself
                                                       # when CUDA is absent); harmless, left for other scripts
fi
NUM_PROCESSES=$(( NNODES * PROCS_PER_NODE ))
# Precision from the job: bf16 where the config leaves it to the launcher (auto) and every GPU has bf16 units.
if [[ -z ${MIXED_PRECISION:-} ]]; then
    MIXED_PRECISION=no
    if (( GPUS_PER_NODE > 0 && ALL_BF16 )) && [[ $CONFIG_PRECISION == auto ]]; then MIXED_PRECISION=bf16; fi
fi
# CPUs: one per training process, plus one per data worker of each.
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$MIN_CPUS}
CPUS_WANTED=$(( PROCS_PER_NODE * (1 + NUM_WORKERS) ))
if (( CPUS_PER_TASK < PROCS_PER_NODE )); then
    die "$CPUS_PER_TASK CPU(s) per node for $PROCS_PER_NODE training processes: submit with" \
        "--cpus-per-task=$CPUS_WANTED (one CPU per process and per data worker, data.num_workers=$NUM_WORKERS)"
elif (( CPUS_PER_TASK < CPUS_WANTED )); then
    log "warning: $CPUS_PER_TASK CPU(s) per node for $PROCS_PER_NODE process(es) x (1 + $NUM_WORKERS data workers):" \
        "the data workers will share; --cpus-per-task=$CPUS_WANTED gives each its own"
fi
THREADS_PER_PROC=${THREADS_PER_PROC:-$(( CPUS_PER_TASK / PROCS_PER_NODE ))}

# Main node: the first of the allocation, by the address Slurm itself reaches it at.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_NODE=${NODES[0]}
if [[ -z ${MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$(scontrol show node "$MAIN_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    MASTER_ADDR=${MASTER_ADDR:-$MAIN_NODE}
    if [[ $MASTER_ADDR == localhost ]]; then MASTER_ADDR=127.0.0.1; fi
fi
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}

# The launcher's config, passed explicitly: without --config_file, accelerate reads the user's
# default one (~/.cache/huggingface/accelerate/default_config.yaml), whose gpu_ids, debug and the
# like would leak into the job. Every value that matters is also a flag below. Next to the job log
# (the submit folder is shared by every node: they all run distgan from it).
mkdir -p "$SUBMIT_DIR/logs"
LAUNCH_CONFIG="$SUBMIT_DIR/logs/$JOB_NAME-$SLURM_JOB_ID.accelerate.yaml"
cat > "$LAUNCH_CONFIG" <<YAML
# Written by slurm/train.sh for job $SLURM_JOB_ID; the command-line flags override these.
compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
gpu_ids: all
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
debug: false
rdzv_backend: static
same_network: false
enable_cpu_affinity: false
main_training_function: main
YAML

LAUNCH_ARGS=(--config_file "$LAUNCH_CONFIG" --num_machines "$NNODES" --num_processes "$NUM_PROCESSES"
             --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
             --num_cpu_threads_per_process "$THREADS_PER_PROC"
             --mixed_precision "$MIXED_PRECISION" --dynamo_backend no)
if (( NNODES > 1 )); then
    # Accelerate's multi-node Slurm pattern: c10d rendezvous at MASTER_ADDR:MASTER_PORT (see slurm/README.md).
    LAUNCH_ARGS+=(--rdzv_backend c10d)
fi
if (( GPUS_PER_NODE > 0 )); then
    LAUNCH_ARGS+=(--enable_cpu_affinity)              # each process on the cores of its GPU's NUMA node
fi
if (( NUM_PROCESSES > 1 )); then
    LAUNCH_ARGS+=(--multi_gpu)                         # DDP; on CPU nodes gloo DDP (distgan picks the CPU itself)
elif (( GPUS_PER_NODE == 0 )); then
    LAUNCH_ARGS+=(--cpu)
fi
# train.sh's run.dir goes last: the last one wins, so training uses the folder train.sh watches.
TRAIN_ARGS=(--config "$CONFIG" --resume auto "train.cpu_threads=$THREADS_PER_PROC" "$@" "run.dir=$RUN_DIR")

mkdir -p "$RUN_DIR"
rm -f "$STOP_FILE"                                     # a stale STOP must not stop a fresh start
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NNODES node(s) x" \
    "$PROCS_PER_NODE process(es), $GPUS_PER_NODE GPU(s)/node ($SUMMARY), main $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# How this script tells "finished" from "stopped on request" (both exit 0): a finished run writes
# (replaces) its exported generator, a stopped one does not. Inode and mtime: no clock comparison.
EXPORT="$RUN_DIR/generator_ema.safetensors"
export_stamp() { stat -c '%i %y' "$EXPORT" 2>/dev/null || echo none; }
last_checkpoint() {
    local found=("$RUN_DIR"/checkpoints/step-*/state.json)      # zero-padded steps: sorted by the glob
    if [[ -e ${found[-1]} ]]; then echo "${found[-1]%/state.json}"; else echo "none"; fi
}
EXPORT_BEFORE=$(export_stamp)
# The job's nodes that Slurm has declared dead (down, not responding: sinfo marks them with '*').
down_nodes() {
    sinfo --noheader --Node --nodes="$SLURM_JOB_NODELIST" --format='%N %t' 2>/dev/null |
        awk '$2 ~ /down|fail|\*/ { printf "%s%s: %s", sep, $1, $2; sep = ", " }'
}

NODE_FAILURE_SAID=0
say_node_failed() {  # $1: the down nodes, $2: what srun did
    if (( NODE_FAILURE_SAID )); then return; fi
    NODE_FAILURE_SAID=1
    log "a node of this job failed ($1): $2; Slurm requeues the job (--requeue)," \
        "which resumes from the last checkpoint, $(last_checkpoint)"
}

# Several nodes: the c10d rendezvous store runs here, on the first node, until srun has returned. When the
# first node's launcher hosts it (is_host), it closes it as soon as its own training ends, while the other
# launchers may still be closing the rendezvous: a DistNetworkError stack at the end of a successful job.
# The store prints "ready" once it listens and ends on SIGTERM.
STORE_PY='
import signal, sys
from datetime import timedelta
from torch.distributed import TCPStore
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
store = TCPStore("0.0.0.0", int(sys.argv[1]), is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
print("ready", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
'
STORE_PID=""
if (( NNODES > 1 )); then
    exec {STORE_FD}< <(exec python3 -c "$STORE_PY" "$MASTER_PORT" 2>&1)
    STORE_PID=$!
    if ! read -r -t 60 -u "$STORE_FD" READY || [[ $READY != ready ]]; then
        die "the rendezvous store could not listen on port $MASTER_PORT (${READY:-no answer in 60 s}): set MASTER_PORT to a free port"
    fi
fi

# One launcher per node; the per-node values expand in each task, hence the single quotes.
# --machine_rank 1 on every node: torch ignores the node rank with c10d, and accelerate checks the port is
# free on machine 0 only, where the store above listens on it. is_host=0: the store is already there.
# --kill-on-bad-exit: a task that fails (a crashed or killed rank) ends the whole step at once.
# shellcheck disable=SC2016
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    bash -c 'exec accelerate launch --machine_rank "$(( ${SLURM_NNODES:-1} > 1 ))" --rdzv_conf is_host=0 "$@"' \
    accelerate-launch \
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
if [[ -n $STORE_PID ]]; then kill "$STORE_PID" 2>/dev/null || true; fi
rm -f "$STOP_FILE"
EXPORTED=0
if [[ $(export_stamp) != "$EXPORT_BEFORE" ]]; then EXPORTED=1; fi
CHECKPOINT=$(last_checkpoint)
RESUBMIT="to continue: RUN_DIR=$RUN_DIR CONFIG=$CONFIG sbatch ... slurm/train.sh (same overrides)"

if (( STATUS == 0 && EXPORTED )); then
    log "training finished; run dir $RUN_DIR"
elif (( STATUS == 0 )) && [[ $STOP_SIGNAL == USR1 ]]; then
    log "training checkpointed and stopped ($CHECKPOINT): requeueing job $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        log "scontrol requeue failed (is requeueing allowed on this cluster? JobRequeue, --requeue); $RESUBMIT"
        exit 1
    fi
elif [[ -n $NODE_DOWN ]] || { { (( STATUS != 0 )) || [[ $STOP_SIGNAL == TERM ]]; } && DOWN=$(down_nodes) &&
        [[ -n $DOWN ]]; } || [[ -n $NODE_DOWN ]]; then
    # A node failure: slurmctld ends the job (TERM to this shell, often before srun returns, hence the check in
    # the trap too) and requeues it itself (--requeue). srun's status, 0 or not, says nothing more then.
    # NODE_DOWN again last: a TERM to the job's processes during $(down_nodes) kills that subshell, and the trap
    # that runs right after it is what finds the dead node.
    say_node_failed "${NODE_DOWN:-$DOWN}" "srun exit status $STATUS"
elif (( STATUS == 0 )) && [[ -n $STOP_SIGNAL ]]; then
    log "training stopped on request (SIG$STOP_SIGNAL) at checkpoint $CHECKPOINT; not requeued; $RESUBMIT"
elif (( STATUS == 0 )); then
    # No signal came, yet no export appeared: a STOP file someone wrote, or training wrote elsewhere.
    log "training exited without exporting $EXPORT and without a signal (a STOP file in the run dir?);" \
        "last checkpoint $CHECKPOINT; not requeued; $RESUBMIT"
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
