"""scripts/gpu_check.py without a GPU: the step order, the deadline, a step cut at its limit
while the next one still runs, the per-row JSON a cut step leaves, the summary printed last and
the files copied to $OUT (the dry run's stand-ins replace the GPU steps' commands)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

ORDER = ["device", "install", "build-extension", "kernel-model", "loss-bench", "train-bench", "data-bench", "gpu-tests"]


def context(tmp_path, budget_s=100.0, **kwargs):
    ctx = gpu_check.Context(sys.executable, tmp_path / "work", time.monotonic() + budget_s, **kwargs)
    ctx.results.mkdir(parents=True)
    ctx.logs.mkdir(parents=True)
    return ctx


def python_step(name, code, cap_s=30.0, needs=None):
    return gpu_check.Step(name, cap_s, lambda c, t: [sys.executable, "-c", code], needs)


def test_steps_are_in_order_of_value():
    assert [s.name for s in gpu_check.STEPS] == ORDER
    assert gpu_check.BUDGET_S == 510
    ctx = gpu_check.Context("py", Path("w"), 0.0)
    steps = {s.name: s for s in gpu_check.STEPS}
    argv = steps["loss-bench"].command(ctx, 110.0)
    assert argv[argv.index("--time-cap") + 1] == "90" and "--targets" in argv  # the loss rows take <= 90 s
    train = steps["train-bench"].command(ctx, 200.0)
    assert train[train.index("--rungs") + 1] == "0,6,7,8,5" and train[train.index("--epochs") + 1] == "7"


def test_an_overrunning_step_is_cut_and_the_next_still_runs(tmp_path):
    ctx = context(tmp_path)
    steps = [python_step("slow", "import time; print('started', flush=True); time.sleep(60)", cap_s=1.0),
             python_step("fails", "raise SystemExit(3)"),
             python_step("absent", "print('never')", needs="bench/no_such_file.py"),
             python_step("next", "print('ran')")]
    record, after = {"steps": []}, []
    t0 = time.monotonic()
    gpu_check.run_check(steps, ctx, record, lambda: after.append(len(record["steps"])), lambda: None)
    assert time.monotonic() - t0 < 15
    got = {s["name"]: s for s in record["steps"]}
    assert [s["name"] for s in record["steps"]] == ["slow", "fails", "absent", "next"]
    assert got["slow"]["status"] == "cut" and 1.0 <= got["slow"]["seconds"] < 6
    assert got["fails"]["status"] == "failed" and got["fails"]["rc"] == 3
    assert got["absent"]["status"] == "skipped: bench/no_such_file.py is not in this checkout"
    assert got["next"]["status"] == "ok" and "ran" in (ctx.logs / "next.log").read_text()
    assert "started" in (ctx.logs / "slow.log").read_text()
    assert after == [1, 2, 3, 4]  # the outputs are rewritten after every step


def test_the_deadline_limits_each_step_and_skips_what_cannot_start(tmp_path):
    ctx = context(tmp_path, budget_s=gpu_check.RESERVE_S + 7, caps={"capped": 2.0})
    limit, skipped = gpu_check.plan_step(python_step("long", "", cap_s=300), ctx)
    assert skipped is None and 6 < limit <= 7  # what is left, not the step's 300 s
    assert gpu_check.plan_step(python_step("capped", "", cap_s=300), ctx)[0] == 2.0
    ctx.deadline = time.monotonic() + gpu_check.RESERVE_S + 3
    limit, skipped = gpu_check.plan_step(python_step("late", ""), ctx)
    assert limit == 0 and skipped == "skipped: budget spent (3 s left)"


def test_command_line_errors_name_the_bad_item(capsys):
    for argv, message in ((["--cap", "train=5"], "no step 'train'"), (["--cap", "train-bench=x"], "expected STEP=SECONDS")):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(argv)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_end_to_end_with_overruns(tmp_path):
    """The real driver in a subprocess, stand-ins for the GPU steps: the loss bench's stand-in
    waits 30 s after its first row and is cut at 1 s, the next steps still run; the test
    runner's budget cuts the waiting test and names the one after it; $OUT gets the files."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--work-dir", str(tmp_path / "work"),
         "--cap", "loss-bench=1", "--stand-in-delay", "loss-bench=30",
         "--cap", "gpu-tests=6", "--stand-in-delay", "gpu-tests=30"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**__import__("os").environ, "OUT": str(out)})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step was cut
    record = json.loads((out / "gpu_check.json").read_text())
    assert [s["name"] for s in record["steps"]] == ORDER and record["dry_run"] and record["finished"]
    status = {s["name"]: s["status"] for s in record["steps"]}
    assert status["loss-bench"] == "cut" and status["gpu-tests"] == "failed"
    assert all(status[name] == "ok" for name in ORDER if name not in ("loss-bench", "gpu-tests"))
    for name in ORDER:  # each step's time printed as it ends
        assert re.search(rf"^\[gpu-check\] {name}: \w+ in \d+\.\d s", proc.stdout, re.M), name
    # the cut step left the row it measured before the cut
    loss = json.loads((out / "loss_bench-nvidia-h200.json").read_text())
    assert [r["backend"] for r in loss["rows"]] == ["reference-style"] and "replay" in loss["stand_in"]
    train = json.loads((out / "train_bench-nvidia-h200.json").read_text())
    assert [r["rung"] for r in train["rows"]] == [0, 0, 6, 5]  # rungs 7 and 8 were not in the recorded run
    outcomes = record["tests"]["outcomes"]
    assert outcomes == {"test_gpu_standin.py::test_passes": "PASSED", "test_gpu_standin.py::test_skipped": "SKIPPED",
                        "test_gpu_standin.py::test_waits": "CUT: budget",
                        "test_gpu_standin.py::test_after": "not run: budget"}
    # $OUT: few files, flat, names the device tool brings back
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["summary.txt", "gpu_check.json", "logs.tgz", "loss_bench-nvidia-h200.json",
                            "train_bench-nvidia-h200.json", "data_bench.json", "kernel_model.json"])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and (out / n).is_file() for n in names)
    # the summary prints last, and is the file in $OUT
    summary = (out / "summary.txt").read_text().strip()
    assert proc.stdout.rstrip().endswith(summary)
    assert summary.startswith("DRY RUN") and "SPEC 4 target" in summary
    assert "not run: budget (1): test_gpu_standin.py::test_after" in summary
    assert "loss-bench cut" in summary
    line = next(x for x in summary.splitlines() if x.startswith("triton: 2^20x7 bfloat16"))
    assert "not measured" in line and line.rstrip().endswith("72.0%")  # the fixture's prediction beside it
