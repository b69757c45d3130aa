"""Fused Triton NLA loss (SPEC 1.1): one sweep writes the loss, both gradients and the NAW weights.

Liger-Kernel style: the forward already computes d loss/d logits and d loss/d logits_flip
(the loss is a scalar, so the gradient is known up to the factor grad_output), and the
backward only multiplies the saved gradients by grad_output, in place and with every load and
store masked off when grad_output == 1 (no extra pass). The maths is exactly
``nla_fast.reference.nla_forward_backward_closed_form`` (its docstring has the derivation).

Memory layout (what makes it fast at large B; rows of C = 7 bf16 values are 14 bytes):
- compute: a tile of BLOCK_B rows x BLOCK_C = next_power_of_2(C) columns with whole rows in
  one thread (two threads for float32), so the ~12 row reductions are register-only and the
  per-row maths (the Gaussian, the case split) runs once per row, not once per column;
- gradients: written as ONE flat contiguous block of BLOCK_B * C elements per tile, 16-byte
  vector stores. The compute tile is [BLOCK_B, BLOCK_C] with padding columns, the flat block is
  not (7 is not a power of two, so no tl.reshape), so the tile is permuted through shared memory
  by ``tl.gather`` into a [BLOCK_B, BLOCK_C] "flat rows" view (slot (i, j) = flat element
  i * BLOCK_C + j, valid below BLOCK_B * C). That store, being aligned and contiguous, is also
  what makes Triton's coalescing pass give the compute tile its row-per-thread layout;
- logits: loaded in the compute layout (each thread reads its rows' C contiguous values; the
  lanes of a warp read adjacent rows, so a warp's loads cover one contiguous span and each cache
  line comes from DRAM once). Vector loads of a flat block would need the same shared-memory
  permutation on the way in, and a gathered tile loses the row-per-thread layout (measured on
  the compiled TTGIR: Triton then spreads each row over 8 lanes); for C a power of two the
  rows are aligned and the loads are 16-byte vectors too. In-tile offsets are 32-bit
  (tile base in 64 bits); non-contiguous logits take a strided 64-bit path (FLAT_ROWS=False);
- targets: one contiguous vector per tile.

Launches: small batches (B * BLOCK_C <= 4096, e.g. B <= 512 for C <= 8: the trainer's 32) are
ONE program with a fixed configuration, so the loss bits are the same in every process and the
launch is graph-capturable. Larger batches run a persistent grid (programs per SM x SM count;
each program loops over full tiles; the program next in turn takes the partial last tile) that
writes one partial sum per program, and a one-program launch adds them in program order: the
order, so the loss bits, is fixed per (device, shape, configuration); no float atomics. On a
GPU the configuration of the large path is autotuned once per (device, C, dtypes, batch
bucket) in eager use and remembered; under CUDA-graph capture or torch.compile tracing nothing
is benchmarked: a remembered configuration or a fixed heuristic one is used.

Numerics: everything is float32 in registers whatever the input dtype (float64 inputs are
also computed in float32; their gradients are stored as float64). Scalar arguments are cast to
float32 at kernel entry (Inductor passes Python floats as fp64, which would otherwise leak into
the loop-carried sum). Rows are shifted by their max, so the cross entropy and the "official"
consistency are computed from differences (z - max z) and stay accurate for large logits. The
nearest negative and the true case (g >= n) are decided on the raw logits (softmax is monotone),
so ties are exact: first index among tied negatives, g == n counts as the true case. A -inf
logit on a non-target class has probability 0 and adds nothing (finite loss and gradients, as
the reference). Targets outside [0, C) are never used as an address (the gather is a compare
with the column index); such rows give NaN. Other non-finite logits give a non-finite loss.

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

from nla_fast.loss_inputs import split_eps

_SINGLE_PROGRAM_ELEMENTS = 4096  # B * BLOCK_C up to this: one program, one launch, fixed config
_TILE_ELEMENTS = 4096  # heuristic large-batch tile: BLOCK_B * BLOCK_C (512 rows for C <= 8)
_ELEMENTS_PER_THREAD = 8  # heuristic warps: a row of 8 in one thread (C <= 8)
_WARPS_PER_SM = 32  # heuristic persistent grid: SMs * 32 / num_warps programs
_SCALE_BLOCK = 4096  # elements per program of the backward scaling kernel
_SUM_BLOCK = 1024  # partial sums added per loop step of the final reduction


@triton.jit
def _nla_tile(
    z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, tile, B, C,
    stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
    lam, mu_t1, mu_t2, diag_t, b_t, inv_det_t, norm_t,
    mu_f1, mu_f2, diag_f, off_f, inv_det_f, norm_f, inv_b, reg_scale, flat_src,
    FULL: tl.constexpr,  # all BLOCK_B rows exist (no row masks: vector stores)
    EXACT_C: tl.constexpr,  # C == BLOCK_C: no padding columns, no permutation, aligned rows
    FLAT_ROWS: tl.constexpr,  # both logits have strides (C, 1)
    HAS_FLIP: tl.constexpr, JSD: tl.constexpr, WRITE_LOSS: tl.constexpr,
    GRAD_Z: tl.constexpr, GRAD_ZF: tl.constexpr, WRITE_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One tile of rows: stores its weights/gradients, returns its rows' loss terms [BLOCK_B]."""
    if EXACT_C:
        C = BLOCK_C  # a compile-time row length: aligned rows, 16-byte vector loads
    r = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    start = tl.cast(tile, tl.int64) * BLOCK_B  # 64-bit tile base; offsets inside a tile are 32-bit
    rows = start + r
    col_ok = cols < C
    row_ok = rows < B

    # All loads first (memory-level parallelism). Padding columns become -inf (exp -> 0);
    # padding rows load 0 so they stay finite, and row_ok drops them from the sums.
    # Full tiles carry no row mask, and no mask at all when C == BLOCK_C (vectorisable).
    if FLAT_ROWS:
        z_tile = z_ptr + start * C
        zf_tile = zf_ptr + start * C
        offs = r[:, None] * C + cols[None, :]
    else:
        z_tile = z_ptr + start * stride_zb
        zf_tile = zf_ptr + start * stride_zfb
        offs = r.to(tl.int64)[:, None] * stride_zb + cols.to(tl.int64)[None, :] * stride_zc
    if FULL:
        y = tl.load(y_ptr + rows * stride_y)
        if EXACT_C:
            z = tl.load(z_tile + offs)
        else:
            z = tl.load(z_tile + offs, mask=col_ok[None, :], other=0.0)
    else:
        y = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0)
        z = tl.load(z_tile + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_FLIP:
        if not FLAT_ROWS:
            offs = r.to(tl.int64)[:, None] * stride_zfb + cols.to(tl.int64)[None, :] * stride_zfc
        if FULL:
            if EXACT_C:
                zf = tl.load(zf_tile + offs)
            else:
                zf = tl.load(zf_tile + offs, mask=col_ok[None, :], other=0.0)
        else:
            zf = tl.load(zf_tile + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        zf = tl.where(col_ok[None, :], zf.to(tl.float32), float("-inf"))
    z = tl.where(col_ok[None, :], z.to(tl.float32), float("-inf"))
    # the gather of the target is a compare: an out-of-range label is never an address
    y = y.to(tl.int64)  # any integer dtype read as it is; 64-bit so 2^40 cannot wrap into range
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

    # nearest negative on the raw logits: first index among the tied maxima (a valid column
    # other than y, also when every other logit is -inf)
    z_neg = tl.where(is_y, float("-inf"), z)
    z_k = tl.max(z_neg, axis=1)
    k = tl.min(tl.where((z_neg == z_k[:, None]) & col_ok[None, :] & ~is_y, cols[None, :], BLOCK_C), axis=1)
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
        if FULL:
            tl.store(w_ptr + rows, w)
        else:
            tl.store(w_ptr + rows, w, mask=row_ok)

    row_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    if HAS_FLIP:
        mf = tl.max(zf, axis=1)
        af = zf - mf[:, None]
        ef = tl.exp(af)
        sf = tl.sum(ef, axis=1)
        log_sf = tl.log(sf)
        pf = ef * (1.0 / sf)[:, None]

        if JSD:
            # t = log p - log m, log m = logaddexp(log p, log p') - log 2 (finite when p underflows);
            # 0 * log(0/0) = 0: a class of probability 0 (padding, a -inf logit) gives t = 0
            lp = a - log_s[:, None]
            lpf = af - log_sf[:, None]
            # (a class at -inf in both views, padding included, gets log m = 0: unused, t = 0 there)
            both_zero = tl.maximum(lp, lpf) == float("-inf")
            hi = tl.where(both_zero, 0.0, tl.maximum(lp, lpf))
            lo = tl.where(both_zero, 0.0, tl.minimum(lp, lpf))
            log_m = hi + tl.log(1.0 + tl.exp(lo - hi)) - 0.6931471805599453
            t = tl.where(p > 0.0, lp - log_m, 0.0)
            tf = tl.where(pf > 0.0, lpf - log_m, 0.0)
            pt_sum = tl.sum(p * t, axis=1)
            ptf_sum = tl.sum(pf * tf, axis=1)
            reg_row = 0.5 * (pt_sum + ptf_sum)
            reg_gz = 0.5 * p * (t - pt_sum[:, None])
            reg_gzf = 0.5 * pf * (tf - ptf_sum[:, None])
        else:
            # official: (lse z + lse z')/2 - lse((z + z')/2), written with the shifted logits
            # so the large max terms cancel exactly: v = (a + a')/2 = u - (m + m')/2
            v = 0.5 * (a + af)
            vmax = tl.max(v, axis=1)
            ev = tl.exp(v - vmax[:, None])
            sv = tl.sum(ev, axis=1)
            q = ev * (1.0 / sv)[:, None]
            reg_row = 0.5 * (log_s + log_sf) - vmax - tl.log(sv)
            reg_gz = 0.5 * (p - q)
            reg_gzf = 0.5 * (pf - q)

        if WRITE_LOSS:
            row_loss = (lam * inv_b) * (1.0 + w) * ce + ((1.0 - lam) * reg_scale) * reg_row
            if not FULL:
                row_loss = tl.where(row_ok, row_loss, 0.0)

        # gradients: one flat block per tile (see the module docstring)
        f = r[:, None] * BLOCK_C + cols[None, :]
        g_tile = start * C
        if GRAD_Z:
            # d[(1+w) CE]/dz = (1+w)(p - e_y) + CE (dw/dg g (e_y - p) + dw/dn n (e_k - p))
            dw_dg = -w * (sa * d1 - sb * d2) * inv_det
            dw_dn = -w * (sa * d2 - sb * d1) * inv_det
            one_w = 1.0 + w
            c_y = ce * dw_dg * g
            c_k = ce * dw_dn * n
            naw = p * (one_w - c_y - c_k)[:, None] + tl.where(is_y, (c_y - one_w)[:, None], 0.0)
            naw += tl.where(is_k, c_k[:, None], 0.0)
            gz = (lam * inv_b) * naw + ((1.0 - lam) * reg_scale) * reg_gz
            gz = _flat_rows(gz.to(gz_ptr.dtype.element_ty), flat_src, EXACT_C, BLOCK_B, BLOCK_C)
            _store_flat(gz_ptr + g_tile + f, gz, f, B - start, C, FULL, EXACT_C, BLOCK_B)
        if GRAD_ZF:
            gzf = ((1.0 - lam) * reg_scale) * reg_gzf
            gzf = _flat_rows(gzf.to(gzf_ptr.dtype.element_ty), flat_src, EXACT_C, BLOCK_B, BLOCK_C)
            _store_flat(gzf_ptr + g_tile + f, gzf, f, B - start, C, FULL, EXACT_C, BLOCK_B)
    return row_loss


@triton.jit
def _flat_rows(x, flat_src, EXACT_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_B, BLOCK_C] tile (C valid columns) -> its flat-rows view: slot (i, j) holds flat
    element i * BLOCK_C + j of the tile's contiguous (rows, C) block, taken from the compute
    tile at ``flat_src`` (a shared-memory permutation). When C == BLOCK_C the tile already is
    its flat-rows view."""
    if EXACT_C:
        return x
    flat = tl.gather(tl.reshape(x, [BLOCK_B * BLOCK_C]), flat_src, 0)
    return tl.reshape(flat, [BLOCK_B, BLOCK_C])


@triton.jit
def _store_flat(ptrs, x, f, rows_left, C, FULL: tl.constexpr, EXACT_C: tl.constexpr, BLOCK_B: tl.constexpr):
    """Store a flat-rows view: the first min(BLOCK_B, rows_left) * C slots. A full tile's bound
    is a multiple of BLOCK_B (16-byte vector stores); no mask at all when C == BLOCK_C."""
    if FULL:
        if EXACT_C:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=f < BLOCK_B * C)
    else:
        tl.store(ptrs, x, mask=f < rows_left.to(tl.int32) * C)


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
    REG_MEAN: tl.constexpr,  # consistency term averaged over the batch (else summed)
    WRITE_LOSS: tl.constexpr,
    GRAD_Z: tl.constexpr,
    GRAD_ZF: tl.constexpr,
    WRITE_W: tl.constexpr,
    FLAT_ROWS: tl.constexpr,  # both logits contiguous (row stride C, column stride 1)
    EXACT_C: tl.constexpr,  # C == BLOCK_C (a power of two)
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # unused here: the launch grid reads it from the (tuned) config
):
    # Every scalar in float32 from here on: under Inductor a Python float arrives as fp64 and
    # would turn the loop-carried sum into fp64 (a compile error in the persistent loop).
    lam = tl.cast(lam, tl.float32)
    mu_t1 = tl.cast(mu_t1, tl.float32)
    mu_t2 = tl.cast(mu_t2, tl.float32)
    diag_t = tl.cast(diag_t, tl.float32)
    off_t = tl.cast(off_t, tl.float32)
    true_scale = tl.cast(true_scale, tl.float32)
    mu_f1 = tl.cast(mu_f1, tl.float32)
    mu_f2 = tl.cast(mu_f2, tl.float32)
    diag_f = tl.cast(diag_f, tl.float32)
    off_f = tl.cast(off_f, tl.float32)
    inv_det_f = tl.cast(inv_det_f, tl.float32)
    norm_f = tl.cast(norm_f, tl.float32)
    if EPS_FROM_PTR:
        eps = tl.load(eps_ptr).to(tl.float32)
    else:
        eps = tl.cast(eps_value, tl.float32)

    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    inv_b = 1.0 / (B * 1.0)  # in the kernel: no SymFloat argument under torch.compile
    if REG_MEAN:
        reg_scale = inv_b
    else:
        reg_scale = 1.0
    # NAW weight: 2-D Gaussian with Sigma = [[a, b], [b, a]], closed-form inverse.
    # Only the true-case off-diagonal depends on eps: its det/normaliser are per-program scalars.
    b_t = -eps * off_t
    det_t = diag_t * diag_t - b_t * b_t
    inv_det_t = 1.0 / det_t
    norm_t = true_scale / (6.283185307179586 * tl.sqrt(det_t))

    # where each flat-rows slot of a gradient tile comes from (tile-independent, so computed once):
    # flat element f of the tile is row f // C, column f % C of the compute tile
    f = tl.arange(0, BLOCK_B * BLOCK_C)
    if EXACT_C:
        flat_src = f  # unused
    else:
        f_row = f // C
        flat_src = tl.where(f < BLOCK_B * C, f_row * BLOCK_C + (f - f_row * C), 0)  # the rest is masked off

    # Persistent programs: program pid takes full tiles pid, pid + grid, ...; the program next in
    # turn takes the partial last tile. Fixed order: deterministic per (device, shape, config).
    num_full = B // BLOCK_B
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for tile in tl.range(pid, num_full, num_programs):
        acc += _nla_tile(
            z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, tile, B, C,
            stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
            lam, mu_t1, mu_t2, diag_t, b_t, inv_det_t, norm_t,
            mu_f1, mu_f2, diag_f, off_f, inv_det_f, norm_f, inv_b, reg_scale, flat_src,
            True, EXACT_C, FLAT_ROWS, HAS_FLIP, JSD, WRITE_LOSS, GRAD_Z, GRAD_ZF, WRITE_W, BLOCK_B, BLOCK_C,
        )
    if (num_full * BLOCK_B < B) & (pid == num_full % num_programs):
        acc += _nla_tile(
            z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, num_full, B, C,
            stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
            lam, mu_t1, mu_t2, diag_t, b_t, inv_det_t, norm_t,
            mu_f1, mu_f2, diag_f, off_f, inv_det_f, norm_f, inv_b, reg_scale, flat_src,
            False, EXACT_C, FLAT_ROWS, HAS_FLIP, JSD, WRITE_LOSS, GRAD_Z, GRAD_ZF, WRITE_W, BLOCK_B, BLOCK_C,
        )
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


def _clamp(x, lo, hi):
    return max(lo, min(hi, x))


def _block_c(num_classes):
    return max(2, _next_pow2(num_classes))


def _warps_for(block_b, block_c):
    return _clamp((block_b * block_c) // (32 * _ELEMENTS_PER_THREAD), 1, 16)


def _fixed_config(batch, block_c):
    """(BLOCK_B, num_warps, num_stages, programs per SM), the same in every process.

    Small batches (a concrete B with B * BLOCK_C <= 4096) get one program holding the whole
    batch in one tile: one launch, whose bits do not depend on any tuning. Otherwise the
    large-batch heuristic (used where nothing may be benchmarked and nothing was tuned)."""
    if isinstance(batch, int) and batch * block_c <= _SINGLE_PROGRAM_ELEMENTS:
        block_b = _next_pow2(batch)
        return block_b, _warps_for(block_b, block_c), 1, 1
    block_b = max(1, _TILE_ELEMENTS // block_c)
    num_warps = _warps_for(block_b, block_c)
    return block_b, num_warps, 1, max(1, _WARPS_PER_SM // num_warps)


def _tuning_configs(block_c):
    """Large-batch candidates: tiles of 2k-16k elements and 4-16 warps. num_stages stays 1: the
    loads are per-element (see the module docstring), which Triton's loop pipeliner leaves alone
    (sm_90 PTX identical for 1 and 2 stages), so more stages would only lengthen the tuning."""
    configs = []
    for tile, num_warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)):
        block_b = max(1, tile // block_c)
        configs.append(triton.Config(
            {"BLOCK_B": block_b, "PROGRAMS_PER_SM": max(1, _WARPS_PER_SM // num_warps)},
            num_warps=num_warps, num_stages=1))
    return configs


@functools.lru_cache(maxsize=None)
def _tuner(block_c):
    """The autotuned forward kernel for one BLOCK_C (its candidates depend on the row length).
    Keyed on B and C (dtypes are added by Triton); it is only called for a batch bucket that
    has no remembered configuration yet (``_tuned``)."""
    return triton.autotune(configs=_tuning_configs(block_c), key=["B", "C"])(_nla_fwd_kernel)


_tuned = {}  # (device, C, dtype, dtype flip, B bucket) -> (BLOCK_B, num_warps, num_stages, per SM)
_plans = {}  # (device, B, C, tuning key) -> launch plan; everything derived per call is cached
_sm_counts = {}


def _program_limit(device, programs_per_sm):
    """Persistent grid size cap: programs per SM x SMs. 4 on the CPU interpreter (enough to
    exercise the tile loop)."""
    if device.type != "cuda":
        return 4
    sms = _sm_counts.get(device.index)
    if sms is None:
        sms = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return programs_per_sm * sms


def _plan(batch, block_c, device, config, sm_count=None):
    """(BLOCK_B, num_warps, num_stages, programs per SM, number of programs) for a config;
    ``sm_count`` stands in for the device's (``describe_launches`` of a GPU not at hand)."""
    block_b, num_warps, num_stages, per_sm = config
    limit = _program_limit(device, per_sm) if sm_count is None else per_sm * sm_count
    num_programs = min(_cdiv(batch, block_b), limit)
    return block_b, num_warps, num_stages, per_sm, num_programs


def _tuning_key(logits, zf, batch, num_classes):
    return (logits.device, num_classes, logits.dtype, zf.dtype, batch.bit_length())


def _may_tune(device):
    """Benchmarking launches and synchronises: never while tracing or capturing a CUDA graph."""
    return (device.type == "cuda" and not _INTERPRET and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def _identity(kernel):
    return kernel


def _forward_body(wrap, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd,
                  reg_mean, grad_z, grad_zf, weights, loss):
    """(loss, d/dlogits, d/dlogits_flip, weights), None for what was not asked for.
    Shared by the eager path (``wrap`` = identity) and the triton_op (``wrap`` = wrap_triton)."""
    batch, num_classes = logits.shape
    num_classes = int(num_classes)  # C picks constexpr block sizes: specialise on it under compile
    device = logits.device
    zf = logits_flip if logits_flip is not None else logits
    block_c = _block_c(num_classes)
    tune_key = None
    plan = None
    if isinstance(batch, int):
        if batch * block_c > _SINGLE_PROGRAM_ELEMENTS:
            tune_key = _tuning_key(logits, zf, batch, num_classes)
        plan_key = (device, batch, num_classes, tune_key, tune_key in _tuned)
        plan = _plans.get(plan_key)
    tune_now = False
    if plan is None:
        config = _tuned.get(tune_key) if tune_key is not None else None
        tune_now = tune_key is not None and config is None and wrap is _identity and _may_tune(device)
        plan = _plan(batch, block_c, device, config or _fixed_config(batch, block_c))
        if isinstance(batch, int) and not tune_now:
            _plans[plan_key] = plan
    block_b, num_warps, num_stages, per_sm, num_programs = plan
    # gradients contiguous, in each input's dtype; outputs not asked for are not allocated
    # (the kernel gets a dummy pointer it never touches)
    gz = logits.new_empty((batch, num_classes)) if grad_z else None
    gzf = zf.new_empty((batch, num_classes)) if grad_zf else None
    w = logits.new_empty((batch,), dtype=torch.float32) if weights else None
    loss_out = partial = None
    if tune_now:  # the tuned grid is known only after the launch: room for the largest one
        num_programs = max(_plan(batch, block_c, device, (c.kwargs["BLOCK_B"], 0, 0, c.kwargs["PROGRAMS_PER_SM"]))[4]
                           for c in _tuning_configs(block_c))
    if loss:
        loss_out = logits.new_empty((), dtype=torch.float32)
        # one program writes the final loss directly: small batches are a single launch
        partial = loss_out if num_programs == 1 else logits.new_empty((num_programs,), dtype=torch.float32)
    args = (
        logits, zf, target, logits if eps_tensor is None else eps_tensor,
        logits if partial is None else partial, logits if gz is None else gz,
        logits if gzf is None else gzf, logits if w is None else w,
        batch, num_classes,
        *logits.stride(), *zf.stride(), target.stride(0),
        eps_value, *consts,
    )
    flags = dict(
        EPS_FROM_PTR=eps_tensor is not None, HAS_FLIP=logits_flip is not None, JSD=jsd,
        REG_MEAN=reg_mean, WRITE_LOSS=loss, GRAD_Z=grad_z, GRAD_ZF=grad_zf, WRITE_W=weights,
        FLAT_ROWS=logits.is_contiguous() and zf.is_contiguous(), EXACT_C=num_classes == block_c,
        BLOCK_C=block_c,
    )
    if tune_now:
        limit = functools.partial(_program_limit, device)
        tuner = _tuner(block_c)
        tuner[lambda meta: (min(_cdiv(batch, meta["BLOCK_B"]), limit(meta["PROGRAMS_PER_SM"])),)](*args, **flags)
        best = tuner.best_config
        config = (best.kwargs["BLOCK_B"], best.num_warps, best.num_stages, best.kwargs["PROGRAMS_PER_SM"])
        _tuned[tune_key] = config
        num_programs = _plan(batch, block_c, device, config)[4]
    else:
        wrap(_nla_fwd_kernel)[(num_programs,)](
            *args, **flags, BLOCK_B=block_b, PROGRAMS_PER_SM=per_sm,
            num_warps=num_warps, num_stages=num_stages,
        )
    if loss and partial is not loss_out:  # (after tuning, also when the chosen grid is one program)
        block = min(_SUM_BLOCK, _next_pow2(num_programs))
        wrap(_sum_partials_kernel)[(1,)](partial, loss_out, num_programs, BLOCK=block,
                                         num_warps=max(1, min(8, block // 128)))
    return loss_out, gz, gzf, w


def _scale_launch_uncached(numel):
    """(grid, BLOCK, num_warps) of the gradient-scaling kernel for ``numel`` elements."""
    block = min(_SCALE_BLOCK, _next_pow2(numel))
    return (_cdiv(numel, block),), block, max(1, min(8, block // 512))


_scale_launch_cached = functools.lru_cache(maxsize=256)(_scale_launch_uncached)


def _scale_launch(numel):
    # a SymInt (torch.compile with a dynamic batch) cannot be a cache key
    return _scale_launch_cached(numel) if isinstance(numel, int) else _scale_launch_uncached(numel)


def _scale_body(wrap, grad_output, gz, gzf):
    """(grad_output * gz, grad_output * gzf), None for a gradient that is None."""
    oz = None if gz is None else torch.empty_like(gz)
    ozf = None if gzf is None else torch.empty_like(gzf)
    ref = gz if gz is not None else gzf
    if ref is not None and ref.numel() > 0:
        numel = ref.numel()
        grid, block, num_warps = _scale_launch(numel)
        wrap(_scale_grads_kernel)[grid](
            grad_output, ref if gz is None else gz, ref if gzf is None else gzf,
            ref if oz is None else oz, ref if ozf is None else ozf, numel,
            HAS_Z=gz is not None, HAS_ZF=gzf is not None, IN_PLACE=False, BLOCK=block,
            num_warps=num_warps,
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
    reg_mean: bool,
    grad_z: bool,
    grad_zf: bool,
    weights: bool,
    loss: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _placeholders(logits.device, _forward_body(
        _WRAP, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, grad_z,
        grad_zf, weights, loss))


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
    grid, block, num_warps = _scale_launch(numel)
    gz_or_ref, gzf_or_ref = (ref if gz is None else gz), (ref if gzf is None else gzf)
    _scale_grads_kernel[grid](
        grad_output, gz_or_ref, gzf_or_ref, gz_or_ref, gzf_or_ref, numel,
        HAS_Z=gz is not None, HAS_ZF=gzf is not None, IN_PLACE=True, BLOCK=block,
        num_warps=num_warps,
    )


class _NLALossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean,
                grad_z, grad_zf, weights):
        loss, gz, gzf, w = _forward(logits, logits_flip, target, eps_tensor, eps_value, consts,
                                    jsd, reg_mean, grad_z, grad_zf, weights, True)
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
        return (oz, ozf, None, None, None, None, None, None, None, None, None)


def _unpack_constants(constants):
    """(the 12 float constants as the kernel takes them, jsd, reg_mean)."""
    return [float(c) for c in constants[:12]], bool(constants.jsd), bool(constants.reg_mean)


_cached_constants = functools.lru_cache(maxsize=64)(_unpack_constants)  # once per NLAConstants, eagerly


def _kernel_constants(constants):
    # Dynamo cannot use an lru_cache (it warns and traces through it); the unpacking is traced
    # once per compiled graph anyway
    return _unpack_constants(constants) if torch.compiler.is_compiling() else _cached_constants(constants)


def nla_loss_triton(logits, logits_flip, target, eps, constants, return_weights):
    """(loss, weights or None): the NLA loss as a 0-d float32 tensor with autograd."""
    eps_tensor, eps_value = split_eps(eps, logits.device)
    consts, jsd, reg_mean = _kernel_constants(constants)
    grad_z = grad_zf = False
    if torch.is_grad_enabled():
        grad_z, grad_zf = logits.requires_grad, logits_flip.requires_grad
    if grad_z or grad_zf:
        out = _NLALossFunction.apply(logits, logits_flip, target, eps_tensor, eps_value, consts,
                                     jsd, reg_mean, grad_z, grad_zf, return_weights)
        return out if return_weights else (out, None)
    # no autograd: no gradient writes at all
    loss, _, _, w = _forward(logits, logits_flip, target, eps_tensor, eps_value, consts, jsd,
                             reg_mean, False, False, return_weights, True)
    return loss, (w if return_weights else None)


def naw_weight_triton(logits, target, eps, constants):
    """(B,) float32 NAW weights (no gradient); reads only the logits and the targets."""
    eps_tensor, eps_value = split_eps(eps, logits.device)
    consts, jsd, reg_mean = _kernel_constants(constants)
    with torch.no_grad():
        _, _, _, w = _forward(logits.detach(), None, target, eps_tensor, eps_value, consts,
                              jsd, reg_mean, False, False, True, False)
    return w


# ---------------------------------------------------------------------------------------------
# What a call launches, described without launching (bench/kernel_model.py compiles exactly it)

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}


def _described(name, kernel, args, constexprs, num_warps, num_stages, grid, config, role):
    """One launch as ``triton.compiler.ASTSource`` takes it. ``args``: the positional arguments
    in order, a tensor given by its dtype (allocations are 16-byte aligned). Typed the way
    Triton's launcher specialises them: an int equal to 1 becomes a constexpr, other ints are
    i32 (i64 past 2^31) and, like pointers, marked divisible by 16 when they are; floats fp32."""
    signature, consts, attrs = {}, dict(constexprs), {}
    values = iter(args)
    for index, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        value = next(values)
        if isinstance(value, torch.dtype):
            signature[arg] = "*" + _TRITON_TYPES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1:
            signature[arg] = "constexpr"
            consts[arg] = 1
        elif isinstance(value, int):
            signature[arg] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32"
    return dict(name=name, kernel=kernel, args=tuple(args), signature=signature, constexprs=consts, attrs=attrs,
                num_warps=num_warps, num_stages=num_stages, grid=grid, config=config, role=role, candidates=[])


def _described_forward(batch, num_classes, dtypes, outputs, flags, plan, role):
    """The forward launch of ``_forward_body`` for one plan (same argument order)."""
    dtype, flip_dtype = dtypes
    grad_z, grad_zf, weights, eps_dtype = outputs
    block_b, num_warps, num_stages, per_sm, num_programs = plan
    strides = (num_classes, 1) if flags["FLAT_ROWS"] else (1, batch)  # else: a transposed (C, B) tensor
    args = (dtype, flip_dtype, torch.int64, eps_dtype or dtype, torch.float32,
            dtype, flip_dtype if grad_zf else dtype, torch.float32 if weights else dtype,
            batch, num_classes, *strides, *strides, 1, 0.5, *[0.5] * 12)
    return _described("forward", _nla_fwd_kernel, args, dict(flags, BLOCK_B=block_b, PROGRAMS_PER_SM=per_sm),
                      num_warps, num_stages, (num_programs,), f"bb{block_b}_w{num_warps}", role)


def _described_sum(num_programs, config, role):
    block = min(_SUM_BLOCK, _next_pow2(num_programs))
    return _described("sum_partials", _sum_partials_kernel, (torch.float32, torch.float32, num_programs),
                      dict(BLOCK=block), max(1, min(8, block // 128)), None, (1,), config, role)


def _described_scale(numel, dtypes, grad_z, grad_zf):
    """The eager backward's in-place scaling launch (``_scale_inplace``)."""
    grid, block, num_warps = _scale_launch(numel)
    z_or_ref = dtypes[0] if grad_z else dtypes[1]
    zf_or_ref = dtypes[1] if grad_zf else z_or_ref
    flags = dict(HAS_Z=grad_z, HAS_ZF=grad_zf, IN_PLACE=True, BLOCK=block)
    launch = _described("scale_grads", _scale_grads_kernel, (torch.float32, z_or_ref, zf_or_ref, z_or_ref, zf_or_ref,
                        numel), flags, num_warps, None, grid, f"block{block}_w{num_warps}", "backward")
    launch["moves_data"] = "only when grad_output != 1 (in place, every load and store masked off at 1)"
    return launch


def describe_launches(batch, num_classes, dtype, flip_dtype=None, grad_z=True, grad_zf=True, weights=False,
                      contiguous=True, *, sm_count=None, device=None, jsd=False, reg_mean=False, eps_dtype=None):
    """The kernel launches of one eager ``nla_loss(..., backend="triton")`` forward + backward
    on contiguous (or, ``contiguous=False``, transposed) (batch, num_classes) logits of ``dtype``
    (the flipped view's ``flip_dtype``, default the same) and int64 targets, in launch order,
    built from the planning functions the launches use; nothing is launched.

    One dict per launch: name, kernel (the JITFunction), args (positional, a tensor by its
    dtype), signature / constexprs / attrs (as ``ASTSource`` takes them), num_warps, num_stages
    (None: Triton's default), grid (programs), config (a label), role ("single program",
    "heuristic", "autotune" or "backward"), phase ("forward" / "backward") and
    candidates. On the autotuned large-batch path the launches are those of the heuristic
    config (what runs where nothing was tuned) and each config-dependent launch lists, as
    candidates, itself for every config the autotuner may pick plus the heuristic one: a
    config's launches are, for each launch with candidates, its candidate of that config label
    (no such candidate: not launched for that config) and every launch without candidates.
    The backward's scale launch is marked ``phase = "backward"``; it moves data only when
    grad_output != 1. The grid is the one of a GPU with ``sm_count`` SMs when given, else of
    ``device`` (default: this process's: the CPU interpreter's grid cap without CUDA).
    ``eps_dtype``: the dtype of a tensor eps (read from memory), None for a Python float."""
    flip_dtype = flip_dtype or dtype
    block_c = _block_c(num_classes)
    if device is None:
        device = "cuda" if sm_count is None and torch.cuda.is_available() and not _INTERPRET else "cpu"
    device = torch.device(device)
    flags = dict(EPS_FROM_PTR=eps_dtype is not None, HAS_FLIP=True, JSD=jsd, REG_MEAN=reg_mean, WRITE_LOSS=True,
                 GRAD_Z=grad_z, GRAD_ZF=grad_zf, WRITE_W=weights, FLAT_ROWS=contiguous,
                 EXACT_C=num_classes == block_c, BLOCK_C=block_c)
    large = batch * block_c > _SINGLE_PROGRAM_ELEMENTS
    plans = [("heuristic" if large else "single program", _fixed_config(batch, block_c))]
    if large:
        plans += [("autotune", (c.kwargs["BLOCK_B"], c.num_warps, c.num_stages, c.kwargs["PROGRAMS_PER_SM"]))
                  for c in _tuning_configs(block_c)]
    dtypes, outputs = (dtype, flip_dtype), (grad_z, grad_zf, weights, eps_dtype)
    forwards, sums = [], {}  # sums: config label -> the partial-sum launch (grids over one program)
    for role, config in plans:
        plan = _plan(batch, block_c, device, config, sm_count)
        forwards.append(_described_forward(batch, num_classes, dtypes, outputs, flags, plan, role))
        if plan[4] > 1:
            sums[forwards[-1]["config"]] = _described_sum(plan[4], forwards[-1]["config"], role)
    candidates = forwards[1:] + forwards[:1] if large else []
    launches = [dict(forwards[0], candidates=candidates)]
    if forwards[0]["config"] in sums:
        launches.append(dict(sums[forwards[0]["config"]],
                             candidates=[sums[f["config"]] for f in candidates if f["config"] in sums]))
    for launch in launches:
        launch["phase"] = "forward"
    if grad_z or grad_zf:
        launches.append(dict(_described_scale(batch * num_classes, dtypes, grad_z, grad_zf), phase="backward"))
    return launches
