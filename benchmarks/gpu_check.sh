#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run for a borrowed GPU machine (under 8 minutes in all):
#   1. the gpu-marked tests (pytest -m gpu);
#   2. the embedded default sweep, short (--num-samples 2), with --gpus-per-trial 0.5 and then 1 (one storage, so
#      the base is built once), and which device each trial reported;
#   3. the VGG16 preset's extraction images/s against the raw forward images/s of its backbone and whole model
#      (benchmarks/bench_real_size.py --gpu-throughput).
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; PYTHON=... picks the interpreter
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#
# It needs the project's environment on that machine (the default interpreter is .venv/bin/python, else python3);
# nothing is downloaded. Outputs (at most 8 files, none in subfolders): $OUT/summary.txt (one line per step with
# its exit status and seconds), nvidia-smi.txt, gpu_tests.log, sweep_gpus_0.5.log, sweep_gpus_1.log,
# throughput.json, throughput.log. Without $OUT they go to a new temporary folder, named at the end. Each step
# has its own time limit (timeout), so one hung step cannot eat the others' time; the exit status is 1 when any
# step failed.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT="${OUT:-$(mktemp -d -t vladsweep-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Sweep storage, MLflow store and the synthetic set stay out of $OUT (only a few files come back from it).
WORK="$(mktemp -d -t vladsweep-gpu-work.XXXXXX)"
export VLADSWEEP_CACHE="$WORK/cache"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=0

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || failed=1
    tail -n 3 "$OUT/$name.log"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (no driver?)" >>"$OUT/nvidia-smi.txt"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' \
    | tee -a "$SUMMARY"

step gpu_tests 100 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/

for share in 0.5 1; do
    # The first sweep builds the synthetic set and the embedded base; the second finds the base in the storage.
    limit=$([ "$share" = 0.5 ] && echo 190 || echo 110)
    step "sweep_gpus_$share" "$limit" "$PYTHON" sweep/run.py --num-samples 2 --max-concurrent 2 \
        --gpus-per-trial "$share" --cpus-per-trial 2 --storage "$WORK/storage" \
        --mlflow-uri "sqlite:///$WORK/mlflow.db" --name "gpu-check-$share"
    # Where each trial ran: the placement keys of its last report (trainables.contract.PLACEMENT_KEYS).
    "$PYTHON" - "$WORK/storage/gpu-check-$share" "$share" <<'PY' | tee -a "$SUMMARY"
import json
import sys
from pathlib import Path

from trainables.contract import PLACEMENT_KEYS

root, share = Path(sys.argv[1]), sys.argv[2]
rows = []
for result in sorted(root.glob("*/result.json")):
    lines = [line for line in result.read_text().splitlines() if line.strip()]
    if lines:
        last = json.loads(lines[-1])
        rows.append(" ".join(f"{key}={last.get(key)}" for key in PLACEMENT_KEYS[1:]) + f" stage={last.get('stage')}")
print(f"sweep --gpus-per-trial {share}: {len(rows)} trial(s): " + ("; ".join(rows) or "none found under " + str(root)))
PY
done

step throughput 60 "$PYTHON" benchmarks/bench_real_size.py --gpu-throughput --device auto \
    --throughput-images 64 --json "$OUT/throughput.json"

rm -rf "$WORK"
echo "outputs in $OUT"
exit "$failed"
