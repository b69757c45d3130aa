"""Run pytest so that a test which kills the interpreter (a segfault in a kernel) is named and
the tests after it still run, within an optional time budget.

    python scripts/pytest_isolated.py -m gpu                          # any pytest selection arguments
    python scripts/pytest_isolated.py --budget-s 200 --report r.json -m gpu

The selected tests are collected once, then run in one pytest process. When that process dies
without finishing (killed by a signal, or an exit code pytest never gives), the test it was
running is the last one it announced: it is recorded as CRASHED and a new process runs the
tests after it. With ``--budget-s``, when the budget (counted from the start, collection
included) runs out, pytest and its children are stopped: the test it was running is named
"CUT: budget" and every test not reached "not run: budget". ``--report`` writes every test's
outcome as JSON. The closing line reads like pytest's: "N passed, N failed, N crashed, N
skipped" (then ", N cut, N not run: budget" when the budget ran out). Exit code 0 only when
every test passed or was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

from child_process import stop_group
from stdlib_atomic import atomic

PYTEST_EXIT_CODES = {0, 1, 2, 3, 4, 5}  # ok, failed, interrupted, internal error, usage, none collected
RESULT = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
CUT, NOT_RUN = "CUT: budget", "not run: budget"


def collect(args: list[str], deadline: float | None = None) -> list[str]:
    timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"pytest_isolated: collection did not finish within the budget ({timeout:.0f} s left)")
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if out.returncode not in (0, 5):
        sys.stdout.write(out.stdout + out.stderr)
        raise SystemExit(f"pytest_isolated: collection failed (exit code {out.returncode})")
    return ids


def run(ids: list[str], deadline: float | None = None, seconds: dict | None = None
        ) -> tuple[int, dict[str, str], str | None, bool]:
    """One pytest process over ``ids``: (exit code, {test: outcome}, the test it died in or was
    cut in (or None), whether the budget ran out). ``seconds`` gets each test's wall time (from
    the previous test's end: the first one's includes pytest's start-up)."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", *ids]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, process_group=0)
    out_of_time = threading.Event()
    watchdog = None
    if deadline is not None:
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: (out_of_time.set(), stop_group(proc)))
        watchdog.start()
    outcomes: dict[str, str] = {}
    announced = None  # pytest -v writes a test's id before running it and its outcome after
    last = time.monotonic()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            match = RESULT.match(line)
            if match:
                outcomes[match.group(1)] = match.group(2)
                announced = None
                if seconds is not None:
                    seconds[match.group(1)], last = time.monotonic() - last, time.monotonic()
            else:
                head = line.split(" ", 1)[0].strip()
                if head in ids and head not in outcomes:
                    announced = head
        code = proc.wait()
    except KeyboardInterrupt:  # pytest runs in its own process group: Ctrl-C reaches only us
        stop_group(proc)
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if out_of_time.is_set():
        return code, outcomes, announced, True
    crashed = None
    if code not in PYTEST_EXIT_CODES:
        crashed = announced or next((i for i in ids if i not in outcomes), None)
    return code, outcomes, crashed, False


def run_all(ids: list[str], deadline: float | None, seconds: dict | None = None) -> dict[str, str]:
    """Every test's outcome: a crash starts a new process after the crashing test; the budget's
    end names the test it cut and every test it never reached."""
    outcomes: dict[str, str] = {}
    remaining = ids
    while remaining:
        code, done, stopped_in, out_of_time = run(remaining, deadline, seconds)
        outcomes.update(done)
        if out_of_time:
            if stopped_in is not None:
                outcomes[stopped_in] = CUT
            outcomes.update({i: NOT_RUN for i in remaining if i not in outcomes})
            print(f"\npytest_isolated: the budget ran out (exit code {code})", flush=True)
            break
        if stopped_in is None:
            break
        outcomes[stopped_in] = "CRASHED"
        print(f"\npytest_isolated: {stopped_in} killed the interpreter (exit code {code}); "
              "running the tests after it in a new process", flush=True)
        remaining = [i for i in remaining if i not in outcomes]
    return outcomes


def closing_line(outcomes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    line = (f"{counts.get('PASSED', 0)} passed, {counts.get('FAILED', 0) + counts.get('ERROR', 0)} failed, "
            f"{counts.get('CRASHED', 0)} crashed, {counts.get('SKIPPED', 0)} skipped")
    if counts.get(CUT) or counts.get(NOT_RUN):
        line += f", {counts.get(CUT, 0)} cut, {counts.get(NOT_RUN, 0)} not run: budget"
    return line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--report", default=None)
    options, args = parser.parse_known_args(argv)
    deadline = None if options.budget_s is None else time.monotonic() + options.budget_s
    ids = collect(args, deadline)
    seconds: dict[str, float] = {}
    outcomes = run_all(ids, deadline, seconds)
    for outcome in ("CRASHED", CUT, NOT_RUN):
        for test in [i for i, o in outcomes.items() if o == outcome]:
            print(f"{outcome} {test}")
    line = closing_line(outcomes)
    print(line)
    missing = [i for i in ids if i not in outcomes]
    if missing:
        print(f"pytest_isolated: {len(missing)} tests never reported (first: {missing[0]})")
    if options.report:
        atomic.write_text(options.report, json.dumps({"outcomes": {i: outcomes.get(i, "never reported") for i in ids},
                                                      "seconds": seconds, "summary": line,
                                                      "budget_s": options.budget_s}, indent=1))
    good = {"PASSED", "SKIPPED", "XFAIL"}
    return 1 if missing or any(o not in good for o in outcomes.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
