"""Timing helpers shared by the benchmarks: windows of calls and whole-step CUDA-graph capture."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, windows: int, calls: int) -> list[float]:
    """Seconds per call of ``fn`` in each of ``windows`` windows of ``calls`` calls (synchronised at
    each window's end, so asynchronous device work is counted)."""
    sync(device)
    per_call = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - t0) / calls)
    return per_call


def capture_cuda_graph(fn, warmup: int = 3, generator: torch.Generator | None = None) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream (as capture requires), then capture one call of it.
    A non-default ``generator`` it draws from is registered with the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        fn()
    return graph
