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
    assert rungs == [0, 1, 2, 3, 4, 6]  # rungs 5, 7, 8 (CUDA graph, compiled) need a GPU
    assert result["targets"] == {} and all(r["fraction_of_compiled_ceiling"] is None for r in result["rows"])
    for r in result["rows"]:
        assert r["samples_per_s"] > 0 and r["median_step_ms"] > 0
    assert next(r for r in result["rows"] if r["rung"] == 0)["x_rung0"] == 1.0
    assert next(r for r in result["rows"] if r["rung"] == 6)["fraction_of_ceiling"] == 1.0
    stem = f"train_bench-{result['device']}-quick"
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    assert "samples/s" in capsys.readouterr().out


def test_ratios_and_targets_come_from_one_run():
    rows = [{"rung": 0, "samples_per_s": 1000.0}, {"rung": 0, "samples_per_s": 1100.0},
            {"rung": 5, "samples_per_s": 4800.0}, {"rung": 6, "samples_per_s": 5000.0},
            {"rung": 7, "samples_per_s": 6000.0}, {"rung": 8, "samples_per_s": 6400.0}]
    epochs = {"rung7": {"projected_60_epochs_min": 2.2}}
    targets = train_bench.add_ratios(rows, epochs)
    assert rows[1]["x_rung0"] == 1.1  # against the first rung-0 row (4 workers)
    assert rows[4]["fraction_of_ceiling"] == 6000 / 5000 and rows[4]["fraction_of_compiled_ceiling"] == 6000 / 6400
    assert targets == {"rung7_x_rung6 (>= 1.15, moonshot 1.3)": 1.2, "rung7_of_compiled_ceiling (>= 0.90)": 0.9375,
                       "rung7_x_rung0 (>= 6)": 6.0, "rung7_60_epochs_min_compile_included (< 2.5)": 2.2}
    table = train_bench.table({"device_name": "x", "versions": {"torch": "t"}, "plan": {"batch": 32, "image_size": 224},
                               "rows": [dict(r, name=f"r{r['rung']}", peak_memory_mb=None) for r in rows],
                               "epochs": {}, "targets": targets})
    assert "target rung7_x_rung6 (>= 1.15, moonshot 1.3): 1.200" in table
