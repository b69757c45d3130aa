"""bench/train_bench.py --quick runs the ladder on the CPU and writes its JSON and chart."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import train_bench  # noqa: E402


@pytest.mark.slow
def test_quick_ladder_on_cpu(tmp_path, capsys):
    result = train_bench.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    rungs = [r["rung"] for r in result["rows"]]
    assert rungs == [0, 1, 2, 3, 4, 6]  # rung 5 (CUDA graph) needs a GPU
    for r in result["rows"]:
        assert r["samples_per_s"] > 0 and r["median_step_ms"] > 0
    assert next(r for r in result["rows"] if r["rung"] == 0)["x_rung0"] == 1.0
    assert next(r for r in result["rows"] if r["rung"] == 6)["fraction_of_ceiling"] == 1.0
    stem = f"train_bench-{result['device']}-quick"
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    assert "samples/s" in capsys.readouterr().out
