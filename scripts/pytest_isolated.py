"""Run pytest so that a test which kills the interpreter (a segfault in a kernel) is named and
the tests after it still run.

    python scripts/pytest_isolated.py -m gpu            # any pytest selection arguments

The selected tests are collected once, then run in one pytest process. When that process dies
without finishing (killed by a signal, or an exit code pytest never gives), the test it was
running is the last one it announced: it is recorded as CRASHED and a new process runs the
tests after it. The closing line reads like pytest's: "N passed, N failed, N crashed".
Exit code 0 only when every test passed or was skipped.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

PYTEST_EXIT_CODES = {0, 1, 2, 3, 4, 5}  # ok, failed, interrupted, internal error, usage, none collected
RESULT = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def collect(args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if out.returncode not in (0, 5):
        sys.stdout.write(out.stdout + out.stderr)
        raise SystemExit(f"pytest_isolated: collection failed (exit code {out.returncode})")
    return ids


def run(ids: list[str]) -> tuple[int, dict[str, str], str | None]:
    """One pytest process over ``ids``: (exit code, {test: outcome}, the test it died in or None)."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", *ids]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    outcomes: dict[str, str] = {}
    announced = None  # pytest -v writes a test's id before running it and its outcome after
    for line in proc.stdout:
        sys.stdout.write(line)
        match = RESULT.match(line)
        if match:
            outcomes[match.group(1)] = match.group(2)
            announced = None
        else:
            head = line.split(" ", 1)[0].strip()
            if head in ids and head not in outcomes:
                announced = head
    code = proc.wait()
    crashed = None
    if code not in PYTEST_EXIT_CODES:
        crashed = announced or next((i for i in ids if i not in outcomes), None)
    return code, outcomes, crashed


def main(args: list[str]) -> int:
    ids = collect(args)
    outcomes: dict[str, str] = {}
    remaining = ids
    while remaining:
        code, done, crashed = run(remaining)
        outcomes.update(done)
        if crashed is None:
            break
        outcomes[crashed] = "CRASHED"
        print(f"\npytest_isolated: {crashed} killed the interpreter (exit code {code}); "
              "running the tests after it in a new process", flush=True)
        remaining = [i for i in remaining if i not in outcomes]
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    crashed = [i for i, o in outcomes.items() if o == "CRASHED"]
    for test in crashed:
        print(f"CRASHED {test}")
    print(f"{counts.get('PASSED', 0)} passed, {counts.get('FAILED', 0) + counts.get('ERROR', 0)} failed, "
          f"{len(crashed)} crashed, {counts.get('SKIPPED', 0)} skipped")
    bad = counts.get("FAILED", 0) + counts.get("ERROR", 0) + len(crashed) + counts.get("XPASS", 0)
    missing = [i for i in ids if i not in outcomes]
    if missing:
        print(f"pytest_isolated: {len(missing)} tests never reported (first: {missing[0]})")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
