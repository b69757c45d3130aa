"""The native (C++/CUDA) NLA loss as torch sees it: operators, fake kernels, autograd, backend table.

The operators are declared once in ``csrc/nla_loss.cpp`` (``TORCH_LIBRARY(nla_fast, m)``):

- ``nla_fast::nla_loss_fwd(logits, logits_flip, target, eps_tensor?, eps_value, constants,
  jsd, reg_mean, need_grad, need_weights) -> (loss, grad_logits, grad_logits_flip, weights)``:
  the loss, both gradients (when ``need_grad``) and the NAW weights (when ``need_weights``) in
  one sweep; any C >= 2; targets int64 or int32;
- ``nla_fast::nla_scale_grads(grad_output, grad_logits, grad_logits_flip) -> (Tensor, Tensor)``:
  the saved gradients times ``grad_output`` (read from memory, no host check);
- ``nla_fast::nla_scale_grads_(grad_output, grad_logits!, grad_logits_flip!)``: the same in
  place, moving no data when ``grad_output`` is 1 (checked on the device);
- ``nla_fast::naw_weight(logits, target, eps_tensor?, eps_value, constants) -> weights``.

Importing this module builds (first time) and loads the library (``native_build``); the fake
kernels and the autograd formula of ``nla_loss_fwd`` are registered beside it, here, so
``torch.compile`` traces the operators and a user may differentiate ``nla_loss_fwd`` directly.
``nla_fast.nla_loss`` itself goes through ``nla_fast.fused`` (one Function for every backend)
with the launchers at the end of this file.
"""
from __future__ import annotations

import torch

from . import native_build
from .fused import FusedBackend, Launchers, register
from .native_build import unavailable_reason  # noqa: F401 - the backend protocol of nla_fast.loss

native_build.load()
LOADED = native_build.op_exists()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if LOADED:
    @torch.library.register_fake("nla_fast::nla_loss_fwd")
    def _nla_loss_fwd_fake(logits, logits_flip, target, eps_tensor, eps_value, constants, jsd, reg_mean,
                           need_grad, need_weights):
        torch._check(logits.dim() == 2, lambda: f"logits must be (B, C), got {tuple(logits.shape)}")
        torch._check(logits_flip.shape == logits.shape, lambda: "logits_flip must match logits")
        batch, classes = logits.shape
        acc = _acc_dtype(logits.dtype)
        rows = batch if need_grad else 0
        grad = logits.new_empty((rows, classes) if need_grad else (0,))
        grad_flip = logits_flip.new_empty((rows, classes) if need_grad else (0,))
        weights = logits.new_empty((batch if need_weights else 0,), dtype=acc)
        return logits.new_empty((), dtype=acc), grad, grad_flip, weights

    @torch.library.register_fake("nla_fast::nla_scale_grads")
    def _nla_scale_grads_fake(grad_output, grad_logits, grad_logits_flip):
        return grad_logits.new_empty(grad_logits.shape), grad_logits_flip.new_empty(grad_logits_flip.shape)

    @torch.library.register_fake("nla_fast::nla_scale_grads_")
    def _nla_scale_grads_inplace_fake(grad_output, grad_logits, grad_logits_flip):
        return None

    @torch.library.register_fake("nla_fast::naw_weight")
    def _naw_weight_fake(logits, target, eps_tensor, eps_value, constants):
        torch._check(logits.dim() == 2, lambda: f"logits must be (B, C), got {tuple(logits.shape)}")
        return logits.new_empty((logits.shape[0],), dtype=_acc_dtype(logits.dtype))

    def _setup_context(ctx, inputs, output):
        _loss, grad, grad_flip, weights = output
        ctx.need_grad = bool(inputs[8])
        ctx.mark_non_differentiable(grad, grad_flip, weights)
        ctx.save_for_backward(grad, grad_flip)

    def _backward(ctx, grad_loss, _grad_grad, _grad_grad_flip, _grad_weights):
        if not ctx.need_grad:
            raise RuntimeError(
                "nla_fast::nla_loss_fwd was called with need_grad=False, so it saved no gradient; "
                "call it with need_grad=True to differentiate it"
            )
        grad, grad_flip = ctx.saved_tensors
        scaled, scaled_flip = torch.ops.nla_fast.nla_scale_grads(grad_loss, grad, grad_flip)
        needs = ctx.needs_input_grad
        return (scaled if needs[0] else None, scaled_flip if needs[1] else None) + (None,) * 8

    torch.library.register_autograd("nla_fast::nla_loss_fwd", _backward, setup_context=_setup_context)

    _FWD = torch.ops.nla_fast.nla_loss_fwd.default  # resolved once: no overload lookup per call
    _SCALE = torch.ops.nla_fast.nla_scale_grads.default
    _SCALE_ = torch.ops.nla_fast.nla_scale_grads_.default
    _WEIGHTS = torch.ops.nla_fast.naw_weight.default

# Eager calls skip the op's Autograd kernel (the register_autograd wrapper): FusedNLALoss
# already records the graph. The in-place scale also skips ADInplaceOrView: it rescales buffers
# the Function owns, and a version bump would make a retain_graph backward refuse to read them.
_below_autograd = torch._C._AutoDispatchBelowAutograd
_below_inplace_or_view = torch._C._AutoDispatchBelowADInplaceOrView


def _forward(op, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, grad_z, grad_zf,
             weights, loss):
    """The launcher protocol of ``nla_fast.fused`` over the native ops: both gradients are
    written (and returned) when either is wanted; ``logits_flip`` None: the NAW weights only."""
    if logits_flip is None:
        return None, None, None, _WEIGHTS(logits, target, eps_tensor, eps_value, consts)
    need_grad = grad_z or grad_zf
    out, grad, grad_flip, w = op(logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean,
                                 need_grad, weights)
    if not need_grad:
        grad = grad_flip = None
    return out, grad, grad_flip, (w if weights else None)


def _eager_forward(*args):
    with _below_autograd():
        return _forward(_FWD, *args)


def _traced_forward(*args):
    return _forward(torch.ops.nla_fast.nla_loss_fwd, *args)


def _scale(grad_output, grad, grad_flip, in_place):
    # the extension saves both gradients whenever it saves one (see _forward)
    if in_place:
        with _below_inplace_or_view():
            _SCALE_(grad_output, grad, grad_flip)
        return grad, grad_flip
    with _below_autograd():
        return _SCALE(grad_output, grad, grad_flip)


def _traced_scale(grad_output, grad, grad_flip, in_place):
    return torch.ops.nla_fast.nla_scale_grads(grad_output, grad, grad_flip)


BACKEND = register(FusedBackend(
    name="extension",
    eager=Launchers(forward=_eager_forward, scale=_scale),
    traced=Launchers(forward=_traced_forward, scale=_traced_scale),
    same_dtypes=True,
)) if LOADED else None
