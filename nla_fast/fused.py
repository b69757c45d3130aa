"""The one autograd Function behind both fused backends (Triton kernels, C++/CUDA extension).

Liger-Kernel style: the forward launch writes the loss AND both gradients (the loss is a scalar,
so the gradient is known up to the factor grad_output); the backward only scales them:

- first backward: the saved buffers (each forward allocates its own) become the gradients,
  scaled in place by a kernel that reads grad_output on the device and moves no data when it
  is 1 (the usual ``loss.backward()``): no host sync, graph-capturable;
- a further backward (``retain_graph=True``): the first call's scale is undone into new tensors
  (NaN if that scale was exactly 0, whose information is gone);
- traced by torch.compile: always the out-of-place scale (no in-place tricks in a graph).

Double backward (``create_graph=True``) is refused with a clear error when it is attempted: the
kernels compute first derivatives only (the eager reference backend has them all).

A backend is a ``FusedBackend``: its launchers for eager calls and for traced ones (registered
custom ops, which torch.compile sees). The eager-versus-traced choice is made here, once per
call (``launchers``), and nowhere else.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

__all__ = ["Launchers", "FusedBackend", "register", "backend", "launchers", "fused_loss", "FusedNLALoss"]


class Launchers(NamedTuple):
    """How a backend runs, eagerly or inside a traced graph.

    ``forward(logits, logits_flip|None, target, eps_tensor|None, eps_value, consts, jsd,
    reg_mean, grad_z, grad_zf, weights, loss) -> (loss, gz, gzf, w)``, each None (eager) or a
    0-element placeholder (traced) where not asked for; ``scale(grad_output, gz, gzf, in_place)
    -> (gz', gzf')``.
    """

    forward: Callable
    scale: Callable


class FusedBackend(NamedTuple):
    name: str
    eager: Launchers
    traced: Launchers
    same_dtypes: bool  # both logits must share one dtype (the extension); else any pair


_BACKENDS: dict[str, FusedBackend] = {}


def register(backend: FusedBackend) -> FusedBackend:
    _BACKENDS[backend.name] = backend
    return backend


def backend(name: str) -> FusedBackend:
    return _BACKENDS[name]


def launchers(name: str) -> Launchers:
    """The one place where eager and traced calls part ways."""
    backend = _BACKENDS[name]
    return backend.traced if torch.compiler.is_compiling() else backend.eager


_TWICE = (
    b"nla_fast: the fused NLA loss backends compute first derivatives only, so the gradient "
    b"they return cannot be differentiated again (create_graph=True); use backend='reference' "
    b"for double backward (e.g. a gradient penalty through the loss)"
)


def _refuse_double_backward(*grads):
    """Under ``create_graph=True``: gradients whose own backward raises the message above
    (``once_differentiable``'s mechanism, applied even when grad_output needs no gradient, as in a
    gradient penalty, and with words that say what to do)."""
    live = [g for g in grads if g is not None]
    if not torch.is_grad_enabled() or not live:
        return grads
    wrapped = iter(torch._C._functions.DelayedError(_TWICE, len(live))(
        *[g.detach().requires_grad_() for g in live]))
    return tuple(None if g is None else next(wrapped) for g in grads)


class FusedNLALoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name: str, logits, logits_flip, target, eps_tensor, eps_value: float, consts,
                jsd: bool, reg_mean: bool, grad_z: bool, grad_zf: bool, weights: bool):
        loss, gz, gzf, w = launchers(name).forward(
            logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, grad_z, grad_zf,
            weights, True)
        ctx.save_for_backward(gz, gzf)  # None where the backend wrote no gradient
        ctx.backend = name
        ctx.applied_scale = None  # the grad_output already multiplied into the saved gradients
        ctx.set_materialize_grads(False)
        if not weights:
            return loss
        ctx.mark_non_differentiable(w)
        return loss, w

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if grad_loss is None:
            return (None,) * 12
        gz, gzf = ctx.saved_tensors
        scale = launchers(ctx.backend).scale
        if torch.compiler.is_compiling():
            gz, gzf = scale(grad_loss, gz, gzf, False)
        elif torch.is_grad_enabled():  # create_graph=True: compute as below, refuse a second backward
            with torch.no_grad():
                gz, gzf = _scale_saved(ctx, scale, grad_loss, gz, gzf)
            gz, gzf = _refuse_double_backward(gz, gzf)
        else:
            gz, gzf = _scale_saved(ctx, scale, grad_loss, gz, gzf)
        needs = ctx.needs_input_grad
        return (None, gz if needs[1] else None, gzf if needs[2] else None) + (None,) * 9


def _scale_saved(ctx, scale, grad_loss, gz, gzf):
    """First backward: the saved buffers become the gradients, scaled in place; a further one
    (retain_graph=True) undoes the first scale into new tensors."""
    if ctx.applied_scale is None:
        scale(grad_loss, gz, gzf, True)
        ctx.applied_scale = grad_loss
        return gz, gzf
    return scale(grad_loss / ctx.applied_scale, gz, gzf, False)


def fused_loss(name: str, logits, logits_flip, target, eps_tensor: Optional[torch.Tensor], eps_value: float,
               consts, jsd: bool, reg_mean: bool, return_weights: bool):
    """(loss, weights or None) from backend ``name``: through the Function when a gradient is
    wanted, else one forward launch that writes no gradient at all."""
    grad_z = grad_zf = False
    if torch.is_grad_enabled():
        grad_z, grad_zf = logits.requires_grad, logits_flip.requires_grad
    if grad_z or grad_zf:
        out = FusedNLALoss.apply(name, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd,
                                 reg_mean, grad_z, grad_zf, return_weights)
        return out if return_weights else (out, None)
    loss, _, _, w = launchers(name).forward(
        logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, False, False,
        return_weights, True)
    return loss, (w if return_weights else None)
