#!/usr/bin/env bash
# The README's main job: set up, then convert SmolLM2-135M-Instruct (shipped in a wheel) into a block-diffusion LM
# with a few OPD steps on CPU, printing the student's answers beside the teacher's before and after, and saving it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# bf16 autocast doubles a CPU training step's speed where the CPU has bf16 instructions and is ~10x slower where it
# has not (emulated), so the precision follows this CPU (opdlm_trl/precision.py decides); arguments given here win.
bf16=$(python -m opdlm_trl.precision --use-cpu)
echo "training precision: bf16=$bf16"
opdlm-convert --config examples/configs/cpu_demo.yaml --bf16 "$bf16" "$@"
