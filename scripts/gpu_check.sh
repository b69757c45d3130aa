#!/usr/bin/env bash
# make gpu-check: the GPU machine's python3 as it is (no venv, nothing fetched) runs
# scripts/gpu_check.py: every SPEC 4 figure under one deadline, the summary printed last.
# Arguments pass through (--dry-run: stand-ins for the GPU steps; --budget-s; --cap STEP=S).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
