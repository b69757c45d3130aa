"""NLA loss benchmark: every backend against the reference-style loss, in one run.

    python bench/loss_bench.py                  # full sweep (GPU: do_bench medians, cold L2)
    python bench/loss_bench.py --targets        # SPEC 4's rows only, in order of value (make gpu-check)
    python bench/loss_bench.py --quick          # small CPU-friendly sweep, < 30 s
    python bench/loss_bench.py --time-cap 90    # start no row after 90 s; the JSON lists what was left
    python bench/loss_bench.py --save           # the reference copy: bench/results/<date>-<device>/

Prints a table and writes loss_bench-<device>[-quick].{json,md} under bench/out/ (not tracked;
``--out-dir`` elsewhere; and a copy under $OUT when set), rewritten after every row, so a run
that is cut short keeps what it measured. Bytes counted per call: both logit tensors and the
targets read once, plus both gradients written once for forward+backward; GB/s is set against
a device-to-device copy measured in the same run. On CUDA, each fast backend's forward +
autograd.grad is also captured in a CUDA graph and replayed (backend "<name> graph"): the
kernel-only time of the call, what the trainer pays, so host and device costs are told apart.

``--targets`` measures forward+backward at (32, 7) fp32 (reference-style, both fast backends,
the compiled reference: one Inductor compile), then (2^20, 7) bf16, (2^20, 7) fp32 and
(4096, 1000) bf16 (fast backends only: three autotuned batch buckets), then the host bar.

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
import statistics
import sys
import time
from pathlib import Path

from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import result_files  # noqa: E402
import spec_targets  # noqa: E402
from reference_style import reference_style_nla_loss  # noqa: E402
from timing import capture_cuda_graph  # noqa: E402

from nla_fast import NLAConfig, atomic, nla_loss  # noqa: E402
from nla_fast.reference import nla_loss_reference  # noqa: E402
from nla_fast.threads import use_cpu_threads, usable_cpus  # noqa: E402

FULL_SHAPES = [(32, 7), (64, 7), (4096, 7), (65536, 7), (2**20, 7), (4096, 1000)]
QUICK_SHAPES = [(32, 7), (4096, 7)]
FAST_BACKENDS = spec_targets.FAST_BACKENDS
HOST_BAR_CALLS = {True: 1500, False: 6000}  # interleaved calls of each, --quick or not
CONFIG = NLAConfig.official()  # the constants the reference-style loss uses


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return result_files.slug(name)


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


def make_backends(device: torch.device, with_compile: bool, wanted: set | None = None) -> dict:
    """name -> loss(z, zf, y, eps) for every backend that runs here (or only those ``wanted``)."""
    backends = {
        "reference-style": lambda z, zf, y, e: reference_style_nla_loss(z, zf, y, float(e)),
        "reference": lambda z, zf, y, e: nla_loss_reference(z, zf, y, e, CONFIG),
    }
    if with_compile:
        compiled = torch.compile(nla_loss_reference, dynamic=False)
        backends["reference+compile"] = lambda z, zf, y, e: compiled(z, zf, y, e, CONFIG)
    for name in FAST_BACKENDS:
        if wanted is not None and name not in wanted:
            continue
        if device.type == "cpu" and name == "triton":
            continue  # the interpreter's timings mean nothing
        try:
            probe = torch.randn(2, 7, device=device)
            nla_loss(probe, probe, torch.zeros(2, dtype=torch.long, device=device), backend=name)
        except Exception as err:  # noqa: BLE001 - report and go on without that backend
            print(f"[loss_bench] backend {name} unavailable: {err}", file=sys.stderr)
            continue
        backends[name] = lambda z, zf, y, e, _n=name: nla_loss(z, zf, y, e, CONFIG, backend=_n, validate=False)
    return {name: fn for name, fn in backends.items() if wanted is None or name in wanted}


@dataclass(frozen=True)
class Case:
    """One input shape and mode; ``backends`` in the order measured (None: every backend)."""
    batch: int
    classes: int
    dtype: torch.dtype
    mode: str  # "fwd" or "fwd+bwd"
    backends: tuple | None = None


# SPEC 4's loss rows in order of value. (32, 7): the reference-style baseline first (every
# speedup is against it), the compiled reference last (its Inductor compile is the slowest row).
TARGET_CASES = (
    Case(32, 7, torch.float32, "fwd+bwd", ("reference-style", "triton", "extension", "reference+compile")),
    Case(2**20, 7, torch.bfloat16, "fwd+bwd", FAST_BACKENDS),
    Case(2**20, 7, torch.float32, "fwd+bwd", FAST_BACKENDS),
    Case(4096, 1000, torch.bfloat16, "fwd+bwd", FAST_BACKENDS),
)


def sweep_cases(shapes, dtypes) -> list[Case]:
    return [Case(b, c, dtype, mode) for b, c in shapes for dtype in dtypes for mode in ("fwd", "fwd+bwd")]


def plan_cases(args, device: torch.device) -> list[Case]:
    if args.targets:
        return list(TARGET_CASES)
    dtypes = [torch.float32] if (args.quick or device.type == "cpu") else [torch.float32, torch.bfloat16]
    return sweep_cases(QUICK_SHAPES if args.quick else FULL_SHAPES, dtypes)


def case_inputs(case: Case, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(case.batch + case.classes)
    z = (2 * torch.randn(case.batch, case.classes, device=device, generator=gen)).to(case.dtype)
    zf = (z.float() + 0.5 * torch.randn(case.batch, case.classes, device=device, generator=gen)).to(case.dtype)
    y = torch.randint(0, case.classes, (case.batch,), device=device, generator=gen)
    grads = case.mode == "fwd+bwd"
    return z.detach().requires_grad_(grads), zf.detach().requires_grad_(grads), y, torch.tensor(0.37, device=device)


class Clock:
    """Seconds since the run started, against an optional cap on starting new rows."""

    def __init__(self, cap_s: float | None):
        self.start, self.cap_s = time.perf_counter(), cap_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.cap_s is not None and self.elapsed() > self.cap_s


def run(args, on_row=lambda result: None) -> dict:
    """Measure every row of the plan; ``on_row(result)`` after each (the caller rewrites the files)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick
    cases = plan_cases(args, device)
    with_compile = args.compile if args.compile is not None else (device.type == "cuda")
    wanted = {name for case in cases for name in (case.backends or ())} or None
    backends = make_backends(device, with_compile, wanted)
    clock = Clock(args.time_cap)
    bandwidth = copy_bandwidth_gbs(device, quick)
    print(f"[loss_bench] {device_slug(device)}: copy bandwidth {bandwidth:.0f} GB/s; backends {list(backends)}")
    result = {
        "benchmark": "loss_bench", "device": device_slug(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "arch": _arch(device), "versions": versions(), "quick": quick, "plan": "targets" if args.targets else "sweep",
        "copy_bandwidth_gb_per_s": bandwidth,
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "time_cap_s": args.time_cap, "rows": [], "host_bar": None,
        "not_measured": [], "targets": {},
    }
    for case in cases:
        measure_case(case, backends, device, quick, bandwidth, clock, result, on_row)
    if clock.over():
        result["not_measured"].append("host bar")
    else:
        bar = host_bar(quick)
        if bar is not None:
            result["rows"] += bar.pop("rows")
            result["host_bar"] = bar
    cpu_threads = cpu_thread_rows(quick) if device.type == "cpu" and not clock.over() else None
    if cpu_threads is not None:
        result["rows"] += cpu_threads.pop("rows")
        result["cpu_threads"] = cpu_threads
    result["targets"] = targets(result["rows"], result["host_bar"])
    if cpu_threads is not None:
        result["targets"].update(cpu_threads["targets"])
    on_row(result)
    return result


def measure_case(case: Case, backends: dict, device, quick: bool, bandwidth: float, clock: Clock, result: dict,
                 on_row) -> None:
    """The rows of one case: each backend eager, then (CUDA, forward+backward, fast backends) the
    same call captured in a CUDA graph and replayed."""
    label = f"{case.batch}x{case.classes} {str(case.dtype).replace('torch.', '')} {case.mode}"
    graphed = case.mode == "fwd+bwd" and device.type == "cuda"
    planned = [(name, row_name) for name in (case.backends or backends) if name in backends
               for row_name in [name] + ([f"{name} graph"] if graphed and name in FAST_BACKENDS else [])]
    if clock.over():
        result["not_measured"] += [f"{label} {row_name}" for _, row_name in planned]
        return
    z, zf, y, eps = case_inputs(case, device)
    nbytes = 2 * z.numel() * z.element_size() + y.numel() * y.element_size()
    if case.mode == "fwd+bwd":
        nbytes += 2 * z.numel() * z.element_size()
    baseline = None
    for name, row_name in planned:
        if clock.over():
            result["not_measured"].append(f"{label} {row_name}")
            continue
        try:
            ms = time_call(case, backends[name], z, zf, y, eps, device, quick, graph=row_name != name)
        except Exception as err:  # noqa: BLE001 - a failing backend or capture is a line, not a crash
            print(f"[loss_bench] {label} {row_name}: {err}", file=sys.stderr)
            continue
        if row_name == "reference-style":
            baseline = ms
        result["rows"].append(_row(case.batch, case.classes, case.dtype, case.mode, row_name, ms, nbytes,
                                   bandwidth, baseline))
        result["targets"] = targets(result["rows"], result["host_bar"])
        print(f"[loss_bench] {label} {row_name}: {ms:.4f} ms (at {clock.elapsed():.1f} s)", flush=True)
        on_row(result)


def time_call(case: Case, fn, z, zf, y, eps, device, quick: bool, graph: bool) -> float:
    """Median ms of one call: eager, or (``graph``) its CUDA-graph capture replayed (kernel-only)."""
    if case.mode == "fwd":
        def call():
            with torch.no_grad():
                fn(z, zf, y, eps)
    else:
        def call():
            torch.autograd.grad(fn(z, zf, y, eps), (z, zf))
    if graph:
        call = capture_cuda_graph(call).replay
    return median_ms(call, device, quick)


def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _row(batch, classes, dtype, mode, backend, ms, nbytes, bandwidth, baseline) -> dict:
    gbs = nbytes / ms / 1e6
    return {
        "batch": batch, "classes": classes, "dtype": str(dtype).replace("torch.", ""),
        "mode": mode, "backend": backend, "median_ms": ms, "bytes": nbytes, "gb_per_s": gbs,
        "fraction_of_copy_bw": gbs / bandwidth,
        "speedup_vs_reference_style": (baseline / ms) if baseline else None,
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


def targets(rows, bar=None) -> dict:
    """SPEC 4's loss and host targets measured in these rows ({label: value}; bench/spec_targets.py
    defines them): (32, 7) eager speedups, the fraction of copy bandwidth of the graph-replayed
    call at (2^20, 7) bf16 and fp32 and (4096, 1000) bf16, the host bar."""
    result = {"rows": rows, "host_bar": bar}
    return spec_targets.as_dict(spec_targets.loss_targets(result) + spec_targets.host_targets(result))


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
    if result.get("not_measured"):
        lines += ["", f"Not measured (time cap {result['time_cap_s']} s reached): " + ", ".join(result["not_measured"])]
    lines += ["", "Targets (SPEC 4):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in result["targets"].items()] or ["- (no fast backend ran)"]
    return "\n".join(lines) + "\n"


def write(result, out_dir: Path) -> list[Path]:
    """Rewrite the JSON and Markdown of ``result`` in ``out_dir`` (atomically: a cut run keeps the last rows)."""
    stem = f"loss_bench-{result['device']}{'-quick' if result['quick'] else ''}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic.write_text(paths[0], json.dumps(result, indent=2))
    atomic.write_text(paths[1], to_markdown(result))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--quick", action="store_true", help="small sweep (CPU-friendly, < 30 s)")
    plan.add_argument("--targets", action="store_true", help="SPEC 4's rows only, in order of value")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile of the reference (default: on for CUDA)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--time-cap", type=float, default=None, metavar="SECONDS",
                        help="start no new row after this many seconds (the JSON lists the rows left)")
    result_files.add_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dirs = [result_files.output_dir(args, device_slug(device))]
    if os.environ.get("OUT"):
        out_dirs.append(Path(os.environ["OUT"]))

    def save(result):
        for out in out_dirs:
            write(result, out)

    result = run(args, on_row=save)
    print(to_markdown(result))
    print("wrote " + ", ".join(str(p) for p in write(result, out_dirs[0])))
    return result


if __name__ == "__main__":
    use_cpu_threads()  # a shared host's cores, not oversubscribed (nla_fast.threads)
    main()
