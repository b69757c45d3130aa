"""Host (Python) cost of the Triton loss wrapper, kernels not launched: a CPU-only measurement.

Every Triton launch of ``nla_fast.kernels.nla_loss`` is replaced by a no-op, so what is timed is
the wrapper around the launches: argument handling, launch-config choice, output allocation,
the autograd Function and the backward. It runs on CPU tensors under TRITON_INTERPRET=1 (the
eager path is the same Python as on a GPU; only the launches are missing). It says nothing
about the kernels, nor about Triton's own launch cost (binding the arguments, ~20-40 us a launch).

    TRITON_INTERPRET=1 .venv/bin/python bench/triton_host_bench.py [--batch 32 --classes 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from nla_fast.config import NLAConfig  # noqa: E402
import nla_fast.kernels.nla_loss as triton_loss  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return _no_op

    def run(self, *args, **kwargs):  # an autotuner's entry point
        return None


def _no_op(*args, **kwargs):
    return None


def patch_out_launches() -> list[str]:
    """Replace every module-level Triton kernel (JITFunction or Autotuner) by a no-op."""
    from triton.runtime.jit import KernelInterface  # JITFunction, InterpretedFunction, Autotuner

    patched = []
    for name, value in list(vars(triton_loss).items()):
        if isinstance(value, KernelInterface):
            setattr(triton_loss, name, _NoLaunch())
            patched.append(name)
    return patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--windows", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    patched = patch_out_launches()
    constants = NLAConfig().constants
    z = torch.randn(args.batch, args.classes, requires_grad=True)
    zf = torch.randn(args.batch, args.classes, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,))

    def forward_backward():
        loss, _ = triton_loss.nla_loss_triton(z, zf, y, 0.37, constants, False)
        loss.backward()

    def forward_only():
        with torch.no_grad():
            triton_loss.nla_loss_triton(z, zf, y, 0.37, constants, False)

    print(f"kernels replaced by no-ops: {', '.join(patched)}")
    for name, fn in (("forward + backward", forward_backward), ("forward, no_grad", forward_only)):
        for _ in range(200):
            fn()
        per_call = []
        for _ in range(args.windows):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            per_call.append((time.perf_counter() - t0) / args.calls * 1e6)
        print(f"{name:20s} B={args.batch} C={args.classes}: median {statistics.median(per_call):6.1f} us/call "
              f"(min {min(per_call):.1f}, max {max(per_call):.1f}; {args.windows} windows of {args.calls})")


if __name__ == "__main__":
    main()
