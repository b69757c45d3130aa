"""What every loss backend agrees on before any kernel runs: input checks, eps, targets, errors.

One place for it, so the reference, the Triton kernels and the C++/CUDA extension accept and
reject the same inputs with the same messages. Nothing here synchronises with the device
unless ``validate=True`` asks for it (the target range and a tensor eps are then read once).
"""
from __future__ import annotations

import torch

__all__ = ["BackendUnavailable", "check_inputs", "check_eps", "split_eps", "index_target"]

# Integer label dtypes every backend reads as they are; any other integer dtype is widened once.
NATIVE_TARGET_DTYPES = (torch.int64, torch.int32)


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


def _in_trace_or_capture() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# Every integer dtype a label tensor may have (bool is not a label).
_INTEGER_DTYPES = frozenset(
    d for d in (getattr(torch, n, None) for n in ("uint8", "int8", "int16", "int32", "int64", "uint16",
                                                   "uint32", "uint64")) if d is not None
)


def check_inputs(logits, logits_flip, target, validate: bool) -> None:
    """Shape and dtype checks (free); with ``validate`` also the target range (one host sync).

    The common case (everything right) is one combined test; a failure falls through to the
    checks below, which name what is wrong."""
    shape = logits.shape
    device = logits.device
    if not (
        len(shape) == 2 and shape[0] > 0 and shape[1] >= 2 and logits.dtype.is_floating_point
        and target.shape == shape[:1] and target.dtype in _INTEGER_DTYPES and target.device == device
        and (logits_flip is None or (logits_flip.shape == shape and logits_flip.dtype.is_floating_point
                                     and logits_flip.device == device))
    ):
        _explain_bad_inputs(logits, logits_flip, target)
    if validate and torch.compiler.is_compiling():
        # no host read inside a graph: the check runs in it (an error on the CPU, a device-side
        # assert on a GPU) rather than letting a bad label become a NaN loss
        torch._assert_async(((target >= 0) & (target < shape[1])).all(),
                            f"nla_fast: a target outside [0, {shape[1]}) (C = {shape[1]} classes)")
    elif validate and not _in_trace_or_capture():
        bad = (target < 0) | (target >= shape[1])
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{index}] = {int(target[index])} is outside [0, {shape[1]}) "
                f"(C = {shape[1]} classes); pass validate=False only for labels checked once"
            )


def _explain_bad_inputs(logits, logits_flip, target) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("the batch is empty (logits of shape (0, C)): the NLA loss is a mean over samples")
    if logits_flip is not None and logits_flip.shape != logits.shape:
        raise ValueError(
            f"logits_flip must match logits: {tuple(logits_flip.shape)} != {tuple(logits.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"NLA needs at least 2 classes, got C={logits.shape[1]}")
    for name, tensor in (("logits_flip", logits_flip), ("target", target)):
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device} but logits are on {logits.device}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (B,) = ({logits.shape[0]},), got shape {tuple(target.shape)}")
    if target.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if logits_flip is not None and not logits_flip.dtype.is_floating_point:
        raise ValueError(f"logits_flip must be floating point, got dtype {logits_flip.dtype}")
    raise AssertionError("nla_fast.loss_inputs: inputs failed the combined check but no single check")


def index_target(target: torch.Tensor) -> torch.Tensor:
    """Targets as the kernels read them: int64 and int32 as they are, other integer dtypes widened."""
    return target if target.dtype in NATIVE_TARGET_DTYPES else target.long()


def check_eps(eps, validate: bool) -> None:
    """eps is the schedule value in [0, 1]: a float is always checked (free), a tensor only with
    ``validate`` (one host read)."""
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"eps must be a float or a 0-d tensor, got a tensor of shape {tuple(eps.shape)}")
        if not eps.dtype.is_floating_point:
            raise ValueError(f"eps must be a floating-point tensor, got dtype {eps.dtype}")
        if not validate or _in_trace_or_capture():
            return
        value = float(eps)
    else:
        try:
            value = float(eps)
        except (TypeError, ValueError):
            raise ValueError(f"eps must be a float in [0, 1] or a 0-d tensor, got {eps!r}") from None
    # NaN and +-inf fail the range test too (and math.isfinite does not trace a symbolic float)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"eps must lie in [0, 1] (the schedule value, see eps_schedule), got {value}")


def split_eps(eps, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """(eps tensor the kernel reads, eps float): the one place a backend splits eps.

    A tensor on the logits' device is read by the kernel from memory (a captured CUDA graph
    sees new values; no host read here). A CPU scalar tensor beside CUDA logits is read on
    the host (no device sync: it is already on the host). A Python number is passed by value.
    """
    if isinstance(eps, torch.Tensor):
        if eps.device == device:
            # no copy and, for the usual 0-d tensor that needs no gradient, no op at all
            if eps.requires_grad:
                eps = eps.detach()
            return (eps if eps.dim() == 0 else eps.reshape(())), 0.0
        if eps.device.type == "cpu":
            return None, float(eps)
        raise ValueError(f"eps tensor is on {eps.device}, the logits on {device}")
    return None, float(eps)
