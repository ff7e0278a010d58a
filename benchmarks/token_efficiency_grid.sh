#!/usr/bin/env bash
# The token-efficiency grid of docs/results.md on a CPU machine: nine independent jobs (one per
# (method, seeds) group, each with its own --out-dir), run two at a time with one torch thread each
# (on 2 cores this beats one 2-thread process by ~20%), then merged into one results.json/PNG/table.
# Resumable: rerunning skips finished cells (each job resumes from its own results.json).
#
#   bash benchmarks/token_efficiency_grid.sh [OUT_DIR] [PARALLEL_JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/token_efficiency_grid}
JOBS=${2:-2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
COMMON="--eval-prompts 100 --new-tokens 32 --eval-batch-size 16 --threads 1"
CURVE="--budgets 256 1024 2048 --dynamic-budgets last"
SEEDS="--budgets 256 --seeds 1 2 --dynamic-budgets none"
# job name | arguments (ordered longest first so the two lanes finish together)
cat > "$OUT/jobs.txt" <<JOBS
init-opd-s1 --shifts 1 0 --methods opd --seeds 0 $CURVE
opd-s0 --no-init --shifts 0 --methods opd --seeds 0 $CURVE
mdlm-s1 --no-init --shifts 1 --methods mdlm_raw --seeds 0 $CURVE
mdlm-s0 --no-init --shifts 0 --methods mdlm_raw --seeds 0 $CURVE
opd-seeds --no-init --shifts 1 0 --methods opd $SEEDS
mdlm-seeds --no-init --shifts 1 0 --methods mdlm_raw $SEEDS
opdrr-s1 --no-init --shifts 1 --methods opd_random_remask --seeds 0 $CURVE
sft-s1 --no-init --shifts 1 --methods sft_teacher --seeds 0 $CURVE
kd-s1 --no-init --shifts 1 --methods offpolicy_kd --seeds 0 $CURVE
JOBS
run_job() {
    local name=$1
    shift
    mkdir -p "$OUT/$name"
    echo "[$(date +%T)] start $name"
    # shellcheck disable=SC2086
    python benchmarks/token_efficiency.py "$@" $COMMON --out-dir "$OUT/$name" > "$OUT/$name/run.log" 2>&1 \
        && echo "[$(date +%T)] done $name" || echo "[$(date +%T)] FAILED $name (see $OUT/$name/run.log)"
}
export -f run_job
export OUT COMMON
# shellcheck disable=SC2016
xargs -P "$JOBS" -L 1 bash -c 'run_job "$@"' _ < "$OUT/jobs.txt"
# shellcheck disable=SC2046
python benchmarks/token_efficiency.py --merge $(awk -v out="$OUT" '{print out "/" $1}' "$OUT/jobs.txt") \
    --out-dir "$OUT/merged"
