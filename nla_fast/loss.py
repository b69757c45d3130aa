"""The public NLA loss: one function, three implementations picked by ``backend``.

- ``reference``: eager PyTorch autograd (``nla_fast.reference``), the oracle.
- ``triton``: one fused Triton sweep writing the loss and both gradients (``nla_fast.kernels``).
- ``extension``: the C++/CUDA op ``torch.ops.nla_fast.nla_loss_fwd`` (``csrc/``).
- ``auto``: CUDA tensors use triton, else the extension; CPU tensors use the extension, else
  the reference.
"""
from __future__ import annotations

import warnings

import torch

from .config import NLAConfig
from .loss_inputs import BackendUnavailable, check_eps, check_inputs, index_target
from .reference import naw_weight_reference, nla_loss_reference

BACKENDS = ("auto", "reference", "triton", "extension")
_DEFAULT_CONFIG = NLAConfig()
_reasons: dict[tuple[str, str], str | None] = {}
_resolved: dict[tuple[str, str], str] = {}  # (backend asked for, device type) -> backend
_impls: dict[str, tuple] = {}  # fast backend -> (loss function, weight function), imported once


def _impl(chosen: str) -> tuple:
    """(nla_loss_<backend>, naw_weight_<backend>) of a fast backend (no import statement per call)."""
    impl = _impls.get(chosen)
    if impl is None:
        if chosen == "triton":
            from .kernels.nla_loss import naw_weight_triton, nla_loss_triton

            impl = (nla_loss_triton, naw_weight_triton)
        else:
            from .extension import naw_weight_extension, nla_loss_extension

            impl = (nla_loss_extension, naw_weight_extension)
        _impls[chosen] = impl
    return impl


def _unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` tensors (None: it can). Each backend answers
    for itself; the answer is cached per (backend, device type), so a call costs a dict lookup."""
    key = (backend, device_type)
    if key not in _reasons:
        if backend == "triton":
            from .kernels import unavailable_reason
        else:
            from .extension import unavailable_reason
        _reasons[key] = unavailable_reason(device_type)
    return _reasons[key]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; raises BackendUnavailable if named and impossible."""
    key = (backend, device.type)
    chosen = _resolved.get(key)
    if chosen is not None:
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("triton", "extension"):
        reason = _unavailable_reason(backend, device.type)
        if reason:
            raise BackendUnavailable(f"backend {backend!r} is unavailable: {reason}")
        chosen = backend
    elif backend == "reference":
        chosen = backend
    else:
        order = ("triton", "extension") if device.type == "cuda" else ("extension",)
        reasons = []
        for candidate in order:
            reason = _unavailable_reason(candidate, device.type)
            if reason is None:
                chosen = candidate
                break
            reasons.append(f"{candidate}: {reason}")
        else:
            warnings.warn(f"nla_fast: using the eager reference loss on {device.type} ({'; '.join(reasons)})")
            chosen = "reference"
    _resolved[key] = chosen
    return chosen


def nla_loss(
    logits: torch.Tensor,
    logits_flip: torch.Tensor,
    target: torch.Tensor,
    eps: float | torch.Tensor = 0.0,
    config: NLAConfig | None = None,
    backend: str = "auto",
    validate: bool = True,
    return_weights: bool = False,
):
    """The NLA loss (SPEC 1.1) as a 0-d float32 tensor (float64 for float64 logits, except on
    the triton backend, which computes in float32).

    ``logits``/``logits_flip``: (B, C) logits of an image and of its horizontal flip.
    ``target``: (B,) integer labels. ``eps``: the schedule value, a float or a 0-d tensor on
    the logits' device (read from memory, so a captured CUDA graph sees updates).
    ``return_weights``: also return the (B,) NAW weights (detached) from the same pass.
    """
    config = config or _DEFAULT_CONFIG
    check_inputs(logits, logits_flip, target, validate)
    check_eps(eps, validate)
    target = index_target(target)
    chosen = resolve_backend(backend, logits.device)
    if chosen == "reference":
        loss = nla_loss_reference(logits, logits_flip, target, eps, config)
        if return_weights:
            return loss, naw_weight_reference(logits.detach(), target, eps, config).float()
        return loss
    loss, weights = _impl(chosen)[0](logits, logits_flip, target, eps, config.constants, return_weights)
    return (loss, weights) if return_weights else loss


def naw_weight(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float | torch.Tensor = 0.0,
    config: NLAConfig | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """(B,) float32 NAW weight of each sample (no gradient)."""
    config = config or _DEFAULT_CONFIG
    check_inputs(logits, None, target, validate)
    check_eps(eps, validate)
    target = index_target(target)
    chosen = resolve_backend(backend, logits.device)
    with torch.no_grad():
        if chosen == "reference":
            return naw_weight_reference(logits, target, eps, config).float()
        return _impl(chosen)[1](logits, target, eps, config.constants)


class NLALoss(torch.nn.Module):
    """``nn.Module`` form of :func:`nla_loss`: ``NLALoss(config)(logits, logits_flip, target, eps)``."""

    def __init__(self, config: NLAConfig | None = None, backend: str = "auto", validate: bool = True):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = config or NLAConfig()
        self.backend = backend
        self.validate = validate

    def forward(self, logits, logits_flip, target, eps=0.0, return_weights: bool = False):
        return nla_loss(
            logits, logits_flip, target, eps, self.config, self.backend, self.validate, return_weights
        )

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}"
