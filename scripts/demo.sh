#!/usr/bin/env bash
# The README's main job: set up, then convert SmolLM2-135M-Instruct (shipped in a wheel) into a block-diffusion LM
# with a few LoRA OPD steps on CPU, printing before/after samples and saving the student.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python examples/convert.py --config examples/configs/cpu_demo.yaml "$@"
