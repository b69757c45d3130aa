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
