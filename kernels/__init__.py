"""Triton kernels of nla_fast (installed as ``nla_fast.kernels``).

Importing this package does not import Triton; ``nla_fast.kernels.nla_loss`` does.
"""
from __future__ import annotations

import os

import torch


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else why not."""
    device_type = torch.device(device).type
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"the Triton kernels need CUDA tensors (got {device_type}); on the CPU they run only "
        "under TRITON_INTERPRET=1 set before nla_fast.kernels is imported"
    )


def fused_backend():
    """The Triton backend table (``nla_fast.fused.FusedBackend``); imports Triton."""
    from .ops import BACKEND

    return BACKEND
