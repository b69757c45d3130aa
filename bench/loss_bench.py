"""NLA loss benchmark: every backend against the reference-style loss, in one run.

    python bench/loss_bench.py            # full sweep (GPU: do_bench medians, cold L2)
    python bench/loss_bench.py --quick    # small CPU-friendly sweep, < 30 s

Prints a table and writes bench/results/loss_bench-<device>.{json,md} (and a copy under
$OUT when set). Bytes counted per call: both logit tensors and the targets read once, plus
both gradients written once for forward+backward; GB/s is set against a device-to-device
copy measured in the same run. On CUDA, each fast backend's forward + autograd.grad is also
captured in a CUDA graph and replayed (backend "<name> graph": what the trainer pays).

The host bar (SPEC 4, CPU proxy for the host path), measured on the CPU with one thread in
every run: the extension's forward + ``torch.autograd.grad`` (B=32, C=7, ``validate=False``)
against two ``F.cross_entropy`` terms summed, forward + ``torch.autograd.grad``, the two
alternated call by call, medians of many calls; the ratio must be <= 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_style import reference_style_nla_loss  # noqa: E402
from timing import capture_cuda_graph  # noqa: E402

from nla_fast import NLAConfig, nla_loss  # noqa: E402
from nla_fast.reference import nla_loss_reference  # noqa: E402
from nla_fast.threads import use_cpu_threads, usable_cpus  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL_SHAPES = [(32, 7), (64, 7), (4096, 7), (65536, 7), (2**20, 7), (4096, 1000)]
QUICK_SHAPES = [(32, 7), (4096, 7)]
FAST_BACKENDS = ("triton", "extension")
HOST_BAR_CALLS = {True: 1500, False: 6000}  # interleaved calls of each, --quick or not
CONFIG = NLAConfig.official()  # the constants the reference-style loss uses


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def median_ms(fn, device: torch.device, quick: bool) -> float:
    """Median milliseconds of fn(). GPU: triton's do_bench (events, L2 flushed per call)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100 if quick else 200, return_mode="median"))
    for _ in range(3):
        fn()
    times = []
    budget = 0.3 if quick else 2.0
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, quick: bool) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    n = (2**26 if quick else 2**28) if device.type == "cuda" else 2**23
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def make_backends(device: torch.device, with_compile: bool) -> dict:
    backends = {
        "reference-style": lambda z, zf, y, e: reference_style_nla_loss(z, zf, y, float(e)),
        "reference": lambda z, zf, y, e: nla_loss_reference(z, zf, y, e, CONFIG),
    }
    if with_compile:
        compiled = torch.compile(nla_loss_reference, dynamic=False)
        backends["reference+compile"] = lambda z, zf, y, e: compiled(z, zf, y, e, CONFIG)
    for name in ("triton", "extension"):
        if device.type == "cpu" and name == "triton":
            continue  # the interpreter's timings mean nothing
        try:
            probe = torch.randn(2, 7, device=device)
            nla_loss(probe, probe, torch.zeros(2, dtype=torch.long, device=device), backend=name)
        except Exception as err:  # noqa: BLE001 - report and go on without that backend
            print(f"[loss_bench] backend {name} unavailable: {err}", file=sys.stderr)
            continue
        backends[name] = lambda z, zf, y, e, _n=name: nla_loss(z, zf, y, e, CONFIG, backend=_n, validate=False)
    return backends


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    dtypes = [torch.float32] if (quick or device.type == "cpu") else [torch.float32, torch.bfloat16]
    with_compile = args.compile if args.compile is not None else (device.type == "cuda")
    backends = make_backends(device, with_compile)
    bandwidth = copy_bandwidth_gbs(device, quick)
    print(f"[loss_bench] {device_slug(device)}: copy bandwidth {bandwidth:.0f} GB/s; backends {list(backends)}")

    rows = []
    for batch, classes in shapes:
        for dtype in dtypes:
            gen = torch.Generator(device=device).manual_seed(batch + classes)
            z = (2 * torch.randn(batch, classes, device=device, generator=gen)).to(dtype)
            zf = (z.float() + 0.5 * torch.randn(batch, classes, device=device, generator=gen)).to(dtype)
            y = torch.randint(0, classes, (batch,), device=device, generator=gen)
            eps = torch.tensor(0.37, device=device)
            io_bytes = 2 * z.numel() * z.element_size() + y.numel() * y.element_size()
            for mode in ("fwd", "fwd+bwd"):
                zg = z.detach().requires_grad_(mode == "fwd+bwd")
                zfg = zf.detach().requires_grad_(mode == "fwd+bwd")
                nbytes = io_bytes + (2 * z.numel() * z.element_size() if mode == "fwd+bwd" else 0)
                baseline = None
                for name, fn in backends.items():
                    if mode == "fwd":
                        def call(fn=fn):
                            with torch.no_grad():
                                fn(zg, zfg, y, eps)
                    else:
                        def call(fn=fn):
                            torch.autograd.grad(fn(zg, zfg, y, eps), (zg, zfg))
                    try:
                        ms = median_ms(call, device, quick)
                    except Exception as err:  # noqa: BLE001 - a failing backend is a row, not a crash
                        print(f"[loss_bench] {name} {batch}x{classes} {dtype} {mode}: {err}", file=sys.stderr)
                        continue
                    if name == "reference-style":
                        baseline = ms
                    rows.append(_row(batch, classes, dtype, mode, name, ms, nbytes, bandwidth, baseline))
                if mode == "fwd+bwd" and device.type == "cuda":
                    # fwd + autograd.grad captured once and replayed: no Python, no dispatcher
                    for name in FAST_BACKENDS:
                        if name not in backends:
                            continue
                        try:
                            graph = capture_cuda_graph(
                                lambda fn=backends[name]: torch.autograd.grad(fn(zg, zfg, y, eps), (zg, zfg)))
                            ms = median_ms(graph.replay, device, quick)
                        except Exception as err:  # noqa: BLE001 - a failing capture is reported, not fatal
                            print(f"[loss_bench] {name} graph {batch}x{classes} {dtype}: {err}", file=sys.stderr)
                            continue
                        rows.append(_row(batch, classes, dtype, mode, f"{name} graph", ms, nbytes, bandwidth,
                                         baseline))
    bar = host_bar(quick)
    if bar is not None:
        rows += bar.pop("rows")
    cpu_threads = cpu_thread_rows(quick)
    if cpu_threads is not None:
        rows += cpu_threads.pop("rows")
    result = {
        "benchmark": "loss_bench", "device": device_slug(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions(), "quick": quick, "copy_bandwidth_gb_per_s": bandwidth,
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "host_bar": bar,
        "targets": targets(rows, bar), "cpu_threads": cpu_threads,
    }
    if cpu_threads is not None:
        result["targets"].update(cpu_threads["targets"])
    return result


def _row(batch, classes, dtype, mode, backend, ms, nbytes, bandwidth, baseline) -> dict:
    gbs = nbytes / ms / 1e6
    return {
        "batch": batch, "classes": classes, "dtype": str(dtype).replace("torch.", ""),
        "mode": mode, "backend": backend, "median_ms": ms, "bytes": nbytes, "gb_per_s": gbs,
        "fraction_of_copy_bw": gbs / bandwidth,
        "speedup_vs_reference_style": (baseline / ms) if baseline else None,
    }


def host_bar(quick: bool, batch: int = 32, classes: int = 7) -> dict | None:
    """SPEC 4's CPU proxy for the host path: extension fwd + autograd.grad vs two F.cross_entropy
    terms summed, fwd + autograd.grad, on the CPU with one thread, alternated call by call (the
    order flips every call, so drift and cache effects hit both alike); medians in microseconds.
    None when the extension cannot run on the CPU."""
    cpu = torch.device("cpu")
    try:
        nla_loss(torch.zeros(2, classes), torch.zeros(2, classes), torch.zeros(2, dtype=torch.long), backend="extension")
    except Exception as err:  # noqa: BLE001 - no extension: no bar, said why
        print(f"[loss_bench] host bar skipped, extension unavailable on the CPU: {err}", file=sys.stderr)
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(7)
        z = (2 * torch.randn(batch, classes, generator=gen)).requires_grad_()
        zf = (z.detach() + 0.5 * torch.randn(batch, classes, generator=gen)).requires_grad_()
        y = torch.randint(0, classes, (batch,), generator=gen)
        eps = torch.tensor(0.37)

        def two_cross_entropy():
            torch.autograd.grad(F.cross_entropy(z, y) + F.cross_entropy(zf, y), (z, zf))

        def fused():
            torch.autograd.grad(nla_loss(z, zf, y, eps, CONFIG, backend="extension", validate=False), (z, zf))

        calls = HOST_BAR_CALLS[quick]
        pair = (two_cross_entropy, fused)
        times = ([], [])
        for i in range(calls // 10 + calls):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for k in order:
                t0 = time.perf_counter()
                pair[k]()
                elapsed = time.perf_counter() - t0
                if i >= calls // 10:  # the first tenth warms up
                    times[k].append(elapsed)
    finally:
        torch.set_num_threads(threads)
    ce_us, fused_us = (statistics.median(t) * 1e6 for t in times)
    nbytes = 2 * batch * classes * 4 * 2 + batch * 8
    mode = "fwd+bwd host, CPU, 1 thread"
    rows = [_row(batch, classes, torch.float32, mode, name, us / 1e3, nbytes, float("inf"), None)
            for name, us in (("two F.cross_entropy", ce_us), ("extension", fused_us))]
    for row in rows:
        row["fraction_of_copy_bw"] = None
    return {
        "batch": batch, "classes": classes, "threads": 1, "calls_each": calls,
        "two_cross_entropy_us": ce_us, "extension_us": fused_us, "ratio": fused_us / ce_us,
        "target": "<= 1.0", "rows": rows,
    }


def _other_cpu_ticks() -> int | None:
    """CPU ticks (1/100 s) used so far by every process but this one (Linux /proc), else None."""
    try:
        busy = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return sum(busy) - busy[3] - busy[4] - int(own[11]) - int(own[12])


def cpu_thread_rows(quick: bool) -> dict | None:
    """The extension's CPU kernel on 1 and 2 threads (issue 23), forward + autograd.grad, fp32: at
    (2^20, 7) the 2-thread speed-up (target >= 1.6), at (4096, 1000) the time against two
    F.cross_entropy terms summed, forward + autograd.grad, at each thread count (target <= 1).
    Every round calls each variant once, thread counts and functions alternating; the first round
    warms up. A call is quiet when no other process used the CPU meanwhile (at most one tick): a
    shape's medians are over its quiet calls when every variant has 3 or more (a shared host's other
    jobs would otherwise decide the 2-thread figures), else over all calls; rows say which. None when
    the extension cannot run on the CPU."""
    try:
        nla_loss(torch.zeros(2, 7), torch.zeros(2, 7), torch.zeros(2, dtype=torch.long), backend="extension")
    except Exception as err:  # noqa: BLE001 - no extension: no rows, said why
        print(f"[loss_bench] CPU thread rows skipped, extension unavailable on the CPU: {err}", file=sys.stderr)
        return None
    counts = [1, 2] if usable_cpus() >= 2 else [1]
    calls = 7 if quick else 15
    before = torch.get_num_threads()
    rows, median = [], {}
    try:
        for batch, classes in ((2**20, 7), (4096, 1000)):
            gen = torch.Generator().manual_seed(batch + classes)
            z = (2 * torch.randn(batch, classes, generator=gen)).requires_grad_()
            zf = (z.detach() + 0.5 * torch.randn(batch, classes, generator=gen)).requires_grad_()
            y = torch.randint(0, classes, (batch,), generator=gen)
            fns = {"extension": lambda: torch.autograd.grad(
                nla_loss(z, zf, y, 0.37, CONFIG, backend="extension", validate=False), (z, zf))}
            if classes > 7:
                fns["two F.cross_entropy"] = lambda: torch.autograd.grad(
                    F.cross_entropy(z, y) + F.cross_entropy(zf, y), (z, zf))
            times = {(name, n): [] for name in fns for n in counts}
            for i in range(calls + 1):
                for n in counts:
                    torch.set_num_threads(n)
                    for name, fn in fns.items():
                        ticks, t0 = _other_cpu_ticks(), time.perf_counter()
                        fn()
                        elapsed = time.perf_counter() - t0
                        quiet = ticks is not None and _other_cpu_ticks() - ticks <= 1
                        if i > 0:
                            times[(name, n)].append((elapsed, quiet))
            nbytes = 4 * batch * classes * 4 + batch * 8
            over_quiet = all(sum(q for _, q in ts) >= 3 for ts in times.values())
            for (name, n), ts in times.items():
                median[(classes, name, n)] = statistics.median(t for t, q in ts if q or not over_quiet) * 1e3
                row = _row(batch, classes, torch.float32, f"fwd+bwd, CPU, {n} thread{'s' * (n > 1)}", name,
                           median[(classes, name, n)], nbytes, float("inf"), None)
                rows.append(dict(row, fraction_of_copy_bw=None, calls=len(ts), quiet_calls=sum(q for _, q in ts),
                                 median_over="quiet calls" if over_quiet else "all calls"))
    finally:
        torch.set_num_threads(before)
    out = {}
    if 2 in counts:
        out["extension CPU: 2^20x7 fp32 fwd+bwd, 1-thread / 2-thread time (>= 1.6)"] = (
            median[(7, "extension", 1)] / median[(7, "extension", 2)])
    for n in counts:
        out[f"extension CPU: 4096x1000 fp32 fwd+bwd / two F.cross_entropy, {n} thread{'s' * (n > 1)} (<= 1.0)"] = (
            median[(1000, "extension", n)] / median[(1000, "two F.cross_entropy", n)])
    return {"threads": counts, "calls_each": calls, "rows": rows, "targets": out}


def _find(rows, **key):
    for row in rows:
        if all(row[k] == v for k, v in key.items()):
            return row
    return None


def targets(rows, bar=None) -> dict:
    """SPEC 4: (32,7) fwd+bwd >= 50x reference-style and >= 3x compiled reference, for each fast
    backend eager and replayed in a CUDA graph; (2^20,7) bf16 >= 70% of copy bandwidth; host bar <= 1."""
    out = {}
    comp = _find(rows, batch=32, classes=7, dtype="float32", mode="fwd+bwd", backend="reference+compile")
    for fast in FAST_BACKENDS:
        for label in (fast, f"{fast} graph"):
            small = _find(rows, batch=32, classes=7, dtype="float32", mode="fwd+bwd", backend=label)
            if small and small["speedup_vs_reference_style"]:
                out[f"{label}: 32x7 speedup vs reference-style (>= 50)"] = small["speedup_vs_reference_style"]
            if small and comp:
                out[f"{label}: 32x7 speedup vs compiled reference (>= 3)"] = comp["median_ms"] / small["median_ms"]
            big = _find(rows, batch=2**20, classes=7, dtype="bfloat16", mode="fwd+bwd", backend=label)
            if big:
                out[f"{label}: 2^20x7 bf16 fraction of copy bandwidth (>= 0.70)"] = big["fraction_of_copy_bw"]
    if bar is not None:
        out["extension: host time / two F.cross_entropy, 32x7 CPU 1 thread (<= 1.0)"] = bar["ratio"]
    return out


def to_markdown(result) -> str:
    lines = [
        f"# loss_bench on {result['device_name']} ({result['device']})",
        f"torch {result['versions']['torch']}, triton {result['versions']['triton']}, "
        f"CUDA {result['versions']['cuda']}; {result['timer']}; copy bandwidth "
        f"{result['copy_bandwidth_gb_per_s']:.0f} GB/s; {result['time']}",
        "",
        "| B | C | dtype | mode | backend | median ms | GB/s | % copy BW | x ref-style |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        speed = f"{r['speedup_vs_reference_style']:.1f}" if r["speedup_vs_reference_style"] else "-"
        bw = f"{100 * r['fraction_of_copy_bw']:.1f}" if r["fraction_of_copy_bw"] is not None else "-"
        lines.append(
            f"| {r['batch']} | {r['classes']} | {r['dtype']} | {r['mode']} | {r['backend']} | "
            f"{r['median_ms']:.4f} | {r['gb_per_s']:.1f} | {bw} | {speed} |"
        )
    bar = result.get("host_bar")
    if bar:
        lines += ["", f"Host bar (CPU, 1 thread, {bar['calls_each']} interleaved calls each, medians): "
                      f"two F.cross_entropy {bar['two_cross_entropy_us']:.1f} us, extension "
                      f"{bar['extension_us']:.1f} us, ratio {bar['ratio']:.3f} (target {bar['target']})"]
    lines += ["", "Targets (SPEC 4):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in result["targets"].items()] or ["- (no fast backend ran)"]
    return "\n".join(lines) + "\n"


def write(result, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"loss_bench-{result['device']}{'-quick' if result['quick'] else ''}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(to_markdown(result))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sweep (CPU-friendly, < 30 s)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile of the reference (default: on for CUDA)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and Markdown go")
    args = parser.parse_args(argv)
    result = run(args)
    paths = write(result, args.out_dir)
    if os.environ.get("OUT"):
        write(result, Path(os.environ["OUT"]))
    print(to_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return result


if __name__ == "__main__":
    use_cpu_threads()  # a shared host's cores, not oversubscribed (nla_fast.threads)
    main()
