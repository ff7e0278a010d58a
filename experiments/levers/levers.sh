#!/usr/bin/env bash
# Levers for parallel decoding (this folder's README.md): every cell is the long CPU OPD recipe
# (examples/configs/cpu_long_opd.yaml, trained with bf16 autocast on a bf16 CPU) plus ONE change, trained for the same number of
# optimizer steps (= the same rollout-token budget, +-2%) from the same start and seed, then evaluated in float32 on
# the first 24 held-out HumanEval prompts (64 new tokens, decoding block 4, static + dynamic at each threshold).
#
#   bash experiments/levers/levers.sh OUT_DIR [STEPS] [CELL ...]    # default: 26 steps (~12.5k tokens), every cell
#   bash experiments/levers/levers.sh OUT_DIR 26 plain@1 plain@2   # CELL@N: the same cell with training seed N (default 0)
#
# Resumable: a cell with its report.json is skipped, a trained cell without one is only evaluated, and a killed
# cell resumes from its newest complete checkpoint (every 13 steps).
#
# Curves (issue 20's long runs, experiments/long_runs/README.md): CURVE_EVERY=N keeps a checkpoint every N steps
# (resumable from the newest) and evaluates each one, as the final model, into CELL/curve/stepN.json; an evaluated
# checkpoint is deleted once a newer complete one exists (the newest stays, for resuming or continuing). EVAL_ONLY=1
# does only that evaluation, so a second lane can follow a training lane:
#   CURVE_EVERY=39 bash experiments/levers/levers.sh long/ 220 left_to_right &
#   while sleep 600; do CURVE_EVERY=39 EVAL_ONLY=1 bash experiments/levers/levers.sh long/ 220 left_to_right; done
# experiments/levers/curve_table.py prints the curve. A cell directory seeded with another run's checkpoint-N
# (copied in) continues from it: a run with a constant learning rate is the same run, only longer. It also keeps
# that run's save_steps (13 for a cell trained without CURVE_EVERY: transformers restores them from the checkpoint),
# so pick N a multiple of 13 there; checkpoints between curve points are only kept for a resume.
#
# One torch thread per process: run two lanes (disjoint cells) side by side on a 2-core machine, not more (each
# training process holds ~8 GB). every_step trains
# up to 4 state rows per rollout: the same 8 rollouts per optimizer step, their up to 32 state rows in 4 accumulation
# chunks (the same step's gradient; 32 rows in one forward ran out of 24 GB). threshold_ramp_0.7 ramps the rollout
# threshold 0.9 -> 0.7 over the run (reference code's cosine shape); completion_128 trains 128-token rollouts at half
# the batch (the same tokens a step); short_prompts trains on one-sentence prompts (short_prompts.py) and is
# evaluated on the usual full prompts; stdlib_prompts trains on the 64 problems plus ~950 HumanEval-shaped stubs of
# standard-library functions (stdlib_prompts.py), so no prompt repeats within the budget; left_to_right
# commits rollouts from each block's frontier only (issue 20's rule comparison; every cell is evaluated in both
# commit orders); cosine_lr decays the learning rate 5e-5 -> 5e-6 over the run (the paper's 1e-5 -> 1e-6 cosine at this
# recipe's rate) and lora trains rank-16 adapters on every linear layer at 10x the rate with the frozen base as teacher
# (issue 20's levers against forgetting). A combined cell A+B makes both changes (left_to_right+cosine_lr: the
# drift levers under the default commit order, which this base config pins to the recorded runs' confidence). OUT_DIR is relative to the current directory (the script finds the repository from its own
# path) and must not contain spaces. Training precision: bf16 autocast where the CPU has bf16 instructions
# (avx512_bf16 / amx_bf16 / aarch64 bf16; the published cells ran so), float32 where it has none (bf16 is emulated
# there: 10x slower steps); BF16=true|false overrides (opdlm_trl/precision.py decides the default).
set -euo pipefail
out="${1:?usage: bash experiments/levers/levers.sh OUT_DIR [STEPS] [CELL ...]}"
steps="${2:-26}"
shift $(($# < 2 ? $# : 2))

declare -A CELLS=(
  [plain]=""
  [every_step]="--state_selection every_step --per_device_train_batch_size 2 --gradient_accumulation_steps 4"
  [rollout_threshold_0.7]="--threshold 0.7"
  [token_normalisation]="--loss_normalization token"
  [train_block_8]="--block_size 8"
  [rollout_temperature_0.7]="--temperature 0.7"
  [threshold_ramp_0.7]="--threshold_final 0.7"
  [completion_128]="--min_completion_length 128 --max_completion_length 128 --per_device_train_batch_size 4"
  [short_prompts]="--dataset_name $out/short_prompts.jsonl"
  [stdlib_prompts]="--dataset_name $out/stdlib_prompts.jsonl"
  [left_to_right]="--commit_order left_to_right"
  [cosine_lr]="--lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs {\"min_lr_rate\":0.1}"
  [lora]="--use_peft true --lora_r 16 --lora_alpha 32 --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj --teacher_backend shared --learning_rate 5e-4"
)
# cells that train on a prompt file of their own: OUT_DIR/CELL.jsonl, written once by this script
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
declare -A PROMPT_SETS=([short_prompts]="$here/short_prompts.py" [stdlib_prompts]="$here/stdlib_prompts.py")
cells=("$@")
[[ ${#cells[@]} -gt 0 ]] || cells=(plain every_step rollout_threshold_0.7 token_normalisation train_block_8
  rollout_temperature_0.7 threshold_ramp_0.7 completion_128 short_prompts stdlib_prompts left_to_right cosine_lr lora)
python=${PYTHON:-python}
curve_every=${CURVE_EVERY:-}
[[ -z $curve_every || $curve_every =~ ^[1-9][0-9]*$ ]] || { echo "CURVE_EVERY must be a positive integer" >&2; exit 2; }

evaluate() {  # STUDENT REPORT LOG: the one evaluation of every cell and checkpoint (float32, 24 held-out prompts)
  "$python" -m opdlm_trl.eval.cli --student "$1" --teacher embedded --limit 24 --max-new-tokens 64 \
    --block-size 4 --thresholds 0.5 0.9 --decodings static dynamic --batch-size 8 \
    --output "${2%.json}.partial.json" >>"$3" 2>&1
  mv "${2%.json}.partial.json" "$2"
}

complete_checkpoints() {  # DIR: its complete checkpoint-N directories, oldest first (a resume could read them)
  local checkpoint
  for checkpoint in "$1"/checkpoint-*; do
    [[ $checkpoint =~ /checkpoint-[0-9]+$ && -d $checkpoint ]] || continue
    "$python" -c 'import sys; from opdlm_trl.checkpoints import missing_checkpoint_files as missing
sys.exit(1 if missing(sys.argv[1]) else 0)' "$checkpoint" && echo "${checkpoint##*-} $checkpoint"
  done | sort -n | cut -d' ' -f2-
}

on_curve() {  # STEP: a curve point (a multiple of CURVE_EVERY; every step without it)
  [[ -z $curve_every ]] || (($1 % curve_every == 0))
}

evaluate_checkpoints() {  # DIR FINAL_STEP: curve/stepN.json for each complete checkpoint; drop evaluated old ones
  # A continued run keeps the save_steps of the checkpoint it resumed from (transformers restores the trainer
  # state after reading the arguments), so its checkpoints can fall between curve points: those only serve a
  # resume, and go once a newer complete one exists.
  local dir=$1 final=$2 checkpoint step newest checkpoints
  mapfile -t checkpoints < <(complete_checkpoints "$dir")
  [[ ${#checkpoints[@]} -gt 0 ]] || return 0
  newest=${checkpoints[-1]}
  mkdir -p "$dir/curve"
  for checkpoint in "${checkpoints[@]}"; do
    step=${checkpoint##*-}
    # the final step's model is the cell's own report.json
    [[ $step == "$final" || -f $dir/curve/step$step.json ]] || ! on_curve "$step" ||
      evaluate "$checkpoint" "$dir/curve/step$step.json" "$dir/eval.log"
    if [[ $checkpoint != "$newest" ]] && { [[ -f $dir/curve/step$step.json ]] || ! on_curve "$step"; }; then
      rm -rf "$checkpoint"
    fi
  done
}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
bf16=${BF16:-$("$python" -m opdlm_trl.precision --use-cpu)}
echo "training precision: bf16=$bf16"

for spec in "${cells[@]}"; do
  cell=${spec%@*}
  seed=0
  [[ $spec == *@* ]] && seed=${spec##*@}
  IFS=+ read -ra parts <<<"$cell"  # a combined cell, A+B, makes both changes at once
  overrides=""
  for part in "${parts[@]}"; do
    [[ -v CELLS[$part] ]] || { echo "unknown cell $part; choose from: ${!CELLS[*]}" >&2; exit 2; }
    overrides+=" ${CELLS[$part]}"
  done
  [[ $seed =~ ^[0-9]+$ ]] || { echo "bad seed in $spec: write CELL@N with N an integer" >&2; exit 2; }
  dir="$out/$cell"
  [[ $seed == 0 ]] || dir="$out/$cell@$seed"
  if [[ -n ${EVAL_ONLY:-} ]]; then
    [[ -d $dir ]] && evaluate_checkpoints "$dir" "$steps"
    continue
  fi
  [[ -f $dir/report.json ]] && { echo "$spec: done"; continue; }
  mkdir -p "$dir"
  for part in "${parts[@]}"; do
    if [[ -v PROMPT_SETS[$part] && ! -f $out/$part.jsonl ]]; then
      "$python" "${PROMPT_SETS[$part]}" "$out/$part.jsonl"
    fi
  done
  # training ended once convert.py wrote its opd_report.json (its last file; a LoRA cell saves no model.safetensors)
  if [[ ! -f $dir/opd_report.json ]]; then
    saving=(--save_steps 13 --save_total_limit 1)
    [[ -z $curve_every ]] || saving=(--save_steps "$curve_every")
    resume=()
    compgen -G "$dir/checkpoint-*" >/dev/null && resume=(--resume_from_checkpoint true)
    # shellcheck disable=SC2086  # the cell's override is a list of arguments
    "$python" "$root/examples/convert.py" --config "$root/examples/configs/cpu_long_opd.yaml" --output_dir "$dir" \
      --max_steps "$steps" "${saving[@]}" --bf16 "$bf16" --report_prompts 0 --seed "$seed" $overrides "${resume[@]}" \
      >>"$dir/train.log" 2>&1
  fi
  [[ -z $curve_every ]] || evaluate_checkpoints "$dir" "$steps"
  evaluate "$dir" "$dir/report.json" "$dir/eval.log"
  echo "$spec: evaluated"
done
