"""Fused Triton NLA loss kernels (SPEC 1.1): one sweep writes the loss, both gradients and the NAW weights.

Liger-Kernel style: the forward already computes d loss/d logits and d loss/d logits_flip
(the loss is a scalar, so the gradient is known up to the factor grad_output), and the
backward only multiplies the saved gradients by grad_output (``_scale_grads_kernel``, in
place with every load and store masked off when grad_output == 1). The maths is exactly
``nla_fast.reference.nla_forward_backward_closed_form`` (its docstring has the derivation).
This file holds the kernels only; ``launch.py`` plans and launches them, ``ops.py`` registers
them for torch.compile.

Memory layout (what makes it fast at large B; rows of C = 7 bf16 values are 14 bytes):
- compute: a tile of BLOCK_B rows x BLOCK_C = next_power_of_2(C) columns with whole rows in
  one thread (C <= 8; two for float32 rows of exactly 8), so the ~12 row reductions are
  register-only and the per-row maths (the Gaussian, the case split) runs once per row, not
  once per column;
- gradients: written as ONE flat contiguous block of BLOCK_B * C elements per tile, 16-byte
  vector stores. The compute tile is [BLOCK_B, BLOCK_C] with padding columns, the flat block is
  not (7 is not a power of two, so no tl.reshape), so the tile is permuted through shared memory
  by ``tl.gather`` into a [BLOCK_B, BLOCK_C] "flat rows" view (slot (i, j) = flat element
  i * BLOCK_C + j, valid below BLOCK_B * C); 16-bit gradients take the compute tile
  column-major there, which keeps the shared-memory reads' bank conflicts ~2-way (see _flat_rows);
- logits: where rows are contiguous and C < BLOCK_C, read as the same flat block (16-byte
  vector loads) and permuted into the compute tile through shared memory by ``tl.gather``
  (compute (i, j) = flat element i * C + j: a base per thread and immediate offsets). Triton
  gives a gathered tile its index's layout, which an arithmetic index does not fix (Triton then
  spreads a row over 8 lanes); ``_row_anchor`` builds the index on a 16-bit load that is laid out
  one row a thread and never executes, so the compute tile is one row a thread for every dtype
  (float32 included, whose own 16-byte accesses hold half a row). The last padding column
  brings the row's target logit along (one shared load instead of a masked sum over the row).
  For C a power of two the rows are aligned and loaded as they are (16-byte vectors where they
  are that wide). In-tile offsets are 32-bit (tile base in 64 bits), strided logits' too
  (FLAT_ROWS=False; launch.py copies a view a tile of which could span 2^31 elements);
- targets: one contiguous vector per tile.

Numerics: everything is float32 in registers whatever the input dtype (float64 inputs are
also computed in float32; their gradients are stored as float64). Scalar arguments are cast to
float32 at kernel entry (Inductor passes Python floats as fp64, which would otherwise leak into
the loop-carried sum). Rows are shifted by their max, so the cross entropy and the "official"
consistency are computed from differences (z - max z) and stay accurate for large logits. The
nearest negative and the true case (g >= n) are decided on the raw logits (softmax is monotone),
so ties are exact: first index among tied negatives, g == n counts as the true case. A -inf
logit on a non-target class has probability 0 and adds nothing (finite loss and gradients, as
the reference). Targets outside [0, C) are never used as an address (the target's logit is
read at column 0 instead); such rows give NaN. Other non-finite logits give a non-finite loss
(row maxima propagate NaN).
"""
import triton
import triton.language as tl


_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _ex2(x, FAST_MATH: tl.constexpr):
    """2^x. On a GPU the bare MUFU.EX2 (``ex2.approx.ftz``: no denormal fix-up; results below
    2^-126 are 0, far below what a probability here can matter)."""
    if FAST_MATH:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _lg2(x, FAST_MATH: tl.constexpr):
    """log2(x) for x >= 1 (a softmax denominator): MUFU.LG2 on a GPU."""
    if FAST_MATH:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, FAST_MATH: tl.constexpr):
    """1/x for x >= 1 (a softmax denominator): MUFU.RCP on a GPU (within 1 ulp)."""
    if FAST_MATH:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _opaque_zero(x, FAST_MATH: tl.constexpr):
    """0, which the compiler cannot see through (so what is built on it stays in the loop)."""
    if FAST_MATH:
        return tl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return 0


@triton.jit
def _row_anchor(base, r, cols, opaque, FAST_MATH: tl.constexpr):
    """A [BLOCK_B, BLOCK_C] int32 zero that gives the tile its layout: one row per thread (rows
    of up to 8 columns). Triton picks layouts from memory accesses, and a tile made by tl.gather
    takes its index's layout; an index built from this load's result is laid out as this load
    is (up to 8 16-bit columns a thread: one 16-byte vector), whatever the logits' dtype. The load's mask is
    always false (opaque is 0) and ptxas, which sees the 0, deletes it: no instruction, no byte."""
    if FAST_MATH:
        ptrs = base.to(tl.pointer_type(tl.int16)) + tl.broadcast_to(cols[None, :], [r.shape[0], cols.shape[0]])
        never = tl.broadcast_to(opaque != 0, [r.shape[0], cols.shape[0]])
        a = tl.load(ptrs, mask=never, other=0)
        return tl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,h", [a], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return 0


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_max(x, FAST_MATH: tl.constexpr):
    """max over each row of a 2-D tile, NaN-propagating: LLVM folds max(x, -inf) = x for this
    maximum (not for maxnum, which -inf beats a NaN), so -inf padding columns cost nothing. The
    interpreter (no FAST_MATH) takes tl.max, numpy's NaN-propagating max: a reduce with a
    combine function runs in Python there, which doubled the CPU suite's Triton cases."""
    if FAST_MATH:
        return tl.reduce(x, 1, _max_nan)
    else:
        return tl.max(x, axis=1)


@triton.jit
def _neg_zero():
    """-0.0 (x + -0.0 == x exactly, so the compiler drops it; a -0.0 literal is folded to 0.0)."""
    return tl.full([1, 1], -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _softmax_parts(x, scale, col_ok, FAST_MATH: tl.constexpr):
    """Softmax of ``scale * x`` by rows of a [rows, cols] tile: (m = scale * max x, m_l = its
    log2 e multiple as rounded, e = exp(scale x - m) computed as 2^(x scale log2e - m_l), 1/sum e,
    ln sum e). One FFMA and one MUFU.EX2 per element. The one rounding of m_l scales every e of
    a row alike (p = e / sum e is unchanged) and is taken out of ln sum e exactly (``err``)."""
    m = _row_max(x, FAST_MATH) * scale
    m_l = m * _LOG2E
    err = tl.fma(m, _LOG2E, -m_l)  # m log2e - m_l, exactly
    # padding columns are 0 by construction: said so (as -0.0, which adds exactly nothing), the
    # compiler drops their (opaque) exp and their share of the sum
    e = tl.where(col_ok[None, :], _ex2(x * (scale * _LOG2E) - m_l[:, None], FAST_MATH), _neg_zero())
    s = tl.sum(e, axis=1)
    return m, m_l, e, _rcp(s, FAST_MATH), (_lg2(s, FAST_MATH) + err) * _LN2


@triton.jit
def _load_rows(ptr, start, r, cols, rows_left, opaque, target, stride_b, stride_c, C: tl.constexpr,
               FULL: tl.constexpr, FLAT_ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
               FAST_MATH: tl.constexpr):
    """[BLOCK_B, BLOCK_C] float32 logits of the tile's rows: -inf in the padding columns (a
    probability of 0), 0 in rows past the batch (finite; dropped from every sum). Rows taken
    through shared memory (flat rows, C < BLOCK_C) with a ``target`` column per row hold that
    column's logit in the last padding column instead (the caller masks it)."""
    col_ok = cols < C  # C is a compile-time constant: this mask folds away per register
    if FLAT_ROWS and C != BLOCK_C:
        f = r[:, None] * BLOCK_C + cols[None, :]
        base = ptr + start * C
        if FULL:
            xf = tl.load(base + f, mask=f < BLOCK_B * C, other=0.0)
        else:
            xf = tl.load(base + f, mask=f < rows_left.to(tl.int32) * C, other=0.0)
        src = r[:, None] * C + cols[None, :] + _row_anchor(base, r, cols, opaque, FAST_MATH)
        if target is not None:
            src = tl.where(cols[None, :] == BLOCK_C - 1, (r * C + target)[:, None], src)
        x = tl.reshape(tl.gather(tl.reshape(xf, [BLOCK_B * BLOCK_C]), tl.reshape(src, [BLOCK_B * BLOCK_C]), 0),
                       [BLOCK_B, BLOCK_C]).to(tl.float32)
        if target is None:
            x = tl.where(col_ok[None, :], x, float("-inf"))
    else:
        if FLAT_ROWS:
            offs = r[:, None] * C + cols[None, :]  # 32-bit offsets inside the tile
            base = ptr + start * C
        else:
            # rebuilt per tile (on opaque): hoisted, the loop-invariant offsets would hold registers
            offs = (opaque + r)[:, None] * stride_b + cols[None, :] * stride_c
            base = ptr + start * stride_b
        if FULL:
            x = tl.load(base + offs, mask=col_ok[None, :], other=float("-inf")).to(tl.float32)
        else:
            ok = (r < rows_left)[:, None] & col_ok[None, :]
            x = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
            x = tl.where(col_ok[None, :], x, float("-inf"))
    return x


@triton.jit
def _nla_tile(
    z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, tile, B,
    stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
    coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f, norm_f,
    flat_first,
    C: tl.constexpr,
    FULL: tl.constexpr,  # all BLOCK_B rows exist (no row masks: vector stores)
    FLAT_ROWS: tl.constexpr,  # both logits have strides (C, 1)
    HAS_FLIP: tl.constexpr, JSD: tl.constexpr, WRITE_LOSS: tl.constexpr,
    GRAD_Z: tl.constexpr, GRAD_ZF: tl.constexpr, WRITE_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """One tile of rows: stores its weights/gradients, returns its rows' loss terms [BLOCK_B].

    ``coef_naw`` = lam / B and ``coef_reg`` = (1 - lam) * (1/B or 1): the two terms' factors."""
    r = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    start = tl.cast(tile, tl.int64) * BLOCK_B  # 64-bit tile base; offsets inside a tile are 32-bit
    # a 0 the compiler cannot see through: per-thread values built on it are rebuilt per tile,
    # not held in registers across the tile loop (64 registers for 32 resident warps)
    opaque = _opaque_zero(tile, FAST_MATH)
    rows = start + r
    rows_left = B - start
    row_ok = r < rows_left
    if FULL:
        # the tile's base, then 32-bit per-thread offsets (no 64-bit pointer held per thread)
        y = tl.load((y_ptr + start * stride_y) + (opaque + r) * stride_y)
    else:
        y = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=0)
    # an out-of-range label is never an address (the padded target reads column 0 instead, and
    # y_ok makes the row NaN)
    y = y.to(tl.int64)  # any integer dtype read as it is; 64-bit so 2^40 cannot wrap into range
    y_ok = y.to(tl.uint64) < C  # one unsigned compare: negative labels wrap past C
    col_ok = cols < C  # a compile-time constant per register
    # rows through shared memory bring their target's logit along in the last padding column
    # (one shared load where a masked sum over the row costs ~2 instructions a column)
    PADDED_TARGET: tl.constexpr = FLAT_ROWS and C != BLOCK_C
    if PADDED_TARGET:
        z = _load_rows(z_ptr, start, r, cols, rows_left, opaque, tl.where(y_ok, y, 0).to(tl.int32), stride_zb,
                       stride_zc, C, FULL, FLAT_ROWS, BLOCK_B, BLOCK_C, FAST_MATH)
        z_y = tl.sum(tl.where(cols[None, :] == BLOCK_C - 1, z, _neg_zero()), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
    else:
        z = _load_rows(z_ptr, start, r, cols, rows_left, opaque, None, stride_zb, stride_zc, C, FULL, FLAT_ROWS,
                       BLOCK_B, BLOCK_C, FAST_MATH)
    if HAS_FLIP:
        zf = _load_rows(zf_ptr, start, r, cols, rows_left, opaque, None, stride_zfb, stride_zfc, C, FULL, FLAT_ROWS,
                        BLOCK_B, BLOCK_C, FAST_MATH)

    # gradients: one flat block per tile, written with 16-byte stores (see _flat_rows)
    f = r[:, None] * BLOCK_C + cols[None, :]
    if C != BLOCK_C:
        # the permutation's source of each flat slot (see _flat_rows), built per tile from one
        # loop-invariant value per thread (hoisted whole, it would hold BLOCK_C registers):
        first = opaque + flat_first
        # slot j holds column start_col + j of row0 or, past the row's end (once or, when
        # BLOCK_C >= C + 2, twice), column start_col + j - C of the next row
        if _columns_first(z_ptr):
            # first = start_col * BLOCK_B + row0: a step of 1 - C * BLOCK_B past a row's end,
            # which is where first >= (C - j) * BLOCK_B (row0 < BLOCK_B): a compare with an
            # immediate a slot
            step = 1 - C * BLOCK_B
            src = first[:, None] + cols[None, :] * BLOCK_B
            src += (first[:, None] >= (C - cols[None, :]) * BLOCK_B).to(tl.int32) * step
            if BLOCK_C >= C + 2:
                src += (first[:, None] >= (2 * C - cols[None, :]) * BLOCK_B).to(tl.int32) * step
        else:
            # first = row0 * BLOCK_C + start_col, start_col < C <= BLOCK_C: skip the BLOCK_C - C
            # padding slots past a row's end (the test is on j, an immediate: one compare a slot)
            start_col = first & (BLOCK_C - 1)
            src = first[:, None] + cols[None, :] + (cols[None, :] >= (C - start_col)[:, None]).to(tl.int32) * (
                BLOCK_C - C)
            if BLOCK_C >= C + 2:
                src += (cols[None, :] >= (2 * C - start_col)[:, None]).to(tl.int32) * (BLOCK_C - C)
        if BLOCK_B * C % BLOCK_C != 0:  # a flat row partly past the tile (tiny tiles): keep in bounds
            src = tl.minimum(src, BLOCK_B * BLOCK_C - 1)
        flat_src = tl.reshape(src, [BLOCK_B * BLOCK_C])
    else:
        flat_src = f  # unused: C == BLOCK_C stores the compute tile as it is
    g_tile = start * C
    half_reg = 0.5 * coef_reg
    if HAS_FLIP:
        # the flip's side first: its gradient needs nothing of the NAW term, so it is stored (and
        # its registers freed) before the NAW side is computed
        mf, _, ef, inv_sf, ln_sf = _softmax_parts(zf, 1.0, cols < C, FAST_MATH)
        if not JSD:
            # official: 0.5 (lse z + lse z') - lse((z + z')/2); gradients 0.5 (p - q), 0.5 (p' - q)
            um, _, ev, inv_sv, ln_sv = _softmax_parts(z + zf, 0.5, cols < C, FAST_MATH)
            q_coef = half_reg * inv_sv
            if GRAD_ZF:
                gzf = (half_reg * inv_sf)[:, None] * ef - q_coef[:, None] * ev
                gzf = tl.where(col_ok[None, :], gzf, 0.0)  # padding: never stored, not computed
                gzf = _flat_rows(gzf, flat_src, gzf_ptr, _columns_first(z_ptr), C == BLOCK_C, BLOCK_B, BLOCK_C)
                _store_flat(gzf_ptr + g_tile + f, gzf, f, rows_left, C, FULL, C == BLOCK_C, BLOCK_B)

    # (& col_ok: a padding column is never y, and the compiler then drops its selects)
    is_y = (cols[None, :] == tl.where(y_ok, y, -1).to(tl.int32)[:, None]) & col_ok[None, :]

    m, m_l, e, inv_s, ln_s = _softmax_parts(z, 1.0, cols < C, FAST_MATH)
    if not PADDED_TARGET:
        z_y = tl.sum(tl.where(is_y, z, _neg_zero()), axis=1)
    ce = tl.where(y_ok, ln_s - (z_y - m), float("nan"))
    # nearest negative on the raw logits (softmax is monotone): first index among tied maxima.
    # When every negative is -inf, k may land on y or a padding column: then n = 0 and its
    # gradient term vanishes, so any k is right.
    z_neg = tl.where(is_y, float("-inf"), z)
    z_k = _row_max(z_neg, FAST_MATH)
    k = tl.min(tl.where(z_neg == z_k[:, None], cols[None, :], BLOCK_C), axis=1)
    is_k = (cols[None, :] == k[:, None]) & col_ok[None, :]
    true_case = z_y >= z_k  # ties count as the true case
    g = _ex2(z_y * _LOG2E - m_l, FAST_MATH) * inv_s  # e_y / sum e, as the e of the gradient
    n = _ex2(z_k * _LOG2E - m_l, FAST_MATH) * inv_s

    # NAW weight: the 2-D Gaussian N(s; mu, [[a, b], [b, a]]) written as norm * exp(t) with
    # t = alpha (d1^2 + d2^2) + beta d1 d2, alpha = -a / (2 det), beta = b / det (per case)
    alpha = tl.where(true_case, alpha_t, alpha_f)
    beta = tl.where(true_case, beta_t, beta_f)
    d1 = g - tl.where(true_case, mu_t1, mu_f1)
    d2 = n - tl.where(true_case, mu_t2, mu_f2)
    w = tl.where(true_case, norm_t, norm_f) * _ex2((alpha * (d1 * d1 + d2 * d2) + beta * d1 * d2) * _LOG2E,
                                                   FAST_MATH)
    w = tl.where(y_ok, w, float("nan"))
    if WRITE_W:
        if FULL:
            tl.store((w_ptr + start) + (opaque + r), w)  # as the targets: no 64-bit pointer held
        else:
            tl.store(w_ptr + rows, w, mask=row_ok)

    row_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    if HAS_FLIP:
        if JSD:
            reg_row, reg_gz, reg_gzf = _jsd_rows(z - m[:, None], zf - mf[:, None], e * inv_s[:, None],
                                                 ef * inv_sf[:, None], ln_s, ln_sf)
            if GRAD_ZF:
                gzf = _flat_rows(coef_reg * reg_gzf, flat_src, gzf_ptr, _columns_first(z_ptr), C == BLOCK_C,
                                 BLOCK_B, BLOCK_C)
                _store_flat(gzf_ptr + g_tile + f, gzf, f, rows_left, C, FULL, C == BLOCK_C, BLOCK_B)
        else:
            reg_row = 0.5 * (ln_s + ln_sf + m + mf) - um - ln_sv
        if WRITE_LOSS:
            row_loss = coef_naw * (1.0 + w) * ce + coef_reg * reg_row
            if not FULL:
                row_loss = tl.where(row_ok, row_loss, 0.0)
        if GRAD_Z:
            # d[(1+w) CE]/dz = (1+w)(p - e_y) + CE (dw/dg g (e_y - p) + dw/dn n (e_k - p)), so per
            # row gz = A e + [j == y] Ey + [j == k] Ek (+ the consistency term), A folding 1/sum e
            dw_dg = w * (2.0 * alpha * d1 + beta * d2)
            dw_dn = w * (2.0 * alpha * d2 + beta * d1)
            one_w = 1.0 + w
            c_y = ce * dw_dg * g
            c_k = ce * dw_dn * n
            e_y = coef_naw * (c_y - one_w)
            e_k = coef_naw * c_k
            pick = tl.where(is_y, e_y[:, None], tl.where(is_k, e_k[:, None], 0.0))
            if JSD:
                gz = (coef_naw * (one_w - c_y - c_k) * inv_s)[:, None] * e + pick + coef_reg * reg_gz
            else:
                a_p = (coef_naw * (one_w - c_y - c_k) + half_reg) * inv_s
                gz = a_p[:, None] * e + (pick - q_coef[:, None] * ev)  # two FFMAs per element
                gz = tl.where(col_ok[None, :], gz, 0.0)  # padding: never stored, not computed
            gz = _flat_rows(gz, flat_src, gz_ptr, _columns_first(z_ptr), C == BLOCK_C, BLOCK_B, BLOCK_C)
            _store_flat(gz_ptr + g_tile + f, gz, f, rows_left, C, FULL, C == BLOCK_C, BLOCK_B)
    return row_loss


@triton.jit
def _jsd_rows(a, af, p, pf, log_s, log_sf):
    """Jensen-Shannon consistency per row from shifted logits a = z - max z: (0.5 sum p t +
    0.5 sum p' t', its gradients for z and z'), t = log p - log m, m = (p + p')/2; log m via
    logaddexp (finite when p underflows); 0 log(0/0) = 0: a class of probability 0 in a view
    (padding, a -inf logit) gives t = 0 there."""
    lp = a - log_s[:, None]
    lpf = af - log_sf[:, None]
    both_zero = tl.maximum(lp, lpf) == float("-inf")
    hi = tl.where(both_zero, 0.0, tl.maximum(lp, lpf))
    lo = tl.where(both_zero, 0.0, tl.minimum(lp, lpf))
    log_m = hi + tl.log(1.0 + tl.exp(lo - hi)) - 0.6931471805599453
    t = tl.where(p > 0.0, lp - log_m, 0.0)
    tf = tl.where(pf > 0.0, lpf - log_m, 0.0)
    pt_sum = tl.sum(p * t, axis=1)
    ptf_sum = tl.sum(pf * tf, axis=1)
    return 0.5 * (pt_sum + ptf_sum), 0.5 * p * (t - pt_sum[:, None]), 0.5 * pf * (tf - ptf_sum[:, None])


@triton.jit
def _columns_first(z_ptr):
    """Whether the gradients' permutation takes the compute tile column-major (16-bit logits and
    gradients; see _flat_rows)."""
    return z_ptr.dtype.element_ty.primitive_bitwidth < 32


@triton.jit
def _flat_rows(x, flat_src, out_ptr, COLUMNS_FIRST: tl.constexpr, EXACT_C: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """float32 [BLOCK_B, BLOCK_C] tile (C valid columns) -> its flat-rows view in out_ptr's dtype:
    slot (i, j) holds flat element i * BLOCK_C + j of the tile's contiguous (rows, C) block,
    taken from the compute tile at ``flat_src`` (a shared-memory permutation). When
    C == BLOCK_C the tile already is its flat-rows view.

    The gather stores its source in shared memory at the source's row-major offsets, and a
    warp's 32 lanes read one slot each of 32 flat rows: ~37 consecutive compute rows. Row-major
    rows of 16 or 32 bytes reach only 7-8 bank positions (C = 7: 40 wavefronts a warp and view,
    ~5-way conflicts); ``COLUMNS_FIRST`` gives the tile column-major (compute (r, c) at
    c * BLOCK_B + r: 16 wavefronts, 2-way where the rows wrap past 32) for 8 four-byte shared
    stores a thread instead of one or two wide ones. Where the output is 16-bit the shared pipe,
    not DRAM, would bound the kernel otherwise (bench/shared_wavefronts.py at C = 7: 3.4 against
    4.9 wavefronts a row, the DRAM floor ~3.9); float32 rows stay under their floor row-major
    and keep the fewer instructions."""
    # (if/else, not an early return: Triton still compiles what follows a constexpr return)
    if EXACT_C:
        flat = x.to(out_ptr.dtype.element_ty)
    elif COLUMNS_FIRST:
        # gathered as float32 (no 16-bit packing for the narrow stores), converted after
        flat = tl.reshape(tl.gather(tl.reshape(tl.trans(x), [BLOCK_C * BLOCK_B]), flat_src, 0), [BLOCK_B, BLOCK_C])
        flat = flat.to(out_ptr.dtype.element_ty)
    else:
        flat = tl.reshape(tl.gather(tl.reshape(x.to(out_ptr.dtype.element_ty), [BLOCK_B * BLOCK_C]), flat_src, 0),
                          [BLOCK_B, BLOCK_C])
    return flat


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
def _call_scalars(eps_ptr, eps_value, B, lam, mu_t1, mu_t2, diag_t, off_t, true_scale, mu_f1, mu_f2, alpha_f, beta_f,
                  norm_f, EPS_FROM_PTR: tl.constexpr, REG_MEAN: tl.constexpr):
    """The per-call scalars every kernel of the loss uses, all float32 (under Inductor a Python
    float arrives as fp64 and would turn a loop-carried sum into fp64, a compile error): the two
    terms' factors (lam / B; (1 - lam) times 1/B or 1), and both Gaussians' constants, the true
    case's built here from eps (read from memory under CUDA graphs)."""
    lam = tl.cast(lam, tl.float32)
    if EPS_FROM_PTR:
        eps = tl.load(eps_ptr).to(tl.float32)
    else:
        eps = tl.cast(eps_value, tl.float32)
    inv_b = 1.0 / (B * 1.0)  # in the kernel: no SymFloat argument under torch.compile
    coef_naw = lam * inv_b
    if REG_MEAN:
        coef_reg = (1.0 - lam) * inv_b
    else:
        coef_reg = 1.0 - lam
    diag_t = tl.cast(diag_t, tl.float32)
    b_t = -eps * tl.cast(off_t, tl.float32)
    det_t = diag_t * diag_t - b_t * b_t
    alpha_t = -0.5 * diag_t / det_t
    beta_t = b_t / det_t
    norm_t = tl.cast(true_scale, tl.float32) / (6.283185307179586 * tl.sqrt(det_t))
    return (coef_naw, coef_reg, tl.cast(mu_t1, tl.float32), tl.cast(mu_t2, tl.float32), alpha_t, beta_t, norm_t,
            tl.cast(mu_f1, tl.float32), tl.cast(mu_f2, tl.float32), tl.cast(alpha_f, tl.float32),
            tl.cast(beta_f, tl.float32), tl.cast(norm_f, tl.float32))


@triton.jit
def _nla_fwd_kernel(
    z_ptr, zf_ptr, y_ptr, eps_ptr,
    loss_ptr, gz_ptr, gzf_ptr, w_ptr,
    B,
    stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
    eps_value, lam,
    mu_t1, mu_t2, diag_t, off_t, true_scale,
    mu_f1, mu_f2, alpha_f, beta_f, norm_f,  # false case: eps-free, derived on the host
    C: tl.constexpr,  # the number of classes (each compiled kernel serves one)
    EPS_FROM_PTR: tl.constexpr,  # read eps from memory (CUDA graphs) instead of the scalar arg
    HAS_FLIP: tl.constexpr,  # False: NAW weights only
    JSD: tl.constexpr,
    REG_MEAN: tl.constexpr,  # consistency term averaged over the batch (else summed)
    WRITE_LOSS: tl.constexpr,
    GRAD_Z: tl.constexpr,
    GRAD_ZF: tl.constexpr,
    WRITE_W: tl.constexpr,
    FLAT_ROWS: tl.constexpr,  # both logits contiguous (row stride C, column stride 1)
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FAST_MATH: tl.constexpr,  # MUFU approximations (on a GPU; the interpreter has no inline asm)
):
    coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f, norm_f = _call_scalars(
        eps_ptr, eps_value, B, lam, mu_t1, mu_t2, diag_t, off_t, true_scale, mu_f1, mu_f2, alpha_f, beta_f, norm_f,
        EPS_FROM_PTR, REG_MEAN)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)

    # the gradient tile's flat rows (see _flat_rows): flat row i starts at flat element i * BLOCK_C,
    # which is column start_col of compute row row0: position flat_first of the compute tile as
    # the permutation stores it (column- or row-major)
    r = tl.arange(0, BLOCK_B)
    row0 = (r * BLOCK_C) // C
    in_tile = r * BLOCK_C < BLOCK_B * C  # flat rows past the tile's last element: masked at the store
    flat_start_col = tl.where(in_tile, r * BLOCK_C - row0 * C, 0)
    if _columns_first(z_ptr):
        flat_first = tl.where(in_tile, flat_start_col * BLOCK_B + row0, 0)
    else:
        flat_first = tl.where(in_tile, row0 * BLOCK_C + flat_start_col, 0)

    # Persistent programs: program pid takes full tiles pid, pid + grid, ...; the program next in
    # turn takes the partial last tile. Fixed order: deterministic per (device, shape, config).
    num_full = B // BLOCK_B
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for tile in tl.range(pid, num_full, num_programs):
        acc += _nla_tile(
            z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, tile, B,
            stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
            coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f, norm_f,
            flat_first,
            C, True, FLAT_ROWS, HAS_FLIP, JSD, WRITE_LOSS, GRAD_Z, GRAD_ZF, WRITE_W, BLOCK_B, BLOCK_C, FAST_MATH,
        )
    if (num_full * BLOCK_B < B) & (pid == num_full % num_programs):
        acc += _nla_tile(
            z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, num_full, B,
            stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
            coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f, norm_f,
            flat_first,
            C, False, FLAT_ROWS, HAS_FLIP, JSD, WRITE_LOSS, GRAD_Z, GRAD_ZF, WRITE_W, BLOCK_B, BLOCK_C, FAST_MATH,
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
    # gradients are already the answer, so the kernel returns at once (no traffic).
    go = tl.load(go_ptr).to(tl.float32)
    if IN_PLACE:
        if go != 1.0:
            _scale_loop(go, gz_ptr, gzf_ptr, oz_ptr, ozf_ptr, N, HAS_Z, HAS_ZF, BLOCK)
    else:
        _scale_loop(go, gz_ptr, gzf_ptr, oz_ptr, ozf_ptr, N, HAS_Z, HAS_ZF, BLOCK)


@triton.jit
def _scale_loop(go, gz_ptr, gzf_ptr, oz_ptr, ozf_ptr, N, HAS_Z: tl.constexpr, HAS_ZF: tl.constexpr,
                BLOCK: tl.constexpr):
    # a capped persistent grid: each program strides over blocks of BLOCK elements
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in tl.range(tl.program_id(0).to(tl.int64) * BLOCK, N, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        if HAS_Z:
            x = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(oz_ptr + offs, (x * go).to(oz_ptr.dtype.element_ty), mask=mask)
        if HAS_ZF:
            x = tl.load(gzf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ozf_ptr + offs, (x * go).to(ozf_ptr.dtype.element_ty), mask=mask)
