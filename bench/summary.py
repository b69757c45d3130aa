"""Short table of the latest benchmark JSON files (the last thing `make gpu-check` prints).

    python bench/summary.py [bench/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def latest(folder: Path, pattern: str):
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def loss_lines(result) -> list[str]:
    lines = [f"loss_bench on {result['device_name']} (torch {result['versions']['torch']}, "
             f"triton {result['versions']['triton']}; copy {result['copy_bandwidth_gb_per_s']:.0f} GB/s), fwd+bwd:"]
    for r in result["rows"]:
        if r["mode"] == "fwd+bwd" and (r["batch"], r["dtype"]) in {(32, "float32"), (2**20, "bfloat16"), (4096, "float32")}:
            speed = f"{r['speedup_vs_reference_style']:.1f}x" if r["speedup_vs_reference_style"] else "-"
            lines.append(f"  {r['batch']:>8}x{r['classes']:<4} {r['dtype']:<9} {r['backend']:<18} "
                         f"{r['median_ms']:>9.4f} ms  {100 * r['fraction_of_copy_bw']:>5.1f}% BW  {speed:>8} vs ref-style")
    lines += [f"  target {k}: {v:.2f}" for k, v in result["targets"].items()]
    return lines


def train_lines(result) -> list[str]:
    lines = [f"train_bench on {result['device_name']} (batch {result['plan']['batch']} x 2 views, "
             f"{result['plan']['image_size']} px):"]
    for r in result["rows"]:
        lines.append(f"  rung {r['rung']}  {r['samples_per_s']:>8.0f} samples/s  {r['x_rung0']:>6.2f}x rung0  "
                     f"{100 * r['fraction_of_ceiling']:>6.1f}% ceiling  {r['name']}")
    for name, e in result.get("epochs", {}).items():
        compile_note = f" + {e['compile_s']:.1f} s compile" if e.get("compile_s") else ""
        lines.append(f"  epoch {name}: {e['epoch_s']:.1f} s{compile_note}; 60 epochs ~ "
                     f"{e['projected_60_epochs_min']:.1f} min")
    lines += [f"  target {k}: {v:.3f}" for k, v in result.get("targets", {}).items() if v is not None]
    return lines


def data_lines(result) -> list[str]:
    return [f"data_bench on {result['device']}:"] + [f"  {k}: {v}" for k, v in result.get("targets", {}).items()]


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:] or ["bench/results"])[0])
    sections = [("loss_bench-*.json", loss_lines), ("data_bench.json", data_lines), ("train_bench-*.json", train_lines)]
    for pattern, render in sections:
        result = latest(folder, pattern)
        if result is not None and not result.get("quick"):
            print("\n".join(render(result)))


if __name__ == "__main__":
    main()
