"""make gpu-check: every SPEC 4 figure from one short call on a GPU machine, under one deadline.

    python3 scripts/gpu_check.py                 # on the GPU machine (what `make gpu-check` runs)
    python3 scripts/gpu_check.py --dry-run       # anywhere: the real plumbing, GPU steps replaced by stand-ins
    python3 scripts/gpu_check.py --budget-s 400 --cap train-bench=150

Steps, in order of value; each is cut at its cap or at what is left of the budget (default
510 s from the start, the last 10 s kept for the summary and the copies), and the next one runs
after a step fails or is cut:

  device           nvidia-smi and the versions (device.json)
  install          pip install --no-deps --no-build-isolation -e .  (this machine's python3 as it is)
  build-extension  the C++/CUDA extension (the loss bench needs it)
  kernel-model     bench/kernel_model.py --reuse-saved: the static predictions (no GPU; the saved ones, seconds);
                   skipped when the file is absent, and its failure stops nothing
  loss-bench       bench/loss_bench.py --targets --time-cap: SPEC 4's loss rows and their
                   kernel-only (CUDA-graph replay) rows, then the host bar
  train-bench      bench/train_bench.py --rungs 0,6,7,8,5 --epochs 7
  data-bench       bench/data_bench.py --device cuda
  gpu-tests        scripts/pytest_isolated.py -m gpu with whatever time is left: the test it is
                   running when the budget ends is named "CUT: budget", every test not reached
                   "not run: budget"

Every benchmark rewrites its JSON after each row, so a cut step keeps what it measured. One
Inductor cache (in the run folder) serves every step: a compile one step did is not repeated
by the next, and the first compile of the run is cold, as on a user's first run. Each step's
time is printed as it ends; the summary (bench/summary.py: every SPEC 4 target, judged, with
the kernel model's prediction beside it) prints last.

Files: the run folder (``--work-dir``, default bench/out/gpu-check-<time>/, ignored by git)
holds results/ (the benchmarks' JSON, device.json, gpu_tests.json, gpu_check.json,
summary.txt), logs/ (one log per step) and the Inductor cache. When $OUT is set (the device
tool brings back at most 8 files), after every step $OUT receives summary.txt, gpu_check.json,
logs.tgz and the benchmark JSONs, at most 7 files, so a call cut from outside still returns
what was measured. The driver imports no torch: it runs before the install step, and in the
dry run (``--dry-run`` or GPU_CHECK_DRY_RUN=1) each step's command is replaced by its stand-in
(scripts/gpu_check_standins.py: recorded results replayed row by row, a small test file run by
the real test runner), everything else is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from child_process import stop_group
from stdlib_atomic import atomic

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 510.0
RESERVE_S = 10.0  # kept at the end for the summary and the copies to $OUT
MIN_STEP_S = 5.0  # a step is not started with less than this left
POLL_S = 0.2
MIRROR_EVERY_S = 2.0
PRODUCTS = ("summary.txt", "gpu_check.json", "loss_bench-*.json", "train_bench-*.json", "data_bench.json",
            "kernel_model.json")  # with logs.tgz: 7 files, under the device tool's 8
OUT_FILE_LIMIT = 8


@dataclass
class Context:
    python: str
    work: Path
    deadline: float  # time.monotonic() at which the budget ends
    dry_run: bool = False
    caps: dict = field(default_factory=dict)
    stand_in_delays: dict = field(default_factory=dict)
    out: Path | None = None

    @property
    def results(self) -> Path:
        return self.work / "results"

    @property
    def logs(self) -> Path:
        return self.work / "logs"


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float
    command: Callable[[Context, float], list[str]]  # (context, time limit) -> argv
    needs: str | None = None  # a file the real command needs (relative to the repository); absent: skipped


STEPS = (
    Step("device", 60, lambda c, t: [c.python, "scripts/device_info.py", str(c.results / "device.json")]),
    Step("install", 90, lambda c, t: [c.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                                      "-e", str(ROOT)]),
    Step("build-extension", 240, lambda c, t: [
        c.python, "-c", "import torch; from nla_fast import extension as e; r = e.unavailable_reason(torch.device("
                        "'cuda')); print(r or 'extension built'); raise SystemExit(1 if r else 0)"]),
    # the prediction saved with these sources (committed, made on a CPU) when there is one, else sm_90 only
    Step("kernel-model", 120, lambda c, t: [c.python, "bench/kernel_model.py", "--reuse-saved", "--arch", "90",
                                            "--out-dir", str(c.results)], needs="bench/kernel_model.py"),
    Step("loss-bench", 110, lambda c, t: [c.python, "bench/loss_bench.py", "--targets", "--time-cap",
                                          f"{max(1.0, min(90.0, t - 15)):.0f}", "--out-dir", str(c.results)]),
    Step("train-bench", 200, lambda c, t: [c.python, "bench/train_bench.py", "--rungs", "0,6,7,8,5", "--epochs", "7",
                                           "--no-plot", "--out-dir", str(c.results)]),
    Step("data-bench", 60, lambda c, t: [c.python, "bench/data_bench.py", "--device", "cuda", "--out",
                                         str(c.results / "data_bench.json")]),
    Step("gpu-tests", 600, lambda c, t: [c.python, "scripts/pytest_isolated.py", "--budget-s", f"{runner_budget(t):.1f}",
                                         "--report", str(c.results / "gpu_tests.json"), "-m", "gpu"]),
)


def runner_budget(limit: float) -> float:
    """The test runner stops itself this long into the step, before the driver would cut it, so
    it names the tests it did not reach."""
    return max(1.0, limit - min(8.0, 0.2 * limit))


def stand_in_command(step: Step, ctx: Context, limit: float) -> list[str]:
    argv = [ctx.python, str(ROOT / "scripts" / "gpu_check_standins.py"), step.name, "--results", str(ctx.results),
            "--work", str(ctx.work), "--budget-s", f"{runner_budget(limit):.2f}"]
    if step.name in ctx.stand_in_delays:
        argv += ["--delay", str(ctx.stand_in_delays[step.name])]
    return argv


def step_environment(ctx: Context) -> dict:
    env = dict(os.environ)
    env.pop("OUT", None)  # the benchmarks' own copies under $OUT would pass the device tool's 8 files
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(ctx.work / "inductor")  # one cache for every step of this run
    return env


def run_step(argv: list[str], limit: float, log_path: Path, env: dict, tick: Callable[[], None]) -> dict:
    """Run ``argv`` (output to ``log_path``) for at most ``limit`` seconds: {status, seconds, rc}."""
    t0 = time.monotonic()
    cut = False
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, process_group=0)
        except OSError as err:
            log.write(f"could not start: {err}\n".encode())
            return {"status": "failed", "seconds": time.monotonic() - t0, "rc": None}
        try:
            while True:
                try:
                    proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    tick()
                    if time.monotonic() - t0 >= limit:
                        cut = True
                        stop_group(proc)
                        break
        except BaseException:  # Ctrl-C or SIGTERM of the driver: the step does not outlive it
            stop_group(proc)
            raise
    rc = proc.returncode
    status = "cut" if cut else ("ok" if rc == 0 else "failed")
    return {"status": status, "seconds": time.monotonic() - t0, "rc": rc}


def plan_step(step: Step, ctx: Context) -> tuple[float, str | None]:
    """(time limit, None) for a step to run, or (0, why it is skipped)."""
    left = ctx.deadline - time.monotonic() - RESERVE_S
    if step.needs and not ctx.dry_run and not (ROOT / step.needs).is_file():
        return 0.0, f"skipped: {step.needs} is not in this checkout"
    if left < MIN_STEP_S:
        return 0.0, f"skipped: budget spent ({max(0.0, left):.0f} s left)"
    return min(float(ctx.caps.get(step.name, step.cap_s)), left), None


def run_check(steps, ctx: Context, record: dict, after_step: Callable[[], None], tick: Callable[[], None]) -> None:
    """Every step in order; ``record['steps']`` gets one entry each, ``after_step()`` after each."""
    env = step_environment(ctx)
    for step in steps:
        limit, skipped = plan_step(step, ctx)
        if skipped:
            entry = {"name": step.name, "status": skipped, "seconds": 0.0, "limit_s": 0.0, "rc": None}
        else:
            print(f"[gpu-check] {step.name}: up to {limit:.0f} s ({ctx.deadline - time.monotonic():.0f} s of the "
                  f"budget left)", flush=True)
            argv = stand_in_command(step, ctx, limit) if ctx.dry_run else step.command(ctx, limit)
            entry = {"name": step.name, **run_step(argv, limit, ctx.logs / f"{step.name}.log", env, tick),
                     "limit_s": limit}
        record["steps"].append(entry)
        print(f"[gpu-check] {step_line(entry)}", flush=True)
        if entry["status"] in ("failed", "cut"):
            print(log_tail(ctx.logs / f"{step.name}.log"), flush=True)
        after_step()


def step_line(entry: dict) -> str:
    if entry["status"].startswith("skipped"):
        return f"{entry['name']}: {entry['status']}"
    detail = {"ok": "", "cut": f" (cut at its limit of {entry['limit_s']:.0f} s)",
              "failed": f" (exit code {entry['rc']})"}[entry["status"]]
    return f"{entry['name']}: {entry['status']} in {entry['seconds']:.1f} s{detail}"


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text[-lines:])


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def render_summary(results: Path) -> str:
    """bench/summary.py's table; an error in it is reported in its place, never fatal."""
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        import summary

        return summary.render(results)
    except Exception as err:  # noqa: BLE001 - the check's files still go out without a summary
        return f"summary failed: {type(err).__name__}: {err}"


def write_outputs(ctx: Context, record: dict) -> str:
    """gpu_check.json, summary.txt and logs.tgz from the state so far; returns the summary."""
    record["device"] = read_json(ctx.results / "device.json")
    record["tests"] = read_json(ctx.results / "gpu_tests.json")
    atomic.write_text(ctx.results / "gpu_check.json", json.dumps(record, indent=1))  # the summary reads it
    text = render_summary(ctx.results)
    atomic.write_text(ctx.results / "summary.txt", text + "\n")
    with atomic.target(ctx.work / "logs.tgz") as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(ctx.logs, arcname="logs")
    return text


def out_files(ctx: Context) -> list[Path]:
    """What goes to $OUT: the products present, newest first, at most the device tool's 8 files."""
    files = [ctx.work / "logs.tgz"] if (ctx.work / "logs.tgz").is_file() else []
    for pattern in PRODUCTS:
        files += sorted(ctx.results.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)[:1]
    return files[:OUT_FILE_LIMIT]


class Mirror:
    """Copies the products to $OUT when they changed, at most every MIRROR_EVERY_S during a step."""

    def __init__(self, ctx: Context):
        self.ctx, self.seen, self.last = ctx, {}, 0.0

    def __call__(self, force: bool = False) -> None:
        if self.ctx.out is None or (not force and time.monotonic() - self.last < MIRROR_EVERY_S):
            return
        self.last = time.monotonic()
        for path in out_files(self.ctx):
            stamp = path.stat()
            key = (stamp.st_mtime_ns, stamp.st_size)
            if self.seen.get(path.name) != key:
                atomic.copy(path, self.ctx.out / path.name)
                self.seen[path.name] = key


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"the whole check's deadline (default {BUDGET_S:.0f})")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                        help="stand-ins for the GPU steps (also GPU_CHECK_DRY_RUN=1)")
    parser.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                        help="a step's own time limit, e.g. train-bench=150 (repeatable)")
    parser.add_argument("--stand-in-delay", action="append", default=[], metavar="STEP=SECONDS",
                        help="dry run: seconds a stand-in waits after each row (tests cut steps with it)")
    parser.add_argument("--work-dir", type=Path, default=None, help="the run folder (default bench/out/gpu-check-<time>)")
    args = parser.parse_args(argv)
    names = {s.name for s in STEPS}
    for option in ("cap", "stand_in_delay"):
        pairs = {}
        for item in getattr(args, option):
            name, _, seconds = item.partition("=")
            try:
                pairs[name] = float(seconds)
            except ValueError:
                parser.error(f"--{option.replace('_', '-')} {item!r}: expected STEP=SECONDS")
            if name not in names:
                parser.error(f"--{option.replace('_', '-')} {item!r}: no step {name!r} (steps: {', '.join(names)})")
        setattr(args, option, pairs)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    work = args.work_dir or ROOT / "bench" / "out" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    ctx = Context(sys.executable, work.resolve(), start + args.budget_s, args.dry_run, args.cap, args.stand_in_delay,
                  out)
    for folder in (ctx.results, ctx.logs, *([out] if out else [])):
        folder.mkdir(parents=True, exist_ok=True)
    record = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s,
              "work_dir": str(ctx.work), "inductor_cache": str(ctx.work / "inductor"), "steps": [], "finished": False}
    mirror = Mirror(ctx)
    print(f"[gpu-check] {'DRY RUN, stand-ins for the GPU steps; ' if args.dry_run else ''}budget {args.budget_s:.0f} s; "
          f"run folder {ctx.work}", flush=True)

    def after_step():
        write_outputs(ctx, record)
        mirror(force=True)

    try:
        run_check(STEPS, ctx, record, after_step, mirror)
    finally:
        record["finished"] = True
        record["seconds"] = time.monotonic() - start
        summary_text = write_outputs(ctx, record)
        mirror(force=True)
    print("\n=== steps ===")
    print("\n".join(step_line(entry) for entry in record["steps"]))
    print(f"total {record['seconds']:.0f} s of {args.budget_s:.0f}; files in {ctx.results}"
          + (f"; copied to $OUT: {', '.join(p.name for p in out_files(ctx))}" if out else ""))
    print("\n=== summary ===")
    print(summary_text)
    return 0 if all(entry["status"] == "ok" or "not in this checkout" in entry["status"]
                    for entry in record["steps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
