"""Host time of the fused loss paths on a machine without a GPU (SPEC §4's CPU proxy for the host path).

The Triton path runs for real up to the C launcher: argument binding, Triton's compile cache
(the kernels are compiled for sm_90 here, with Triton's own ptxas), launch planning, output
allocation, the autograd Function and the backward. Only the driver's C launcher and module
loading are stubbed (a fake driver that accepts CPU tensors and launches nothing). Beside it, in
the same interleaved windows: two ``F.cross_entropy`` terms (the bar), the extension's CPU op
(which really computes, so its figure is an upper bound of its host time), and the Triton path
with lean launches turned off (every launch through ``JITFunction.run``), to show that cut.

    .venv/bin/python bench/triton_host_bench.py [--batch 32 --classes 7] [--save | --out-dir DIR]

Prints a table and writes ``triton_host_bench-<device>.json``: medians over windows, and each
row's ratio to the two cross-entropies measured in the same run. One thread.
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

os.environ.pop("TRITON_INTERPRET", None)  # the real JIT path, not the interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import result_files  # noqa: E402


class _NoLauncher:
    """The stubbed C launcher: takes the launch arguments, launches nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class _FakeUtils:
    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "sm_clock_rate": 1980000,
                "mem_clock_rate": 3200000, "mem_bus_width": 6144}

    @staticmethod
    def load_binary(name, kernel, shared, device):
        return object(), 0, None, 0, 1024  # module, function, registers (unknown), spills, max threads


class _StubbedDriver:
    """What Triton asks of the active driver on a launch, with no GPU behind it."""

    utils = _FakeUtils()
    launcher_cls = _NoLauncher

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("no benchmarking without a GPU")


def stub_the_launcher() -> None:
    from triton.runtime import driver

    driver.set_active(_StubbedDriver())


def _windows(cases: dict, calls: int, windows: int) -> dict:
    """Median microseconds per call of each case, the cases interleaved window by window."""
    for fn in cases.values():
        for _ in range(200):
            fn()
    samples = {name: [] for name in cases}
    for _ in range(windows):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def make_cases(batch: int, classes: int) -> dict:
    import nla_fast
    from nla_fast import loss as loss_module
    from nla_fast.kernels import fused_backend, launch

    fused_backend()  # registers the Triton launchers
    loss_module._resolved[("triton", "cpu")] = "triton"  # CPU tensors stand in for CUDA ones here

    z = torch.randn(batch, classes, requires_grad=True)
    zf = torch.randn(batch, classes, requires_grad=True)
    y = torch.randint(0, classes, (batch,))
    eps = torch.tensor(0.37)

    def fused(backend):
        def call():
            loss = nla_fast.nla_loss(z, zf, y, eps, backend=backend, validate=False)
            torch.autograd.grad(loss, (z, zf))
        return call

    def cross_entropies():
        loss = F.cross_entropy(z, y) + F.cross_entropy(zf, y)
        torch.autograd.grad(loss, (z, zf))

    def triton_without_lean_launches():
        launch_allowed = launch.lean_allowed
        launch.lean_allowed = lambda: False
        try:
            fused("triton")()
        finally:
            launch.lean_allowed = launch_allowed

    def triton_forward_only():
        with torch.no_grad():
            nla_fast.nla_loss(z, zf, y, eps, backend="triton", validate=False)

    return {
        "two F.cross_entropy, fwd + autograd.grad": cross_entropies,
        "triton, fwd + autograd.grad": fused("triton"),
        "triton, fwd + autograd.grad, every launch via JITFunction.run": triton_without_lean_launches,
        "triton, fwd only (no_grad)": triton_forward_only,
        "extension (CPU op computes), fwd + autograd.grad": fused("extension"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=7)
    result_files.add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stub_the_launcher()
    import triton

    medians = _windows(make_cases(args.batch, args.classes), args.calls, args.windows)
    bar = medians["two F.cross_entropy, fwd + autograd.grad"]
    rows = [{"case": name, "median_us": us, "x_two_cross_entropies": us / bar} for name, us in medians.items()]
    print(f"host time per call, B={args.batch} C={args.classes}, 1 thread, {args.windows} interleaved windows "
          f"of {args.calls} calls (Triton's C launcher stubbed)")
    for row in rows:
        print(f"  {row['median_us']:8.1f} us  {row['x_two_cross_entropies']:5.2f}x  {row['case']}")
    result = {
        "bench": "triton_host_bench", "device": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "classes": args.classes, "threads": 1,
        "calls": args.calls, "windows": args.windows, "rows": rows,
    }
    folder = result_files.output_dir(args, f"cpu-{result_files.slug(platform.machine())}")
    path = folder / f"triton_host_bench-cpu-{result_files.slug(platform.machine())}.json"
    from nla_fast import atomic

    atomic.write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
