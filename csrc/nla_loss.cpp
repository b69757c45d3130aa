// NLA loss (SPEC 1.1) as native PyTorch operators: schemas and CPU kernels.
//
//   nla_fast::nla_loss_fwd    loss, d loss/d logits, d loss/d logits_flip and the NAW weights in
//                             one sweep over the rows.
//   nla_fast::nla_scale_grads backward: the saved gradients times grad_output (read from memory).
//   nla_fast::naw_weight      the (B,) NAW weights alone.
//
// The CUDA kernels live in nla_loss_cuda.cu (no torch headers there); their ATen glue and the CUDA
// registration are at the end of this file behind NLA_WITH_CUDA, so a CPU-only build compiles
// this file alone. The fake (meta) kernels and the autograd formula are registered from Python
// (nla_fast/extension.py). Both kernels share the row maths of nla_loss.h.
#include "nla_loss.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#ifdef NLA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace nla_fast {
namespace {

// ---- argument handling shared by the CPU and CUDA entry points
inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.dim() == 2, "nla_fast: ", name, " must be (B, C), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 2, "nla_fast: NLA needs at least 2 classes, got C=", logits.size(1));
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "nla_fast: ", name,
              " must be floating point, got ", logits.scalar_type());
}

inline void check_inputs(const at::Tensor& logits, const at::Tensor* logits_flip, const at::Tensor& target,
                         at::ArrayRef<double> constants) {
  check_logits(logits, "logits");
  if (logits_flip != nullptr) {
    check_logits(*logits_flip, "logits_flip");
    TORCH_CHECK(logits_flip->sizes() == logits.sizes(), "nla_fast: logits_flip ", logits_flip->sizes(),
                " must match logits ", logits.sizes());
    TORCH_CHECK(logits_flip->scalar_type() == logits.scalar_type(), "nla_fast: logits_flip dtype ",
                logits_flip->scalar_type(), " must match logits dtype ", logits.scalar_type());
    TORCH_CHECK(logits_flip->device() == logits.device(), "nla_fast: logits_flip must be on ", logits.device());
  }
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "nla_fast: target must be (B,) = (",
              logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
              "nla_fast: target must hold integer class indices, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "nla_fast: target must be on ", logits.device(), ", got ",
              target.device());
  TORCH_CHECK(constants.size() == static_cast<size_t>(kNumConstants), "nla_fast: expected ", kNumConstants,
              " constants (NLAConstants.as_list()), got ", constants.size());
}

// int32 and int64 targets are read as they are; any other integer dtype is widened to int64.
inline at::Tensor prepare_target(const at::Tensor& target) {
  if (target.scalar_type() == at::kInt || target.scalar_type() == at::kLong) return target;
  return target.to(at::kLong);
}

// eps lives either in a 0-d tensor on the logits' device (read inside the kernel, so a captured
// CUDA graph sees updates) or in a host double. Returns the device tensor (undefined if the value
// is read on the host) converted to the accumulation dtype, and the host value.
inline std::pair<at::Tensor, double> resolve_eps(const std::optional<at::Tensor>& eps_tensor, double eps_value,
                                                 const at::Tensor& logits, at::ScalarType acc_type) {
  if (!eps_tensor.has_value() || !eps_tensor->defined()) return {at::Tensor(), eps_value};
  const at::Tensor& e = *eps_tensor;
  TORCH_CHECK(e.numel() == 1, "nla_fast: eps must be a float or a 0-d tensor, got shape ", e.sizes());
  TORCH_CHECK(at::isFloatingType(e.scalar_type()), "nla_fast: eps tensor must be floating point, got ",
              e.scalar_type());
  if (logits.is_cpu() || e.is_cpu()) {
    // A CPU scalar is read on the host without any device synchronisation.
    return {at::Tensor(), e.item<double>()};
  }
  TORCH_CHECK(e.device() == logits.device(), "nla_fast: eps tensor must be on ", logits.device(), ", got ",
              e.device());
  return {e.reshape({}).to(acc_type), eps_value};
}

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- CPU kernels

constexpr int64_t kRowsPerChunk = 64;  // fixed chunks: the loss sum does not depend on the thread count

template <typename scalar_t, typename index_t>
struct CpuRows {
  using acc_t = at::opmath_type<scalar_t>;

  const scalar_t* z;
  int64_t z_s0, z_s1;
  const scalar_t* zf;  // nullptr: weights only
  int64_t zf_s0, zf_s1;
  const index_t* y;
  int64_t y_s0;
  int64_t B, C;
  Constants<acc_t> c;
  TrueCase<acc_t> tc;
  bool jsd;
  scalar_t* gz;  // nullptr: no gradients
  scalar_t* gzf;
  acc_t* weights;  // nullptr: no weights

  // Processes row i; returns its contribution to the loss (0 in weights-only mode).
  acc_t row(int64_t i) const {
    const scalar_t* zr = z + i * z_s0;
    const scalar_t* zfr = zf ? zf + i * zf_s0 : nullptr;
    const int64_t yi = static_cast<int64_t>(y[i * y_s0]);
    const acc_t nan = nla_nan<acc_t>();
    if (yi < 0 || yi >= C) {  // never index with an out-of-range label: the row is NaN
      if (weights) weights[i] = nan;
      if (gz) {
        for (int64_t j = 0; j < C; ++j) {
          gz[i * C + j] = static_cast<scalar_t>(nan);
          gzf[i * C + j] = static_cast<scalar_t>(nan);
        }
      }
      return nan;
    }
    const acc_t half = static_cast<acc_t>(0.5);
    // pass 1: maxima and the nearest negative (first index of the largest logit among j != y)
    acc_t mz = -nla_inf<acc_t>(), mzf = -nla_inf<acc_t>(), mu = -nla_inf<acc_t>(), best = -nla_inf<acc_t>();
    int64_t k = -1;
    for (int64_t j = 0; j < C; ++j) {
      const acc_t a = static_cast<acc_t>(zr[j * z_s1]);
      mz = nla_max(mz, a);
      if (j != yi && (a > best || (a == best && k < 0))) {
        best = a;
        k = j;
      }
      if (zfr) {
        const acc_t b = static_cast<acc_t>(zfr[j * zf_s1]);
        mzf = nla_max(mzf, b);
        if (!jsd) mu = nla_max(mu, (a + b) * half);
      }
    }
    // pass 2: sums of exponentials
    acc_t sz = 0, szf = 0, su = 0;
    for (int64_t j = 0; j < C; ++j) {
      const acc_t a = static_cast<acc_t>(zr[j * z_s1]);
      sz += nla_exp(a - mz);
      if (zfr) {
        const acc_t b = static_cast<acc_t>(zfr[j * zf_s1]);
        szf += nla_exp(b - mzf);
        if (!jsd) su += nla_exp((a + b) * half - mu);
      }
    }
    const acc_t lse_z = mz + nla_log(sz);
    const acc_t zy = static_cast<acc_t>(zr[yi * z_s1]);
    const acc_t ce = lse_z - zy;
    const acc_t g = nla_exp(zy - lse_z);
    const acc_t n = nla_exp(best - lse_z);
    const NAW<acc_t> r = naw_weight(g, n, c, tc);
    if (weights) weights[i] = r.w;
    if (!zfr) return 0;

    const acc_t lse_zf = mzf + nla_log(szf);
    const acc_t inv_b = static_cast<acc_t>(1) / static_cast<acc_t>(B);
    const acc_t lam_over_b = c.lam * inv_b;
    const acc_t one_m_lam = static_cast<acc_t>(1) - c.lam;
    acc_t contrib = lam_over_b * (static_cast<acc_t>(1) + r.w) * ce;
    acc_t lse_u = 0, S = 0, Sf = 0;
    if (!jsd) {
      lse_u = mu + nla_log(su);
      contrib += one_m_lam * (half * (lse_z + lse_zf) - lse_u);
    } else {
      for (int64_t j = 0; j < C; ++j) {
        const acc_t lp = static_cast<acc_t>(zr[j * z_s1]) - lse_z;
        const acc_t lpf = static_cast<acc_t>(zfr[j * zf_s1]) - lse_zf;
        const acc_t lm = nla_logaddexp(lp, lpf) - static_cast<acc_t>(0.69314718055994530942);
        S += nla_exp(lp) * (lp - lm);
        Sf += nla_exp(lpf) * (lpf - lm);
      }
      contrib += one_m_lam * inv_b * half * (S + Sf);
    }
    if (gz) {
      const NAWGrad<acc_t> ng = naw_grad(r, ce, g, n, lam_over_b);
      scalar_t* gr = gz + i * C;
      scalar_t* gfr = gzf + i * C;
      if (!jsd) {
        const acc_t h = one_m_lam * half;
        for (int64_t j = 0; j < C; ++j) {
          const acc_t a = static_cast<acc_t>(zr[j * z_s1]);
          const acc_t b = static_cast<acc_t>(zfr[j * zf_s1]);
          const acc_t p = nla_exp(a - lse_z);
          const acc_t pf = nla_exp(b - lse_zf);
          const acc_t q = nla_exp((a + b) * half - lse_u);
          acc_t v = ng.A * p + h * (p - q);
          if (j == yi) v += ng.Ey;
          if (j == k) v += ng.Ek;
          gr[j] = static_cast<scalar_t>(v);
          gfr[j] = static_cast<scalar_t>(h * (pf - q));
        }
      } else {
        const acc_t h = one_m_lam * half * inv_b;
        for (int64_t j = 0; j < C; ++j) {
          const acc_t lp = static_cast<acc_t>(zr[j * z_s1]) - lse_z;
          const acc_t lpf = static_cast<acc_t>(zfr[j * zf_s1]) - lse_zf;
          const acc_t lm = nla_logaddexp(lp, lpf) - static_cast<acc_t>(0.69314718055994530942);
          const acc_t p = nla_exp(lp);
          const acc_t pf = nla_exp(lpf);
          acc_t v = ng.A * p + h * p * ((lp - lm) - S);
          if (j == yi) v += ng.Ey;
          if (j == k) v += ng.Ek;
          gr[j] = static_cast<scalar_t>(v);
          gfr[j] = static_cast<scalar_t>(h * pf * ((lpf - lm) - Sf));
        }
      }
    }
    return contrib;
  }
};

// Runs every row; returns the loss (sum of row contributions in a fixed order, in double).
template <typename scalar_t, typename index_t>
double run_rows(const CpuRows<scalar_t, index_t>& rows) {
  const int64_t nchunks = (rows.B + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(static_cast<size_t>(nchunks), 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t r1 = std::min(rows.B, (ch + 1) * kRowsPerChunk);
      double s = 0.0;
      for (int64_t i = ch * kRowsPerChunk; i < r1; ++i) s += static_cast<double>(rows.row(i));
      partial[static_cast<size_t>(ch)] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

template <typename scalar_t, typename index_t>
void launch_cpu(const at::Tensor& z, const at::Tensor* zf, const at::Tensor& y, double eps,
                at::ArrayRef<double> constants, bool jsd, at::Tensor* gz, at::Tensor* gzf, at::Tensor* weights,
                at::Tensor* loss) {
  using acc_t = at::opmath_type<scalar_t>;
  CpuRows<scalar_t, index_t> rows;
  rows.z = z.const_data_ptr<scalar_t>();
  rows.z_s0 = z.stride(0);
  rows.z_s1 = z.stride(1);
  rows.zf = zf ? zf->const_data_ptr<scalar_t>() : nullptr;
  rows.zf_s0 = zf ? zf->stride(0) : 0;
  rows.zf_s1 = zf ? zf->stride(1) : 0;
  rows.y = y.const_data_ptr<index_t>();
  rows.y_s0 = y.stride(0);
  rows.B = z.size(0);
  rows.C = z.size(1);
  rows.c = make_constants<acc_t>(constants.data());
  rows.tc = make_true_case(rows.c, static_cast<acc_t>(eps));
  rows.jsd = jsd;
  rows.gz = gz ? gz->mutable_data_ptr<scalar_t>() : nullptr;
  rows.gzf = gzf ? gzf->mutable_data_ptr<scalar_t>() : nullptr;
  rows.weights = weights ? weights->mutable_data_ptr<acc_t>() : nullptr;
  const double total = run_rows(rows);
  if (loss) {
    const double value = rows.B > 0 ? total : std::numeric_limits<double>::quiet_NaN();
    loss->fill_(value);
  }
}

void dispatch_cpu(const at::Tensor& z, const at::Tensor* zf, const at::Tensor& y, double eps,
                  at::ArrayRef<double> constants, bool jsd, at::Tensor* gz, at::Tensor* gzf, at::Tensor* weights,
                  at::Tensor* loss) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nla_fast_cpu", [&] {
    if (y.scalar_type() == at::kInt) {
      launch_cpu<scalar_t, int32_t>(z, zf, y, eps, constants, jsd, gz, gzf, weights, loss);
    } else {
      launch_cpu<scalar_t, int64_t>(z, zf, y, eps, constants, jsd, gz, gzf, weights, loss);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nla_loss_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& logits_flip, const at::Tensor& target,
    const std::optional<at::Tensor>& eps_tensor, double eps_value, at::ArrayRef<double> constants, bool jsd,
    bool need_grad, bool need_weights) {
  check_inputs(logits, &logits_flip, target, constants);
  TORCH_CHECK(logits.is_cpu(), "nla_fast::nla_loss_fwd (CPU kernel) got a tensor on ", logits.device());
  const at::Tensor y = prepare_target(target);
  const auto acc = acc_type_of(logits.scalar_type());
  const double eps = resolve_eps(eps_tensor, eps_value, logits, acc).second;
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor loss = at::empty({}, logits.options().dtype(acc));
  at::Tensor gz = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor gzf = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor w = at::empty({need_weights ? B : 0}, logits.options().dtype(acc));
  dispatch_cpu(logits, &logits_flip, y, eps, constants, jsd, need_grad ? &gz : nullptr,
               need_grad ? &gzf : nullptr, need_weights ? &w : nullptr, &loss);
  return {loss, gz, gzf, w};
}

at::Tensor naw_weight_cpu(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& eps_tensor, double eps_value,
                          at::ArrayRef<double> constants) {
  check_inputs(logits, nullptr, target, constants);
  TORCH_CHECK(logits.is_cpu(), "nla_fast::naw_weight (CPU kernel) got a tensor on ", logits.device());
  const at::Tensor y = prepare_target(target);
  const auto acc = acc_type_of(logits.scalar_type());
  const double eps = resolve_eps(eps_tensor, eps_value, logits, acc).second;
  at::Tensor w = at::empty({logits.size(0)}, logits.options().dtype(acc));
  dispatch_cpu(logits, nullptr, y, eps, constants, false, nullptr, nullptr, &w, nullptr);
  return w;
}

std::tuple<at::Tensor, at::Tensor> nla_scale_grads_cpu(const at::Tensor& grad_output, const at::Tensor& grad_logits,
                                                       const at::Tensor& grad_logits_flip) {
  TORCH_CHECK(grad_output.numel() == 1, "nla_fast::nla_scale_grads: grad_output must hold one value, got ",
              grad_output.sizes());
  // A 0-d grad_output does not promote: the products keep the gradients' dtype.
  const at::Tensor go = grad_output.reshape({});
  return {at::mul(grad_logits, go), at::mul(grad_logits_flip, go)};
}

// ---- CUDA entry points: ATen glue around the plain launchers of nla_loss_cuda.cu
#ifdef NLA_WITH_CUDA

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "nla_fast: unsupported logits dtype ", t);
  }
}

void run_cuda(const at::Tensor& z, const at::Tensor* zf, const at::Tensor& y, const at::Tensor& eps_dev,
              double eps_value, at::ArrayRef<double> constants, bool jsd, at::Tensor* gz, at::Tensor* gzf,
              at::Tensor* weights, at::Tensor* loss) {
  const int64_t B = z.size(0), C = z.size(1);
  TORCH_CHECK(C <= (int64_t{1} << kCudaMaxLog2C), "nla_fast: the CUDA kernels support C <= ",
              (int64_t{1} << kCudaMaxLog2C), " classes, got C=", C);
  CudaRowsArgs a{};
  a.dtype = to_dtype(z.scalar_type());
  a.z = z.const_data_ptr();
  a.z_s0 = z.stride(0);
  a.z_s1 = z.stride(1);
  a.zf = zf ? zf->const_data_ptr() : nullptr;
  a.zf_s0 = zf ? zf->stride(0) : 0;
  a.zf_s1 = zf ? zf->stride(1) : 0;
  a.y = y.const_data_ptr();
  a.y_s0 = y.stride(0);
  a.y_is_int64 = y.scalar_type() == at::kLong;
  a.B = B;
  a.C = C;
  for (int i = 0; i < kNumConstants; ++i) a.constants[i] = constants[i];
  a.eps_ptr = eps_dev.defined() ? eps_dev.const_data_ptr() : nullptr;
  a.eps_value = eps_value;
  a.jsd = jsd;
  a.gz = gz ? gz->mutable_data_ptr() : nullptr;
  a.gzf = gzf ? gzf->mutable_data_ptr() : nullptr;
  a.weights = weights ? weights->mutable_data_ptr() : nullptr;
  at::Tensor partials;  // freed after the launch: the caching allocator orders reuse on this stream
  if (loss != nullptr) {
    partials = at::empty({cuda_grid(B, C)}, z.options().dtype(acc_type_of(z.scalar_type())));
    a.partials = partials.mutable_data_ptr();
    a.loss = loss->mutable_data_ptr();
  }
  const char* err = cuda_rows(a, c10::cuda::getCurrentCUDAStream(z.device().index()).stream());
  TORCH_CHECK(err == nullptr, "nla_fast: CUDA kernel launch failed: ", err);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nla_loss_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& logits_flip, const at::Tensor& target,
    const std::optional<at::Tensor>& eps_tensor, double eps_value, at::ArrayRef<double> constants, bool jsd,
    bool need_grad, bool need_weights) {
  check_inputs(logits, &logits_flip, target, constants);
  TORCH_CHECK(logits.is_cuda(), "nla_fast::nla_loss_fwd (CUDA kernel) got a tensor on ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor y = prepare_target(target);
  const auto acc = acc_type_of(logits.scalar_type());
  const auto eps = resolve_eps(eps_tensor, eps_value, logits, acc);
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor loss = at::empty({}, logits.options().dtype(acc));
  at::Tensor gz = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor gzf = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor w = at::empty({need_weights ? B : 0}, logits.options().dtype(acc));
  run_cuda(logits, &logits_flip, y, eps.first, eps.second, constants, jsd, need_grad ? &gz : nullptr,
           need_grad ? &gzf : nullptr, need_weights ? &w : nullptr, &loss);
  return {loss, gz, gzf, w};
}

at::Tensor naw_weight_cuda(const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& eps_tensor, double eps_value,
                           at::ArrayRef<double> constants) {
  check_inputs(logits, nullptr, target, constants);
  TORCH_CHECK(logits.is_cuda(), "nla_fast::naw_weight (CUDA kernel) got a tensor on ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor y = prepare_target(target);
  const auto acc = acc_type_of(logits.scalar_type());
  const auto eps = resolve_eps(eps_tensor, eps_value, logits, acc);
  at::Tensor w = at::empty({logits.size(0)}, logits.options().dtype(acc));
  run_cuda(logits, nullptr, y, eps.first, eps.second, constants, false, nullptr, nullptr, &w, nullptr);
  return w;
}

std::tuple<at::Tensor, at::Tensor> nla_scale_grads_cuda(const at::Tensor& grad_output, const at::Tensor& grad_logits,
                                                        const at::Tensor& grad_logits_flip) {
  TORCH_CHECK(grad_output.numel() == 1, "nla_fast::nla_scale_grads: grad_output must hold one value, got ",
              grad_output.sizes());
  TORCH_CHECK(grad_logits.scalar_type() == grad_logits_flip.scalar_type(),
              "nla_fast::nla_scale_grads: both gradients must share a dtype");
  TORCH_CHECK(grad_logits.is_cuda() && grad_logits_flip.device() == grad_logits.device(),
              "nla_fast::nla_scale_grads: the gradients must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  const at::Tensor a = grad_logits.contiguous();
  const at::Tensor b = grad_logits_flip.contiguous();
  at::Tensor go = grad_output.reshape({});
  if (go.device() != a.device()) go = go.to(a.device());  // a host scalar: not what autograd passes
  if (go.scalar_type() != at::kFloat && go.scalar_type() != at::kDouble) go = go.to(at::kFloat);
  at::Tensor out_a = at::empty(a.sizes(), a.options());
  at::Tensor out_b = at::empty(b.sizes(), b.options());
  const char* err = cuda_scale(to_dtype(a.scalar_type()), go.const_data_ptr(), go.scalar_type() == at::kDouble,
                               a.const_data_ptr(), b.const_data_ptr(), out_a.mutable_data_ptr(),
                               out_b.mutable_data_ptr(), a.numel(), b.numel(),
                               c10::cuda::getCurrentCUDAStream(a.device().index()).stream());
  TORCH_CHECK(err == nullptr, "nla_fast: CUDA kernel launch failed: ", err);
  return {out_a, out_b};
}

#endif  // NLA_WITH_CUDA

}  // namespace
}  // namespace nla_fast

TORCH_LIBRARY(nla_fast, m) {
  m.set_python_module("nla_fast.extension");
  m.def(
      "nla_loss_fwd(Tensor logits, Tensor logits_flip, Tensor target, Tensor? eps_tensor, float eps_value, "
      "float[] constants, bool jsd, bool need_grad, bool need_weights) "
      "-> (Tensor loss, Tensor grad_logits, Tensor grad_logits_flip, Tensor weights)");
  m.def("nla_scale_grads(Tensor grad_output, Tensor grad_logits, Tensor grad_logits_flip) -> (Tensor, Tensor)");
  m.def("naw_weight(Tensor logits, Tensor target, Tensor? eps_tensor, float eps_value, float[] constants) -> Tensor");
}

TORCH_LIBRARY_IMPL(nla_fast, CPU, m) {
  m.impl("nla_loss_fwd", &nla_fast::nla_loss_fwd_cpu);
  m.impl("nla_scale_grads", &nla_fast::nla_scale_grads_cpu);
  m.impl("naw_weight", &nla_fast::naw_weight_cpu);
}

#ifdef NLA_WITH_CUDA
TORCH_LIBRARY_IMPL(nla_fast, CUDA, m) {
  m.impl("nla_loss_fwd", &nla_fast::nla_loss_fwd_cuda);
  m.impl("nla_scale_grads", &nla_fast::nla_scale_grads_cuda);
  m.impl("naw_weight", &nla_fast::naw_weight_cuda);
}
#endif
