"""The loss benchmark's baseline computes the same function, and --quick runs and writes its files."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nla_fast import NLAConfig
from nla_fast.reference import nla_loss_reference

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import loss_bench  # noqa: E402
from reference_style import reference_style_nla_loss  # noqa: E402


def test_reference_style_baseline_equals_official_preset():
    g = torch.Generator().manual_seed(1)
    z, zf = torch.randn(19, 7, generator=g) * 3, torch.randn(19, 7, generator=g)
    y = torch.randint(0, 7, (19,), generator=g)
    for eps in (0.0, 0.37, 1.0):
        expected = nla_loss_reference(z, zf, y, eps, NLAConfig.official())
        torch.testing.assert_close(reference_style_nla_loss(z, zf, y, eps), expected, rtol=1e-5, atol=1e-6)


def test_quick_run_writes_table_and_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    result = loss_bench.main(["--quick", "--device", "cpu", "--no-compile", "--out-dir", str(tmp_path)])
    files = sorted(tmp_path.iterdir(), key=lambda p: p.suffix)
    assert [p.suffix for p in files] == [".json", ".md"]
    assert all(p.stem.startswith("loss_bench-cpu") and p.stem.endswith("-quick") for p in files)
    data = json.loads(files[0].read_text())
    assert data["versions"]["torch"] == torch.__version__
    backends = {r["backend"] for r in data["rows"]}
    assert {"reference-style", "reference"} <= backends
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["bytes"] > 0
        if row["backend"] == "reference-style":
            assert row["speedup_vs_reference_style"] == 1.0
    out = capsys.readouterr().out
    assert "| B | C | dtype | mode | backend |" in out
    assert result["copy_bandwidth_gb_per_s"] > 0
    # the host bar (SPEC 4 CPU proxy): both rows, and the ratio computed from them (not a timing assertion)
    bar = data["host_bar"]
    host_rows = {r["backend"]: r for r in data["rows"] if r["mode"] == "fwd+bwd host, CPU, 1 thread"}
    assert set(host_rows) == {"two F.cross_entropy", "extension"}
    assert all((r["batch"], r["classes"]) == (32, 7) for r in host_rows.values())
    assert bar["threads"] == 1 and bar["calls_each"] >= 1000
    assert math.isclose(bar["two_cross_entropy_us"], host_rows["two F.cross_entropy"]["median_ms"] * 1e3, rel_tol=1e-12)
    assert math.isclose(bar["extension_us"], host_rows["extension"]["median_ms"] * 1e3, rel_tol=1e-12)
    assert bar["ratio"] == bar["extension_us"] / bar["two_cross_entropy_us"]
    key = "extension: host time / two F.cross_entropy, 32x7 CPU 1 thread (<= 1.0)"
    assert data["targets"][key] == bar["ratio"]
    assert f"ratio {bar['ratio']:.3f}" in out
    assert torch.get_num_threads() == threads  # the bar's one thread is not left behind


def test_targets_cover_both_fast_backends_eager_and_graph():
    """targets() on synthetic rows: every ratio SPEC 4 names, for both fast backends and their
    CUDA-graph rows, computed from the rows."""
    rows = []
    for backend, ms in (("reference-style", 4.0), ("reference+compile", 1.0), ("triton", 0.4), ("extension", 0.5),
                        ("triton graph", 0.01), ("extension graph", 0.02)):
        rows.append(loss_bench._row(32, 7, torch.float32, "fwd+bwd", backend, ms, 1000, 1.0,
                                    None if backend == "reference-style" else 4.0))
    for backend, ms in (("triton graph", 0.02), ("extension graph", 0.04)):
        rows.append(loss_bench._row(2**20, 7, torch.bfloat16, "fwd+bwd", backend, ms, 67_108_864, 4000.0, None))
    got = loss_bench.targets(rows, {"ratio": 0.9})
    for fast, ms in (("triton", 0.4), ("extension", 0.5), ("triton graph", 0.01), ("extension graph", 0.02)):
        assert got[f"{fast}: 32x7 speedup vs reference-style (>= 50)"] == 4.0 / ms
        assert got[f"{fast}: 32x7 speedup vs compiled reference (>= 3)"] == 1.0 / ms
    assert math.isclose(got["extension graph: 2^20x7 bf16 fraction of copy bandwidth (>= 0.70)"],
                        67_108_864 / 0.04 / 1e6 / 4000, rel_tol=1e-12)
    assert got["extension: host time / two F.cross_entropy, 32x7 CPU 1 thread (<= 1.0)"] == 0.9


def test_summary_renders_loss_rows(tmp_path, capsys):
    import summary

    result = loss_bench.main(["--quick", "--device", "cpu", "--no-compile", "--out-dir", str(tmp_path)])
    lines = summary.loss_lines(result)
    assert "loss_bench on" in lines[0]
    assert any("reference-style" in line and "1.0x" in line for line in lines[1:])
    capsys.readouterr()
    summary.main([str(tmp_path)])
    assert capsys.readouterr().out == ""  # quick results are not summarised as device figures


def test_gpu_check_script_parses():
    import subprocess

    script = BENCH.parent / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.slow
def test_cpu_thread_rows_give_the_issue_23_ratios():
    """The OpenMP rows of --quick: 1 and 2 threads at (2^20, 7) and (4096, 1000), the cross-entropy
    baseline at the wide shape, and the targets computed from those rows' medians (not a timing
    assertion)."""
    threads = torch.get_num_threads()
    out = loss_bench.cpu_thread_rows(quick=True)
    assert torch.get_num_threads() == threads
    counts = out["threads"]
    assert counts == ([1, 2] if loss_bench.usable_cpus() >= 2 else [1])
    rows = {(r["batch"], r["classes"], r["backend"], r["mode"]): r for r in out["rows"]}
    mode = {n: f"fwd+bwd, CPU, {n} thread{'s' * (n > 1)}" for n in counts}
    for n in counts:
        for key in ((2**20, 7, "extension"), (4096, 1000, "extension"), (4096, 1000, "two F.cross_entropy")):
            row = rows[(*key, mode[n])]
            assert row["median_ms"] > 0 and row["calls"] == out["calls_each"] and 0 <= row["quiet_calls"] <= row["calls"]
            assert row["median_over"] in ("quiet calls", "all calls")
        ratio = rows[(4096, 1000, "extension", mode[n])]["median_ms"] / rows[(4096, 1000, "two F.cross_entropy", mode[n])]["median_ms"]
        assert out["targets"][f"extension CPU: 4096x1000 fp32 fwd+bwd / two F.cross_entropy, {mode[n].split(', ')[-1]} (<= 1.0)"] == ratio
    if 2 in counts:
        speedup = rows[(2**20, 7, "extension", mode[1])]["median_ms"] / rows[(2**20, 7, "extension", mode[2])]["median_ms"]
        assert out["targets"]["extension CPU: 2^20x7 fp32 fwd+bwd, 1-thread / 2-thread time (>= 1.6)"] == speedup
