#!/usr/bin/env bash
# The token-efficiency grid of this folder's README.md on a 2-core CPU machine: independent jobs of
# benchmarks/token_efficiency.py (each with its own --out-dir, one torch thread), PARALLEL_JOBS at a time, then
# merged into one results.json / PNG / table. Resumable: rerunning skips finished cells (each job resumes from its
# own results.json).
# Memory: an OPD job holds student + teacher + AdamW state of SmolLM2-135M, ~5.5 GB RSS.
#
#   bash experiments/token_efficiency/grid.sh [OUT_DIR] [PARALLEL_JOBS]   # OUT_DIR relative to the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-experiments/token_efficiency/out}
PARALLEL=${2:-3}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
COMMON=(--eval-prompts 100 --new-tokens 32 --eval-batch-size 16 --threads 1)
LONG="--budgets 256 1024 2048 --dynamic-budgets last"  # the three main curves
SHORT="--budgets 256 1024 --dynamic-budgets none"      # the other baselines, static decoding only
SEEDS="--budgets 256 --seeds 1 2 --dynamic-budgets none"
# name | arguments; the 0-token rows and the teacher row come from the first job
JOBS=(
    "init --shifts 1 0 --init-only"
    "opd-s1 --no-init --shifts 1 --methods opd --seeds 0 $LONG"
    "opd-s0 --no-init --shifts 0 --methods opd --seeds 0 $LONG"
    "mdlm-s1 --no-init --shifts 1 --methods mdlm_raw --seeds 0 $LONG"
    "opd-seeds-s1 --no-init --shifts 1 --methods opd $SEEDS"
    "opd-seeds-s0 --no-init --shifts 0 --methods opd $SEEDS"
    "mdlm-s0 --no-init --shifts 0 --methods mdlm_raw --seeds 0 $SHORT"
    "mdlm-seeds-s1 --no-init --shifts 1 --methods mdlm_raw $SEEDS"
    "mdlm-seeds-s0 --no-init --shifts 0 --methods mdlm_raw $SEEDS"
    "sft-s1 --no-init --shifts 1 --methods sft_teacher --seeds 0 $SHORT"
    "kd-s1 --no-init --shifts 1 --methods offpolicy_kd --seeds 0 $SHORT"
    "opdrr-s1 --no-init --shifts 1 --methods opd_random_remask --seeds 0 $SHORT"
)
names=()
for job in "${JOBS[@]}"; do
    read -r name arguments <<< "$job"
    names+=("$OUT/$name")
    while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || true; done
    mkdir -p "$OUT/$name"
    echo "[$(date +%T)] start $name"
    # shellcheck disable=SC2086
    (python benchmarks/token_efficiency.py $arguments "${COMMON[@]}" --out-dir "$OUT/$name" > "$OUT/$name/run.log" 2>&1 \
        && echo "[$(date +%T)] done $name" || echo "[$(date +%T)] FAILED $name (see $OUT/$name/run.log)") &
done
wait
python benchmarks/token_efficiency.py --merge "${names[@]}" --out-dir "$OUT/merged"
