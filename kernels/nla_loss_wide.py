"""Fused Triton NLA loss for wide rows (C > 32, e.g. 1000 classes): ``_nla_wide_kernel``.

The same contract as ``nla_loss._nla_fwd_kernel`` (the same arguments, constexprs and outputs:
one partial loss per program at ``loss_ptr + pid`` in a fixed order, gradients and weights
written in full; ``launch.py`` launches either), the same maths (``nla_fast.reference.
nla_forward_backward_closed_form``), helpers (``_ex2`` / ``_lg2`` / ``_rcp`` on MUFU, logits
pre-scaled by log2 e) and numerics conventions (``nla_loss.py``'s docstring: ties, -inf
non-target logits, out-of-range targets, float32 maths whatever the input dtype), laid out for
rows too long to hold in registers:

- a row is walked in column chunks of BLOCK_C = lanes x VEC: each lane of a chunk is one vector
  load of VEC columns (16 bytes where contiguous rows are 16-byte aligned) held in one thread,
  the lanes of a row are those of one warp (large batches) or of 4 or 8 warps (small batches,
  a config's ``block_c``: fewer chunks one after another per row);
- each LANE keeps its own running (max, sum of exp) per view: softmax(z), softmax(z') and, for
  the official consistency, softmax((z + z')/2) (online softmax: a lane's sum is rescaled when
  its max grows; z's shift starts at z_y, loaded on its own, so only the negatives' max is
  tracked), and its own nearest negative as (value, first index), a later chunk winning only
  when strictly larger. Nothing crosses lanes inside the chunk loop; the lanes meet once per
  row (warp shuffles; a block-wide reduction only for rows over several warps);
- the per-row maths (cross entropy, NAW weight and its derivatives) then runs once per row;
- the last sweep reads the row again and writes both gradients (vector stores). That read comes
  from L2, not DRAM: between its two reads a row stays in the working set of the resident
  warps (at (4096, 1000) bf16, 32 rows per SM x 132 SMs x 4 kB = 17 MB, inside the H200's
  50 MB L2; sweep 1 loads with evict_last, the last sweep with evict_first), so DRAM bytes are
  counted once, as SPEC 4 counts them. The Jensen-Shannon consistency needs the row sums of
  p t before any gradient element, so it reads the row three times (twice from L2).

Every chunk loop runs ceil(C / BLOCK_C) times, the partial last chunk masked
(``bench/kernel_model.py`` counts its trips so). In-tile offsets are 32-bit; tiles, pointers
and strided rows (FLAT_ROWS=False) 64-bit.
"""
import triton
import triton.language as tl

from .nla_loss import _LN2, _LOG2E, _call_scalars, _ex2, _lg2, _opaque_zero, _rcp

# A finite stand-in for -inf as the start of a running max: a chunk of -inf logits (a -inf
# non-target class) then adds exp(-inf - m) = 0 instead of NaN; its log2 e multiple stays finite.
_NO_MAX = tl.constexpr(-1e30)


@triton.jit
def _load_chunk(ptr, row_off, c, row_ok, stride_c, C: tl.constexpr, FULL: tl.constexpr, MASKED: tl.constexpr,
                FLAT_ROWS: tl.constexpr, POLICY: tl.constexpr):
    """[BLOCK_B, LANES, VEC] float32 logits of the chunk's columns ``c`` ([LANES, VEC]) of the
    tile's rows: -inf past C (a probability of 0), 0 in rows past the batch (finite; never
    stored, dropped from the loss)."""
    if FLAT_ROWS:
        ptrs = ptr + (row_off[:, None, None] + c[None, :, :])  # 32-bit offsets inside the tile
    else:
        ptrs = ptr + (row_off[:, None, None] + c.to(tl.int64)[None, :, :] * stride_c)
    col_ok = (c < C)[None, :, :]
    if FULL:
        if MASKED:
            x = tl.load(ptrs, mask=col_ok, other=float("-inf"), eviction_policy=POLICY)
        else:
            x = tl.load(ptrs, eviction_policy=POLICY)
        x = x.to(tl.float32)
    else:
        if MASKED:
            x = tl.load(ptrs, mask=row_ok[:, None, None] & col_ok, other=0.0, eviction_policy=POLICY)
            x = tl.where(col_ok, x.to(tl.float32), float("-inf"))
        else:
            x = tl.load(ptrs, mask=row_ok[:, None, None], other=0.0, eviction_policy=POLICY).to(tl.float32)
    return x


@triton.jit
def _online(x, lane_max, m, s, SCALE: tl.constexpr, FAST_MATH: tl.constexpr):
    """Running softmax sums of SCALE * x per lane (axis 2 of a chunk is one thread's vector, so
    nothing here crosses lanes): (m, s) -> (m' = max(m, lane_max), the shift in SCALE x units,
    any bound >= the lane's elements so far; s' = s 2^((m - m') log2 e) + sum 2^(x SCALE log2 e
    - m' log2 e)): one FFMA and one MUFU.EX2 per element, one rescale per lane and chunk."""
    m_new = tl.maximum(m, lane_max)
    ml = m_new * _LOG2E
    e = _ex2(x * (SCALE * _LOG2E) - ml[:, :, None], FAST_MATH)
    return m_new, s * _ex2(m * _LOG2E - ml, FAST_MATH) + tl.sum(e, axis=2)


@triton.jit
def _row_of_lanes(m, s, FAST_MATH: tl.constexpr):
    """The row's (shift, sum of exp) from its lanes' running ones: one reduction across the row's
    lanes each (warp shuffles; across warps too for a row over several warps)."""
    m_row = tl.max(m, axis=1)
    return m_row, tl.sum(s * _ex2(m * _LOG2E - (m_row * _LOG2E)[:, None], FAST_MATH), axis=1)


@triton.jit
def _log_parts(m, s, FAST_MATH: tl.constexpr):
    """(m log2 e as rounded, 1 / s, ln s + the rounding of m log2 e taken out exactly): the
    shift of the later sweeps' exponents, the row's normaliser and log-normaliser."""
    ml = m * _LOG2E
    err = tl.fma(m, _LOG2E, -ml)
    return ml, _rcp(s, FAST_MATH), (_lg2(s, FAST_MATH) + err) * _LN2


@triton.jit
def _stats_chunk(z_ptr, zf_ptr, z_off, zf_off, c0, lane_col, v_idx, row_ok, yc, stride_zc, stride_zfc,
                 m, s, mf, sf, mv, sv, zk, k,
                 C: tl.constexpr, FULL: tl.constexpr, MASKED: tl.constexpr, FLAT_ROWS: tl.constexpr,
                 HAS_FLIP: tl.constexpr, JSD: tl.constexpr, FAST_MATH: tl.constexpr):
    """Sweep 1 over one chunk, per lane: the running softmax sums of each view (and of the logit
    mean for the official consistency) and the running nearest negative (value zk, first index k)."""
    c = c0 + lane_col[:, None] + v_idx[None, :]
    lane_c = c0 + lane_col  # the lane's first column in this chunk
    z = _load_chunk(z_ptr, z_off, c, row_ok, stride_zc, C, FULL, MASKED, FLAT_ROWS, "evict_last")
    # the target's slot in each lane's vector, compared as 32-bit integers (outside [0, VEC): not
    # this lane's; yc = -1 for an out-of-range target: no lane's)
    y_slot = yc[:, None] - lane_c[None, :]
    z_neg = tl.where(v_idx[None, None, :] == y_slot[:, :, None], float("-inf"), z)
    lane_k = tl.max(z_neg, axis=2)
    # first slot among the lane's maxima; a later chunk wins only when strictly larger (ties: first)
    first = tl.min(tl.where(z_neg == lane_k[:, :, None], v_idx[None, None, :], v_idx.shape[0]), axis=2)
    k = tl.where(lane_k > zk, lane_c[None, :] + first, k)
    zk = tl.maximum(zk, lane_k)
    m, s = _online(z, lane_k, m, s, 1.0, FAST_MATH)  # m starts at z_y: max(m, max z_neg) bounds z
    if HAS_FLIP:
        zf = _load_chunk(zf_ptr, zf_off, c, row_ok, stride_zfc, C, FULL, MASKED, FLAT_ROWS, "evict_last")
        mf, sf = _online(zf, tl.max(zf, axis=2), mf, sf, 1.0, FAST_MATH)
        if not JSD:
            v = z + zf
            mv, sv = _online(v, 0.5 * tl.max(v, axis=2), mv, sv, 0.5, FAST_MATH)
    return m, s, mf, sf, mv, sv, zk, k


@triton.jit
def _sweep_stats(z_ptr, zf_ptr, z_off, zf_off, lane_col, v_idx, row_ok, yc, z_y, stride_zc, stride_zfc,
                 C: tl.constexpr, FULL: tl.constexpr, FLAT_ROWS: tl.constexpr, HAS_FLIP: tl.constexpr,
                 JSD: tl.constexpr, BLOCK_C: tl.constexpr, FAST_MATH: tl.constexpr):
    """Sweep 1 over the row (every chunk masked where C is not a multiple of BLOCK_C), then the
    lanes combined: the row's (shift, sum) per view, the nearest negative's value and index."""
    lanes = tl.zeros([z_y.shape[0], lane_col.shape[0]], dtype=tl.float32)
    m = lanes + tl.maximum(z_y, _NO_MAX)[:, None]  # z's shift starts at z_y: chunks need only max z_neg
    s = lanes
    mf = lanes + _NO_MAX
    sf = lanes
    mv = lanes + _NO_MAX
    sv = lanes
    zk = lanes + float("-inf")
    k = lanes.to(tl.int32) + C  # no column: every negative -inf gives n = 0, any k is right
    for c0 in tl.range(0, C, BLOCK_C):
        m, s, mf, sf, mv, sv, zk, k = _stats_chunk(
            z_ptr, zf_ptr, z_off, zf_off, c0, lane_col, v_idx, row_ok, yc, stride_zc, stride_zfc,
            m, s, mf, sf, mv, sv, zk, k, C, FULL, C % BLOCK_C != 0, FLAT_ROWS, HAS_FLIP, JSD, FAST_MATH)
    z_k = tl.max(zk, axis=1)
    k = tl.min(tl.where(zk == z_k[:, None], k, C), axis=1)  # the first lane's among tied maxima
    m, s = _row_of_lanes(m, s, FAST_MATH)
    mf, sf = _row_of_lanes(mf, sf, FAST_MATH)
    mv, sv = _row_of_lanes(mv, sv, FAST_MATH)
    return m, s, mf, sf, mv, sv, z_k, k


@triton.jit
def _naw_weight(z_y, z_k, ml, inv_s, y_ok, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f,
                norm_f, FAST_MATH: tl.constexpr):
    """The NAW weight w and what its derivatives need: (w, alpha, beta, d1, d2, g, n), the 2-D
    Gaussian as norm * exp(alpha (d1^2 + d2^2) + beta d1 d2) per case (as ``nla_loss``)."""
    true_case = z_y >= z_k  # ties count as the true case
    g = _ex2(z_y * _LOG2E - ml, FAST_MATH) * inv_s
    n = _ex2(z_k * _LOG2E - ml, FAST_MATH) * inv_s
    alpha = tl.where(true_case, alpha_t, alpha_f)
    beta = tl.where(true_case, beta_t, beta_f)
    d1 = g - tl.where(true_case, mu_t1, mu_f1)
    d2 = n - tl.where(true_case, mu_t2, mu_f2)
    w = tl.where(true_case, norm_t, norm_f) * _ex2((alpha * (d1 * d1 + d2 * d2) + beta * d1 * d2) * _LOG2E,
                                                   FAST_MATH)
    return tl.where(y_ok, w, float("nan")), alpha, beta, d1, d2, g, n


@triton.jit
def _jsd_terms(z, zf, m, ml, inv_s, ln_s, mf, mlf, inv_sf, ln_sf, FAST_MATH: tl.constexpr):
    """Per element of a chunk: p, p', t = log p - log m, t' (m = (p + p')/2; log m via logaddexp,
    finite when p underflows; 0 log(0/0) = 0), as ``nla_loss._jsd_rows`` (its log and exp on MUFU)."""
    p = _ex2(z * _LOG2E - ml[:, None, None], FAST_MATH) * inv_s[:, None, None]
    pf = _ex2(zf * _LOG2E - mlf[:, None, None], FAST_MATH) * inv_sf[:, None, None]
    lp = (z - m[:, None, None]) - ln_s[:, None, None]
    lpf = (zf - mf[:, None, None]) - ln_sf[:, None, None]
    both_zero = tl.maximum(lp, lpf) == float("-inf")
    hi = tl.where(both_zero, 0.0, tl.maximum(lp, lpf))
    lo = tl.where(both_zero, 0.0, tl.minimum(lp, lpf))
    # ln(1 + e^(lo - hi)) on MUFU: 1 + e^(lo - hi) is in [1, 2], where lg2.approx is within 2^-22
    log_m = hi + (_lg2(1.0 + _ex2((lo - hi) * _LOG2E, FAST_MATH), FAST_MATH) - 1.0) * _LN2
    t = tl.where(p > 0.0, lp - log_m, 0.0)
    tf = tl.where(pf > 0.0, lpf - log_m, 0.0)
    return p, t, pf, tf


@triton.jit
def _jsd_sums_chunk(z_ptr, zf_ptr, z_off, zf_off, c, row_ok, stride_zc, stride_zfc,
                    m, ml, inv_s, ln_s, mf, mlf, inv_sf, ln_sf, pt, ptf,
                    C: tl.constexpr, FULL: tl.constexpr, MASKED: tl.constexpr, FLAT_ROWS: tl.constexpr,
                    FAST_MATH: tl.constexpr):
    """The JSD's middle sweep over one chunk: the lanes' running sums of p t and p' t'."""
    z = _load_chunk(z_ptr, z_off, c, row_ok, stride_zc, C, FULL, MASKED, FLAT_ROWS, "evict_last")
    zf = _load_chunk(zf_ptr, zf_off, c, row_ok, stride_zfc, C, FULL, MASKED, FLAT_ROWS, "evict_last")
    p, t, pf, tf = _jsd_terms(z, zf, m, ml, inv_s, ln_s, mf, mlf, inv_sf, ln_sf, FAST_MATH)
    return pt + tl.sum(p * t, axis=2), ptf + tl.sum(pf * tf, axis=2)


@triton.jit
def _sweep_jsd_sums(z_ptr, zf_ptr, z_off, zf_off, lane_col, v_idx, row_ok, stride_zc, stride_zfc,
                    m, ml, inv_s, ln_s, mf, mlf, inv_sf, ln_sf,
                    C: tl.constexpr, FULL: tl.constexpr, FLAT_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                    FAST_MATH: tl.constexpr):
    """The JSD's middle sweep (from L2): the row sums of p t and p' t'."""
    cols = lane_col[:, None] + v_idx[None, :]
    pt = tl.zeros([m.shape[0], lane_col.shape[0]], dtype=tl.float32)
    ptf = pt
    for c0 in tl.range(0, C, BLOCK_C):
        pt, ptf = _jsd_sums_chunk(z_ptr, zf_ptr, z_off, zf_off, c0 + cols, row_ok, stride_zc, stride_zfc,
                                  m, ml, inv_s, ln_s, mf, mlf, inv_sf, ln_sf, pt, ptf,
                                  C, FULL, C % BLOCK_C != 0, FLAT_ROWS, FAST_MATH)
    return tl.sum(pt, axis=1), tl.sum(ptf, axis=1)


@triton.jit
def _grad_chunk(z_ptr, zf_ptr, gz_ptr, gzf_ptr, z_off, zf_off, g_off, c0, lane_col, v_idx, row_ok, yc, k,
                stride_zc, stride_zfc, ml, a_e, pick_y, pick_k, mlf, a_f, mlv, q, m, inv_s, ln_s, mf, inv_sf, ln_sf,
                pt, ptf, half_reg,
                C: tl.constexpr, FULL: tl.constexpr, MASKED: tl.constexpr, FLAT_ROWS: tl.constexpr,
                JSD: tl.constexpr, GRAD_Z: tl.constexpr, GRAD_ZF: tl.constexpr, FAST_MATH: tl.constexpr):
    """The last sweep over one chunk: both gradients, stored. Official: gz = a_e e + [j == y] Ey
    + [j == k] Ek - q e_v, gzf = a_f e' - q e_v (e = exp(z - m), e_v = exp((z + z')/2 - m_v));
    JSD: a_e p + [j == y] Ey + [j == k] Ek + 0.5 c p (t - sum p t), 0.5 c p' (t' - sum p' t').
    (Folding q or a_f into the exponent's shift would save a multiply, but the shift's rounding,
    not shared by the row's normaliser, would scale the row's terms by up to 3e-4 at logits ~1e4.)"""
    lane_c = c0 + lane_col
    c = lane_c[:, None] + v_idx[None, :]
    z = _load_chunk(z_ptr, z_off, c, row_ok, stride_zc, C, FULL, MASKED, FLAT_ROWS, "evict_first")
    zf = _load_chunk(zf_ptr, zf_off, c, row_ok, stride_zfc, C, FULL, MASKED, FLAT_ROWS, "evict_first")
    if FULL:
        if MASKED:
            ok = (c < C)[None, :, :]
        else:
            ok = None
    else:
        ok = row_ok[:, None, None] & (c < C)[None, :, :]
    offs = g_off[:, None, None] + c[None, :, :]
    # [j == y] Ey + [j == k] Ek: each lane compares its vector's slots with the row's two columns
    slot = v_idx[None, None, :]
    pick = tl.where(slot == (yc[:, None] - lane_c[None, :])[:, :, None], pick_y[:, None, None],
                    tl.where(slot == (k[:, None] - lane_c[None, :])[:, :, None], pick_k[:, None, None], 0.0))
    if JSD:
        p, t, pf, tf = _jsd_terms(z, zf, m, ml, inv_s, ln_s, mf, mlf, inv_sf, ln_sf, FAST_MATH)
        if GRAD_Z:
            gz = a_e[:, None, None] * p + pick + half_reg * p * (t - pt[:, None, None])
            tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=ok, eviction_policy="evict_first")
        if GRAD_ZF:
            gzf = half_reg * pf * (tf - ptf[:, None, None])
            tl.store(gzf_ptr + offs, gzf.to(gzf_ptr.dtype.element_ty), mask=ok, eviction_policy="evict_first")
    else:
        qe_v = q[:, None, None] * _ex2((z + zf) * (0.5 * _LOG2E) - mlv[:, None, None], FAST_MATH)
        if GRAD_Z:
            gz = a_e[:, None, None] * _ex2(z * _LOG2E - ml[:, None, None], FAST_MATH) + (pick - qe_v)
            tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=ok, eviction_policy="evict_first")
        if GRAD_ZF:
            gzf = a_f[:, None, None] * _ex2(zf * _LOG2E - mlf[:, None, None], FAST_MATH) - qe_v
            tl.store(gzf_ptr + offs, gzf.to(gzf_ptr.dtype.element_ty), mask=ok, eviction_policy="evict_first")


@triton.jit
def _sweep_grads(z_ptr, zf_ptr, gz_ptr, gzf_ptr, z_off, zf_off, g_off, lane_col, v_idx, row_ok, yc, k, stride_zc,
                 stride_zfc, ml, a_e, pick_y, pick_k, mlf, a_f, mlv, q, m, inv_s, ln_s, mf, inv_sf, ln_sf, pt, ptf,
                 half_reg, C: tl.constexpr, FULL: tl.constexpr, FLAT_ROWS: tl.constexpr, JSD: tl.constexpr,
                 GRAD_Z: tl.constexpr, GRAD_ZF: tl.constexpr, BLOCK_C: tl.constexpr, FAST_MATH: tl.constexpr):
    """The last sweep (from L2): both gradients, chunk by chunk."""
    for c0 in tl.range(0, C, BLOCK_C):
        _grad_chunk(z_ptr, zf_ptr, gz_ptr, gzf_ptr, z_off, zf_off, g_off, c0, lane_col, v_idx, row_ok, yc, k,
                    stride_zc, stride_zfc, ml, a_e, pick_y, pick_k, mlf, a_f, mlv, q, m, inv_s, ln_s, mf, inv_sf,
                    ln_sf, pt, ptf, half_reg, C, FULL, C % BLOCK_C != 0, FLAT_ROWS, JSD, GRAD_Z, GRAD_ZF, FAST_MATH)


@triton.jit
def _flip_side(z_ptr, zf_ptr, gz_ptr, gzf_ptr, z_off, zf_off, g_off, lane_col, v_idx, row_ok, yc, k, stride_zc,
               stride_zfc, m, s, mf, sf, mv, sv, ml, inv_s, ln_s, ce, w, alpha, beta, d1, d2, g, n, coef_naw, coef_reg,
               C: tl.constexpr, FULL: tl.constexpr, FLAT_ROWS: tl.constexpr, JSD: tl.constexpr,
               WRITE_LOSS: tl.constexpr, GRAD_Z: tl.constexpr, GRAD_ZF: tl.constexpr, BLOCK_C: tl.constexpr,
               FAST_MATH: tl.constexpr):
    """With the flipped view: the consistency term, the rows' loss, and the gradient sweep."""
    half_reg = 0.5 * coef_reg
    mlf, inv_sf, ln_sf = _log_parts(mf, sf, FAST_MATH)
    if JSD:
        pt = tl.zeros_like(m)
        ptf = pt
        if WRITE_LOSS or GRAD_Z or GRAD_ZF:
            pt, ptf = _sweep_jsd_sums(z_ptr, zf_ptr, z_off, zf_off, lane_col, v_idx, row_ok, stride_zc, stride_zfc,
                                      m, ml, inv_s, ln_s, mf, mlf, inv_sf, ln_sf, C, FULL, FLAT_ROWS, BLOCK_C,
                                      FAST_MATH)
        reg_row = 0.5 * (pt + ptf)
        mlv = ml  # (mlv, q: unused by the JSD)
        q = inv_s
    else:
        pt = ml  # (pt, ptf: unused by the official consistency)
        ptf = ml
        mlv, inv_sv, ln_sv = _log_parts(mv, sv, FAST_MATH)
        # official: 0.5 (lse z + lse z') - lse((z + z')/2), mv = max((z + z')/2)
        reg_row = 0.5 * (ln_s + ln_sf + m + mf) - mv - ln_sv
        q = half_reg * inv_sv
    row_loss = tl.zeros_like(m)
    if WRITE_LOSS:
        row_loss = coef_naw * (1.0 + w) * ce + coef_reg * reg_row
        if not FULL:
            row_loss = tl.where(row_ok, row_loss, 0.0)
    if GRAD_Z or GRAD_ZF:
        # d[(1+w) CE]/dz = (1+w)(p - e_y) + CE (dw/dg g (e_y - p) + dw/dn n (e_k - p)): per row
        # gz = a_e e + [j == y] Ey + [j == k] Ek (+ the consistency term)
        one_w = 1.0 + w
        c_y = ce * (w * (2.0 * alpha * d1 + beta * d2)) * g
        c_k = ce * (w * (2.0 * alpha * d2 + beta * d1)) * n
        if JSD:
            a_e = coef_naw * (one_w - c_y - c_k)  # multiplies p = e / sum e
        else:
            a_e = (coef_naw * (one_w - c_y - c_k) + half_reg) * inv_s
        _sweep_grads(z_ptr, zf_ptr, gz_ptr, gzf_ptr, z_off, zf_off, g_off, lane_col, v_idx, row_ok, yc, k, stride_zc,
                     stride_zfc, ml, a_e, coef_naw * (c_y - one_w), coef_naw * c_k, mlf, half_reg * inv_sf, mlv, q,
                     m, inv_s, ln_s, mf, inv_sf, ln_sf, pt, ptf, half_reg,
                     C, FULL, FLAT_ROWS, JSD, GRAD_Z, GRAD_ZF, BLOCK_C, FAST_MATH)
    return row_loss


@triton.jit
def _wide_tile(
    z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, tile, B,
    stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
    coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f, norm_f,
    C: tl.constexpr, FULL: tl.constexpr, FLAT_ROWS: tl.constexpr,
    HAS_FLIP: tl.constexpr, JSD: tl.constexpr, WRITE_LOSS: tl.constexpr,
    GRAD_Z: tl.constexpr, GRAD_ZF: tl.constexpr, WRITE_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """One tile of BLOCK_B rows: stores its weights and gradients, returns its rows' loss terms."""
    r = tl.arange(0, BLOCK_B)
    # Per-thread offsets built per tile on an opaque 0: hoisted out of the tile loop, every load's
    # and store's per-thread 64-bit pointer would stay live across it (and spill under the cap)
    zero = _opaque_zero(tile, FAST_MATH)
    lane_col = tl.multiple_of(tl.arange(0, BLOCK_C // VEC) * VEC + zero, VEC)  # a lane's first column
    v_idx = tl.arange(0, VEC)  # the slots of a lane's vector
    start = tl.cast(tile, tl.int64) * BLOCK_B  # 64-bit tile base; offsets inside a tile are 32-bit
    row_ok = r < B - start
    if FULL:
        y = tl.load(y_ptr + (start + (r + zero)) * stride_y)
    else:
        y = tl.load(y_ptr + (start + (r + zero)) * stride_y, mask=row_ok, other=0)
    # the gather of the target is a compare and a masked load: an out-of-range label is never an address
    y = y.to(tl.int64)  # any integer dtype read as it is; 64-bit so 2^40 cannot wrap into range
    y_ok = y.to(tl.uint64) < C  # one unsigned compare: negative labels wrap past C
    yc = tl.where(y_ok, y, -1).to(tl.int32)
    if FLAT_ROWS:
        z_ptr += start * C
        zf_ptr += start * C
        z_off = r * C
        zf_off = z_off
        y_off = z_off + yc
    else:
        z_ptr += start * stride_zb
        zf_ptr += start * stride_zfb
        z_off = r.to(tl.int64) * stride_zb
        zf_off = r.to(tl.int64) * stride_zfb
        y_off = z_off + yc.to(tl.int64) * stride_zc
    if FULL:
        z_y = tl.load(z_ptr + y_off, mask=y_ok, other=0.0).to(tl.float32)
    else:
        z_y = tl.load(z_ptr + y_off, mask=y_ok & row_ok, other=0.0).to(tl.float32)

    m, s, mf, sf, mv, sv, z_k, k = _sweep_stats(z_ptr, zf_ptr, z_off, zf_off, lane_col, v_idx, row_ok, yc, z_y,
                                                stride_zc, stride_zfc, C, FULL, FLAT_ROWS, HAS_FLIP, JSD, BLOCK_C,
                                                FAST_MATH)
    ml, inv_s, ln_s = _log_parts(m, s, FAST_MATH)
    ce = tl.where(y_ok, ln_s - (z_y - m), float("nan"))
    w, alpha, beta, d1, d2, g, n = _naw_weight(z_y, z_k, ml, inv_s, y_ok, mu_t1, mu_t2, alpha_t, beta_t, norm_t,
                                               mu_f1, mu_f2, alpha_f, beta_f, norm_f, FAST_MATH)
    if WRITE_W:
        if FULL:
            tl.store(w_ptr + start + (r + zero), w)
        else:
            tl.store(w_ptr + start + (r + zero), w, mask=row_ok)
    row_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    if HAS_FLIP:
        row_loss = _flip_side(z_ptr, zf_ptr, gz_ptr + start * C, gzf_ptr + start * C, z_off, zf_off, r * C, lane_col,
                              v_idx, row_ok, yc, k, stride_zc, stride_zfc, m, s, mf, sf, mv, sv, ml, inv_s, ln_s, ce,
                              w, alpha, beta, d1, d2, g, n, coef_naw, coef_reg,
                              C, FULL, FLAT_ROWS, JSD, WRITE_LOSS, GRAD_Z, GRAD_ZF, BLOCK_C, FAST_MATH)
    return row_loss


@triton.jit
def _nla_wide_kernel(
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
    BLOCK_B: tl.constexpr,  # rows per tile (a row per warp, or a few)
    BLOCK_C: tl.constexpr,  # the column chunk: at most 32 lanes x 16 bytes, so a row stays in one warp
    FAST_MATH: tl.constexpr,  # MUFU approximations (on a GPU; the interpreter has no inline asm)
):
    coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f, norm_f = _call_scalars(
        eps_ptr, eps_value, B, lam, mu_t1, mu_t2, diag_t, off_t, true_scale, mu_f1, mu_f2, alpha_f, beta_f, norm_f,
        EPS_FROM_PTR, REG_MEAN)

    # A chunk is BLOCK_C // VEC lanes of VEC columns, a lane's columns one vector load: 16 bytes
    # of the wider logits where contiguous rows are 16-byte aligned, else the widest power of two
    # that divides C (C & -C: its lowest set bit), 1 for strided rows (then BLOCK_C = 64: two
    # columns a lane). Each lane's VEC columns sit in one thread either way, which is the layout
    # the loads compile to. launch.wide_vector mirrors this rule.
    BITS: tl.constexpr = max(z_ptr.dtype.element_ty.primitive_bitwidth, zf_ptr.dtype.element_ty.primitive_bitwidth)
    VEC: tl.constexpr = min(128 // BITS, C & -C) if FLAT_ROWS else 1

    # Persistent programs, as _nla_fwd_kernel: full tiles pid, pid + grid, ...; the program next in
    # turn takes the partial last tile. Fixed order: deterministic per (device, shape, config).
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_full = B // BLOCK_B
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for tile in tl.range(pid, num_full, num_programs):
        acc += _wide_tile(z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, tile, B,
                          stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
                          coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f,
                          norm_f, C, True, FLAT_ROWS, HAS_FLIP, JSD, WRITE_LOSS, GRAD_Z, GRAD_ZF, WRITE_W,
                          BLOCK_B, BLOCK_C, VEC, FAST_MATH)
    if (num_full * BLOCK_B < B) & (pid == num_full % num_programs):
        acc += _wide_tile(z_ptr, zf_ptr, y_ptr, gz_ptr, gzf_ptr, w_ptr, num_full, B,
                          stride_zb, stride_zc, stride_zfb, stride_zfc, stride_y,
                          coef_naw, coef_reg, mu_t1, mu_t2, alpha_t, beta_t, norm_t, mu_f1, mu_f2, alpha_f, beta_f,
                          norm_f, C, False, FLAT_ROWS, HAS_FLIP, JSD, WRITE_LOSS, GRAD_Z, GRAD_ZF, WRITE_W,
                          BLOCK_B, BLOCK_C, VEC, FAST_MATH)
    if WRITE_LOSS:
        # this program's partial sum (the final loss when the grid is one program)
        tl.store(loss_ptr + pid, tl.sum(acc, axis=0))
