"""The short table `make gpu-check` prints last: every SPEC 4 target, judged, with the
prediction beside it.

    python bench/summary.py [FOLDER]        # default: bench/out/

Reads the newest full (not ``--quick``) results in FOLDER: ``loss_bench-*.json``,
``train_bench-*.json``, ``data_bench.json``, ``kernel_model.json`` (``bench/kernel_model.py``;
when absent every prediction reads "no prediction") and ``gpu_check.json`` (written by
``scripts/gpu_check.py``: device, versions, steps, GPU tests). Prints one row per SPEC 4 target
(``bench/spec_targets.py``): the figure, the bar, pass / FAIL / not measured, the kernel-only
time (the call replayed in a CUDA graph) and the kernel model's prediction; then the
kernel-only table of every loss shape measured (host and device costs told apart), the
training ladder, the data targets, the steps with their times and the GPU tests. No torch
import: it runs where torch does not.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_targets  # noqa: E402
from spec_targets import format_value  # noqa: E402

DEFAULT_FOLDER = Path(__file__).resolve().parent / "out"
SECTIONS = {"loss": "loss, GPU", "host": "host path and CPU extension, CPU proxies", "train": "training step, GPU",
            "static": "static kernel model (no GPU)"}


def newest(folder: Path, pattern: str) -> dict | None:
    """The newest JSON matching ``pattern`` that is not a --quick result, or None."""
    for path in sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable: an older file may still do
        if not (isinstance(data, dict) and data.get("quick")):
            return data
    return None


def load(folder: Path) -> dict:
    return {"loss": newest(folder, "loss_bench-*.json"), "train": newest(folder, "train_bench-*.json"),
            "data": newest(folder, "data_bench.json"), "model": newest(folder, "kernel_model.json"),
            "check": newest(folder, "gpu_check.json")}


def device_arch(sources: dict) -> int:
    """The compute capability the predictions are read for (10 * major + minor; sm_90 when unknown)."""
    loss, device = sources["loss"] or {}, (sources["check"] or {}).get("device") or {}
    return loss.get("arch") or device.get("arch") or 90


def header_lines(sources: dict) -> list[str]:
    loss, train, check = sources["loss"] or {}, sources["train"] or {}, sources["check"] or {}
    device = check.get("device") or {}
    versions = loss.get("versions") or train.get("versions") or device
    name = device.get("name") or loss.get("device_name") or train.get("device_name") or "unknown device"
    when = loss.get("time") or train.get("time") or check.get("started") or "unknown date"
    lines = [f"device {name} (sm_{device_arch(sources)}), torch {versions.get('torch', '?')}, "
             f"triton {versions.get('triton', '?')}, python {versions.get('python', '?')}, "
             f"CUDA {versions.get('cuda', '?')}; measured {when}"]
    if device.get("driver"):
        lines[0] += f"; driver {device['driver']}"
    if loss.get("copy_bandwidth_gb_per_s"):
        lines.append(f"copy bandwidth {loss['copy_bandwidth_gb_per_s']:,.0f} GB/s (read + written, same run)")
    stand_in = loss.get("stand_in") or train.get("stand_in") or check.get("dry_run")
    if stand_in:
        lines.insert(0, "DRY RUN: no GPU; stand-in figures replayed from recorded results, nothing measured now")
    return lines


def target_lines(judged: list[spec_targets.Judged], has_model: bool) -> list[str]:
    lines = [f"{'SPEC 4 target':<74} {'bar':<29} {'measured':>9}  {'status':<12} {'kernel-only':>11}  predicted"]
    section = None
    for j in judged:
        if j.section != section:
            section = j.section
            lines.append(f"-- {SECTIONS[section]}")
        kernel = f"{j.kernel_only_us:.1f} us" if j.kernel_only_us is not None else "-"
        predicted = j.predicted or "-"
        if j.predicted is None and j.section == "loss":
            predicted = "no prediction" + ("" if has_model else " (no kernel_model.json)")
        note = f"  [{j.note}]" if j.note else ""
        lines.append(f"{j.what:<74} {j.bar.text(j.unit):<29} {format_value(j.value, j.unit):>9}  {j.status:<12} "
                     f"{kernel:>11}  {predicted}{note}")
    counts = {s: sum(j.status == s for j in judged) for s in ("pass", "FAIL", "not measured")}
    lines.append(f"{counts['pass']} pass, {counts['FAIL']} FAIL, {counts['not measured']} not measured "
                 f"(of {len(judged)} targets)")
    return lines


def kernel_only_lines(loss: dict | None, model, arch: int) -> list[str]:
    """Per loss shape (forward+backward) and fast backend: the eager call, the same call replayed
    in a CUDA graph (kernel-only), and the kernel model's prediction of the latter."""
    rows = (loss or {}).get("rows", [])
    shapes = []
    for r in rows:
        key = (r["batch"], r["classes"], r["dtype"])
        if r["mode"] == "fwd+bwd" and r["backend"] in spec_targets.FAST_BACKENDS and key not in shapes:
            shapes.append(key)
    if not shapes:
        return []
    predictions = spec_targets.model_rows(model)
    lines = ["kernel-only (CUDA-graph replay) vs eager, fwd+bwd:",
             f"{'shape':<20} {'backend':<10} {'eager ms':>9} {'graph us':>9} {'graph %BW':>9}  "
             f"{'predicted us':>12} {'predicted %BW':>13}"]
    for batch, classes, dtype in shapes:
        for fast in spec_targets.FAST_BACKENDS:
            eager = spec_targets.find_row(rows, batch, classes, dtype, fast)
            graph = spec_targets.find_row(rows, batch, classes, dtype, f"{fast} graph")
            if not eager and not graph:
                continue
            predicted = spec_targets.model_row(predictions, fast, batch, classes, dtype, arch) or {}
            cells = [f"{eager['median_ms']:.4f}" if eager else "-", f"{graph['median_ms'] * 1e3:.1f}" if graph else "-",
                     format_value(graph["fraction_of_copy_bw"] if graph else None, "%"),
                     _number(predicted.get("predicted_us"), "{:.1f}"),
                     _number(predicted.get("predicted_pct_copy_bw"), "{:.1f}%")]
            lines.append(f"{spec_targets.shape_text(batch, classes) + ' ' + dtype:<20} {fast:<10} {cells[0]:>9} "
                         f"{cells[1]:>9} {cells[2]:>9}  {cells[3]:>12} {cells[4]:>13}")
    return lines


def _number(value, pattern: str) -> str:
    return pattern.format(value) if value is not None else "none"


def train_lines(train: dict | None) -> list[str]:
    if not train or not train.get("rows"):
        return []
    lines = [f"train_bench (batch {train['plan']['batch']} x 2 views, {train['plan']['image_size']} px):"]
    for r in train["rows"]:
        first = f", first step {r['first_step_s']:.1f} s" if r.get("compiled") and r.get("first_step_s") else ""
        lines.append(f"  rung {r['rung']}  {r['samples_per_s']:>8.0f} samples/s  {r['name']}{first}")
    for name, e in (train.get("epochs") or {}).items():
        if "projected_60_epochs_min" in e:
            compile_note = f" + {e['compile_s']:.1f} s compile once" if e.get("compile_s") else ""
            lines.append(f"  epoch {name}: {e['epoch_s']:.1f} s{compile_note}; 60 epochs ~ "
                         f"{e['projected_60_epochs_min']:.2f} min")
    return lines


def data_lines(data: dict | None) -> list[str]:
    if not data or not data.get("targets"):
        return []
    parts = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in data["targets"].items()]
    return textwrap.wrap("data_bench: " + ", ".join(parts), 130, subsequent_indent="  ", break_on_hyphens=False)


def step_lines(check: dict | None) -> list[str]:
    if not check or not check.get("steps"):
        return []
    parts = [f"{s['name']} {s['status']} {s['seconds']:.0f} s" for s in check["steps"]]
    return textwrap.wrap("steps: " + "; ".join(parts), 130, subsequent_indent="  ", break_on_hyphens=False)


def test_lines(check: dict | None) -> list[str]:
    tests = (check or {}).get("tests")
    if not tests:
        return []
    outcomes = tests.get("outcomes", {})
    lines = ["GPU tests: " + (tests.get("summary") or f"{len(outcomes)} tests")]
    for outcome in ("FAILED", "ERROR", "CRASHED", "CUT: budget", "not run: budget"):
        names = [t for t, o in outcomes.items() if o == outcome]
        if names:
            lines += textwrap.wrap(f"{outcome} ({len(names)}): " + ", ".join(names), 130, subsequent_indent="  ",
                                   break_on_hyphens=False)
    slowest = sorted((tests.get("seconds") or {}).items(), key=lambda item: -item[1])[:5]
    if slowest:
        lines += textwrap.wrap("slowest: " + ", ".join(f"{t} {s:.0f} s" for t, s in slowest), 130,
                               subsequent_indent="  ", break_on_hyphens=False)
    return lines


def render(folder: Path) -> str:
    sources = load(folder)
    if not any(sources.values()):
        return f"no full benchmark results in {folder}"
    arch = device_arch(sources)
    judged = spec_targets.all_targets(sources["loss"], sources["train"], sources["model"], arch)
    blocks = [header_lines(sources), target_lines(judged, sources["model"] is not None),
              kernel_only_lines(sources["loss"], sources["model"], arch), train_lines(sources["train"]),
              data_lines(sources["data"]), step_lines(sources["check"]), test_lines(sources["check"])]
    return "\n\n".join("\n".join(block) for block in blocks if block)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(render(Path(args[0]) if args else DEFAULT_FOLDER))


if __name__ == "__main__":
    main()
