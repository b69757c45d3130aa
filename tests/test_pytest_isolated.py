"""scripts/pytest_isolated.py: a test that kills the interpreter is named and the rest still run."""
import subprocess
import sys
from pathlib import Path

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
