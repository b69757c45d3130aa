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

// log(exp(a) + exp(b)) as torch.logaddexp: -inf for two -inf, NaN for a NaN.
template <typename acc_t>
NLA_HD acc_t nla_logaddexp(acc_t a, acc_t b) {
  if (a == b) return a + static_cast<acc_t>(0.69314718055994530942);
  const acc_t m = a > b ? a : b;
  return m + nla_log1p(nla_exp(-nla_abs(a - b)));
}

// "Better" candidate for the nearest negative: larger logit, first index among ties.
// NaN logits never win, so every lane of a reduction ends with the same pair.
template <typename acc_t>
NLA_HD bool nla_nn_better(acc_t v, int idx, acc_t best_v, int best_idx) {
  return v > best_v || (v == best_v && idx < best_idx);
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

}  // namespace nla_fast


// ---- the CUDA launchers (nla_loss_cuda.cu), called by the ATen glue in nla_loss.cpp ----
namespace nla_fast {

enum class DType : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

constexpr int kCudaThreads = 256;     // threads per block of the row kernel (8 warps)
constexpr int kCudaMaxBlocks = 4096;  // grid cap: bounds the partials and the final reduction
constexpr int kCudaMaxLog2C = 10;     // the CUDA kernels take C <= 1024

inline int ceil_log2(int64_t c) {
  int l = 0;
  while ((int64_t{1} << l) < c) ++l;
  return l;
}

// Rows handled by one block per grid-stride step: a row takes min(next_pow2(C), 32) lanes.
inline int cuda_rows_per_block(int64_t C) {
  const int log2c = ceil_log2(C);
  const int lanes = log2c >= 5 ? 32 : (1 << log2c);
  return (32 / lanes) * (kCudaThreads / 32);
}

// Blocks of the row kernel = number of loss partials. A fixed function of (B, C): the loss sum
// has a fixed order for a given shape. With one block (B <= 32 for C <= 8, e.g. a training
// batch of 32) the block writes the loss itself and the final-sum kernel is skipped.
inline int cuda_grid(int64_t B, int64_t C) {
  const int64_t rpb = cuda_rows_per_block(C);
  int64_t g = (B + rpb - 1) / rpb;
  if (g < 1) g = 1;
  if (g > kCudaMaxBlocks) g = kCudaMaxBlocks;
  return static_cast<int>(g);
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
  const void* eps_ptr;  // 0-d tensor in the accumulation dtype (float, double for Double); nullptr: eps_value
  double eps_value;
  bool jsd;
  void* gz;        // nullptr: no gradients (logits dtype, contiguous (B, C))
  void* gzf;
  void* weights;   // nullptr: no weights (accumulation dtype)
  void* partials;  // cuda_grid(B, C) values in the accumulation dtype; nullptr: no loss
  void* loss;      // 0-d, accumulation dtype; written when partials is set
};

// Each returns nullptr on success, else the CUDA error string of the launch.
const char* cuda_rows(const CudaRowsArgs& args, void* stream);
const char* cuda_scale(DType dtype, const void* grad_output, bool grad_output_is_double, const void* a,
                       const void* b, void* out_a, void* out_b, int64_t na, int64_t nb, void* stream);

}  // namespace nla_fast
