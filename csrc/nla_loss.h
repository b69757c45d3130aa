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
// How a row is computed (every path: the CPU's fixed-width, generic and vectorised rows, the
// GPU's tile and warp kernels): pass 1 takes the maxima of z, z' and s = z + z' and the nearest
// negative; pass 2 the sums of exp(z - max z), exp(z' - max z') and exp((s - max s) / 2); from those
// row_head gives CE, g = exp(z_y - max z) / sum, n likewise and the NAW weight, and official_coef /
// jsd_coef the row's share of the loss and its gradient coefficients:
//   official: dz_j = alpha ez_j - beta eu_j (+ Ey at y, + Ek at k), dz'_j = gamma ez'_j - beta eu_j.
// RowMath says how exponentials are taken: float on the GPU uses the MUFU approximations
// (ex2/lg2/rcp.approx, about 2 ulp) on logits pre-scaled by log2(e) (one FFMA + one MUFU per
// exponential); float on the CPU and double everywhere use the exact library functions (for
// double, exactly the formulas of the reference derivation: scale 1, natural logs).
// An out-of-range target never indexes anything: its row is NaN (loss share, weight, gradients).
//
// This header includes no torch header, so nvcc compiles nla_loss_cuda.cu quickly: the CUDA file
// holds kernels and plain launchers (declared at the end), the ATen glue and the CUDA operator
// registration live in nla_loss.cpp behind NLA_WITH_CUDA.
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
  return mode == Consistency::Jsd ? 5 : kCudaWarpMinBlocks;
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
