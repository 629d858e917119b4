#!/bin/bash
# A 10-minute check of a GPU machine, one command, one Markdown report:
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR]      # report: DIR/report.md (default bench/results/gpu_check)
#
# Steps, each under its own timeout (a step that fails or times out is reported and the next one runs):
# environment; synthetic CIFAR-shaped shards; loader speed; 20 training steps under
# torch.cuda.set_sync_debug_mode("error") for fp32, bf16, fp16 and fp16 + R1; the throughput tables of
# bench/gpu.py (distgan against a plain loop, batch 64/256/1024, eager and compiled; CUDA graphs at batch 64 and
# 256 in bf16, with what they skip); an end-to-end train and resume through `accelerate launch`. --dry-run runs the same steps on the CPU with tiny sizes
# (it checks the code, it measures nothing); CI runs it.
set -uo pipefail

DRY_RUN=0
OUT=bench/results/gpu_check
while (( $# )); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument '$1': use --dry-run and --out DIR" >&2; exit 2 ;;
    esac
    shift
done
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE" || exit 2
if [[ -d $OUT && ! -e $OUT/.gpu_check && -n $(ls -A "$OUT") ]]; then
    echo "gpu_check.sh: $OUT holds files gpu_check.sh did not write: choose another --out (it replaces its data/ and run/)" >&2
    exit 2
fi
mkdir -p "$OUT" && touch "$OUT/.gpu_check"
REPORT=$OUT/report.md
DATA=$OUT/data
rm -rf "$DATA" "$OUT/run"
if (( DRY_RUN )); then
    COUNT=2000 LOADER=(--batch 16 --workers 1 --seconds 2) STEPS=3
    GPU_ARGS=(--dry-run) GRAPH_ARGS=() TRAIN_STEPS=4 LIMIT=120 LAUNCH=(--cpu --num_processes 1)
    MODEL=(generator.width=8 generator.max_width=32 discriminator.width=8 discriminator.max_width=32 train.batch_size=8)
else
    COUNT=50000 LOADER=(--batch 256 --workers 8 --seconds 20) STEPS=20
    GPU_ARGS=(--batches 64 256 1024 --precisions no bf16 --compile off on --warmup 20 --steps 50) TRAIN_STEPS=200
    GRAPH_ARGS=(--batches 64 256 --precisions bf16 --compile graphs --warmup 20 --steps 50)  # the launch-bound sizes
    LIMIT=300 LAUNCH=(--num_processes 1 --mixed_precision bf16)
    MODEL=()
fi
FAILED=0

{ echo "# distgan GPU check"; echo; echo "\`bash bench/gpu_check.sh$( (( DRY_RUN )) && echo ' --dry-run')\`, $(date -u '+%Y-%m-%d %H:%M UTC')"
  (( DRY_RUN )) && echo "(DRY RUN: CPU, tiny sizes; it checks the code, it measures nothing)"; } > "$REPORT"

# step TITLE SECONDS COMMAND...: the command's output under a heading, or why it failed
step() {
    local title=$1 limit=$2 start status
    shift 2
    printf '\n## %s\n\n' "$title" >> "$REPORT"
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/step.out" 2> "$OUT/step.err"
    status=$?
    cat "$OUT/step.out" >> "$REPORT"
    if (( status != 0 )); then
        FAILED=1
        local why="exit status $status"
        (( status == 124 )) && why="timed out after $limit s"
        printf '\n**FAILED** (%s): %s\n' "$why" "$(tail -n 3 "$OUT/step.err" | tr '\n' ' ')" >> "$REPORT"
    fi
    echo "gpu_check: $title: $( (( status == 0 )) && echo ok || echo FAILED) in $(( $(date +%s) - start )) s"
}

step "Environment" 60 python3 bench/gpu_check.py env
step "Synthetic CIFAR-shaped shards" "$LIMIT" python3 bench/gpu_check.py shards "$DATA" --count "$COUNT"
step "Loader speed" "$LIMIT" python3 bench/gpu_check.py loader "$DATA" "${LOADER[@]}"
printf '\n## Host syncs inside a step\n\n| precision | result |\n|---|---|\n' >> "$REPORT"
for precision in "no none" "bf16 none" "fp16 none" "fp16 r1"; do
    read -r p penalty <<< "$precision"
    timeout "$LIMIT" python3 bench/gpu_check.py sync "$DATA" --precision "$p" --penalty "$penalty" --steps "$STEPS" \
        $( (( DRY_RUN )) && echo --dry-run) >> "$REPORT" 2> "$OUT/step.err" ||
        { FAILED=1; echo "| $p + $penalty | **FAILED**: $(tail -n 2 "$OUT/step.err" | tr '\n' ' ') |" >> "$REPORT"; }
done
step "Throughput: distgan against a plain loop" $(( LIMIT * 2 )) \
    python3 bench/gpu.py "${GPU_ARGS[@]}" --out "$OUT/throughput.md"
if (( ${#GRAPH_ARGS[@]} )); then  # CUDA graphs (train.compile_mode=reduce-overhead); TORCH_LOGS names what it skips
    step "Throughput with CUDA graphs (train.compile_mode=reduce-overhead)" "$LIMIT" \
        env TORCH_LOGS=cudagraphs python3 bench/gpu.py "${GRAPH_ARGS[@]}" --out "$OUT/throughput_graphs.md"
    grep -h -i "skipping cudagraphs" "$OUT/step.err" | sort | uniq -c | head -n 5 | sed 's/^/    /' >> "$REPORT" || true
fi
TRAIN=(-m distgan.train --config cifar10 "data.path=$DATA" data.prepare=none "run.dir=$OUT/run" log.wandb=false
       log.progress_bar=false log.gif=false data.num_workers=1 "checkpoint.every=$(( TRAIN_STEPS / 2 ))" "${MODEL[@]}")
step "End to end: train through accelerate launch" "$LIMIT" \
    accelerate launch "${LAUNCH[@]}" "${TRAIN[@]}" "train.steps=$(( TRAIN_STEPS / 2 ))"
step "End to end: resume to twice the steps" "$LIMIT" \
    accelerate launch "${LAUNCH[@]}" "${TRAIN[@]}" "train.steps=$TRAIN_STEPS" --resume auto
if [[ -f $OUT/run/checkpoints/step-$(printf '%08d' "$TRAIN_STEPS")/state.json ]]; then
    echo "- resumed run reached step $TRAIN_STEPS (checkpoint written)" >> "$REPORT"
else
    FAILED=1
    echo "- **FAILED**: no checkpoint at step $TRAIN_STEPS after the resume" >> "$REPORT"
fi
rm -f "$OUT/step.out" "$OUT/step.err"
echo "gpu_check: report $REPORT"
exit "$FAILED"
