#!/usr/bin/env bash
# One call on the GPU machine: install in place, build the extension, run the GPU tests and
# the benchmarks, print a short table last. Uses that machine's python3 as it is (no venv,
# no downloads). Full logs and JSON go under $OUT when it is set, else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
status=0
# The whole check stays under 9 minutes: each step gets at most what is left of the budget.
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-510} ))
step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to $OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( DEADLINE - t0 ))
  [ $left -lt $limit ] && limit=$left
  if [ $limit -le 5 ]; then echo "$name skipped: time budget spent" | tee -a "$OUT_DIR/steps.txt"; status=1; return; fi
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT_DIR/steps.txt"
  [ $rc -eq 0 ] || { status=1; tail -n 25 "$OUT_DIR/$name.log"; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/device.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/device.txt"

# Editable install without dependencies (they are on the machine already).
step install 60 $PY -m pip install --no-deps --no-build-isolation -q -e .
step build-extension 150 $PY -c "import torch; from nla_fast import extension as e; r = e.unavailable_reason(torch.device('cuda')); print(r or 'extension built'); raise SystemExit(1 if r else 0)"
step gpu-tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml"
step loss-bench 120 $PY bench/loss_bench.py
[ -f bench/data_bench.py ] && step data-bench 120 $PY bench/data_bench.py
[ -f bench/train_bench.py ] && step train-bench 150 $PY bench/train_bench.py

cp bench/results/*.json bench/results/*.md "$OUT_DIR"/ 2>/dev/null
echo "=== steps ==="; cat "$OUT_DIR/steps.txt"
echo "=== gpu tests ==="; tail -n 3 "$OUT_DIR/gpu-tests.log"
echo "=== loss bench (fwd+bwd) ==="
grep -E "^\| (B|32|4096|1048576) " bench/results/loss_bench-*.md | grep -E "fwd\+bwd|median" | grep -v "^.*\| fwd \|" | cut -c1-140
grep -A6 "^Targets" bench/results/loss_bench-*.md
exit $status
