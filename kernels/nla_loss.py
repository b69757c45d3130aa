"""Fused Triton NLA loss (SPEC 1.1): one sweep writes the loss, both gradients and the NAW weights.

Liger-Kernel style: the forward already computes d loss/d logits and d loss/d logits_flip
(the loss is a scalar, so the gradient is known up to the factor grad_output), and the
backward only multiplies the saved gradients by grad_output. The maths is exactly
``nla_fast.reference.nla_forward_backward_closed_form`` (its docstring has the derivation).

Launch design: rows in 2-D tiles [BLOCK_B, BLOCK_C = next_power_of_2(C)] of 2 values per
thread (BLOCK_B = 64 rows for C <= 8, 1 row for C > 512). The forward is ONE launch when the
batch is at most 4 tiles (one program loops over them and writes the final loss: B <= 256
for C <= 8), otherwise a persistent grid (all programs resident, each looping over row
tiles with the next tile's loads pipelined) writes per-program partial sums and a second
one-program launch adds them in a fixed order (deterministic, no float atomics). The
backward is ONE launch scaling both gradients. ``naw_weight_triton`` is one launch.

Numerics: everything is float32 in registers whatever the input dtype (float64 inputs are
also computed in float32; their gradients are stored as float64). Rows are shifted by
their max, so the cross entropy and the "official" consistency are computed from
differences (z - max z) and stay accurate for large logits. The nearest negative and the
true case (g >= n) are decided on the raw logits (softmax is monotone), so ties are exact:
first index among tied negatives, g == n counts as the true case.
Targets outside [0, C) are never used as an address (the gather is a compare with the
column index); such rows give NaN. Non-finite logits give a non-finite loss.

torch.compile: the launches live in ``torch.library.triton_op`` operators (torch >= 2.6), so
dynamo/inductor see the kernels; the autograd.Function around them is traced by dynamo.
``eps`` may be a 0-d device tensor: the kernel then reads it from memory, so a captured
CUDA graph picks up new values; no host syncs and no host-to-device copies per call.
"""
import functools
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Launch heuristics (no autotuning: unsafe under CUDA-graph capture and torch.compile).
# Register use grows ~linearly with the logits held per thread (sm_90 ptxas: ~32 registers
# at 1 value per thread, ~58 at 2, ~115 at 4), so tiles hold 2 values per thread and tensor
# and occupancy stays high (the kernel is memory-bound): 8 warps, or 16 for C > 512.
_VALUES_PER_THREAD = 2
_WARPS = 8
_WARPS_PER_SM = 32  # persistent grid: SMs * 32 / num_warps programs (= partial sums), all resident
_NUM_STAGES = 2  # software pipelining of the row-tile loop (next tile's loads in flight)
_SINGLE_PROGRAM_TILES = 4
_SCALE_BLOCK = 4096  # elements per program of the backward scaling kernel
_SUM_BLOCK = 1024  # partial sums added per loop step of the final reduction (one step up to 256 SMs)


@triton.jit
def _nla_fwd_kernel(
    z_ptr, zf_ptr, y_ptr, eps_ptr,
    loss_ptr, gz_ptr, gzf_ptr, w_ptr,
    B, C,
    stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
    eps_value, lam,
    mu_t1, mu_t2, diag_t, off_t, true_scale,
    mu_f1, mu_f2, diag_f, off_f, inv_det_f, norm_f,
    EPS_FROM_PTR: tl.constexpr,  # read eps from memory (CUDA graphs) instead of the scalar arg
    HAS_FLIP: tl.constexpr,  # False: NAW weights only (naw_weight_triton)
    JSD: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    GRAD_Z: tl.constexpr,
    GRAD_ZF: tl.constexpr,
    WRITE_W: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Persistent programs: program pid handles row tiles pid, pid + grid, ... and keeps its
    # partial loss in registers, so there are few partials (<= 4 per SM) to add up.
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(B, BLOCK_B)
    inv_b = 1.0 / (B * 1.0)  # in the kernel: no SymFloat argument under torch.compile
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols.to(tl.int64)  # int64 offsets: row * stride (col * stride if transposed) overflow int32

    # NAW weight: 2-D Gaussian with Sigma = [[a, b], [b, a]], closed-form inverse.
    # Only the true-case off-diagonal depends on eps: its det/normaliser are per-program scalars.
    if EPS_FROM_PTR:
        eps = tl.load(eps_ptr).to(tl.float32)
    else:
        eps = eps_value
    b_t = -eps * off_t
    det_t = diag_t * diag_t - b_t * b_t
    inv_det_t = 1.0 / det_t
    norm_t = true_scale / (6.283185307179586 * tl.sqrt(det_t))

    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for tile in tl.range(pid, num_tiles, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)

        # All loads first (memory-level parallelism). Padding columns become -inf (exp -> 0);
        # padding rows load 0 so they stay finite, and row_ok drops them from the sums.
        z = tl.load(z_ptr + rows64[:, None] * stride_zb + cols64[None, :] * stride_zc,
                    mask=mask, other=0.0)
        y = tl.load(y_ptr + rows64 * stride_y, mask=row_ok, other=0).to(tl.int64)
        if HAS_FLIP:
            zf = tl.load(zf_ptr + rows64[:, None] * stride_zfb + cols64[None, :] * stride_zfc,
                         mask=mask, other=0.0)
            zf = tl.where(col_ok[None, :], zf.to(tl.float32), float("-inf"))
        z = tl.where(col_ok[None, :], z.to(tl.float32), float("-inf"))
        # the gather of the target is a compare: an out-of-range label is never an address
        y_ok = (y >= 0) & (y < C)
        is_y = cols[None, :] == tl.where(y_ok, y, -1).to(tl.int32)[:, None]

        # softmax from shifted logits a = z - max z
        m = tl.max(z, axis=1)
        a = z - m[:, None]
        e = tl.exp(a)
        s = tl.sum(e, axis=1)
        log_s = tl.log(s)
        inv_s = 1.0 / s
        p = e * inv_s[:, None]
        a_y = tl.sum(tl.where(is_y, a, 0.0), axis=1)
        ce = tl.where(y_ok, log_s - a_y, float("nan"))

        # nearest negative on the raw logits: first index among the tied maxima
        z_neg = tl.where(is_y, float("-inf"), z)
        z_k = tl.max(z_neg, axis=1)
        k = tl.min(tl.where(z_neg == z_k[:, None], cols[None, :], BLOCK_C), axis=1)
        is_k = cols[None, :] == k[:, None]
        z_y = tl.sum(tl.where(is_y, z, 0.0), axis=1)
        a_k = tl.sum(tl.where(is_k, a, 0.0), axis=1)
        true_case = z_y >= z_k  # ties count as the true case
        g = tl.exp(a_y) * inv_s
        n = tl.exp(a_k) * inv_s

        sa = tl.where(true_case, diag_t, diag_f)
        sb = tl.where(true_case, b_t, off_f)
        inv_det = tl.where(true_case, inv_det_t, inv_det_f)
        d1 = g - tl.where(true_case, mu_t1, mu_f1)
        d2 = n - tl.where(true_case, mu_t2, mu_f2)
        quad = (sa * (d1 * d1 + d2 * d2) - 2.0 * sb * d1 * d2) * inv_det
        w = tl.where(true_case, norm_t, norm_f) * tl.exp(-0.5 * quad)
        w = tl.where(y_ok, w, float("nan"))
        if WRITE_W:
            tl.store(w_ptr + rows64, w, mask=row_ok)

        if HAS_FLIP:
            mf = tl.max(zf, axis=1)
            af = zf - mf[:, None]
            ef = tl.exp(af)
            sf = tl.sum(ef, axis=1)
            log_sf = tl.log(sf)
            pf = ef * (1.0 / sf)[:, None]

            if JSD:
                # t = log p - log m, log m = logaddexp(log p, log p') - log 2 (finite when p underflows)
                # (padding columns set to 0, not -inf - -inf = NaN; their p is 0 so they add nothing)
                lp = tl.where(col_ok[None, :], a - log_s[:, None], 0.0)
                lpf = tl.where(col_ok[None, :], af - log_sf[:, None], 0.0)
                hi = tl.maximum(lp, lpf)
                lo = tl.minimum(lp, lpf)
                log_m = hi + tl.log(1.0 + tl.exp(lo - hi)) - 0.6931471805599453
                t = lp - log_m
                tf = lpf - log_m
                pt_sum = tl.sum(p * t, axis=1)
                ptf_sum = tl.sum(pf * tf, axis=1)
                reg_row = 0.5 * (pt_sum + ptf_sum) * inv_b  # batch mean
                reg_gz = (0.5 * inv_b) * p * (t - pt_sum[:, None])
                reg_gzf = (0.5 * inv_b) * pf * (tf - ptf_sum[:, None])
            else:
                # official: (lse z + lse z')/2 - lse((z + z')/2), written with the shifted logits
                # so the large max terms cancel exactly: v = (a + a')/2 = u - (m + m')/2
                v = 0.5 * (a + af)
                vmax = tl.max(v, axis=1)
                ev = tl.exp(v - vmax[:, None])
                sv = tl.sum(ev, axis=1)
                q = ev * (1.0 / sv)[:, None]
                reg_row = 0.5 * (log_s + log_sf) - vmax - tl.log(sv)  # batch sum
                reg_gz = 0.5 * (p - q)
                reg_gzf = 0.5 * (pf - q)

            if WRITE_LOSS:
                row_loss = (lam * inv_b) * (1.0 + w) * ce + (1.0 - lam) * reg_row
                acc += tl.where(row_ok, row_loss, 0.0)

            g_offs = rows64[:, None] * C + cols64[None, :]  # gradients are contiguous (B, C)
            if GRAD_Z:
                # d[(1+w) CE]/dz = (1+w)(p - e_y) + CE (dw/dg g (e_y - p) + dw/dn n (e_k - p))
                dw_dg = -w * (sa * d1 - sb * d2) * inv_det
                dw_dn = -w * (sa * d2 - sb * d1) * inv_det
                one_w = 1.0 + w
                c_y = ce * dw_dg * g
                c_k = ce * dw_dn * n
                naw = p * (one_w - c_y - c_k)[:, None] + tl.where(is_y, (c_y - one_w)[:, None], 0.0)
                naw += tl.where(is_k, c_k[:, None], 0.0)
                gz = (lam * inv_b) * naw + (1.0 - lam) * reg_gz
                tl.store(gz_ptr + g_offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
            if GRAD_ZF:
                gzf = (1.0 - lam) * reg_gzf
                tl.store(gzf_ptr + g_offs, gzf.to(gzf_ptr.dtype.element_ty), mask=mask)

    if WRITE_LOSS:
        # this program's partial sum (the final loss when the grid is one program)
        tl.store(loss_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # one program, fixed order: deterministic
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _scale_grads_kernel(
    go_ptr, gz_ptr, gzf_ptr, oz_ptr, ozf_ptr, N,
    HAS_Z: tl.constexpr, HAS_ZF: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr,
):
    # grad_output is read from memory: no host check for grad_output == 1, graph-capturable.
    # IN_PLACE (o* == g*): the common loss.backward() has grad_output == 1 and the saved
    # gradients are already the answer, so every load and store is masked off (no traffic).
    go = tl.load(go_ptr).to(tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if IN_PLACE:
        mask = mask & (tl.zeros([BLOCK], dtype=tl.float32) + go != 1.0)
    if HAS_Z:
        x = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(oz_ptr + offs, (x * go).to(oz_ptr.dtype.element_ty), mask=mask)
    if HAS_ZF:
        x = tl.load(gzf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ozf_ptr + offs, (x * go).to(ozf_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n):
    return 1 << (n - 1).bit_length()  # plain Python: triton.next_power_of_2 is slower per call


def _cdiv(a, b):
    return (a + b - 1) // b


def _launch_config(batch, num_classes):
    """(BLOCK_B, BLOCK_C, num_warps) from C, and from B when it is a concrete int."""
    block_c = max(2, _next_pow2(num_classes))
    block_b = max(1, (32 * _WARPS * _VALUES_PER_THREAD) // block_c)
    if isinstance(batch, int):  # small batches: one tile, one program, one launch
        block_b = min(block_b, _next_pow2(max(batch, 1)))
    num_warps = min(2 * _WARPS, max(1, (block_b * block_c) // (32 * _VALUES_PER_THREAD)))
    return block_b, block_c, num_warps


@functools.lru_cache(maxsize=None)
def _max_programs(device, num_warps):
    """Persistent grid size: all programs resident at once (~32 warps per SM). Fixed per device,
    so the reduction order, and the loss bits, are the same on every call. 4 on the CPU
    interpreter (exercises the tile loop)."""
    if device.type != "cuda":
        return 4
    per_sm = max(1, _WARPS_PER_SM // num_warps)
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _identity(kernel):
    return kernel


def _forward_body(wrap, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd,
                  grad_z, grad_zf, weights, loss):
    """(loss, d/dlogits, d/dlogits_flip, weights), None for what was not asked for.
    Shared by the eager path (``wrap`` = identity) and the triton_op (``wrap`` = wrap_triton)."""
    batch, num_classes = logits.shape
    num_classes = int(num_classes)  # C picks constexpr block sizes: specialise on it under compile
    (lam, mu_t1, mu_t2, diag_t, off_t, true_scale,
     mu_f1, mu_f2, diag_f, off_f, inv_det_f, norm_f) = consts
    block_b, block_c, num_warps = _launch_config(batch, num_classes)
    num_tiles = _cdiv(batch, block_b)
    # a few tiles: one program loops over them and writes the loss (one launch, small batches)
    num_programs = 1 if num_tiles <= _SINGLE_PROGRAM_TILES else min(
        num_tiles, _max_programs(logits.device, num_warps))
    zf = logits_flip if logits_flip is not None else logits
    # gradients contiguous, in each input's dtype; outputs not asked for are not allocated
    # (the kernel gets a dummy pointer it never touches)
    gz = logits.new_empty((batch, num_classes)) if grad_z else None
    gzf = zf.new_empty((batch, num_classes)) if grad_zf else None
    w = logits.new_empty((batch,), dtype=torch.float32) if weights else None
    loss_out = partial = None
    if loss:
        loss_out = logits.new_empty((), dtype=torch.float32)
        # one program writes the final loss directly: small batches are a single launch
        partial = loss_out if num_programs == 1 else logits.new_empty(
            (num_programs,), dtype=torch.float32)
    wrap(_nla_fwd_kernel)[(num_programs,)](
        logits, zf, target, logits if eps_tensor is None else eps_tensor,
        logits if partial is None else partial, logits if gz is None else gz,
        logits if gzf is None else gzf, logits if w is None else w,
        batch, num_classes,
        *logits.stride(), *zf.stride(), target.stride(0),
        eps_value, lam,
        mu_t1, mu_t2, diag_t, off_t, true_scale,
        mu_f1, mu_f2, diag_f, off_f, inv_det_f, norm_f,
        EPS_FROM_PTR=eps_tensor is not None, HAS_FLIP=logits_flip is not None, JSD=jsd,
        WRITE_LOSS=loss, GRAD_Z=grad_z, GRAD_ZF=grad_zf, WRITE_W=weights,
        BLOCK_B=block_b, BLOCK_C=block_c, NUM_STAGES=_NUM_STAGES, num_warps=num_warps,
    )
    if loss and num_programs > 1:
        block = min(_SUM_BLOCK, _next_pow2(num_programs))
        wrap(_sum_partials_kernel)[(1,)](partial, loss_out, num_programs, BLOCK=block,
                                         num_warps=max(1, min(8, block // 128)))
    return loss_out, gz, gzf, w


def _scale_body(wrap, grad_output, gz, gzf):
    """(grad_output * gz, grad_output * gzf), None for a gradient that is None."""
    oz = None if gz is None else torch.empty_like(gz)
    ozf = None if gzf is None else torch.empty_like(gzf)
    ref = gz if gz is not None else gzf
    if ref is not None and ref.numel() > 0:
        numel = ref.numel()
        block = min(_SCALE_BLOCK, _next_pow2(numel))
        wrap(_scale_grads_kernel)[(_cdiv(numel, block),)](
            grad_output, ref if gz is None else gz, ref if gzf is None else gzf,
            ref if oz is None else oz, ref if ozf is None else ozf, numel,
            HAS_Z=gz is not None, HAS_ZF=gzf is not None, IN_PLACE=False, BLOCK=block,
            num_warps=max(1, min(8, block // 512)),
        )
    return oz, ozf


class _NoLaunch:
    """Stands in for a kernel in the fake (shape-only) implementations: allocates, launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_launch(kernel):
    return _NoLaunch()


# Interpreted kernels cannot be traced (and older torch's wrap_triton rejects them)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_WRAP = _identity if _INTERPRET else wrap_triton


def _placeholders(device, outputs):
    # custom ops return tensors only, none aliasing another: a distinct 0-element one for None
    return tuple(torch.empty(0, device=device) if t is None else t for t in outputs)


def _loss_fwd(
    logits: torch.Tensor,
    logits_flip: Optional[torch.Tensor],
    target: torch.Tensor,
    eps_tensor: Optional[torch.Tensor],
    eps_value: float,
    consts: List[float],
    jsd: bool,
    grad_z: bool,
    grad_zf: bool,
    weights: bool,
    loss: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _placeholders(logits.device, _forward_body(
        _WRAP, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, grad_z, grad_zf,
        weights, loss))


def _scale_grads(
    grad_output: torch.Tensor, gz: torch.Tensor, gzf: torch.Tensor, has_z: bool, has_zf: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _placeholders(grad_output.device, _scale_body(
        _WRAP, grad_output, gz if has_z else None, gzf if has_zf else None))


def _loss_fwd_fake(logits, logits_flip, target, *args):
    return _placeholders(logits.device, _forward_body(_no_launch, logits, logits_flip, target, *args))


def _scale_grads_fake(grad_output, gz, gzf, has_z, has_zf):
    return _placeholders(grad_output.device, _scale_body(
        _no_launch, grad_output, gz if has_z else None, gzf if has_zf else None))


def _register(name, fn, fake):
    """Custom operator (own namespace: torch.ops.nla_fast is the C++ extension's).

    On a GPU it is a ``triton_op``: inductor sees the kernels, and the body (make_fx-traceable)
    is also the fake implementation. Under TRITON_INTERPRET=1 kernels cannot be traced, so it
    is an opaque ``custom_op`` whose fake runs the same body without launching (lets
    torch.compile run on the CPU).
    """
    if not _INTERPRET:
        return triton_op(name, fn, mutates_args=())
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op


_loss_fwd_op = _register("nla_fast_triton::loss_fwd", _loss_fwd, _loss_fwd_fake)
_scale_grads_op = _register("nla_fast_triton::scale_grads", _scale_grads, _scale_grads_fake)


def _forward(*args):
    if torch.compiler.is_compiling():
        return _loss_fwd_op(*args)  # 0-element placeholders for what was not asked for
    return _forward_body(_identity, *args)  # eager: skip the dispatcher, launch directly


def _scale(grad_output, gz, gzf, has_z, has_zf):
    if torch.compiler.is_compiling():
        return _scale_grads_op(grad_output, gz, gzf, has_z, has_zf)
    return _scale_body(_identity, grad_output, gz, gzf)


def _scale_inplace(grad_output, gz, gzf):
    """Eager backward's first call: scale the saved gradients in place (nothing when grad_output == 1)."""
    ref = gz if gz is not None else gzf
    if ref is None or ref.numel() == 0:
        return
    numel = ref.numel()
    block = min(_SCALE_BLOCK, _next_pow2(numel))
    gz_or_ref, gzf_or_ref = (ref if gz is None else gz), (ref if gzf is None else gzf)
    _scale_grads_kernel[(_cdiv(numel, block),)](
        grad_output, gz_or_ref, gzf_or_ref, gz_or_ref, gzf_or_ref, numel,
        HAS_Z=gz is not None, HAS_ZF=gzf is not None, IN_PLACE=True, BLOCK=block,
        num_warps=max(1, min(8, block // 512)),
    )


class _NLALossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd,
                grad_z, grad_zf, weights):
        loss, gz, gzf, w = _forward(logits, logits_flip, target, eps_tensor, eps_value, consts,
                                    jsd, grad_z, grad_zf, weights, True)
        # the gradients were computed in the forward sweep; backward only scales them
        ctx.save_for_backward(gz, gzf)
        ctx.grad_z, ctx.grad_zf = grad_z, grad_zf
        ctx.applied_scale = None  # grad_output already multiplied into the saved gradients
        if not weights:
            return loss
        ctx.mark_non_differentiable(w)
        return loss, w

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        saved_z, saved_zf = ctx.saved_tensors  # 0-element placeholders where no gradient is wanted
        gz, gzf = (saved_z if ctx.grad_z else None), (saved_zf if ctx.grad_zf else None)
        # grad_loss is read by the kernels from memory: no host-side check for grad_loss == 1
        if torch.compiler.is_compiling():
            oz, ozf = _scale(grad_loss, saved_z, saved_zf, ctx.grad_z, ctx.grad_zf)
        elif ctx.applied_scale is None:
            # first backward: the saved buffers become the gradients (each forward allocates its
            # own), scaled in place only when grad_output != 1: no extra pass in the usual case
            _scale_inplace(grad_loss, gz, gzf)
            ctx.applied_scale = grad_loss
            oz, ozf = gz, gzf
        else:
            # a further backward (retain_graph=True): undo the first call's scale into new tensors
            # (NaN if that scale was exactly 0, whose information is gone)
            factor = grad_loss.float() / ctx.applied_scale.float()
            oz, ozf = _scale(factor, gz, gzf, ctx.grad_z, ctx.grad_zf)
        oz, ozf = (oz if ctx.grad_z else None), (ozf if ctx.grad_zf else None)
        return (oz, ozf, None, None, None, None, None, None, None, None)


def _split_eps(eps, device):
    """(eps tensor or None, eps float). A tensor on the logits' device is read by the kernel;
    a CPU scalar tensor next to CUDA logits is read on the host (no device sync)."""
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"eps must be a float or a 0-d tensor, got shape {tuple(eps.shape)}")
        if eps.device == device:
            return eps.detach().reshape(()), 0.0
        if eps.device.type == "cpu":
            return None, float(eps)
        raise ValueError(f"eps tensor is on {eps.device}, the logits on {device}")
    return None, float(eps)


def nla_loss_triton(logits, logits_flip, target, eps, constants, return_weights):
    """(loss, weights or None): the NLA loss as a 0-d float32 tensor with autograd."""
    eps_tensor, eps_value = _split_eps(eps, logits.device)
    consts = [float(c) for c in constants[:12]]
    jsd = bool(constants.jsd)
    grad_enabled = torch.is_grad_enabled()
    grad_z = grad_enabled and logits.requires_grad
    grad_zf = grad_enabled and logits_flip.requires_grad
    if grad_z or grad_zf:
        out = _NLALossFunction.apply(logits, logits_flip, target, eps_tensor, eps_value, consts,
                                     jsd, grad_z, grad_zf, return_weights)
        return out if return_weights else (out, None)
    # no autograd: no gradient writes at all
    loss, _, _, w = _forward(logits, logits_flip, target, eps_tensor, eps_value, consts, jsd,
                             False, False, return_weights, True)
    return loss, (w if return_weights else None)


def naw_weight_triton(logits, target, eps, constants):
    """(B,) float32 NAW weights (no gradient); reads only the logits and the targets."""
    eps_tensor, eps_value = _split_eps(eps, logits.device)
    consts = [float(c) for c in constants[:12]]
    with torch.no_grad():
        _, _, _, w = _forward(logits.detach(), None, target, eps_tensor, eps_value, consts,
                              bool(constants.jsd), False, False, True, False)
    return w
