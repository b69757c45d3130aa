"""The Triton backend as torch sees it: custom operators for torch.compile, and the backend table.

The operators (own namespace: ``torch.ops.nla_fast`` is the C++ extension's) are
``torch.library.triton_op``s on a GPU, so Inductor sees the kernels and the body (traceable) is
also the fake implementation. Under TRITON_INTERPRET=1 kernels cannot be traced, so they are
opaque ``custom_op``s whose fake runs the same body without launching (torch.compile then
runs on the CPU). Eager calls do not go through the operators: they launch directly
(``launch.forward`` / ``launch.scale``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.library import triton_op, wrap_triton

from nla_fast.fused import FusedBackend, Launchers, register

from . import launch


class _NoLaunch:
    """Stands in for a kernel in the fake (shape-only) implementations: allocates, launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_launch(kernel):
    return _NoLaunch()


_WRAP = (lambda kernel: kernel) if launch.INTERPRET else wrap_triton


def _placeholders(device, outputs):
    # custom ops return tensors only, none aliasing another: a distinct 0-element one for None
    return tuple(torch.empty(0, device=device) if t is None else t for t in outputs)


def _none_if_empty(tensor, present: bool):
    return tensor if present else None


def _loss_fwd(
    logits: torch.Tensor, logits_flip: Optional[torch.Tensor], target: torch.Tensor,
    eps_tensor: Optional[torch.Tensor], eps_value: float, consts: List[float], jsd: bool, reg_mean: bool,
    grad_z: bool, grad_zf: bool, weights: bool, loss: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _placeholders(logits.device, launch.forward(
        logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, grad_z, grad_zf, weights,
        loss, wrap=_WRAP))


def _loss_fwd_fake(logits, logits_flip, target, *args):
    return _placeholders(logits.device, launch.forward(logits, logits_flip, target, *args, wrap=_no_launch))


def _scale_grads(
    grad_output: torch.Tensor, gz: torch.Tensor, gzf: torch.Tensor, has_z: bool, has_zf: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _placeholders(grad_output.device, launch.scale(
        grad_output, _none_if_empty(gz, has_z), _none_if_empty(gzf, has_zf), False, wrap=_WRAP))


def _scale_grads_fake(grad_output, gz, gzf, has_z, has_zf):
    return _placeholders(grad_output.device, launch.scale(
        grad_output, _none_if_empty(gz, has_z), _none_if_empty(gzf, has_zf), False, wrap=_no_launch))


def _register(name, fn, fake):
    if not launch.INTERPRET:
        return triton_op(name, fn, mutates_args=())
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op


loss_fwd = _register("nla_fast_triton::loss_fwd", _loss_fwd, _loss_fwd_fake)
scale_grads = _register("nla_fast_triton::scale_grads", _scale_grads, _scale_grads_fake)


def _traced_forward(logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, grad_z,
                    grad_zf, weights, loss):
    out, gz, gzf, w = loss_fwd(logits, logits_flip, target, eps_tensor, eps_value, list(consts), jsd, reg_mean,
                               grad_z, grad_zf, weights, loss)
    # the operator returns 0-element placeholders for what was not asked for
    return (out if loss else None), (gz if grad_z else None), (gzf if grad_zf else None), (w if weights else None)


def _traced_scale(grad_output, gz, gzf, in_place):
    has_z, has_zf = gz is not None, gzf is not None
    empty = grad_output.new_empty(0)
    oz, ozf = scale_grads(grad_output, gz if has_z else empty, gzf if has_zf else empty, has_z, has_zf)
    return (oz if has_z else None), (ozf if has_zf else None)


BACKEND = register(FusedBackend(
    name="triton",
    eager=Launchers(forward=launch.forward, scale=launch.scale),
    traced=Launchers(forward=_traced_forward, scale=_traced_scale),
    same_dtypes=False,
))
