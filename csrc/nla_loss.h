// Row maths of the NLA loss (SPEC 1.1) shared by the CPU kernels (nla_loss.cpp) and the CUDA
// kernels (nla_loss_cuda.cu), so the CPU tests also cover the arithmetic the GPU runs.
//
// Per row, with p = softmax(z), p' = softmax(z'), g = p_y, n = p_k (k: the first index of the
// largest logit among j != y), d = (g, n) - mu, Sigma = [[a, b], [b, a]]:
//   w     = scale exp(-Q/2) / (2 pi sqrt(det)),  Q = (a (d1^2 + d2^2) - 2 b d1 d2) / det
//   dw/dg = -w (a d1 - b d2) / det,   dw/dn = -w (a d2 - b d1) / det
//   d[(1 + w) CE]/dz_j = A p_j + [j == y] Ey + [j == k] Ek   with
//     A = (1 + w) - CE (dw/dg g + dw/dn n),  Ey = CE dw/dg g - (1 + w),  Ek = CE dw/dn n
// (nla_fast.reference.nla_forward_backward_closed_form writes the same derivation in PyTorch).
// The consistency term per row is official: (lse z + lse z')/2 - lse((z + z')/2), gradients
// (p - q)/2 and (p' - q)/2; jsd: 0.5 sum p t + 0.5 sum p' t' with t = log p - log m,
// m = (p + p')/2 (0 where p = 0, so a -inf logit adds nothing), gradients 0.5 p (t - sum p t). It is summed over the
// batch, or averaged when reg_mean (NLAConfig.consistency_reduction).
//
// How a row is computed (the CPU's fixed-width, generic and vectorised rows, the GPU's tile
// kernels): pass 1 takes the maxima of z, z' and s = z + z' and the nearest negative; pass 2 the
// sums of exp(z - max z), exp(z' - max z') and exp((s - max s) / 2) (the GPU's warp kernels take
// both in one sweep, online: warp_row at the end of this file); from those row_head gives CE,
// g = exp(z_y - max z) / sum, n likewise and the NAW weight, and official_coef / jsd_coef the
// row's share of the loss and its gradient coefficients:
//   official: dz_j = alpha ez_j - beta eu_j (+ Ey at y, + Ek at k), dz'_j = gamma ez'_j - beta eu_j.
// RowMath says how exponentials are taken: float on the GPU uses the MUFU approximations
// (ex2/lg2/rcp.approx, about 2 ulp) on logits pre-scaled by log2(e) (one FFMA + one MUFU per
// exponential); float on the CPU and double everywhere use the exact library functions (for
// double, exactly the formulas of the reference derivation: scale 1, natural logs).
// An out-of-range target never indexes anything: its row is NaN (loss share, weight, gradients).
//
// This header includes no torch header, so nvcc compiles nla_loss_cuda.cu quickly: the CUDA file
// holds kernels and plain launchers (declared below), the ATen glue and the CUDA operator
// registration live in nla_loss.cpp behind NLA_WITH_CUDA. Its last section, the warp kernels' row
// code, is compiled only by nvcc and by tests/warp_emulator.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define NLA_HD __host__ __device__ __forceinline__
#define NLA_UNROLL _Pragma("unroll")
#else
#define NLA_HD inline
#define NLA_UNROLL
#endif

namespace nla_fast {

// The 12 numeric constants, in the order of nla_fast.config.NLAConstants.as_list().
constexpr int kNumConstants = 12;

template <typename acc_t>
struct Constants {
  acc_t lam;
  acc_t mu_true_gt;
  acc_t mu_true_nn;
  acc_t diag_true;
  acc_t offdiag_true;  // o_T: the true-case off-diagonal is -eps * o_T
  acc_t true_scale;
  acc_t mu_false_gt;
  acc_t mu_false_nn;
  acc_t diag_false;
  acc_t offdiag_false;
  acc_t inv_det_false;
  acc_t norm_false;  // 1 / (2 pi sqrt(det Sigma_F))
};

template <typename acc_t>
inline Constants<acc_t> make_constants(const double* v) {
  Constants<acc_t> c;
  c.lam = static_cast<acc_t>(v[0]);
  c.mu_true_gt = static_cast<acc_t>(v[1]);
  c.mu_true_nn = static_cast<acc_t>(v[2]);
  c.diag_true = static_cast<acc_t>(v[3]);
  c.offdiag_true = static_cast<acc_t>(v[4]);
  c.true_scale = static_cast<acc_t>(v[5]);
  c.mu_false_gt = static_cast<acc_t>(v[6]);
  c.mu_false_nn = static_cast<acc_t>(v[7]);
  c.diag_false = static_cast<acc_t>(v[8]);
  c.offdiag_false = static_cast<acc_t>(v[9]);
  c.inv_det_false = static_cast<acc_t>(v[10]);
  c.norm_false = static_cast<acc_t>(v[11]);
  return c;
}

// ---- elementary functions of a row ----
// exp(x) = exp_scaled(x * kScale), ln(x) = kUnit * log_scaled(x): base 2 for float (the GPU's MUFU
// works in base 2), base e for double.
template <typename acc_t>
struct RowMath;

template <>
struct RowMath<float> {
  static constexpr float kScale = 1.44269504088896340736f;  // log2(e)
  static constexpr float kUnit = 0.69314718055994530942f;   // ln(2)
  NLA_HD static float exp_scaled(float t) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
    return r;
#else
    return std::exp2(t);
#endif
  }
  NLA_HD static float log_scaled(float x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return std::log2(x);
#endif
  }
  NLA_HD static float rcp(float x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return 1.0f / x;
#endif
  }
  NLA_HD static float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return a * b + c;
#endif
  }
  // max that the GPU does in one instruction (FMNMX drops a NaN operand: a NaN logit still makes
  // its row NaN through the sums); on the CPU a NaN-propagating compare
  NLA_HD static float max(float a, float b) {
#if defined(__CUDA_ARCH__)
    return fmaxf(a, b);
#else
    return (a > b || a != a) ? a : b;
#endif
  }
};

template <>
struct RowMath<double> {
  static constexpr double kScale = 1.0;
  static constexpr double kUnit = 1.0;
  NLA_HD static double exp_scaled(double t) { return ::exp(t); }
  NLA_HD static double log_scaled(double x) { return ::log(x); }
  NLA_HD static double rcp(double x) { return 1.0 / x; }
  NLA_HD static double fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
    return __fma_rn(a, b, c);
#else
    return a * b + c;
#endif
  }
  NLA_HD static double max(double a, double b) {
#if defined(__CUDA_ARCH__)
    return fmax(a, b);
#else
    return (a > b || a != a) ? a : b;
#endif
  }
};

// exp(x - x_max) from x_max_scaled = x_max * kScale (one FMA and one exponential); with
// half = true, exp((x - x_max) / 2) from x_max_scaled = x_max * kScale / 2.
template <typename acc_t, bool half = false>
NLA_HD acc_t exp_shifted(acc_t x, acc_t x_max_scaled) {
  using M = RowMath<acc_t>;
  constexpr acc_t scale = half ? M::kScale * static_cast<acc_t>(0.5) : M::kScale;
  return M::exp_scaled(M::fma(x, scale, -x_max_scaled));
}

NLA_HD float nla_exp(float x) {
#if defined(__CUDA_ARCH__)
  return RowMath<float>::exp_scaled(x * RowMath<float>::kScale);
#else
  return std::exp(x);
#endif
}
NLA_HD double nla_exp(double x) { return ::exp(x); }
NLA_HD float nla_sqrt(float x) { return ::sqrtf(x); }
NLA_HD double nla_sqrt(double x) { return ::sqrt(x); }

template <typename acc_t>
NLA_HD acc_t nla_inf() {
  return std::numeric_limits<acc_t>::infinity();
}
template <typename acc_t>
NLA_HD acc_t nla_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// max that propagates NaN from either side (so every lane of a reduction agrees).
template <typename acc_t>
NLA_HD acc_t nla_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// The eps-dependent part of the true-case Gaussian, computed once per launch/thread.
template <typename acc_t>
struct TrueCase {
  acc_t b;        // off-diagonal -eps * o_T
  acc_t inv_det;  // 1 / (a^2 - b^2)
  acc_t norm;     // true_scale / (2 pi sqrt(det))
};

template <typename acc_t>
NLA_HD TrueCase<acc_t> make_true_case(const Constants<acc_t>& c, acc_t eps) {
  TrueCase<acc_t> t;
  t.b = -eps * c.offdiag_true;
  const acc_t det = c.diag_true * c.diag_true - t.b * t.b;
  t.inv_det = static_cast<acc_t>(1) / det;
  t.norm = c.true_scale / (static_cast<acc_t>(6.283185307179586476925) * nla_sqrt(det));
  return t;
}

template <typename acc_t>
struct NAW {
  acc_t w;
  acc_t dw_dg;
  acc_t dw_dn;
};

// NAW weight and its partial derivatives at s = (g, n); ties g == n are the true case.
template <typename acc_t>
NLA_HD NAW<acc_t> naw_weight(acc_t g, acc_t n, const Constants<acc_t>& c, const TrueCase<acc_t>& t) {
  const bool true_case = g >= n;
  const acc_t a = true_case ? c.diag_true : c.diag_false;
  const acc_t b = true_case ? t.b : c.offdiag_false;
  const acc_t inv_det = true_case ? t.inv_det : c.inv_det_false;
  const acc_t norm = true_case ? t.norm : c.norm_false;
  const acc_t d1 = g - (true_case ? c.mu_true_gt : c.mu_false_gt);
  const acc_t d2 = n - (true_case ? c.mu_true_nn : c.mu_false_nn);
  const acc_t quad = (a * (d1 * d1 + d2 * d2) - static_cast<acc_t>(2) * b * d1 * d2) * inv_det;
  NAW<acc_t> r;
  r.w = norm * nla_exp(static_cast<acc_t>(-0.5) * quad);
  r.dw_dg = -r.w * (a * d1 - b * d2) * inv_det;
  r.dw_dn = -r.w * (a * d2 - b * d1) * inv_det;
  return r;
}

// Coefficients of d loss / d z_j for the NAW term, already scaled by lam / B:
//   grad_naw_j = A p_j + [j == y] Ey + [j == k] Ek.
template <typename acc_t>
struct NAWGrad {
  acc_t A;
  acc_t Ey;
  acc_t Ek;
};

template <typename acc_t>
NLA_HD NAWGrad<acc_t> naw_grad(const NAW<acc_t>& r, acc_t ce, acc_t g, acc_t n, acc_t lam_over_b) {
  const acc_t one_w = static_cast<acc_t>(1) + r.w;
  const acc_t cg = ce * r.dw_dg * g;
  const acc_t cn = ce * r.dw_dn * n;
  NAWGrad<acc_t> o;
  o.A = lam_over_b * (one_w - cg - cn);
  o.Ey = lam_over_b * (cg - one_w);
  o.Ek = lam_over_b * cn;
  return o;
}

// Everything a row needs besides its values: fixed for a call.
template <typename acc_t>
struct RowConsts {
  Constants<acc_t> c;
  TrueCase<acc_t> tc;
  acc_t lam_over_b;  // lam / B: the NAW term is a batch mean
  acc_t reg_scale;   // (1 - lam), over B when the consistency term is a batch mean (reg_mean)
  bool jsd;
};

template <typename acc_t>
NLA_HD RowConsts<acc_t> make_row_consts(const Constants<acc_t>& c, acc_t eps, int64_t B, bool jsd, bool reg_mean) {
  RowConsts<acc_t> k;
  k.c = c;
  k.tc = make_true_case(c, eps);
  const acc_t inv_b = static_cast<acc_t>(1) / static_cast<acc_t>(B);
  k.lam_over_b = c.lam * inv_b;
  k.reg_scale = (static_cast<acc_t>(1) - c.lam) * (reg_mean ? inv_b : static_cast<acc_t>(1));
  k.jsd = jsd;
  return k;
}

// What a kernel computes besides the NAW weight: nothing (the weights-only op), the official
// consistency term or the JSD one.
enum class Consistency : int { None = 0, Official = 1, Jsd = 2 };

// ---- the per-row scalars, shared by every path ----
// A row after passes 1 and 2.
template <typename acc_t>
struct RowStats {
  acc_t mz, mzf, ms;  // max z, max z', max (z + z')
  acc_t sz, szf, su;  // sum exp(z - mz), sum exp(z' - mzf), sum exp((z + z' - ms) / 2)
  acc_t zy;           // z_y; NaN for an out-of-range target (it poisons the whole row)
  acc_t best;         // z_k, the nearest negative's logit
};

// CE, g, n and the NAW weight (its value and partial derivatives).
template <typename acc_t>
struct RowHead {
  acc_t ce, g, n, lse_z, inv_sz;
  NAW<acc_t> naw;
};

template <typename acc_t>
NLA_HD RowHead<acc_t> row_head(const RowStats<acc_t>& s, const RowConsts<acc_t>& K) {
  using M = RowMath<acc_t>;
  RowHead<acc_t> h;
  const acc_t lg = M::kUnit * M::log_scaled(s.sz);
  const acc_t mz_scaled = s.mz * M::kScale;
  h.lse_z = s.mz + lg;
  h.ce = (s.mz - s.zy) + lg;
  h.inv_sz = M::rcp(s.sz);
  h.g = exp_shifted(s.zy, mz_scaled) * h.inv_sz;
  h.n = exp_shifted(s.best, mz_scaled) * h.inv_sz;
  h.naw = naw_weight(h.g, h.n, K.c, K.tc);
  return h;
}

// Official consistency: the row's loss share and its gradient coefficients
//   dz_j = alpha ez_j - beta eu_j + [j == y] Ey + [j == k] Ek,   dz'_j = gamma ez'_j - beta eu_j
// with ez_j = exp(z_j - mz), ez'_j = exp(z'_j - mzf), eu_j = exp((z_j + z'_j - ms) / 2).
template <typename acc_t>
struct OfficialCoef {
  acc_t contrib;
  acc_t alpha, beta, gamma, Ey, Ek;
};

template <typename acc_t>
NLA_HD OfficialCoef<acc_t> official_coef(const RowStats<acc_t>& s, const RowHead<acc_t>& h,
                                         const RowConsts<acc_t>& K, bool want_grad) {
  using M = RowMath<acc_t>;
  const acc_t half = static_cast<acc_t>(0.5);
  const acc_t lse_zf = s.mzf + M::kUnit * M::log_scaled(s.szf);
  const acc_t lse_u = s.ms * half + M::kUnit * M::log_scaled(s.su);
  OfficialCoef<acc_t> o;
  o.contrib = K.lam_over_b * (static_cast<acc_t>(1) + h.naw.w) * h.ce +
              K.reg_scale * (half * (h.lse_z + lse_zf) - lse_u);
  if (want_grad) {
    const NAWGrad<acc_t> ng = naw_grad(h.naw, h.ce, h.g, h.n, K.lam_over_b);
    const acc_t reg = K.reg_scale * half;
    const acc_t reg_poisoned = reg + (s.zy - s.zy);  // NaN for an out-of-range target
    o.alpha = (ng.A + reg) * h.inv_sz;
    o.beta = reg_poisoned * M::rcp(s.su);
    o.gamma = reg_poisoned * M::rcp(s.szf);
    o.Ey = ng.Ey;
    o.Ek = ng.Ek;
  }
  return o;
}

// JSD consistency: per column, p = ez * inv_sz, p' = ez' * inv_szf, t = log p - log m.
template <typename acc_t>
struct JsdHead {
  acc_t lse_zf, inv_szf;
};

template <typename acc_t>
NLA_HD JsdHead<acc_t> jsd_head(const RowStats<acc_t>& s) {
  using M = RowMath<acc_t>;
  JsdHead<acc_t> j;
  j.lse_zf = s.mzf + M::kUnit * M::log_scaled(s.szf);
  j.inv_szf = M::rcp(s.szf);
  return j;
}

// log m = log((p + p') / 2), used only where p > 0 or p' > 0 (where it is finite).
template <typename acc_t>
NLA_HD acc_t jsd_log_mix(acc_t p, acc_t pf) {
  using M = RowMath<acc_t>;
  return M::kUnit * M::log_scaled(p + pf) - static_cast<acc_t>(0.69314718055994530942);
}

// Adds column j's p t and p' t' to S and Sf (0 where p = 0, so a -inf logit adds nothing).
template <typename acc_t>
NLA_HD void jsd_accumulate(acc_t a, acc_t b, acc_t p, acc_t pf, acc_t lse_z, acc_t lse_zf, acc_t& S, acc_t& Sf) {
  const acc_t zero = static_cast<acc_t>(0);
  if (p > zero || pf > zero) {
    const acc_t lm = jsd_log_mix(p, pf);
    if (p > zero) S += p * ((a - lse_z) - lm);
    if (pf > zero) Sf += pf * ((b - lse_zf) - lm);
  }
}

template <typename acc_t>
struct JsdCoef {
  acc_t contrib;
  acc_t A, h, Ey, Ek, poison;
};

template <typename acc_t>
NLA_HD JsdCoef<acc_t> jsd_coef(const RowStats<acc_t>& s, const RowHead<acc_t>& h, const RowConsts<acc_t>& K,
                               acc_t S, acc_t Sf, bool want_grad) {
  const acc_t half = static_cast<acc_t>(0.5);
  JsdCoef<acc_t> o;
  o.contrib = K.lam_over_b * (static_cast<acc_t>(1) + h.naw.w) * h.ce + K.reg_scale * half * (S + Sf);
  if (want_grad) {
    const NAWGrad<acc_t> ng = naw_grad(h.naw, h.ce, h.g, h.n, K.lam_over_b);
    o.A = ng.A;
    o.Ey = ng.Ey;
    o.Ek = ng.Ek;
    o.h = K.reg_scale * half;
    o.poison = s.zy - s.zy;
  }
  return o;
}

// Column j's JSD gradients (before the Ey / Ek terms).
template <typename acc_t>
NLA_HD void jsd_grad(const JsdCoef<acc_t>& o, acc_t a, acc_t b, acc_t p, acc_t pf, acc_t lse_z, acc_t lse_zf,
                     acc_t S, acc_t Sf, acc_t& v, acc_t& vf) {
  const acc_t zero = static_cast<acc_t>(0);
  const acc_t lm = (p > zero || pf > zero) ? jsd_log_mix(p, pf) : zero;
  v = o.A * p + (p > zero ? o.h * p * (((a - lse_z) - lm) - S) : zero);
  vf = (pf > zero ? o.h * pf * (((b - lse_zf) - lm) - Sf) : zero) + o.poison;
}

// ---- a row of compile-time width C held in registers (the GPU tile kernels for C = 7 and 8, the
// CPU for the same widths). a, b: the row's logits in acc_t; y in [0, C) (0 when out of range),
// zy = a[y] or NaN when the target is out of range. Writes the weight, and the gradients when GRAD.
template <int C, Consistency MODE, bool GRAD, typename acc_t>
NLA_HD acc_t nla_row_fixed(const acc_t (&a)[C], const acc_t (&b)[C], const int y, const acc_t zy,
                           const RowConsts<acc_t>& K, acc_t& weight, acc_t (&gz)[C], acc_t (&gzf)[C]) {
  static_assert(C >= 2, "NLA needs at least 2 classes");
  using M = RowMath<acc_t>;
  constexpr bool kFlip = MODE != Consistency::None;
  constexpr bool kOfficial = MODE == Consistency::Official;
  RowStats<acc_t> s;
  s.zy = zy;
  // pass 1: maxima; the nearest negative k: the first index of the largest logit among j != y
  s.mz = a[0];
  s.mzf = b[0];
  s.ms = a[0] + b[0];
  int k = y == 0 ? 1 : 0;
  s.best = y == 0 ? a[1] : a[0];
  NLA_UNROLL
  for (int j = 1; j < C; ++j) {
    s.mz = M::max(s.mz, a[j]);
    if (kFlip) s.mzf = M::max(s.mzf, b[j]);
    if (kOfficial) s.ms = M::max(s.ms, a[j] + b[j]);
    if (j != y && a[j] > s.best) {
      s.best = a[j];
      k = j;
    }
  }
  // pass 2: the exponentials, kept for the gradients
  const acc_t mz_s = s.mz * M::kScale;
  const acc_t mzf_s = s.mzf * M::kScale;
  const acc_t ms_s = s.ms * (M::kScale * static_cast<acc_t>(0.5));
  acc_t ez[C], ezf[C], eu[C];
  s.sz = s.szf = s.su = static_cast<acc_t>(0);
  NLA_UNROLL
  for (int j = 0; j < C; ++j) {
    ez[j] = exp_shifted(a[j], mz_s);
    s.sz += ez[j];
    if (kFlip) {
      ezf[j] = exp_shifted(b[j], mzf_s);
      s.szf += ezf[j];
    }
    if (kOfficial) {
      eu[j] = exp_shifted<acc_t, true>(a[j] + b[j], ms_s);
      s.su += eu[j];
    }
  }
  const RowHead<acc_t> h = row_head(s, K);
  weight = h.naw.w;
  if (!kFlip) return static_cast<acc_t>(0);
  if (kOfficial) {
    const OfficialCoef<acc_t> o = official_coef(s, h, K, GRAD);
    if (GRAD) {
      NLA_UNROLL
      for (int j = 0; j < C; ++j) {
        const acc_t t = eu[j] * o.beta;
        acc_t v = M::fma(ez[j], o.alpha, -t);
        if (j == y) v += o.Ey;
        if (j == k) v += o.Ek;
        gz[j] = v;
        gzf[j] = M::fma(ezf[j], o.gamma, -t);
      }
    }
    return o.contrib;
  }
  const JsdHead<acc_t> jh = jsd_head(s);
  acc_t S = 0, Sf = 0;
  NLA_UNROLL
  for (int j = 0; j < C; ++j) jsd_accumulate(a[j], b[j], ez[j] * h.inv_sz, ezf[j] * jh.inv_szf, h.lse_z, jh.lse_zf, S, Sf);
  const JsdCoef<acc_t> o = jsd_coef(s, h, K, S, Sf, GRAD);
  if (GRAD) {
    NLA_UNROLL
    for (int j = 0; j < C; ++j) {
      acc_t v, vf;
      jsd_grad(o, a[j], b[j], ez[j] * h.inv_sz, ezf[j] * jh.inv_szf, h.lse_z, jh.lse_zf, S, Sf, v, vf);
      if (j == y) v += o.Ey;
      if (j == k) v += o.Ek;
      gz[j] = v;
      gzf[j] = vf;
    }
  }
  return o.contrib;
}

// ---- a row of any width, read through callbacks (the CPU for narrow rows, the GPU tile kernel
// for C <= 32 other than 7 and 8). load(j, a, b): a = z_j, b = z'_j (b is not used when !has_flip)
// in acc_t; store(j, v, vf): the gradients d loss / d z_j, d loss / d z'_j (only when want_grad);
// weight: where w goes (nullptr: nowhere). Returns the row's share of the loss (0 without flip).
// CMAX > 0: the column loops are unrolled to CMAX (C <= CMAX); CMAX == 0: plain loops. The
// exponentials are recomputed where needed (nothing is kept per column).
template <int CMAX, typename acc_t, typename Load, typename Store>
NLA_HD acc_t nla_row(const Load& load, const int64_t C, const int64_t y, const RowConsts<acc_t>& K,
                     const bool has_flip, const bool want_grad, const Store& store, acc_t* weight) {
  using M = RowMath<acc_t>;
  const acc_t nan = nla_nan<acc_t>();
  const int64_t ncols = CMAX > 0 ? static_cast<int64_t>(CMAX) : C;
  if (y < 0 || y >= C) {
    if (weight != nullptr) *weight = nan;
    if (want_grad) {
      NLA_UNROLL
      for (int64_t j = 0; j < ncols; ++j) {
        if (CMAX == 0 || j < C) store(j, nan, nan);
      }
    }
    return nan;
  }
  const bool official = has_flip && !K.jsd;
  // pass 1: maxima, z_y and the nearest negative k (first index of the largest logit, j != y)
  RowStats<acc_t> s;
  s.mz = s.mzf = s.ms = s.best = -nla_inf<acc_t>();
  s.zy = 0;
  int64_t k = -1;
  NLA_UNROLL
  for (int64_t j = 0; j < ncols; ++j) {
    if (CMAX == 0 || j < C) {
      acc_t a, b;
      load(j, a, b);
      s.mz = M::max(s.mz, a);
      if (j == y) {
        s.zy = a;
      } else if (k < 0 || a > s.best) {
        s.best = a;
        k = j;
      }
      if (has_flip) {
        s.mzf = M::max(s.mzf, b);
        if (official) s.ms = M::max(s.ms, a + b);
      }
    }
  }
  // pass 2: sums of exponentials
  const acc_t mz_s = s.mz * M::kScale;
  const acc_t mzf_s = s.mzf * M::kScale;
  const acc_t ms_s = s.ms * (M::kScale * static_cast<acc_t>(0.5));
  s.sz = s.szf = s.su = static_cast<acc_t>(0);
  NLA_UNROLL
  for (int64_t j = 0; j < ncols; ++j) {
    if (CMAX == 0 || j < C) {
      acc_t a, b;
      load(j, a, b);
      s.sz += exp_shifted(a, mz_s);
      if (has_flip) {
        s.szf += exp_shifted(b, mzf_s);
        if (official) s.su += exp_shifted<acc_t, true>(a + b, ms_s);
      }
    }
  }
  const RowHead<acc_t> h = row_head(s, K);
  if (weight != nullptr) *weight = h.naw.w;
  if (!has_flip) return 0;
  if (official) {
    const OfficialCoef<acc_t> o = official_coef(s, h, K, want_grad);
    if (want_grad) {
      NLA_UNROLL
      for (int64_t j = 0; j < ncols; ++j) {
        if (CMAX == 0 || j < C) {
          acc_t a, b;
          load(j, a, b);
          const acc_t t = exp_shifted<acc_t, true>(a + b, ms_s) * o.beta;
          acc_t v = M::fma(exp_shifted(a, mz_s), o.alpha, -t);
          if (j == y) v += o.Ey;
          if (j == k) v += o.Ek;
          store(j, v, M::fma(exp_shifted(b, mzf_s), o.gamma, -t));
        }
      }
    }
    return o.contrib;
  }
  // pass 3 (JSD): sum p t and sum p' t'
  const JsdHead<acc_t> jh = jsd_head(s);
  acc_t S = 0, Sf = 0;
  NLA_UNROLL
  for (int64_t j = 0; j < ncols; ++j) {
    if (CMAX == 0 || j < C) {
      acc_t a, b;
      load(j, a, b);
      jsd_accumulate(a, b, exp_shifted(a, mz_s) * h.inv_sz, exp_shifted(b, mzf_s) * jh.inv_szf, h.lse_z, jh.lse_zf,
                     S, Sf);
    }
  }
  const JsdCoef<acc_t> o = jsd_coef(s, h, K, S, Sf, want_grad);
  if (want_grad) {
    NLA_UNROLL
    for (int64_t j = 0; j < ncols; ++j) {
      if (CMAX == 0 || j < C) {
        acc_t a, b, v, vf;
        load(j, a, b);
        jsd_grad(o, a, b, exp_shifted(a, mz_s) * h.inv_sz, exp_shifted(b, mzf_s) * jh.inv_szf, h.lse_z, jh.lse_zf,
                 S, Sf, v, vf);
        if (j == y) v += o.Ey;
        if (j == k) v += o.Ek;
        store(j, v, vf);
      }
    }
  }
  return o.contrib;
}

}  // namespace nla_fast


// ---- the CUDA launch plan and launchers (nla_loss_cuda.cu), called by the ATen glue in nla_loss.cpp ----
namespace nla_fast {

enum class DType : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

inline int dtype_size(DType t) {
  return t == DType::Double ? 8 : (t == DType::Float ? 4 : 2);
}

// Which CUDA kernel runs a (B, C, dtype) problem (cuda_launch_plan below).
enum class CudaKernel : int {
  TileFixed = 0,    // nla_tile_fixed_kernel<scalar_t, C, MODE, GRAD>: C in {7, 8}, float/half/bfloat16
  TileGeneric = 1,  // nla_tile_generic_kernel<scalar_t>: C <= 32, the rest
  WarpRow = 2,      // nla_warp_kernel<scalar_t, ELEMS, MODE>: a warp per row swept in 16-byte pieces
  WarpChunked = 3,  // nla_warp_chunked_kernel<scalar_t>: a warp per row swept element by element (any C)
};

constexpr int kCudaTileThreads = 128;    // tile kernels: a thread per row, a tile of 128 rows per block
constexpr int kCudaTileMinBlocks = 8;    // 8 blocks of 4 warps resident per SM (<= 64 registers a thread)
constexpr int kCudaWarpThreads = 128;    // warp kernels: 4 rows (one per warp) per block
constexpr int kCudaWarpMinBlocks = 8;    // 8 blocks of 4 warps resident per SM (<= 64 registers a thread)
constexpr int kCudaMaxBlocks = 4096;     // grid cap (grid-stride beyond): bounds the partials
constexpr int kCudaTileMaxC = 32;        // C <= 32: a row per thread (tile kernels), else a warp per row
constexpr int kCudaWarpMaxElems = 32;    // the piece kernel sweeps up to 32 columns per lane (C <= 1024)
constexpr int kCudaChunkColumns = 4;     // the element kernel: columns per lane per loop iteration
constexpr int kCudaSmemBytes = 48 * 1024;  // static limit of a block's shared memory (no opt-in)

inline bool cuda_fixed_width(int64_t C) { return C == 7 || C == 8; }

// Resident blocks per SM the fixed-width kernel is compiled for (__launch_bounds__): 8 (32 warps,
// <= 64 registers), 6 (<= 80 registers) for JSD with gradients, whose rows keep more per column.
constexpr int cuda_tile_min_blocks(Consistency mode, bool grad) {
  return (mode == Consistency::Jsd && grad) ? 6 : kCudaTileMinBlocks;
}

// Resident blocks per SM the piece kernel (WarpRow) is compiled for: 8 (32 warps, <= 64 registers);
// 6 for JSD (24 warps, <= 80 registers: its gradient pass keeps more per column).
constexpr int cuda_warp_min_blocks(Consistency mode) {
  return mode == Consistency::Jsd ? 6 : kCudaWarpMinBlocks;
}

// Columns per vector piece of the warp kernel: 16 bytes, or fewer when a lane holds fewer columns.
constexpr int cuda_warp_piece(int elems, int esize) { return 16 / esize < elems ? 16 / esize : elems; }

// Pieces a lane of the piece kernel takes per loop iteration: 2 when its rows can have 2 or more,
// except for JSD (1: its gradient pass keeps more per column).
constexpr int cuda_warp_step(int elems, int esize, Consistency mode) {
  return mode != Consistency::Jsd && elems >= 2 * cuda_warp_piece(elems, esize) ? 2 : 1;
}

// Shared-memory layout of a tile of the fixed-width kernel: rows of R = C * esize bytes, copied
// from global memory in 16-byte pieces (the tile's bytes in order, or a 16-byte pad after each row
// when R is a multiple of 32). Each thread then reads its row with `vec`-byte loads, vec = the
// largest power of two dividing R (at most 16); consecutive lanes take rows `lane_rows` apart.
// Bank-conflict free: the lanes of one shared-memory phase (128 / vec of them) read vec-byte words
// at a stride that is an odd multiple of vec (R / vec odd, (R + 16) / 16 odd, or 2R / 4 odd).
struct TileLayout {
  int row_bytes;  // R
  int stride;     // bytes between rows in shared memory: R, or R + 16
  int vec;        // bytes per shared-memory access of a thread's row: 16, 8, 4 or 2
  int lane_rows;  // rows between consecutive lanes of a warp: 1, or 2 when vec == 2
};

constexpr TileLayout tile_layout(int C, int esize) {
  const int R = C * esize;
  const int low = R & -R;  // the largest power of two dividing R
  return low >= 32 ? TileLayout{R, R + 16, 16, 1}
                   : (low >= 4 ? TileLayout{R, R, low, 1} : TileLayout{R, R, 2, 2});
}

// Row stride (bytes) of the generic tile kernel, whose threads read their row element by element:
// an odd number of 4-byte words (8-byte words for double), so 32 lanes hit 32 banks.
constexpr int tile_generic_stride(int C, int esize) {
  return esize == 8 ? 8 * (C | 1) : 4 * (((C * esize + 3) / 4) | 1);
}

// Columns per lane of the warp kernel for C columns: the next power of two >= ceil(C / 32), at least 2.
inline int cuda_warp_elems(int64_t C) {
  int elems = 2;
  while (32 * elems < C) elems *= 2;
  return elems;
}

// How a (B, C, dtype) problem is laid out on the GPU. A fixed function of (B, C, dtype), not of
// the device: the loss sum has a fixed order for a given shape (deterministic), and host and
// device agree on the grid (partials).
struct CudaPlan {
  CudaKernel kernel;
  int width;           // TileFixed: C; TileGeneric: 32 (unroll bound); WarpRow: ELEMS; WarpChunked: 0
  int threads;         // block size
  int rows_per_block;  // rows a block handles per grid-stride step
  int smem_bytes;      // dynamic shared memory (TileGeneric), else 0
  int grid;            // blocks = loss partials
};

// The CUDA launch plan; its rules, in order:
//   1. C in {7, 8} and not double: TileFixed<C>, 128 threads, 128 rows per block (a row per thread).
//   2. C <= 32: TileGeneric, 128 threads and rows per block (64 for double when 128 rows' two tiles
//      exceed 48 kB), dynamic shared memory 2 * rows * tile_generic_stride(C, esize).
//   3. C <= 1024, not double, and C a multiple of V = cuda_warp_piece(ELEMS, esize) (16 bytes of
//      columns, or ELEMS if fewer): WarpRow<ELEMS>, ELEMS = max(2, next power of two >= ceil(C / 32)),
//      128 threads, 4 rows per block (a warp per row).
//   4. else WarpChunked, 128 threads, 4 rows per block.
//   grid = clamp(ceil(B / rows_per_block), 1, 4096); blocks grid-stride over the rest.
// The template's consistency variant follows the call: MODE None for naw_weight (no flip), else
// Official or Jsd (NLAConfig.consistency); TileFixed also has GRAD = whether gradients are wanted.
// So at B = 65,536 the tile kernels launch 512 blocks (>= 2 x 132 SMs of an H200); at B = 2^20 they
// launch 4096 blocks of two tiles each.
inline CudaPlan cuda_launch_plan(int64_t B, int64_t C, DType dtype) {
  const int esize = dtype_size(dtype);
  CudaPlan p{};
  if (cuda_fixed_width(C) && dtype != DType::Double) {
    p.kernel = CudaKernel::TileFixed;
    p.width = static_cast<int>(C);
    p.threads = kCudaTileThreads;
  } else if (C <= kCudaTileMaxC) {
    p.kernel = CudaKernel::TileGeneric;
    p.width = kCudaTileMaxC;
    p.threads = kCudaTileThreads;
    const int stride = tile_generic_stride(static_cast<int>(C), esize);
    while (p.threads > 32 && 2 * p.threads * stride > kCudaSmemBytes) p.threads /= 2;
    p.smem_bytes = 2 * p.threads * stride;
  } else if (C <= 32 * kCudaWarpMaxElems && dtype != DType::Double &&
             C % cuda_warp_piece(cuda_warp_elems(C), esize) == 0) {
    p.kernel = CudaKernel::WarpRow;
    p.width = cuda_warp_elems(C);
    p.threads = kCudaWarpThreads;
  } else {
    p.kernel = CudaKernel::WarpChunked;
    p.threads = kCudaWarpThreads;
  }
  const bool tile = p.kernel == CudaKernel::TileFixed || p.kernel == CudaKernel::TileGeneric;
  p.rows_per_block = tile ? p.threads : p.threads / 32;
  int64_t g = (B + p.rows_per_block - 1) / p.rows_per_block;
  if (g < 1) g = 1;
  if (g > kCudaMaxBlocks) g = kCudaMaxBlocks;
  p.grid = static_cast<int>(g);
  return p;
}

// Columns a lane of a warp kernel takes per loop iteration: each sweep over a row is a loop of
// floor(C / (32 * this)) iterations, then the last partial one (WarpRow: S pieces of V columns;
// WarpChunked: a group of kCudaChunkColumns); 0 for the tile kernels.
inline int cuda_lane_columns(const CudaPlan& p, DType dtype, Consistency mode) {
  const int esize = dtype_size(dtype);
  if (p.kernel == CudaKernel::WarpRow) return cuda_warp_piece(p.width, esize) * cuda_warp_step(p.width, esize, mode);
  return p.kernel == CudaKernel::WarpChunked ? kCudaChunkColumns : 0;
}

struct CudaRowsArgs {
  DType dtype;
  const void* z;   // (B, C) contiguous, 16-byte aligned
  const void* zf;  // the same; nullptr: weights only
  const void* y;
  int64_t y_s0;
  bool y_is_int64;
  int64_t B;
  int64_t C;
  double constants[kNumConstants];
  const void* eps_ptr;  // 0-d float or double tensor on the device; nullptr: eps_value
  bool eps_is_double;
  double eps_value;
  bool jsd;
  bool reg_mean;
  void* gz;        // nullptr: no gradients (logits dtype, contiguous (B, C))
  void* gzf;
  void* weights;   // nullptr: no weights (accumulation dtype)
  void* partials;  // cuda_launch_plan(B, C).grid values in the accumulation dtype; nullptr: no loss
  void* loss;      // 0-d, accumulation dtype; written when partials is set
};

// Each returns nullptr on success, else the CUDA error string of the launch.
const char* cuda_rows(const CudaRowsArgs& args, void* stream);
// out = grad_output * in for two tensors of n_a and n_b elements (contiguous), grad_output read
// from memory (float or double). in == out is allowed: then nothing is read or written when
// grad_output == 1 (the common loss.backward()).
const char* cuda_scale(DType dtype, const void* grad_output, bool grad_output_is_double, const void* a,
                       const void* b, void* out_a, void* out_b, int64_t na, int64_t nb, void* stream);

}  // namespace nla_fast


// ---- a row on a warp: the GPU's warp kernels (C > 32) and what they share with the tile kernels
// (loads and stores in the accumulation type, the kernel parameters). Compiled by nvcc for
// nla_loss_cuda.cu and, for the CPU tests, by the host compiler against an emulated warp
// (tests/warp_emulator.cpp defines NLA_WARP_EMULATOR and the CUDA types and intrinsics used here:
// 32 threads a warp, each shuffle a barrier), so the CPU tests also run the warp kernels' row code.
#if defined(__CUDACC__) || defined(NLA_WARP_EMULATOR)
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define NLA_DEV __device__ __forceinline__
#else
#define NLA_DEV inline
#endif

#include <type_traits>

namespace nla_fast {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- loads and stores in the accumulation type (explicit intrinsics: no implicit half conversions)
template <typename acc_t>
NLA_DEV acc_t to_acc(float v) { return static_cast<acc_t>(v); }
template <typename acc_t>
NLA_DEV acc_t to_acc(double v) { return static_cast<acc_t>(v); }
template <typename acc_t>
NLA_DEV acc_t to_acc(__half v) { return static_cast<acc_t>(__half2float(v)); }
template <typename acc_t>
NLA_DEV acc_t to_acc(__nv_bfloat16 v) { return static_cast<acc_t>(__bfloat162float(v)); }

template <typename scalar_t>
NLA_DEV scalar_t from_acc(float v);
template <>
NLA_DEV float from_acc<float>(float v) { return v; }
template <>
NLA_DEV __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
NLA_DEV __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename scalar_t>
NLA_DEV scalar_t from_acc(double v);
template <>
NLA_DEV double from_acc<double>(double v) { return v; }

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// A raw piece of BYTES bytes (what one vector load or store moves).
template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};
template <>
struct RawVec<2> {
  using type = unsigned short;
};

// Element i of a raw piece holding scalar_t values.
template <typename acc_t, typename scalar_t, typename Raw>
NLA_DEV acc_t raw_elem(const Raw& raw, int i) {
  return to_acc<acc_t>(reinterpret_cast<const scalar_t*>(&raw)[i]);
}

template <typename acc_t>
NLA_DEV acc_t read_eps(const void* ptr, bool is_double, acc_t value) {
  if (ptr == nullptr) return value;
  return is_double ? static_cast<acc_t>(*static_cast<const double*>(ptr))
                   : static_cast<acc_t>(*static_cast<const float*>(ptr));
}

NLA_DEV int64_t read_target(const void* y, int64_t i, int64_t s0, bool is_int64) {
  return is_int64 ? static_cast<const int64_t*>(y)[i * s0]
                  : static_cast<int64_t>(static_cast<const int32_t*>(y)[i * s0]);
}

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* z;   // (B, C) contiguous, 16-byte aligned (nla_loss.cpp copies other layouts)
  const scalar_t* zf;  // the same; nullptr: weights only
  const void* y;
  int64_t y_s0;
  bool y_is_int64;
  int64_t B;
  int64_t C;
  Constants<acc_t> c;
  const void* eps_ptr;  // nullptr: eps_value
  bool eps_is_double;
  acc_t eps_value;
  bool jsd;
  bool reg_mean;
  scalar_t* gz;  // nullptr: no gradients (contiguous (B, C))
  scalar_t* gzf;
  acc_t* weights;   // nullptr: no weights
  acc_t* partials;  // nullptr: no loss (weights only); gridDim.x values (the loss when one block)
};

// ---- the warp kernels (C > 32)
// A warp per row, nothing held per column. Sweep 1 reads the row once from DRAM: each lane folds
// its columns, a group at a time, into running statistics (maxima, sums of exponentials rescaled
// once per group: online softmax; the nearest-negative candidate). The warp combines the lanes'
// statistics with xor-butterflies (every lane ends with bitwise the same row statistics). Sweep 2
// re-reads the row (from L1 / L2: it was just read) and writes both gradients; JSD needs a sweep
// more (its sums of p t) before that one. So a thread keeps a few running values instead of the
// row: at most 64 registers, 32 resident warps per SM.
template <typename T>
NLA_DEV T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T>
NLA_DEV T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = RowMath<T>::max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// (value, index) of the nearest negative: larger value, first index among ties.
template <typename T>
NLA_DEV void warp_argmax(T& v, int& idx) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_xor_sync(kFullMask, v, off);
    const int oi = __shfl_xor_sync(kFullMask, idx, off);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// A running maximum m of some columns x and the sum s of exp((x - m) * factor) (factor 1, or 1/2 for
// the mean of the logits), folded a group of columns at a time. s is kept relative to the shift
// h = m * scale as rounded (scale = factor * RowMath::kScale), the shift every term was taken
// against, and rescaled by exp_scaled(h_old - h_new): terms and rescales agree on one shift, and
// the warp's total is relative to exactly the shift the later passes use (s.mz * kScale). h is
// clamped to the lowest finite value, so while every column so far is -inf the sum stays 0 (no
// -inf - -inf); a NaN or +inf column makes the sum NaN, as it does the row.
template <typename acc_t, bool HALF>
struct OnlineSum {
  using M = RowMath<acc_t>;
  static constexpr acc_t kScale = HALF ? M::kScale * static_cast<acc_t>(0.5) : M::kScale;
  static constexpr acc_t kLowest = -std::numeric_limits<acc_t>::max();
  acc_t m, h, s;

  NLA_DEV static acc_t shift_of(acc_t max) { return M::max(max * kScale, kLowest); }
  NLA_DEV void init() {
    m = -nla_inf<acc_t>();
    h = kLowest;
    s = 0;
  }
  // the running maximum, raised to at least `bound` (an upper bound on the group about to be added):
  // one rescale per group
  NLA_DEV void rescale(acc_t bound) {
    m = M::max(m, bound);
    const acc_t shift = shift_of(m);
    s *= M::exp_scaled(h - shift);
    h = shift;
  }
  NLA_DEV void add(acc_t x) { s += M::exp_scaled(M::fma(x, kScale, -h)); }
  NLA_DEV void reduce_warp() {
    const acc_t row_max = warp_max(m);
    const acc_t shift = shift_of(row_max);
    s = warp_sum(s * M::exp_scaled(h - shift));
    m = row_max;
    h = shift;
  }
};

// Sweep 1's per-lane state: online sums of z, z' and (z + z') / 2, the nearest-negative candidate.
template <typename acc_t>
struct LaneStats {
  OnlineSum<acc_t, false> z, zf;
  OnlineSum<acc_t, true> u;
  acc_t best;  // the largest z_j, j != y, among the lane's columns so far
  int k;       // its column, the first among ties (columns come in increasing order); INT32_MAX: none
};

// Folds N columns of a lane (columns col(e), increasing; y: the target's column, same numbering)
// into its statistics: the group's maxima and nearest negative, then its terms. The running maximum
// of z needs no maximum of its own: max(nearest negative so far, z_y) bounds every z_j folded so far
// and ends as the row's maximum (zy: z_y, NaN for a bad target, which max drops).
template <Consistency MODE, int N, typename acc_t, typename Col>
NLA_DEV void lane_fold(LaneStats<acc_t>& st, const acc_t (&a)[N], const acc_t (&b)[N],
                                          const Col& col, int y, acc_t zy) {
  using M = RowMath<acc_t>;
  constexpr bool kFlip = MODE != Consistency::None;
  constexpr bool kOfficial = MODE == Consistency::Official;
  acc_t gzf = b[0], gu = a[0] + b[0];
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if (e > 0) {
      if (kFlip) gzf = M::max(gzf, b[e]);
      if (kOfficial) gu = M::max(gu, a[e] + b[e]);
    }
    if (col(e) != y && a[e] > st.best) {
      st.best = a[e];
      st.k = col(e);
    }
  }
  st.z.rescale(M::max(st.best, zy));
  if (kFlip) st.zf.rescale(gzf);
  if (kOfficial) st.u.rescale(gu);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    st.z.add(a[e]);
    if (kFlip) st.zf.add(b[e]);
    if (kOfficial) st.u.add(a[e] + b[e]);
  }
}

// The row constants that depend on eps and B, computed once per block into shared memory and read
// back for each row: volatile, so they are read where a row uses them, not held in registers
// through the sweeps (the constants of NLAConfig are kernel parameters, read where used anyway).
template <typename acc_t>
struct SharedRowConsts {
  TrueCase<acc_t> tc;
  acc_t lam_over_b, reg_scale;
};

template <typename acc_t>
NLA_DEV RowConsts<acc_t> row_consts(const Constants<acc_t>& c,
                                                       const volatile SharedRowConsts<acc_t>* shared, bool jsd) {
  RowConsts<acc_t> K;
  K.c = c;
  K.tc.b = shared->tc.b;
  K.tc.inv_det = shared->tc.inv_det;
  K.tc.norm = shared->tc.norm;
  K.lam_over_b = shared->lam_over_b;
  K.reg_scale = shared->reg_scale;
  K.jsd = jsd;
  return K;
}

// The gradients of a column (before the Ey / Ek terms), one call per consistency variant, from the
// row's statistics: the same code for a whole sweep and for the two columns fixed up after it.
template <Consistency MODE, typename acc_t>
struct ColumnGrad {
  acc_t mz_s, mzf_s, ms_s;  // the row's maxima, pre-scaled (RowMath::kScale; halved for ms)
  OfficialCoef<acc_t> oc;
  JsdCoef<acc_t> jc;
  JsdHead<acc_t> jh;
  acc_t lse_z, inv_sz, S, Sf;

  NLA_DEV void operator()(acc_t a, acc_t b, acc_t& v, acc_t& vf) const {
    using M = RowMath<acc_t>;
    if constexpr (MODE == Consistency::Official) {
      const acc_t t = exp_shifted<acc_t, true>(a + b, ms_s) * oc.beta;
      v = M::fma(exp_shifted(a, mz_s), oc.alpha, -t);
      vf = M::fma(exp_shifted(b, mzf_s), oc.gamma, -t);
    } else {
      jsd_grad(jc, a, b, exp_shifted(a, mz_s) * inv_sz, exp_shifted(b, mzf_s) * jh.inv_szf, lse_z, jh.lse_zf, S, Sf, v,
               vf);
    }
  }
};

// Where a row's results go, written by one lane of the warp as soon as they are known (not held
// through the gradient sweep): its share of the loss added to *loss, its weight to *weight
// (nullptr: nowhere).
template <typename acc_t>
struct RowSink {
  bool leader;  // whether this lane writes
  volatile acc_t* loss;
  acc_t* weight;
};

// One row on one warp, the loop body of both warp kernels. `row` sweeps the row's columns in groups
// (row.read(f): f(a, b, col) per group, b = a without flipped logits; row.write(g): the gradients
// g(a, b, v, vf) of every column written), numbers them its own way (row.number(j), row.column(n)),
// says which lane writes column j (row.owns(j)) and reads and writes single columns (row.zf_at(j),
// row.store_gz(j, v)). The target's and the nearest negative's extra terms (Ey, Ek) are not tested
// for column by column: the lane that writes their columns computes those two gradients before the
// sweep and writes them again after it (program order on one thread).
template <Consistency MODE, typename acc_t, typename Row>
NLA_DEV void warp_row(const Row& row, int64_t y, acc_t zy, const Constants<acc_t>& c,
                      const volatile SharedRowConsts<acc_t>* shared, bool want_grad, const RowSink<acc_t>& sink) {
  using M = RowMath<acc_t>;
  constexpr bool kFlip = MODE != Consistency::None;
  constexpr bool kOfficial = MODE == Consistency::Official;
  const bool y_ok = y >= 0 && y < row.C;
  const int y_num = y_ok ? row.number(static_cast<int>(y)) : -1;  // -1: no column (numbers are >= 0)
  LaneStats<acc_t> st;
  st.z.init();
  st.zf.init();
  st.u.init();
  st.best = -nla_inf<acc_t>();
  st.k = INT32_MAX;
  row.template read<kFlip, !kFlip>(
      [&](const auto& a, const auto& b, const auto& col) { lane_fold<MODE>(st, a, b, col, y_num, zy); });
  st.z.reduce_warp();
  if (kFlip) st.zf.reduce_warp();
  if (kOfficial) st.u.reduce_warp();
  if (st.k != INT32_MAX) st.k = row.column(st.k);
  warp_argmax(st.best, st.k);
  RowStats<acc_t> s;
  s.mz = st.z.m;
  s.sz = st.z.s;
  s.mzf = st.zf.m;
  s.szf = st.zf.s;
  s.ms = st.u.m;
  s.su = st.u.s;
  s.zy = zy;
  s.best = st.best;
  const RowConsts<acc_t> K = row_consts(c, shared, MODE == Consistency::Jsd);
  const RowHead<acc_t> h = row_head(s, K);
  if (sink.leader && sink.weight != nullptr) *sink.weight = h.naw.w;
  if (!kFlip) return;
  ColumnGrad<MODE, acc_t> grad;
  grad.mz_s = s.mz * M::kScale;
  grad.mzf_s = s.mzf * M::kScale;
  grad.ms_s = s.ms * (M::kScale * static_cast<acc_t>(0.5));
  acc_t contrib, Ey, Ek;
  if constexpr (kOfficial) {
    grad.oc = official_coef(s, h, K, want_grad);
    contrib = grad.oc.contrib;
    Ey = grad.oc.Ey;
    Ek = grad.oc.Ek;
  } else {
    // JSD: sum p t and sum p' t' (columns past C read as -inf: p = p' = 0 adds nothing)
    grad.jh = jsd_head(s);
    grad.lse_z = h.lse_z;
    grad.inv_sz = h.inv_sz;
    acc_t S = 0, Sf = 0;
    row.template read<true, false>([&](const auto& a, const auto& b, const auto&) {
#pragma unroll
      for (int e = 0; e < static_cast<int>(sizeof(a) / sizeof(a[0])); ++e) {
        jsd_accumulate(a[e], b[e], exp_shifted(a[e], grad.mz_s) * h.inv_sz,
                       exp_shifted(b[e], grad.mzf_s) * grad.jh.inv_szf, h.lse_z, grad.jh.lse_zf, S, Sf);
      }
    });
    grad.S = warp_sum(S);
    grad.Sf = warp_sum(Sf);
    grad.jc = jsd_coef(s, h, K, grad.S, grad.Sf, want_grad);
    contrib = grad.jc.contrib;
    Ey = grad.jc.Ey;
    Ek = grad.jc.Ek;
  }
  if (sink.leader && sink.loss != nullptr) *sink.loss = *sink.loss + contrib;
  if (!want_grad) return;
  const int k = st.k;
  const bool fix_y = y_ok && row.owns(static_cast<int>(y));
  const bool fix_k = k != INT32_MAX && row.owns(k);
  acc_t gy = 0, gk = 0, unused;
  if (fix_y) {
    grad(zy, row.zf_at(static_cast<int>(y)), gy, unused);
    gy += Ey;
  }
  if (fix_k) {
    grad(st.best, row.zf_at(k), gk, unused);
    gk += Ek;
  }
  row.write(grad);
  if (fix_y) row.store_gz(static_cast<int>(y), gy);
  if (fix_k) row.store_gz(k, gk);
}

// Loads of a row: sweeps before the last keep the row in L1 for the next one; the last streams.
template <bool LAST, typename Raw>
NLA_DEV Raw load_piece(const Raw* p) {
  return LAST ? __ldcs(p) : __ldg(p);
}
template <bool LAST, typename scalar_t>
NLA_DEV scalar_t load_elem(const scalar_t* p) {
  if constexpr (sizeof(scalar_t) == 2) {  // no __ldg / __ldcs for __half / __nv_bfloat16 on every toolkit
    const unsigned short r = load_piece<LAST>(reinterpret_cast<const unsigned short*>(p));
    return *reinterpret_cast<const scalar_t*>(&r);
  } else {
    return load_piece<LAST>(p);
  }
}

// Element e of a piece as acc_t: bfloat16 by placing its bits (one instruction: a shift for the low
// half of a word, a mask for the high half), else as raw_elem converts.
template <typename scalar_t, typename Raw>
NLA_DEV float piece_elem(const Raw& raw, int e) {
  if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    const unsigned word = reinterpret_cast<const unsigned*>(&raw)[e / 2];
    return __uint_as_float(e % 2 == 0 ? word << 16 : word & 0xffff0000u);
  } else {
    return raw_elem<float, scalar_t>(raw, e);
  }
}

// Pieces of a warp row: V = cuda_warp_piece consecutive columns, lane l holding pieces l, l + 32, ...
// (C <= 32 * ELEMS). cuda_launch_plan takes this kernel only when C is a multiple of V, so every
// piece is one aligned vector load and store, wholly inside the row or wholly past its end. A sweep
// is a loop over the whole steps of S = cuda_warp_step pieces a lane (floor(C / (32 V S)) of them,
// their loads issued together, no bounds test), then the last partial step (pieces past the row's
// end read as -inf, never stored). Columns are numbered from the lane's first one (number(j) = j - lane V): piece p
// holds numbers 32 V p + e, e < V.
template <typename scalar_t, int ELEMS, Consistency MODE>
struct PieceRow {
  static constexpr int kEsize = sizeof(scalar_t);
  static constexpr int V = cuda_warp_piece(ELEMS, kEsize);
  static constexpr int S = cuda_warp_step(ELEMS, kEsize, MODE);
  using Raw = typename RawVec<V * kEsize>::type;
  using acc_t = float;
  const Params<scalar_t, float>& P;  // the tensors' bases are read from the kernel's parameters where used
  int64_t at;  // the row's first element
  int first;   // the lane's first column, lane * V
  int C;

  NLA_DEV const scalar_t* z() const { return P.z + at; }
  NLA_DEV const scalar_t* zf() const { return P.zf + at; }
  NLA_DEV scalar_t* gz() const { return P.gz + at; }
  NLA_DEV scalar_t* gzf() const { return P.gzf + at; }

  NLA_DEV int number(int j) const { return j - first; }
  NLA_DEV int column(int n) const { return n + first; }
  NLA_DEV bool owns(int j) const {  // j >= 0: piece j / V, lane (j / V) % 32
    return (static_cast<unsigned>(j) / V) % 32u == static_cast<unsigned>(first) / V;
  }
  NLA_DEV acc_t zf_at(int j) const { return to_acc<acc_t>(zf()[j]); }
  NLA_DEV void store_gz(int j, acc_t v) const { gz()[j] = from_acc<scalar_t>(v); }
  NLA_DEV int whole_steps() const { return C / (32 * V * S); }
  NLA_DEV bool inside(int p) const { return first + 32 * V * p < C; }

  template <bool FLIP>
  NLA_DEV static void unpack(const Raw& ra, const Raw& rb, acc_t (&a)[V], acc_t (&b)[V]) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      a[e] = piece_elem<scalar_t>(ra, e);
      b[e] = FLIP ? piece_elem<scalar_t>(rb, e) : a[e];
    }
  }

  // pieces p0 .. p0 + COUNT - 1 of z (and z' when FLIP), their loads issued together; MASKED: those
  // past the row's end read as -inf (and are not loaded)
  template <int COUNT, bool FLIP, bool LAST, bool MASKED>
  NLA_DEV void load_pieces(int p0, Raw (&ra)[COUNT], Raw (&rb)[COUNT]) const {
    const Raw* pz = reinterpret_cast<const Raw*>(z() + first) + 32 * p0;
    const Raw* pzf = reinterpret_cast<const Raw*>((FLIP ? zf() : z()) + first) + 32 * p0;
#pragma unroll
    for (int s = 0; s < COUNT; ++s) {
      if (MASKED) {
#pragma unroll
        for (int e = 0; e < V; ++e) reinterpret_cast<scalar_t*>(&ra[s])[e] = from_acc<scalar_t>(-nla_inf<acc_t>());
        rb[s] = ra[s];
      }
      if (!MASKED || inside(p0 + s)) {
        ra[s] = load_piece<LAST>(pz + 32 * s);
        if (FLIP) rb[s] = load_piece<LAST>(pzf + 32 * s);
      }
    }
  }

  template <bool MASKED, bool FLIP, bool LAST, typename F>
  NLA_DEV void read_step(int p0, const F& f) const {
    Raw ra[S], rb[S];
    load_pieces<S, FLIP, LAST, MASKED>(p0, ra, rb);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      acc_t a[V], b[V];
      unpack<FLIP>(ra[s], rb[s], a, b);
      const int base = 32 * V * (p0 + s);
      f(a, b, [base](int e) { return base + e; });
    }
  }

  template <bool FLIP, bool LAST, typename F>
  NLA_DEV void read(const F& f) const {
    const int steps = whole_steps();
#pragma unroll 1
    for (int i = 0; i < steps; ++i) read_step<false, FLIP, LAST>(i * S, f);
    if (steps * S * 32 * V < C) read_step<true, FLIP, LAST>(steps * S, f);
  }

  template <bool MASKED, typename G>
  NLA_DEV void write_step(int p0, const G& grad) const {
    Raw* qz = reinterpret_cast<Raw*>(gz() + first) + 32 * p0;
    Raw* qzf = reinterpret_cast<Raw*>(gzf() + first) + 32 * p0;
#pragma unroll
    for (int s = 0; s < S; ++s) {  // a piece at a time: the row comes from L1 / L2 now
      Raw ra[1], rb[1];
      load_pieces<1, true, true, MASKED>(p0 + s, ra, rb);
      acc_t a[V], b[V];
      unpack<true>(ra[0], rb[0], a, b);
      Raw rv, rvf;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        acc_t v, vf;
        grad(a[e], b[e], v, vf);
        reinterpret_cast<scalar_t*>(&rv)[e] = from_acc<scalar_t>(v);
        reinterpret_cast<scalar_t*>(&rvf)[e] = from_acc<scalar_t>(vf);
      }
      if (!MASKED || inside(p0 + s)) {
        __stcs(qz + 32 * s, rv);
        __stcs(qzf + 32 * s, rvf);
      }
    }
  }

  template <typename G>
  NLA_DEV void write(const G& grad) const {
    const int steps = whole_steps();
#pragma unroll 1
    for (int i = 0; i < steps; ++i) write_step<false>(i * S, grad);
    if (steps * S * 32 * V < C) write_step<true>(steps * S, grad);
  }
};

// Columns of a row of any width, read element by element: lane l takes columns c + l + 32 e of a
// group (e < G = kCudaChunkColumns, increasing), groups c = 0, 32 G, ...: the whole groups in a
// loop (floor(C / 32 G) of them, no bounds test), the last partial one after it (columns past C
// read as -inf, never stored). Columns are numbered as they are.
template <typename scalar_t>
struct ColumnRow {
  using acc_t = typename AccOf<scalar_t>::type;
  static constexpr int G = kCudaChunkColumns;
  const Params<scalar_t, acc_t>& P;  // the tensors' bases are read from the kernel's parameters where used
  int64_t at;  // the row's first element
  int lane;
  int C;

  NLA_DEV const scalar_t* z() const { return P.z + at; }
  NLA_DEV const scalar_t* zf() const { return P.zf + at; }
  NLA_DEV scalar_t* gz() const { return P.gz + at; }
  NLA_DEV scalar_t* gzf() const { return P.gzf + at; }

  NLA_DEV int number(int j) const { return j; }
  NLA_DEV int column(int n) const { return n; }
  NLA_DEV bool owns(int j) const { return static_cast<unsigned>(j) % 32u == static_cast<unsigned>(lane); }
  NLA_DEV acc_t zf_at(int j) const { return to_acc<acc_t>(zf()[j]); }
  NLA_DEV void store_gz(int j, acc_t v) const { gz()[j] = from_acc<scalar_t>(v); }

  template <bool FLIP, bool LAST, bool FULL>
  NLA_DEV void group(int c, acc_t (&a)[G], acc_t (&b)[G]) const {
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int j = c + lane + 32 * e;
      a[e] = b[e] = -nla_inf<acc_t>();
      if (FULL || j < C) {
        a[e] = to_acc<acc_t>(load_elem<LAST>(z() + j));
        b[e] = FLIP ? to_acc<acc_t>(load_elem<LAST>(zf() + j)) : a[e];
      }
    }
  }

  template <bool FLIP, bool LAST, typename F>
  NLA_DEV void read(const F& f) const {
    const auto fold = [&](int c, const acc_t (&a)[G], const acc_t (&b)[G]) {
      f(a, b, [c, this](int e) { return c + lane + 32 * e; });
    };
    int c = 0;
#pragma unroll 1
    for (; c + 32 * G <= C; c += 32 * G) {
      acc_t a[G], b[G];
      group<FLIP, LAST, true>(c, a, b);
      fold(c, a, b);
    }
    if (c < C) {
      acc_t a[G], b[G];
      group<FLIP, LAST, false>(c, a, b);
      fold(c, a, b);
    }
  }

  template <bool FULL, typename Grad>
  NLA_DEV void write_group(int c, const Grad& grad) const {
    acc_t a[G], b[G];
    group<true, true, FULL>(c, a, b);
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int j = c + lane + 32 * e;
      acc_t v, vf;
      grad(a[e], b[e], v, vf);
      if (FULL || j < C) {
        gz()[j] = from_acc<scalar_t>(v);
        gzf()[j] = from_acc<scalar_t>(vf);
      }
    }
  }

  template <typename Grad>
  NLA_DEV void write(const Grad& grad) const {
    int c = 0;
#pragma unroll 1
    for (; c + 32 * G <= C; c += 32 * G) write_group<true>(c, grad);
    if (c < C) write_group<false>(c, grad);
  }
};


// Row `row` of the piece kernel (WarpRow) on lane `lane` of its warp; lane 0 adds its share of the
// loss to *loss and writes its weight.
template <typename scalar_t, int ELEMS, Consistency MODE>
NLA_DEV void piece_kernel_row(const Params<scalar_t, float>& P, int64_t row, int lane,
                              const volatile SharedRowConsts<float>* shared, volatile float* loss) {
  using Row = PieceRow<scalar_t, ELEMS, MODE>;
  const int C = static_cast<int>(P.C);
  const bool want_grad = P.gz != nullptr;
  const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
  const int64_t at = row * C;
  const Row r{P, at, lane * Row::V, C};
  const float zy = (y >= 0 && y < C) ? to_acc<float>(P.z[at + y]) : nla_nan<float>();
  const RowSink<float> sink{lane == 0, loss, P.weights != nullptr ? P.weights + row : nullptr};
  warp_row<MODE>(r, y, zy, P.c, shared, want_grad, sink);
}

// Row `row` of the element kernel (WarpChunked) on lane `lane`, as piece_kernel_row; the
// consistency variant read at run time.
template <typename scalar_t, typename acc_t>
NLA_DEV void chunked_kernel_row(const Params<scalar_t, acc_t>& P, int64_t row, int lane,
                                const volatile SharedRowConsts<acc_t>* shared, volatile acc_t* loss) {
  const int C = static_cast<int>(P.C);
  const bool has_flip = P.zf != nullptr;
  const bool want_grad = P.gz != nullptr;
  const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
  const int64_t at = row * C;
  const ColumnRow<scalar_t> r{P, at, lane, C};
  const acc_t zy = (y >= 0 && y < C) ? to_acc<acc_t>(P.z[at + y]) : nla_nan<acc_t>();
  const RowSink<acc_t> sink{lane == 0, loss, P.weights != nullptr ? P.weights + row : nullptr};
  if (!has_flip) {
    warp_row<Consistency::None>(r, y, zy, P.c, shared, false, sink);
  } else if (!P.jsd) {
    warp_row<Consistency::Official>(r, y, zy, P.c, shared, want_grad, sink);
  } else {
    warp_row<Consistency::Jsd>(r, y, zy, P.c, shared, want_grad, sink);
  }
}

}  // namespace nla_fast
#endif  // __CUDACC__ || NLA_WARP_EMULATOR
