#!/usr/bin/env bash
# One call on the GPU machine: install in place, build the extension, run the GPU tests and
# the benchmarks, print a short table last. Uses that machine's python3 as it is (no venv,
# no downloads). The benchmark JSON lands in bench/results/; when $OUT is set (the device
# tool brings back at most 8 files), the JSON, the summary and one tarball of all logs go there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
status=0
# The whole check stays under 9 minutes: each step gets at most what is left of the budget.
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-510} ))
step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to $LOGS/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( DEADLINE - t0 ))
  [ $left -lt $limit ] && limit=$left
  if [ $limit -le 5 ]; then echo "$name skipped: time budget spent" | tee -a "$LOGS/steps.txt"; status=1; return; fi
  env -u OUT timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$LOGS/steps.txt"
  [ $rc -eq 0 ] || { status=1; tail -n 25 "$LOGS/$name.log"; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/device.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOGS/device.txt"

step install 60 $PY -m pip install --no-deps --no-build-isolation -q -e .
step build-extension 150 $PY -c "import torch; from nla_fast import extension as e; r = e.unavailable_reason(torch.device('cuda')); print(r or 'extension built'); raise SystemExit(1 if r else 0)"
# every GPU test, compile tests included; a test that kills the interpreter is named and the rest still run
step gpu-tests 270 $PY scripts/pytest_isolated.py -m gpu
step loss-bench 120 $PY bench/loss_bench.py
step data-bench 60 $PY bench/data_bench.py --device cuda
step train-bench 240 $PY bench/train_bench.py

$PY bench/summary.py bench/results > "$LOGS/summary.txt" 2>&1
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_check_logs.tgz" -C "$LOGS" .
  cp "$LOGS/summary.txt" "$OUT/"
  for f in bench/results/loss_bench-*.json bench/results/data_bench.json bench/results/train_bench-*.json; do
    [ -f "$f" ] && case "$f" in *-quick*) ;; *) cp "$f" "$OUT/";; esac
  done
fi
echo "=== steps ==="; cat "$LOGS/steps.txt"
echo "=== gpu tests ==="; tail -n 3 "$LOGS/gpu-tests.log"
echo "=== summary ==="; cat "$LOGS/summary.txt"
exit $status
