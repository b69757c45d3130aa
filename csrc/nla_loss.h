// Row maths of the NLA loss (SPEC 1.1) shared by the CPU kernel (nla_loss.cpp) and the CUDA
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
// This header includes no torch header, so nvcc compiles nla_loss_cuda.cu quickly: the CUDA file
// holds kernels and plain launchers (declared at the end), the ATen glue and the CUDA operator
// registration live in nla_loss.cpp behind NLA_WITH_CUDA.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define NLA_HD __host__ __device__ __forceinline__
#else
#define NLA_HD inline
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

// ---- scalar helpers (float and double overloads, host and device) ----
NLA_HD float nla_exp(float x) { return ::expf(x); }
NLA_HD double nla_exp(double x) { return ::exp(x); }
NLA_HD float nla_log(float x) { return ::logf(x); }
NLA_HD double nla_log(double x) { return ::log(x); }
NLA_HD float nla_log1p(float x) { return ::log1pf(x); }
NLA_HD double nla_log1p(double x) { return ::log1p(x); }
NLA_HD float nla_sqrt(float x) { return ::sqrtf(x); }
NLA_HD double nla_sqrt(double x) { return ::sqrt(x); }
NLA_HD float nla_abs(float x) { return ::fabsf(x); }
NLA_HD double nla_abs(double x) { return ::fabs(x); }

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


#if defined(__CUDACC__)
#define NLA_UNROLL _Pragma("unroll")
#else
#define NLA_UNROLL
#endif

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

// One row of the loss, its gradients and its NAW weight, from the row's values.
//   load(j, a, b): a = z_j, b = z'_j (b is not used when !has_flip) in acc_t;
//   store(j, v, vf): the gradients d loss / d z_j, d loss / d z'_j (only when want_grad);
//   weight: where w goes (nullptr: nowhere). Returns the row's share of the loss (0 without flip).
// CMAX > 0: the column loops are unrolled to CMAX (C <= CMAX), so on the GPU a row held in a
// register array stays in registers; CMAX == 0: plain loops over any C (the CPU kernel).
// The exponentials of pass 2 are kept (registers for CMAX <= 16, the stack for C <= 64 on the
// CPU), so the later passes need none: p = e^(z - max) / sum. A JSD log-mixture is
// log(p + p') - log 2, used only where p > 0 (or p' > 0), so it is finite wherever it counts.
// An out-of-range target never indexes anything: the row is NaN.
template <int CMAX, typename acc_t, typename Load, typename Store>
NLA_HD acc_t nla_row(const Load& load, const int64_t C, const int64_t y, const RowConsts<acc_t>& K,
                     const bool has_flip, const bool want_grad, const Store& store, acc_t* weight) {
  constexpr int kCache = CMAX > 0 ? CMAX : 64;
  const bool cached = CMAX > 0 ? CMAX <= 16 : C <= kCache;
  const acc_t nan = nla_nan<acc_t>();
  const acc_t half = static_cast<acc_t>(0.5);
  const acc_t one = static_cast<acc_t>(1);
  const acc_t zero = static_cast<acc_t>(0);
  const acc_t ln2 = static_cast<acc_t>(0.69314718055994530942);
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
  acc_t mz = -nla_inf<acc_t>(), mzf = -nla_inf<acc_t>(), mu = -nla_inf<acc_t>(), zy = 0;
  acc_t best = -nla_inf<acc_t>();
  int64_t k = -1;
  NLA_UNROLL
  for (int64_t j = 0; j < ncols; ++j) {
    if (CMAX == 0 || j < C) {
      acc_t a, b;
      load(j, a, b);
      mz = nla_max(mz, a);
      if (j == y) {
        zy = a;
      } else if (k < 0 || a > best) {
        best = a;
        k = j;
      }
      if (has_flip) {
        mzf = nla_max(mzf, b);
        if (official) mu = nla_max(mu, (a + b) * half);
      }
    }
  }
  // pass 2: sums of exponentials (kept per column when cached)
  acc_t ez[kCache], ezf[kCache], eu[kCache];
  acc_t sz = 0, szf = 0, su = 0;
  NLA_UNROLL
  for (int64_t j = 0; j < ncols; ++j) {
    if (CMAX == 0 || j < C) {
      acc_t a, b;
      load(j, a, b);
      const acc_t x = nla_exp(a - mz);
      sz += x;
      if (cached) ez[j] = x;
      if (has_flip) {
        const acc_t xf = nla_exp(b - mzf);
        szf += xf;
        if (cached) ezf[j] = xf;
        if (official) {
          const acc_t xu = nla_exp((a + b) * half - mu);
          su += xu;
          if (cached) eu[j] = xu;
        }
      }
    }
  }
  const acc_t lse_z = mz + nla_log(sz);
  const acc_t ce = lse_z - zy;
  const acc_t g = nla_exp(zy - lse_z);
  const acc_t n = nla_exp(best - lse_z);
  const NAW<acc_t> r = naw_weight(g, n, K.c, K.tc);
  if (weight != nullptr) *weight = r.w;
  if (!has_flip) return 0;

  const acc_t lse_zf = mzf + nla_log(szf);
  const acc_t inv_sz = one / sz, inv_szf = one / szf;
  acc_t contrib = K.lam_over_b * (one + r.w) * ce;
  acc_t lse_u = 0, inv_su = 0, S = 0, Sf = 0;
  if (official) {
    lse_u = mu + nla_log(su);
    inv_su = one / su;
    contrib += K.reg_scale * (half * (lse_z + lse_zf) - lse_u);
  } else {
    // pass 3 (JSD): sum p t and sum p' t', t = log p - log m, 0 where p = 0
    NLA_UNROLL
    for (int64_t j = 0; j < ncols; ++j) {
      if (CMAX == 0 || j < C) {
        acc_t a, b;
        load(j, a, b);
        const acc_t p = cached ? ez[j] * inv_sz : nla_exp(a - lse_z);
        const acc_t pf = cached ? ezf[j] * inv_szf : nla_exp(b - lse_zf);
        if (p > zero || pf > zero) {
          const acc_t lm = nla_log(p + pf) - ln2;
          if (p > zero) S += p * ((a - lse_z) - lm);
          if (pf > zero) Sf += pf * ((b - lse_zf) - lm);
        }
      }
    }
    contrib += K.reg_scale * half * (S + Sf);
  }
  if (want_grad) {
    const NAWGrad<acc_t> ng = naw_grad(r, ce, g, n, K.lam_over_b);
    const acc_t h = K.reg_scale * half;
    NLA_UNROLL
    for (int64_t j = 0; j < ncols; ++j) {
      if (CMAX == 0 || j < C) {
        acc_t a, b;
        load(j, a, b);
        const acc_t p = cached ? ez[j] * inv_sz : nla_exp(a - lse_z);
        const acc_t pf = cached ? ezf[j] * inv_szf : nla_exp(b - lse_zf);
        acc_t v, vf;
        if (official) {
          const acc_t q = cached ? eu[j] * inv_su : nla_exp((a + b) * half - lse_u);
          v = ng.A * p + h * (p - q);
          vf = h * (pf - q);
        } else {
          const acc_t lm = (p > zero || pf > zero) ? nla_log(p + pf) - ln2 : zero;
          v = ng.A * p + (p > zero ? h * p * (((a - lse_z) - lm) - S) : zero);
          vf = pf > zero ? h * pf * (((b - lse_zf) - lm) - Sf) : zero;
        }
        if (j == y) v += ng.Ey;
        if (j == k) v += ng.Ek;
        store(j, v, vf);
      }
    }
  }
  return contrib;
}

}  // namespace nla_fast


// ---- the CUDA launchers (nla_loss_cuda.cu), called by the ATen glue in nla_loss.cpp ----
namespace nla_fast {

enum class DType : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

inline int dtype_size(DType t) {
  return t == DType::Double ? 8 : (t == DType::Float ? 4 : 2);
}

constexpr int kCudaMaxBlocks = 4096;    // grid cap: bounds the partials and the final reduction
constexpr int kCudaSmallMaxC = 32;      // C <= 32: a row per thread (the tile kernel), else a warp per row
constexpr int kCudaWarpThreads = 256;   // threads per block of the warp-per-row kernel (8 rows at a time)
constexpr int kCudaRegisterMaxC = 1024; // the warp kernel holds rows up to this many columns in registers
constexpr int kCudaTileSmemBytes = 48 * 1024;  // static limit of a block's shared memory (no opt-in)

inline int ceil_log2(int64_t c) {
  int l = 0;
  while ((int64_t{1} << l) < c) ++l;
  return l;
}

// How a (B, C) problem is laid out on the GPU. A fixed function of (B, C, dtype): the loss sum
// has a fixed order for a given shape (deterministic), and host and device agree on the grid.
struct CudaPlan {
  bool tile;          // row-per-thread tile kernel (C <= 32), else the warp-per-row kernel
  int threads;        // block size
  int64_t rows_per_block;  // rows a block handles per grid-stride step (one tile)
  int grid;           // blocks = loss partials
};

// Tile kernel: a block stages rows_per_block contiguous rows of both logit tensors in shared
// memory (the largest block size of 256 / 128 / 64 and then the most rows per thread, 4 / 2 / 1,
// whose two tiles fit 48 kB with the block's reduction scratch): at (2^20, 7) bf16 a block moves
// 28 kB per staging step, so the two blocks an SM holds (~100 registers a thread) keep enough
// bytes in flight.
inline CudaPlan cuda_plan(int64_t B, int64_t C, DType dtype) {
  constexpr int64_t kScratch = 512;  // the static shared memory of the block reduction
  CudaPlan p{};
  p.tile = C <= kCudaSmallMaxC;
  if (p.tile) {
    const int64_t row_bytes = C * dtype_size(dtype);
    p.threads = 256;
    while (p.threads > 64 && 2 * p.threads * row_bytes + kScratch > kCudaTileSmemBytes) p.threads /= 2;
    int rows_per_thread = 4;
    while (rows_per_thread > 1 && 2 * p.threads * rows_per_thread * row_bytes + kScratch > kCudaTileSmemBytes) {
      rows_per_thread /= 2;
    }
    p.rows_per_block = static_cast<int64_t>(p.threads) * rows_per_thread;
  } else {
    p.threads = kCudaWarpThreads;
    p.rows_per_block = kCudaWarpThreads / 32;
  }
  int64_t g = (B + p.rows_per_block - 1) / p.rows_per_block;
  if (g < 1) g = 1;
  if (g > kCudaMaxBlocks) g = kCudaMaxBlocks;
  p.grid = static_cast<int>(g);
  return p;
}

struct CudaRowsArgs {
  DType dtype;
  const void* z;
  const void* zf;  // nullptr: weights only
  int64_t z_s0, z_s1, zf_s0, zf_s1;
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
  void* partials;  // cuda_plan(B, C).grid values in the accumulation dtype; nullptr: no loss
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
