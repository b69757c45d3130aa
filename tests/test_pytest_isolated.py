"""scripts/pytest_isolated.py: a test that kills the interpreter is named and the rest still run."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pytest_isolated.py"


def test_a_crashing_test_is_named_and_the_rest_run(tmp_path):
    (tmp_path / "test_demo.py").write_text(
        "import ctypes, pytest\n"
        "def test_first(): pass\n"
        "@pytest.mark.parametrize('x', [1, 2])\n"
        "def test_kernel(x):\n"
        "    if x == 1:\n"
        "        ctypes.string_at(0)  # segmentation fault\n"
        "def test_fails(): assert False\n"
        "def test_last(): pass\n"
    )
    out = subprocess.run([sys.executable, str(SCRIPT), "test_demo.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "CRASHED test_demo.py::test_kernel[1]" in out.stdout
    assert "test_demo.py::test_last PASSED" in out.stdout  # ran after the crash
    assert out.stdout.strip().splitlines()[-1] == "3 passed, 1 failed, 1 crashed, 0 skipped"


def test_all_passing_exits_zero(tmp_path):
    (tmp_path / "test_ok.py").write_text("def test_one(): pass\ndef test_two(): pass\n")
    out = subprocess.run([sys.executable, str(SCRIPT), "test_ok.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "2 passed, 0 failed, 0 crashed, 0 skipped"


@pytest.mark.slow
def test_budget_cuts_the_running_test_with_its_children_and_names_every_test_not_reached(tmp_path):
    import json
    import time

    (tmp_path / "test_budget.py").write_text(
        "import subprocess, sys, time\n"
        "def test_first(): pass\n"
        "def test_slow(tmp_path_factory):\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "    open('child.pid', 'w').write(str(child.pid))\n"
        "    time.sleep(60)\n"
        "def test_after(): pass\n"
        "def test_last(): pass\n"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(SCRIPT), "--budget-s", "6", "--report", "report.json", "test_budget.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 30, "the budget did not stop the run"
    assert out.returncode == 1, out.stdout + out.stderr
    assert "CUT: budget test_budget.py::test_slow" in out.stdout
    assert "not run: budget test_budget.py::test_after" in out.stdout
    assert "not run: budget test_budget.py::test_last" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "1 passed, 0 failed, 0 crashed, 0 skipped, 1 cut, 2 not run: budget"
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["seconds"]) == {"test_budget.py::test_first"}  # the tests that finished, timed
    assert report["outcomes"] == {"test_budget.py::test_first": "PASSED", "test_budget.py::test_slow": "CUT: budget",
                                  "test_budget.py::test_after": "not run: budget",
                                  "test_budget.py::test_last": "not run: budget"}
    child = int((tmp_path / "child.pid").read_text())
    time.sleep(0.2)
    try:  # the test's own child process was stopped with it (a zombie would have no cmdline)
        alive = bool(open(f"/proc/{child}/cmdline").read())
    except OSError:
        alive = False
    assert not alive, "a child of the cut test still runs"
