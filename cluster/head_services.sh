#!/usr/bin/env bash
# Services of a vladsweep cluster's head node: the MLflow tracking server, bound to 127.0.0.1 only.
#
# cluster/gpu.yaml and cluster/local.yaml call `bash ~/vladsweep/cluster/head_services.sh start` from their
# head_start_ray_commands, before `ray start`. `start` is idempotent: when an MLflow server already answers on the
# port it leaves it alone, so `ray up` again (which restarts Ray) keeps the UI and its runs up.
#
#   head_services.sh start | stop | status
#   head_services.sh backup DEST    consistent copy of the sqlite store to DEST (a path, or s3://… with the aws CLI)
#
# Settings (environment variables, defaults in brackets):
#   VLADSWEEP_MLFLOW_PORT       [5000]             port on 127.0.0.1; reach it with `ray attach FILE -p 5000`
#   VLADSWEEP_MLFLOW_DIR        [~/mlflow]         the sqlite store, server.log and server.pid
#   VLADSWEEP_MLFLOW_ARTIFACTS  [$DIR/artifacts]   where artifacts go: s3://bucket/prefix or a shared folder
#   VLADSWEEP_MLFLOW_WORKERS    [2]                server worker processes
#   VLADSWEEP_MLFLOW_WAIT_S     [180]              how long `start` waits for the server to answer
set -euo pipefail

PORT="${VLADSWEEP_MLFLOW_PORT:-5000}"
DIR="${VLADSWEEP_MLFLOW_DIR:-$HOME/mlflow}"
ARTIFACTS="${VLADSWEEP_MLFLOW_ARTIFACTS:-$DIR/artifacts}"
WORKERS="${VLADSWEEP_MLFLOW_WORKERS:-2}"
WAIT_S="${VLADSWEEP_MLFLOW_WAIT_S:-180}"
URL="http://127.0.0.1:${PORT}"

healthy() {
    # python rather than curl: the venv is on PATH on every node, curl may not be.
    python - "$URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

server_pid() {
    [[ -f "$DIR/server.pid" ]] && kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null && cat "$DIR/server.pid"
}

start() {
    if healthy; then
        echo "head_services: MLflow already answers at $URL; leaving it running"
        return 0
    fi
    command -v mlflow >/dev/null || {
        echo "head_services: 'mlflow' is not on PATH ($PATH); the node's setup_commands install it" >&2
        exit 1
    }
    mkdir -p "$DIR"
    [[ "$ARTIFACTS" == *://* ]] || mkdir -p "$ARTIFACTS"
    # setsid: the server gets its own session (its pid is the process group id), so it outlives the ssh session
    # that started it and `stop` can end it together with its workers.
    # The job runner serves MLflow's GenAI evaluation jobs (about eight extra processes); a sweep uses none.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
    setsid mlflow server --host 127.0.0.1 --port "$PORT" \
        --backend-store-uri "sqlite:///$DIR/mlflow.db" \
        --artifacts-destination "$ARTIFACTS" \
        --workers "$WORKERS" \
        >"$DIR/server.log" 2>&1 </dev/null &
    echo $! >"$DIR/server.pid"
    local waited=0
    until healthy; do
        if ! kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null; then
            echo "head_services: the MLflow server exited; the end of $DIR/server.log:" >&2
            tail -n 40 "$DIR/server.log" >&2
            exit 1
        fi
        if ((waited >= WAIT_S)); then
            echo "head_services: MLflow did not answer at $URL within ${WAIT_S}s; the end of $DIR/server.log:" >&2
            tail -n 40 "$DIR/server.log" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "head_services: MLflow at $URL (store sqlite:///$DIR/mlflow.db, artifacts $ARTIFACTS)"
}

stop() {
    local pid
    if pid="$(server_pid)"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "head_services: MLflow server (pid $pid) stopped"
    else
        echo "head_services: no MLflow server started by this script is running"
    fi
    rm -f "$DIR/server.pid"
}

status() {
    if healthy; then
        echo "head_services: MLflow answers at $URL"
    else
        echo "head_services: nothing answers at $URL"
        return 1
    fi
}

backup() {
    local dest="${1:?usage: head_services.sh backup DEST (a path or s3://bucket/key)}"
    local copy="$DIR/mlflow-backup.db"
    # sqlite's online backup gives a consistent copy even while the server writes.
    python - "$DIR/mlflow.db" "$copy" <<'EOF'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
with dst:
    src.backup(dst)
EOF
    if [[ "$dest" == s3://* ]]; then
        aws s3 cp --only-show-errors "$copy" "$dest"
    else
        mkdir -p "$(dirname "$dest")"
        cp "$copy" "$dest"
    fi
    echo "head_services: MLflow store copied to $dest"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
backup) backup "${2:-}" ;;
*)
    echo "usage: $0 start|stop|status|backup DEST" >&2
    exit 2
    ;;
esac
