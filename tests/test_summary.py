"""bench/summary.py and bench/spec_targets.py: every SPEC 4 target is one row, judged from the
benchmark JSON, with the kernel model's prediction (tests/fixtures/kernel_model.json, invented
values in its schema) beside it."""
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "kernel_model.json"
sys.path.insert(0, str(ROOT / "bench"))

import spec_targets  # noqa: E402
import summary  # noqa: E402

BW = 4000.0  # GB/s


def counted_bytes(batch, classes, dtype):  # both logits read, both gradients written, the targets read
    return 4 * batch * classes * (2 if dtype == "bfloat16" else 4) + 8 * batch


def loss_row(batch, classes, dtype, backend, ms, mode="fwd+bwd"):
    nbytes = counted_bytes(batch, classes, dtype)
    return {"batch": batch, "classes": classes, "dtype": dtype, "mode": mode, "backend": backend, "median_ms": ms,
            "bytes": nbytes, "gb_per_s": nbytes / ms / 1e6, "fraction_of_copy_bw": nbytes / ms / 1e6 / BW,
            "speedup_vs_reference_style": None}


def loss_result(graph=True, **extra):
    rows = [loss_row(32, 7, "float32", name, ms) for name, ms in
            (("reference-style", 4.0), ("triton", 0.05), ("extension", 0.1), ("reference+compile", 1.0))]
    if graph:
        rows += [loss_row(32, 7, "float32", "triton graph", 0.005), loss_row(32, 7, "float32", "extension graph", 0.007)]
    for batch, classes, dtype in ((2**20, 7, "bfloat16"), (2**20, 7, "float32"), (4096, 1000, "bfloat16")):
        floor_ms = counted_bytes(batch, classes, dtype) / BW / 1e6
        rows += [loss_row(batch, classes, dtype, "triton", 0.4), loss_row(batch, classes, dtype, "extension", 0.5)]
        if graph:  # triton at 80% of copy bandwidth, the extension at 40%
            rows += [loss_row(batch, classes, dtype, "triton graph", floor_ms / 0.8),
                     loss_row(batch, classes, dtype, "extension graph", floor_ms / 0.4)]
    return {"benchmark": "loss_bench", "device": "nvidia-h200", "device_name": "NVIDIA H200", "arch": 90,
            "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.3", "cuda": "13.0"},
            "quick": False, "copy_bandwidth_gb_per_s": BW, "time": "2026-12-01 10:00:00", "rows": rows,
            "host_bar": {"ratio": 0.9}, **extra}


def train_result():
    rows = [{"rung": r, "name": f"rung {r}", "samples_per_s": s} for r, s in
            ((0, 1000.0), (0, 1100.0), (6, 5000.0), (7, 6000.0), (8, 6400.0), (5, 4800.0))]
    rows[3].update(compiled=True, first_step_s=30.0)
    return {"benchmark": "train_bench", "device_name": "NVIDIA H200", "quick": False,
            "plan": {"batch": 32, "image_size": 224}, "rows": rows,
            "epochs": {"rung7": {"epoch_s": 2.2, "compile_s": 40.0, "projected_60_epochs_min": 2.87}}}


def by_what(judged):
    return {j.what: j for j in judged}


def test_loss_targets_judge_the_kernel_only_row_and_read_the_matching_prediction():
    model = json.loads(FIXTURE.read_text())
    got = by_what(spec_targets.loss_targets(loss_result(), model, arch=90))
    speed = got["triton: 32x7 fp32 fwd+bwd eager, x reference-style"]
    assert speed.value == 80.0 and speed.status == "pass" and speed.kernel_only_us == 5.0
    assert speed.predicted == "5.0 us"
    assert got["extension: 32x7 fp32 fwd+bwd eager, x reference-style"].status == "FAIL"  # 40x < 50x
    assert got["extension: 32x7 fp32 fwd+bwd eager, x compiled reference"].value == 10.0
    bw = got["triton: 2^20x7 bfloat16 fwd+bwd, fraction of copy bandwidth"]
    assert bw.value == pytest.approx(0.8) and bw.status == "pass" and bw.predicted == "72.0%"  # the sm_90 row, not sm_80's
    ext = got["extension: 4096x1000 bfloat16 fwd+bwd, fraction of copy bandwidth"]
    assert ext.value == pytest.approx(0.4) and ext.status == "FAIL" and ext.predicted == "48.0%"
    assert len(got) == 10


def test_without_graph_rows_the_eager_call_is_judged_and_said_so():
    got = by_what(spec_targets.loss_targets(loss_result(graph=False)))
    bw = got["triton: 2^20x7 float32 fwd+bwd, fraction of copy bandwidth"]
    assert bw.value == pytest.approx(counted_bytes(2**20, 7, "float32") / 0.4 / 1e6 / BW) and bw.kernel_only_us is None
    assert "eager call" in bw.note and bw.predicted is None
    assert spec_targets.loss_targets(None)[0].status == "not measured"


def test_cpu_every_core_target_reads_the_worst_mode_and_ignores_the_one_thread_bar():
    rows = [loss_row(4096, 1000, "float32", b, ms, mode=m) for b, ms, m in (
        ("two F.cross_entropy", 2.0, "fwd+bwd, CPU 16 threads"), ("extension", 1.5, "fwd+bwd, CPU 16 threads"),
        ("two F.cross_entropy", 1.0, "fwd, CPU 16 threads"), ("extension", 1.2, "fwd, CPU 16 threads"),
        ("two F.cross_entropy", 1.0, "fwd+bwd host, CPU, 1 thread"), ("extension", 9.0, "fwd+bwd host, CPU, 1 thread"))]
    assert spec_targets.cpu_threads_ratio(rows) == (1.2, "fwd, CPU 16 threads")


def test_static_targets_from_the_kernel_model():
    got = by_what(spec_targets.static_targets(json.loads(FIXTURE.read_text()), arch=90))
    assert got["triton: 2^20x7 bf16 predicted fraction of copy bandwidth (sm_90)"].value == 0.72
    assert got["extension: 2^20x7 bf16 predicted fraction of copy bandwidth (sm_90)"].status == "FAIL"
    instructions = got["warp-instructions per row at C=7, large batch, worst"]
    assert instructions.value == 13.5 and instructions.note == "extension float32" and instructions.status == "FAIL"
    assert got["spill bytes, any config or instantiation, worst"].value == 76
    assert got["resident warps per SM, large-batch configs, fewest"].value == 16  # the 32x7 rows are not large-batch
    assert all(j.status == "not measured" for j in spec_targets.static_targets(None))


def write_results(folder, model=True, quick_loss=False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loss_bench-nvidia-h200.json").write_text(json.dumps(loss_result(quick=quick_loss)))
    (folder / "train_bench-nvidia-h200.json").write_text(json.dumps(train_result()))
    if model:
        shutil.copy(FIXTURE, folder / "kernel_model.json")


def target_rows(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SPEC 4 target"))
    end = next(i for i, line in enumerate(lines) if " pass, " in line and "targets)" in line)
    return [line for line in lines[start + 1:end] if not line.startswith("-- ")], lines[end]


def test_summary_prints_one_row_per_target_with_prediction_and_kernel_only_table(tmp_path):
    write_results(tmp_path)
    text = summary.render(tmp_path)
    rows, counts = target_rows(text)
    judged = spec_targets.all_targets(loss_result(), train_result(), json.loads(FIXTURE.read_text()), 90)
    assert len(rows) == len(judged) == 22
    assert counts == (f"{sum(j.status == 'pass' for j in judged)} pass, {sum(j.status == 'FAIL' for j in judged)} FAIL, "
                      f"{sum(j.status == 'not measured' for j in judged)} not measured (of 22 targets)")
    line = next(r for r in rows if r.startswith("triton: 2^20x7 bfloat16 fwd+bwd, fraction of copy bandwidth"))
    assert ">= 70.0% (moonshot 85.0%)" in line and "80.0%" in line and " pass " in line and line.endswith("72.0%")
    line = next(r for r in rows if r.startswith("trainer default (rung 7) / bare captured step (rung 6)"))
    assert "1.20x" in line and " pass " in line
    line = next(r for r in rows if r.startswith("triton (launcher stubbed)"))
    assert "not measured" in line
    assert "device NVIDIA H200 (sm_90), torch 2.11.0+cu130, triton 3.6.0" in text
    assert "copy bandwidth 4,000 GB/s" in text
    kernel_only = text[text.index("kernel-only (CUDA-graph replay)"):].splitlines()
    assert kernel_only[2].split() == ["32x7", "float32", "triton", "0.0500", "5.0", "0.0%", "5.0", "none"]
    graph_us = counted_bytes(2**20, 7, "bfloat16") / BW / 1e3 / 0.8
    assert kernel_only[4].split() == ["2^20x7", "bfloat16", "triton", "0.4000", f"{graph_us:.1f}", "80.0%", "22.5",
                                      "72.0%"]


def test_summary_without_kernel_model_says_no_prediction_and_skips_quick_results(tmp_path):
    write_results(tmp_path, model=False)
    rows, _ = target_rows(summary.render(tmp_path))
    loss_rows = [r for r in rows if "fwd+bwd" in r and "CPU" not in r]
    assert len(loss_rows) == 10 and all(r.endswith("no prediction (no kernel_model.json)") for r in loss_rows)
    quick = tmp_path / "quick"
    write_results(quick, quick_loss=True)
    rows, _ = target_rows(summary.render(quick))
    assert all("not measured" in r for r in rows if r.startswith("triton: 32x7"))  # a --quick run is no device figure
    assert summary.render(tmp_path / "empty") == f"no full benchmark results in {tmp_path / 'empty'}"


def test_summary_reads_the_recorded_first_gpu_run():
    """The tracked results of 2026-11-29 (older JSON fields: no graph rows, no compile time per
    epoch) render: the figures they hold, the rest not measured."""
    text = summary.render(ROOT / "bench" / "results" / "2026-11-29-nvidia-h200")
    rows, counts = target_rows(text)
    line = next(r for r in rows if r.startswith("triton: 32x7 fp32 fwd+bwd eager, x reference-style"))
    assert "6.69x" in line and " FAIL " in line
    assert "device NVIDIA H200 (sm_90), torch 2.11.0+cu130, triton 3.6.0" in text
    assert "epoch rung5: 3.0 s; 60 epochs ~ 2.99 min" in text
    assert counts.endswith("(of 22 targets)")
