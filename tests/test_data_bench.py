"""bench/data_bench.py --quick runs on the CPU and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_bench_quick(tmp_path):
    out = tmp_path / "data_bench_quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data_bench.py"), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "NLA_FAST_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    for key in ("device", "torch", "figures", "targets", "wall_s"):
        assert key in res
    fig = res["figures"]
    assert fig["cpu_ours_b32_samples_per_s"] > 0 and fig["cpu_dataloader_w2_samples_per_s"] > 0
    assert res["targets"]["cpu_speedup_vs_best_dataloader"] > 0
    assert "cpu_ours_b32_samples_per_s" in proc.stdout  # the table


def test_targets_come_from_whatever_figures_are_measured():
    """The JSON is rewritten after every figure: its targets are the ratios those figures allow."""
    sys.path.insert(0, str(ROOT / "bench"))
    import data_bench

    fig = {"cuda_dataloader_w4_samples_per_s": 800.0}
    assert data_bench.targets(fig, ["cuda"], [4, 12], 32) == {}
    fig |= {"cuda_dataloader_w12_samples_per_s": 1000.0, "cuda_ours_b32_samples_per_s": 25000.0,
            "cuda_ours_b32_ms_per_batch": 1.0}
    assert data_bench.targets(fig, ["cuda"], [4, 12], 32) == {
        "cuda_speedup_vs_best_dataloader": 25.0, "cuda_speedup_vs_best_dataloader_ge_20x": True}
    fig |= {"cuda_ours_graph_b32_ms_per_batch": 0.25, "cuda_train_step_b32_eager_ms": 10.0,
            "cuda_train_step_b32_graph_ms": 5.0, "cuda_rafdb_cache_bytes_measured": 460170240}
    got = data_bench.targets(fig, ["cuda"], [4, 12], 32)
    assert got["cuda_aug_fraction_of_eager_step"] == 0.1 and got["cuda_graph_aug_fraction_of_graph_step"] == 0.05
    assert got["cuda_aug_under_10pct_of_step"] is True and got["cuda_rafdb_cache_le_0.5GB"] is True


@pytest.mark.slow
def test_cache_bench_reports_time_and_peak_memory_per_build(tmp_path):
    out = tmp_path / "cache_bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cache_bench.py"), "--quick", "--images", "120", "--photos", "8",
         "--cache-size", "48", "--workers", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["device"] and res["torch"] and res["cache_size"] == 48
    rows = {(r["images"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {(120, "streamed"), (120, "in-memory")}
    for row in rows.values():
        assert row["ms_per_image"] > 0 and row["peak_rss_growth_mib"] is not None
    assert rows[(120, "streamed")]["file_gb"] * 1e9 >= 120 * 48 * 48 * 3
    assert isinstance(res["jpeg_draft"]["within_tolerance"], bool)
    assert "peak MiB" in proc.stdout and "JPEG draft decoding" in proc.stdout  # the table
