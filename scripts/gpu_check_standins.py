"""Stand-ins for the GPU steps of scripts/gpu_check.py's dry run: no GPU, no torch, seconds.

    python scripts/gpu_check_standins.py STEP --results DIR --work DIR [--delay S] [--budget-s S]

Each writes what its real step writes, the way the real step writes it: the benchmarks'
stand-ins replay the first GPU run's results (bench/results/2026-11-29-nvidia-h200/) row by
row, rewriting their JSON atomically after each row and waiting ``--delay`` seconds after it
(a long delay makes the step overrun its limit); the JSON says it is a replay. The kernel
model's stand-in copies the test fixture (invented values in its schema). The GPU tests'
stand-in runs the real test runner (scripts/pytest_isolated.py) with its budget over a small
test file: one test passes, one is skipped, one waits ``--delay`` seconds, one comes after it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from stdlib_atomic import atomic

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "bench" / "results" / "2026-11-29-nvidia-h200"
FIXTURE = ROOT / "tests" / "fixtures" / "kernel_model.json"
sys.path.insert(0, str(ROOT / "bench"))
import spec_targets  # noqa: E402

LOSS_CASES = {(32, 7, "float32"): ("reference-style", "triton", "extension", "reference+compile"),
              (2**20, 7, "bfloat16"): ("triton", "extension"), (2**20, 7, "float32"): ("triton", "extension"),
              (4096, 1000, "bfloat16"): ("triton", "extension")}  # loss_bench --targets
TRAIN_RUNGS = (0, 6, 7, 8, 5)  # train_bench --rungs 0,6,7,8,5
TESTS = '''import time, pytest
def test_passes(): pass
@pytest.mark.skip(reason="a stand-in skip")
def test_skipped(): pass
def test_waits(): time.sleep({delay})
def test_after(): pass
'''


def replayed(source: Path) -> dict:
    data = json.loads(source.read_text())
    data["stand_in"] = f"replay of {source.relative_to(ROOT)}, not measured now"
    return data


def device(args) -> None:
    atomic.write_text(args.results / "device.json", json.dumps(
        {"name": "dry run: no GPU (stand-in)", "python": platform.python_version(), "arch": None, "errors": {}}))


def kernel_model(args) -> None:
    atomic.copy(FIXTURE, args.results / "kernel_model.json")


def loss_bench(args) -> None:
    source = replayed(RECORDED / "loss_bench-nvidia-h200.json")
    rows = [r for case, names in LOSS_CASES.items() for name in names for r in source["rows"]
            if (r["batch"], r["classes"], r["dtype"]) == case and r["backend"] == name and r["mode"] == "fwd+bwd"]
    result = {**source, "plan": "targets", "rows": [], "host_bar": None, "not_measured": [], "targets": {}}
    for row in rows:
        result["rows"].append(row)
        result["targets"] = spec_targets.as_dict(spec_targets.loss_targets(result) + spec_targets.host_targets(result))
        atomic.write_text(args.results / "loss_bench-nvidia-h200.json", json.dumps(result, indent=1))
        time.sleep(args.delay)


def train_bench(args) -> None:
    source = replayed(RECORDED / "train_bench-nvidia-h200.json")
    result = {**source, "rungs": list(TRAIN_RUNGS), "rows": [], "epochs": {}, "targets": {}}
    for rung in TRAIN_RUNGS:
        for row in (r for r in source["rows"] if r["rung"] == rung):
            result["rows"].append(row)
            result["targets"] = spec_targets.as_dict(spec_targets.train_targets(result))
            atomic.write_text(args.results / "train_bench-nvidia-h200.json", json.dumps(result, indent=1))
            time.sleep(args.delay)


def data_bench(args) -> None:
    source = replayed(RECORDED / "data_bench.json")
    result = {**source, "figures": {}, "targets": {}}
    for key, value in source["figures"].items():
        result["figures"][key] = value
        atomic.write_text(args.results / "data_bench.json", json.dumps(result, indent=1))
        time.sleep(args.delay)
    result["targets"] = source["targets"]
    atomic.write_text(args.results / "data_bench.json", json.dumps(result, indent=1))


def gpu_tests(args) -> None:
    folder = args.work / "standin_tests"
    atomic.write_text(folder / "test_gpu_standin.py", TESTS.format(delay=args.delay))
    atomic.write_text(folder / "pytest.ini", "[pytest]\n")  # its own rootdir, wherever the run folder is
    os.chdir(folder)
    runner = ROOT / "scripts" / "pytest_isolated.py"
    os.execv(sys.executable, [sys.executable, str(runner), "--budget-s", str(args.budget_s), "--report",
                              str(args.results / "gpu_tests.json"), "test_gpu_standin.py"])


def nothing(args) -> None:
    print("stand-in: nothing to do without a GPU")


STAND_INS = {"device": device, "install": nothing, "build-extension": nothing, "kernel-model": kernel_model,
             "loss-bench": loss_bench, "train-bench": train_bench, "data-bench": data_bench, "gpu-tests": gpu_tests}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STAND_INS))
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.01, help="seconds after each row (gpu-tests: the slow test)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="gpu-tests: the test runner's budget")
    args = parser.parse_args(argv)
    STAND_INS[args.step](args)
    print(f"stand-in {args.step}: done")


if __name__ == "__main__":
    main()
