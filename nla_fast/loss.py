"""The public NLA loss: one function, three implementations picked by ``backend``.

- ``reference``: eager PyTorch autograd (``nla_fast.reference``), the oracle.
- ``triton``: one fused Triton sweep writing the loss and both gradients (``nla_fast.kernels``).
- ``extension``: the C++/CUDA operators ``torch.ops.nla_fast.*`` (``csrc/``, ``nla_fast.extension``).
- ``auto``: CUDA tensors use triton, else the extension; CPU tensors use the extension, else
  the reference.

A call reads: check the inputs (``loss_inputs``) -> resolve the backend (once per backend name
and device type) -> apply it (the reference, or ``nla_fast.fused``'s one autograd Function over
the chosen backend's launchers).
"""
from __future__ import annotations

import warnings

import torch

from . import fused
from .config import NLAConfig
from .loss_inputs import BackendUnavailable, check_eps, check_inputs, index_target, split_eps
from .messages import short_error
from .reference import naw_weight_reference, nla_loss_reference

BACKENDS = ("auto", "reference", "triton", "extension")
_DEFAULT_CONFIG = NLAConfig()
_resolved: dict[tuple[str, str], str] = {}  # (backend asked for, device type) -> concrete backend


def _unavailable_reason(name: str, device_type: str) -> str | None:
    """Why the fused backend ``name`` cannot run on ``device_type`` tensors (None: it can); when
    it can, its launchers are registered with ``nla_fast.fused`` on the way."""
    try:
        if name == "triton":
            from .kernels import fused_backend, unavailable_reason
        else:
            from .native_build import unavailable_reason
        reason = unavailable_reason(device_type)
        if reason is None:
            if name == "triton":
                fused_backend()
            else:
                from . import extension  # noqa: F401 - registers the operators' fakes and launchers
    except Exception as err:  # noqa: BLE001 - a backend that fails to import is unavailable, and says why
        reason = f"importing it failed: {short_error(err, limit=1000)}"
    return reason


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; raises BackendUnavailable if named and
    impossible. Resolved once per (backend, device type)."""
    return _resolve(backend, device.type)


@torch.compiler.assume_constant_result  # traced code runs it once and keeps the name: no lock or build traced
def _resolve(backend: str, device_type: str) -> str:
    key = (backend, device_type)
    chosen = _resolved.get(key)
    if chosen is not None:
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("triton", "extension"):
        reason = _unavailable_reason(backend, device_type)
        if reason:
            raise BackendUnavailable(f"backend {backend!r} is unavailable: {reason}")
        chosen = backend
    elif backend == "reference":
        chosen = backend
    else:
        order = ("triton", "extension") if device_type == "cuda" else ("extension",)
        reasons = []
        for candidate in order:
            reason = _unavailable_reason(candidate, device_type)
            if reason is None:
                chosen = candidate
                break
            reasons.append(f"{candidate}: {reason}")
        else:
            warnings.warn(f"nla_fast: using the eager reference loss on {device_type} ({'; '.join(reasons)})")
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
    The fused backends give first derivatives; differentiating their gradient again
    (``create_graph=True``) raises an error that says to use ``backend="reference"``.
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
    if logits_flip.dtype != logits.dtype and fused.backend(chosen).same_dtypes:
        common = torch.promote_types(logits.dtype, logits_flip.dtype)
        logits, logits_flip = logits.to(common), logits_flip.to(common)
    eps_tensor, eps_value = split_eps(eps, logits.device)
    consts, jsd, reg_mean = config.kernel_args
    loss, weights = fused.fused_loss(chosen, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd,
                                     reg_mean, return_weights)
    return (loss, weights.float()) if return_weights else loss


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
        eps_tensor, eps_value = split_eps(eps, logits.device)
        consts, jsd, reg_mean = config.kernel_args
        return fused.launchers(chosen).forward(
            logits.detach(), None, target, eps_tensor, eps_value, consts, jsd, reg_mean, False, False, True,
            False)[3].float()


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
