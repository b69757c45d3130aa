"""The loss benchmark's baseline computes the same function, and --quick runs and writes its files."""
import json
import sys
from pathlib import Path

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
    assert "| B | C | dtype | mode | backend |" in capsys.readouterr().out
    assert result["copy_bandwidth_gb_per_s"] > 0


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
