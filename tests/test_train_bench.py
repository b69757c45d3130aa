"""bench/train_bench.py --quick runs the ladder on the CPU and writes its JSON and chart."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_rungs_run_in_the_order_given_and_each_row_is_saved_as_it_comes(tmp_path):
    saved = []  # (rungs in the result) at each on_row call
    result = train_bench.run(train_bench.QUICK, torch.device("cpu"), lambda msg: None, rungs=[6, 0, 7],
                             epoch_rungs=[], on_row=lambda r: saved.append([row["rung"] for row in r["rows"]]))
    assert [r["rung"] for r in result["rows"]] == [6, 0]  # rung 7 needs CUDA: skipped on the CPU
    assert saved == [[6], [6, 0]]
    assert result["rows"][0]["x_rung0"] is not None  # ratios recomputed once rung 0 came
    assert result["rows"][1]["fraction_of_ceiling"] == result["rows"][1]["samples_per_s"] / result["rows"][0]["samples_per_s"]


def test_rung_lists_are_checked():
    assert train_bench.rung_list("0,6,7,8,5") == [0, 6, 7, 8, 5] and train_bench.rung_list("none") == []
    for bad in ("9", "0,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            train_bench.rung_list(bad)
    with pytest.raises(SystemExit):
        train_bench.main(["--epochs", "6"])  # rung 6 has no epoch


def test_ratios_to_a_rung_not_measured_are_empty():
    rows = [{"rung": 7, "samples_per_s": 6000.0}, {"rung": 6, "samples_per_s": 5000.0}]
    targets = train_bench.add_ratios(rows, {})
    assert rows[0]["x_rung0"] is None and rows[0]["fraction_of_compiled_ceiling"] is None
    assert rows[0]["fraction_of_ceiling"] == 1.2
    assert targets == {"trainer default (rung 7) / bare captured step (rung 6) (>= 1.15x (moonshot 1.30x))": 1.2}
    assert "   -" in train_bench.table({"device_name": "x", "versions": {"torch": "t"},
                                         "plan": {"batch": 32, "image_size": 224}, "epochs": {}, "targets": targets,
                                         "rows": [dict(r, name="r", peak_memory_mb=None) for r in rows]})


def test_ratios_and_targets_come_from_one_run():
    rows = [{"rung": 0, "samples_per_s": 1000.0}, {"rung": 0, "samples_per_s": 1100.0},
            {"rung": 5, "samples_per_s": 4800.0}, {"rung": 6, "samples_per_s": 5000.0},
            {"rung": 7, "samples_per_s": 6000.0}, {"rung": 8, "samples_per_s": 6400.0}]
    epochs = {"rung7": {"projected_60_epochs_min": 2.2}}
    targets = train_bench.add_ratios(rows, epochs)
    assert rows[1]["x_rung0"] == 1.1  # against the first rung-0 row (4 workers)
    assert rows[4]["fraction_of_ceiling"] == 6000 / 5000 and rows[4]["fraction_of_compiled_ceiling"] == 6000 / 6400
    assert targets == {"trainer default (rung 7) / bare captured step (rung 6) (>= 1.15x (moonshot 1.30x))": 1.2,
                       "trainer default (rung 7) / compiled bare captured step (rung 8) (>= 0.90x)": 0.9375,
                       "trainer default (rung 7) / reference-style loop (rung 0) (>= 6.00x)": 6.0,
                       "60 RAF-DB-shaped epochs, compile included (rung 7) (< 2.50 min)": 2.2}
    table = train_bench.table({"device_name": "x", "versions": {"torch": "t"}, "plan": {"batch": 32, "image_size": 224},
                               "rows": [dict(r, name=f"r{r['rung']}", peak_memory_mb=None) for r in rows],
                               "epochs": {}, "targets": targets})
    assert "target trainer default (rung 7) / bare captured step (rung 6) (>= 1.15x (moonshot 1.30x)): 1.200" in table
