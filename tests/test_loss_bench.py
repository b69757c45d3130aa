"""The loss benchmark's baseline computes the same function, and --quick runs and writes its files."""
import argparse
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


@pytest.mark.slow
def test_quick_run_writes_table_and_json_after_every_row(tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    written = []  # (rows in the result, rows in the JSON on disk) after each write
    real_write = loss_bench.write

    def write(result, out_dir):
        paths = real_write(result, out_dir)
        written.append((len(result["rows"]), len(json.loads(paths[0].read_text())["rows"])))
        return paths

    monkeypatch.setattr(loss_bench, "write", write)
    result = loss_bench.main(["--quick", "--device", "cpu", "--no-compile", "--out-dir", str(tmp_path)])
    files = sorted(tmp_path.iterdir(), key=lambda p: p.suffix)
    assert [p.suffix for p in files] == [".json", ".md"]
    assert all(p.stem.startswith("loss_bench-cpu") and p.stem.endswith("-quick") for p in files)
    # the files are rewritten after every measured row: a run cut short keeps what it measured
    gpu_rows = [n for n, _ in written[:-2]]  # the last two writes: after the host bar, and main's own
    assert gpu_rows == list(range(1, len(gpu_rows) + 1)) and len(gpu_rows) >= 8
    assert all(in_result == on_disk for in_result, on_disk in written)
    data = json.loads(files[0].read_text())
    assert data["versions"]["torch"] == torch.__version__ and data["not_measured"] == []
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
    key = "extension: host time / two F.cross_entropy, 32x7 fwd+bwd, CPU 1 thread (<= 1.00x)"
    assert data["targets"][key] == bar["ratio"]
    assert f"ratio {bar['ratio']:.3f}" in out
    assert torch.get_num_threads() == threads  # the bar's one thread is not left behind


def test_time_cap_lists_every_row_it_did_not_start(tmp_path):
    """--time-cap 0: only the copy bandwidth is measured; every planned row of --targets is named
    as not measured (on the CPU: the extension's, the reference-style baseline's, the host bar)
    and the JSON is still written."""
    result = loss_bench.main(["--targets", "--device", "cpu", "--time-cap", "0", "--out-dir", str(tmp_path)])
    assert result["rows"] == [] and result["plan"] == "targets"
    assert result["not_measured"] == [
        "32x7 float32 fwd+bwd reference-style", "32x7 float32 fwd+bwd extension",
        "1048576x7 bfloat16 fwd+bwd extension", "1048576x7 float32 fwd+bwd extension",
        "4096x1000 bfloat16 fwd+bwd extension", "host bar"]
    saved = json.loads((tmp_path / f"loss_bench-{result['device']}.json").read_text())
    assert saved["not_measured"] == result["not_measured"] and saved["time_cap_s"] == 0
    assert "Not measured (time cap 0.0 s reached)" in (tmp_path / f"loss_bench-{result['device']}.md").read_text()


def test_targets_plan_is_the_spec_rows_in_order_of_value():
    cases = loss_bench.plan_cases(argparse.Namespace(targets=True, quick=False), torch.device("cuda"))
    assert [(c.batch, c.classes, c.dtype, c.mode) for c in cases] == [
        (32, 7, torch.float32, "fwd+bwd"), (2**20, 7, torch.bfloat16, "fwd+bwd"),
        (2**20, 7, torch.float32, "fwd+bwd"), (4096, 1000, torch.bfloat16, "fwd+bwd")]
    assert cases[0].backends == ("reference-style", "triton", "extension", "reference+compile")
    assert all(c.backends == ("triton", "extension") for c in cases[1:])  # no reference rows at large B


def test_targets_cover_both_fast_backends_and_every_bandwidth_shape():
    """targets() on synthetic rows: every ratio SPEC 4 names for both fast backends, computed from
    the rows; the bandwidth fraction from the graph-replayed (kernel-only) row when there is one."""
    rows = []
    for backend, ms in (("reference-style", 4.0), ("reference+compile", 1.0), ("triton", 0.4), ("extension", 0.5),
                        ("triton graph", 0.01), ("extension graph", 0.02)):
        rows.append(loss_bench._row(32, 7, torch.float32, "fwd+bwd", backend, ms, 1000, 1.0,
                                    None if backend == "reference-style" else 4.0))
    for batch, classes, dtype, nbytes in ((2**20, 7, torch.bfloat16, 67_108_864), (2**20, 7, torch.float32, 125_829_120),
                                          (4096, 1000, torch.bfloat16, 32_800_768)):
        for backend, ms in (("triton", 0.5), ("triton graph", 0.02), ("extension", 0.6), ("extension graph", 0.04)):
            rows.append(loss_bench._row(batch, classes, dtype, "fwd+bwd", backend, ms, nbytes, 4000.0, None))
    got = loss_bench.targets(rows, {"ratio": 0.9})
    for fast, ms in (("triton", 0.4), ("extension", 0.5)):
        assert got[f"{fast}: 32x7 fp32 fwd+bwd eager, x reference-style (>= 50.00x (moonshot 100.00x))"] == 4.0 / ms
        assert got[f"{fast}: 32x7 fp32 fwd+bwd eager, x compiled reference (>= 3.00x)"] == 1.0 / ms
    for shape, nbytes, bar in (("2^20x7 bfloat16", 67_108_864, ">= 70.0% (moonshot 85.0%)"),
                               ("2^20x7 float32", 125_829_120, ">= 50.0%"), ("4096x1000 bfloat16", 32_800_768, ">= 50.0%")):
        for fast, ms in (("triton", 0.02), ("extension", 0.04)):
            key = f"{fast}: {shape} fwd+bwd, fraction of copy bandwidth ({bar})"
            assert math.isclose(got[key], nbytes / ms / 1e6 / 4000, rel_tol=1e-12), key
    assert got["extension: host time / two F.cross_entropy, 32x7 fwd+bwd, CPU 1 thread (<= 1.00x)"] == 0.9
    assert len(got) == 4 + 6 + 1


def test_benchmark_output_stays_out_of_git_and_save_writes_a_dated_device_folder():
    import subprocess

    import result_files

    ignored = subprocess.run(["git", "check-ignore", "-q", str(result_files.SCRATCH / "loss_bench-x.json")],
                             cwd=BENCH.parent)
    assert ignored.returncode == 0, "bench/out/ must be ignored by git"
    parser = argparse.ArgumentParser()
    result_files.add_arguments(parser)
    assert result_files.output_dir(parser.parse_args([]), "nvidia-h200") == result_files.SCRATCH
    assert result_files.output_dir(parser.parse_args(["--save"]), "nvidia-h200", day="2026-12-01") == \
        BENCH / "results" / "2026-12-01-nvidia-h200"
    assert result_files.output_dir(parser.parse_args(["--out-dir", "x"]), "nvidia-h200") == Path("x")
    assert result_files.slug("NVIDIA H200 NVL") == "nvidia-h200-nvl"
    with pytest.raises(SystemExit):
        parser.parse_args(["--save", "--out-dir", "x"])


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
