// NLA loss (SPEC 1.1) as native PyTorch operators: schemas and CPU kernels.
//
//   nla_fast::nla_loss_fwd    loss, d loss/d logits, d loss/d logits_flip and the NAW weights in
//                             one sweep over the rows.
//   nla_fast::nla_scale_grads backward: the saved gradients times grad_output (read from memory),
//                             into new tensors (the traced/compiled backward).
//   nla_fast::nla_scale_grads_ the eager backward: the saved gradients scaled in place, nothing
//                             read or written when grad_output == 1 (checked on the device).
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
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
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
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace nla_fast {
namespace {

// ---- argument handling shared by the CPU and CUDA entry points (every check before any launch)
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
  // int32 and int64 labels are read as they are; nla_fast.nla_loss widens any other integer dtype
  // (nla_fast.loss_inputs.index_target) before calling the op.
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "nla_fast: target must hold integer class indices as int64 or int32, got ", target.scalar_type(),
              " (nla_fast.nla_loss widens other integer dtypes; call the op with target.long())");
  TORCH_CHECK(target.device() == logits.device(), "nla_fast: target must be on ", logits.device(), ", got ",
              target.device());
  TORCH_CHECK(constants.size() == static_cast<size_t>(kNumConstants), "nla_fast: expected ", kNumConstants,
              " constants (NLAConstants.as_list()), got ", constants.size());
}

inline void check_eps_tensor(const at::Tensor& e) {
  TORCH_CHECK(e.numel() == 1, "nla_fast: eps must be a float or a 0-d tensor, got shape ", e.sizes());
  TORCH_CHECK(at::isFloatingType(e.scalar_type()), "nla_fast: eps tensor must be floating point, got ",
              e.scalar_type());
}

// A one-element host tensor's value, read from memory (no dispatcher call, no copy).
inline double host_scalar(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return static_cast<double>(*t.const_data_ptr<float>());
    case at::kDouble: return *t.const_data_ptr<double>();
    case at::kHalf: return static_cast<double>(static_cast<float>(*t.const_data_ptr<at::Half>()));
    case at::kBFloat16: return static_cast<double>(static_cast<float>(*t.const_data_ptr<at::BFloat16>()));
    default: TORCH_CHECK(false, "nla_fast: expected a floating-point scalar, got ", t.scalar_type());
  }
}

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- CPU kernels
// Rows are independent; at::parallel_for (OpenMP) splits them in fixed chunks of 64 rows, each
// summed in row order, the chunk sums then added in chunk order: the loss does not depend on the
// thread count. A row of C = 7 or 8 runs nla_row_fixed (the code the GPU tile kernel runs), a
// narrower one nla_row, a wider one the vectorised wide_row (at::vec, every pass over the
// columns a vector loop).

constexpr int64_t kRowsPerChunk = 64;
// A thread takes at least this many logits (about 50 us of work): smaller batches stay on the
// calling thread, so a training batch never wakes the pool (OpenMP threads spinning at a barrier
// on a busy host cost milliseconds).
constexpr int64_t kMinElementsPerThread = 1 << 15;
constexpr int64_t kNarrowMaxC = 8;  // C <= 8: scalar rows; wider: vectorised rows

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// f(j) for each full vector's first column j, then g(j) for each column of the tail.
template <typename acc_t, typename VF, typename SF>
inline void vec_loop(int64_t n, const VF& vf, const SF& sf) {
  int64_t j = 0;
  for (; j + Vec<acc_t>::size() <= n; j += Vec<acc_t>::size()) vf(j);
  for (; j < n; ++j) sf(j);
}

// max of x[0, n) (NaN-propagating), -inf when n == 0.
template <typename acc_t>
inline acc_t vec_max(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  Vec<acc_t> mv(m);
  vec_loop<acc_t>(
      n, [&](int64_t j) { mv = at::vec::maximum(mv, Vec<acc_t>::loadu(x + j)); },
      [&](int64_t j) { m = RowMath<acc_t>::max(m, x[j]); });
  return RowMath<acc_t>::max(m, at::vec::vec_reduce_all<acc_t>(
                                    [](Vec<acc_t> a, Vec<acc_t> b) { return at::vec::maximum(a, b); }, mv));
}

template <typename acc_t>
inline acc_t vec_sum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t> a, Vec<acc_t> b) { return a + b; }, v);
}

// out[j] = exp(x[j] - m) (half: exp((x[j] - m) / 2)); returns their sum.
template <typename acc_t>
inline acc_t vec_exp_shifted(const acc_t* x, acc_t m, acc_t scale, acc_t* out, int64_t n) {
  acc_t s = 0;
  Vec<acc_t> sv(0);
  const Vec<acc_t> mv(m), kv(scale);
  vec_loop<acc_t>(
      n,
      [&](int64_t j) {
        const Vec<acc_t> e = ((Vec<acc_t>::loadu(x + j) - mv) * kv).exp();
        e.store(out + j);
        sv = sv + e;
      },
      [&](int64_t j) {
        out[j] = std::exp((x[j] - m) * scale);
        s += out[j];
      });
  return s + vec_sum(sv);
}

// The first index j != y with x[j] == v, or -1.
template <typename acc_t>
inline int64_t vec_find(const acc_t* x, int64_t n, acc_t v, int64_t y) {
  const Vec<acc_t> vv(v);
  int64_t j = 0;
  for (; j + Vec<acc_t>::size() <= n; j += Vec<acc_t>::size()) {
    int hits = (Vec<acc_t>::loadu(x + j) != vv).zero_mask();  // bit e set: x[j + e] == v
    while (hits != 0) {
      const int e = __builtin_ctz(static_cast<unsigned>(hits));
      if (j + e != y) return j + e;
      hits &= hits - 1;
    }
  }
  for (; j < n; ++j) {
    if (x[j] == v && j != y) return j;
  }
  return -1;
}

template <typename scalar_t, typename index_t>
struct CpuRows {
  using acc_t = at::opmath_type<scalar_t>;

  const scalar_t* z;
  int64_t z_s0, z_s1;
  const scalar_t* zf;  // nullptr: weights only
  int64_t zf_s0, zf_s1;
  const index_t* y;
  int64_t y_s0;
  int64_t C;
  RowConsts<acc_t> k;
  scalar_t* gz;  // nullptr: no gradients (contiguous (B, C))
  scalar_t* gzf;
  acc_t* weights;  // nullptr: no weights

  // acc_t values a task needs for one row of the vectorised path (reused row after row)
  int64_t scratch_size() const { return C > kNarrowMaxC ? 7 * C : 0; }

  // Processes row i; returns its share of the loss.
  acc_t row(int64_t i, acc_t* scratch) const {
    const int64_t yi = static_cast<int64_t>(y[i * y_s0]);
    if (C == 7) return row_fixed<7>(i, yi);
    if (C == 8) return row_fixed<8>(i, yi);
    if (C > kNarrowMaxC) return wide_row(i, yi, scratch);
    const scalar_t* zr = z + i * z_s0;
    const scalar_t* zfr = zf ? zf + i * zf_s0 : zr;
    const int64_t zs = z_s1, zfs = zf ? zf_s1 : z_s1;
    const auto load = [zr, zfr, zs, zfs](int64_t j, acc_t& a, acc_t& b) {
      a = static_cast<acc_t>(zr[j * zs]);
      b = static_cast<acc_t>(zfr[j * zfs]);
    };
    scalar_t* gr = gz ? gz + i * C : nullptr;
    scalar_t* gfr = gzf ? gzf + i * C : nullptr;
    const auto store = [gr, gfr](int64_t j, acc_t v, acc_t vf) {
      gr[j] = static_cast<scalar_t>(v);
      gfr[j] = static_cast<scalar_t>(vf);
    };
    return nla_row<0>(load, C, yi, k, zf != nullptr, gz != nullptr, store, weights ? weights + i : nullptr);
  }

  template <int CF>
  acc_t row_fixed(int64_t i, int64_t yv) const {
    acc_t a[CF], b[CF], ga[CF], gb[CF], w;
    for (int j = 0; j < CF; ++j) {
      a[j] = static_cast<acc_t>(z[i * z_s0 + j * z_s1]);
      b[j] = zf ? static_cast<acc_t>(zf[i * zf_s0 + j * zf_s1]) : a[j];
    }
    const bool y_ok = yv >= 0 && yv < CF;
    const int yi = y_ok ? static_cast<int>(yv) : 0;
    const acc_t zy = y_ok ? a[yi] : std::numeric_limits<acc_t>::quiet_NaN();
    acc_t contrib;
    if (zf == nullptr) {
      contrib = nla_row_fixed<CF, Consistency::None, false>(a, b, yi, zy, k, w, ga, gb);
    } else if (!k.jsd) {
      contrib = gz ? nla_row_fixed<CF, Consistency::Official, true>(a, b, yi, zy, k, w, ga, gb)
                   : nla_row_fixed<CF, Consistency::Official, false>(a, b, yi, zy, k, w, ga, gb);
    } else {
      contrib = gz ? nla_row_fixed<CF, Consistency::Jsd, true>(a, b, yi, zy, k, w, ga, gb)
                   : nla_row_fixed<CF, Consistency::Jsd, false>(a, b, yi, zy, k, w, ga, gb);
    }
    if (weights) weights[i] = w;
    if (gz) {
      for (int j = 0; j < CF; ++j) {
        gz[i * CF + j] = static_cast<scalar_t>(ga[j]);
        gzf[i * CF + j] = static_cast<scalar_t>(gb[j]);
      }
    }
    return contrib;
  }

  // A row of acc_t values: the row itself when it is contiguous acc_t, else a converted copy.
  const acc_t* row_values(const scalar_t* base, int64_t s1, acc_t* copy) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (s1 == 1) return base;
    }
    if (s1 == 1) {
      at::vec::convert(base, copy, C);
    } else {
      for (int64_t j = 0; j < C; ++j) copy[j] = static_cast<acc_t>(base[j * s1]);
    }
    return copy;
  }

  // The vectorised row (C > 8), the maths of nla_row (shared row_head / official_coef / jsd_coef):
  // scratch holds 7 C values: a, b (converted copies), exp(z - mz), exp(z' - mzf), exp((s - ms) / 2)
  // and the two gradient rows before they are stored in the logits' dtype.
  acc_t wide_row(int64_t i, int64_t yv, acc_t* scratch) const {
    using V = Vec<acc_t>;
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    const int64_t n = C;
    const bool has_flip = zf != nullptr, want_grad = gz != nullptr;
    scalar_t* gr = want_grad ? gz + i * C : nullptr;
    scalar_t* gfr = want_grad ? gzf + i * C : nullptr;
    if (yv < 0 || yv >= n) {
      if (weights) weights[i] = nan;
      for (int64_t j = 0; want_grad && j < n; ++j) gr[j] = gfr[j] = static_cast<scalar_t>(nan);
      return nan;
    }
    const acc_t* a = row_values(z + i * z_s0, z_s1, scratch);
    const acc_t* b = has_flip ? row_values(zf + i * zf_s0, zf_s1, scratch + n) : a;
    acc_t* ez = scratch + 2 * n;
    acc_t* ezf = scratch + 3 * n;
    acc_t* eu = scratch + 4 * n;
    const bool official = has_flip && !k.jsd;
    RowStats<acc_t> s;
    s.zy = a[yv];
    // pass 1: maxima, the nearest negative (the largest logit but z_y, its first index)
    s.mz = vec_max(a, n);
    s.best = RowMath<acc_t>::max(vec_max(a, yv), vec_max(a + yv + 1, n - yv - 1));
    const int64_t kk = vec_find(a, n, s.best, yv);
    s.mzf = has_flip ? vec_max(b, n) : s.mz;
    if (official) {
      vec_loop<acc_t>(
          n, [&](int64_t j) { (V::loadu(a + j) + V::loadu(b + j)).store(eu + j); },
          [&](int64_t j) { eu[j] = a[j] + b[j]; });
      s.ms = vec_max(eu, n);
    }
    // pass 2: the exponentials and their sums
    s.sz = vec_exp_shifted(a, s.mz, acc_t(1), ez, n);
    s.szf = has_flip ? vec_exp_shifted(b, s.mzf, acc_t(1), ezf, n) : acc_t(1);
    s.su = official ? vec_exp_shifted(eu, s.ms, acc_t(0.5), eu, n) : acc_t(1);
    const RowHead<acc_t> h = row_head(s, k);
    if (weights) weights[i] = h.naw.w;
    if (!has_flip) return 0;
    // the gradient rows: written in place when the logits are acc_t, else converted at the end
    acc_t* v = scratch + 5 * n;
    acc_t* vf = scratch + 6 * n;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (want_grad) {
        v = gr;
        vf = gfr;
      }
    }
    acc_t contrib, Ey = 0, Ek = 0;
    if (official) {
      const OfficialCoef<acc_t> o = official_coef(s, h, k, want_grad);
      contrib = o.contrib;
      if (want_grad) {
        const V alpha(o.alpha), beta(o.beta), gamma(o.gamma);
        vec_loop<acc_t>(
            n,
            [&](int64_t j) {
              const V t = V::loadu(eu + j) * beta;
              (V::loadu(ez + j) * alpha - t).store(v + j);
              (V::loadu(ezf + j) * gamma - t).store(vf + j);
            },
            [&](int64_t j) {
              const acc_t t = eu[j] * o.beta;
              v[j] = ez[j] * o.alpha - t;
              vf[j] = ezf[j] * o.gamma - t;
            });
        Ey = o.Ey;
        Ek = o.Ek;
      }
    } else {
      // pass 3 (JSD): S = sum p (log p - log m), S' likewise, only where p > 0 (p' > 0)
      const JsdHead<acc_t> jh = jsd_head(s);
      const acc_t ln2 = static_cast<acc_t>(0.69314718055994530942);
      const V isz(h.inv_sz), iszf(jh.inv_szf), lz(h.lse_z), lzf(jh.lse_zf), l2(ln2), zero(0);
      // p, p', log m and the two log ratios of columns [j, j + size)
      const auto terms = [&](int64_t j, V& p, V& pf, V& tz, V& tzf) {
        p = V::loadu(ez + j) * isz;
        pf = V::loadu(ezf + j) * iszf;
        const V lm = (p + pf).log() - l2;
        tz = V::loadu(a + j) - lz - lm;
        tzf = V::loadu(b + j) - lzf - lm;
      };
      V Sv(0), Sfv(0);
      acc_t S = 0, Sf = 0;
      vec_loop<acc_t>(
          n,
          [&](int64_t j) {
            V p, pf, tz, tzf;
            terms(j, p, pf, tz, tzf);
            Sv = Sv + V::blendv(zero, p * tz, p > zero);
            Sfv = Sfv + V::blendv(zero, pf * tzf, pf > zero);
          },
          [&](int64_t j) {
            jsd_accumulate(a[j], b[j], ez[j] * h.inv_sz, ezf[j] * jh.inv_szf, h.lse_z, jh.lse_zf, S, Sf);
          });
      S += vec_sum(Sv);
      Sf += vec_sum(Sfv);
      const JsdCoef<acc_t> o = jsd_coef(s, h, k, S, Sf, want_grad);
      contrib = o.contrib;
      if (want_grad) {
        const V A(o.A), hv(o.h), Svv(S), Sfvv(Sf);
        vec_loop<acc_t>(
            n,
            [&](int64_t j) {
              V p, pf, tz, tzf;
              terms(j, p, pf, tz, tzf);
              (A * p + V::blendv(zero, hv * p * (tz - Svv), p > zero)).store(v + j);
              V::blendv(zero, hv * pf * (tzf - Sfvv), pf > zero).store(vf + j);
            },
            [&](int64_t j) {
              jsd_grad(o, a[j], b[j], ez[j] * h.inv_sz, ezf[j] * jh.inv_szf, h.lse_z, jh.lse_zf, S, Sf, v[j], vf[j]);
            });
        Ey = o.Ey;
        Ek = o.Ek;
      }
    }
    if (want_grad) {
      v[yv] += Ey;
      if (kk >= 0) v[kk] += Ek;
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        at::vec::convert(v, gr, n);
        at::vec::convert(vf, gfr, n);
      }
    }
    return contrib;
  }
};

// Runs every row of [0, B); returns the loss (sum of row contributions in a fixed order, in double).
template <typename scalar_t, typename index_t>
double run_rows(const CpuRows<scalar_t, index_t>& rows, int64_t B) {
  using acc_t = typename CpuRows<scalar_t, index_t>::acc_t;
  const int64_t nchunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(static_cast<size_t>(nchunks), 0.0);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / (kRowsPerChunk * std::max<int64_t>(rows.C, 1)));
  at::parallel_for(0, nchunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(static_cast<size_t>(rows.scratch_size()));
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t r1 = std::min(B, (ch + 1) * kRowsPerChunk);
      double s = 0.0;
      for (int64_t i = ch * kRowsPerChunk; i < r1; ++i) s += static_cast<double>(rows.row(i, scratch.data()));
      partial[static_cast<size_t>(ch)] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

template <typename scalar_t, typename index_t>
void launch_cpu(const at::Tensor& z, const at::Tensor* zf, const at::Tensor& y, double eps,
                at::ArrayRef<double> constants, bool jsd, bool reg_mean, at::Tensor* gz, at::Tensor* gzf,
                at::Tensor* weights, at::Tensor* loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = z.size(0);
  CpuRows<scalar_t, index_t> rows;
  rows.z = z.const_data_ptr<scalar_t>();
  rows.z_s0 = z.stride(0);
  rows.z_s1 = z.stride(1);
  rows.zf = zf ? zf->const_data_ptr<scalar_t>() : nullptr;
  rows.zf_s0 = zf ? zf->stride(0) : 0;
  rows.zf_s1 = zf ? zf->stride(1) : 0;
  rows.y = y.const_data_ptr<index_t>();
  rows.y_s0 = y.stride(0);
  rows.C = z.size(1);
  rows.k = make_row_consts(make_constants<acc_t>(constants.data()), static_cast<acc_t>(eps), B, jsd, reg_mean);
  rows.gz = gz ? gz->mutable_data_ptr<scalar_t>() : nullptr;
  rows.gzf = gzf ? gzf->mutable_data_ptr<scalar_t>() : nullptr;
  rows.weights = weights ? weights->mutable_data_ptr<acc_t>() : nullptr;
  const double total = run_rows(rows, B);
  if (loss) {
    // written through the pointer: no fill_ through the dispatcher
    *loss->mutable_data_ptr<acc_t>() =
        static_cast<acc_t>(B > 0 ? total : std::numeric_limits<double>::quiet_NaN());
  }
}

void dispatch_cpu(const at::Tensor& z, const at::Tensor* zf, const at::Tensor& y, double eps,
                  at::ArrayRef<double> constants, bool jsd, bool reg_mean, at::Tensor* gz, at::Tensor* gzf,
                  at::Tensor* weights, at::Tensor* loss) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nla_fast_cpu", [&] {
    if (y.scalar_type() == at::kInt) {
      launch_cpu<scalar_t, int32_t>(z, zf, y, eps, constants, jsd, reg_mean, gz, gzf, weights, loss);
    } else {
      launch_cpu<scalar_t, int64_t>(z, zf, y, eps, constants, jsd, reg_mean, gz, gzf, weights, loss);
    }
  });
}

// eps on the CPU path: a tensor (on the CPU) is read from memory, else the float.
inline double cpu_eps(const std::optional<at::Tensor>& eps_tensor, double eps_value) {
  if (!eps_tensor.has_value() || !eps_tensor->defined()) return eps_value;
  check_eps_tensor(*eps_tensor);
  TORCH_CHECK(eps_tensor->is_cpu(), "nla_fast: eps tensor must be on the CPU for CPU logits, got ",
              eps_tensor->device());
  return host_scalar(*eps_tensor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nla_loss_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& logits_flip, const at::Tensor& target,
    const std::optional<at::Tensor>& eps_tensor, double eps_value, at::ArrayRef<double> constants, bool jsd,
    bool reg_mean, bool need_grad, bool need_weights) {
  check_inputs(logits, &logits_flip, target, constants);
  TORCH_CHECK(logits.is_cpu(), "nla_fast::nla_loss_fwd (CPU kernel) got a tensor on ", logits.device());
  const double eps = cpu_eps(eps_tensor, eps_value);
  const auto acc = acc_type_of(logits.scalar_type());
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor loss = at::empty({}, logits.options().dtype(acc));
  at::Tensor gz = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor gzf = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor w = at::empty({need_weights ? B : 0}, logits.options().dtype(acc));
  dispatch_cpu(logits, &logits_flip, target, eps, constants, jsd, reg_mean, need_grad ? &gz : nullptr,
               need_grad ? &gzf : nullptr, need_weights ? &w : nullptr, &loss);
  return {loss, gz, gzf, w};
}

at::Tensor naw_weight_cpu(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& eps_tensor, double eps_value,
                          at::ArrayRef<double> constants) {
  check_inputs(logits, nullptr, target, constants);
  TORCH_CHECK(logits.is_cpu(), "nla_fast::naw_weight (CPU kernel) got a tensor on ", logits.device());
  const double eps = cpu_eps(eps_tensor, eps_value);
  at::Tensor w = at::empty({logits.size(0)}, logits.options().dtype(acc_type_of(logits.scalar_type())));
  dispatch_cpu(logits, nullptr, target, eps, constants, false, false, nullptr, nullptr, &w, nullptr);
  return w;
}

inline void check_scale_args(const at::Tensor& grad_output, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(grad_output.numel() == 1, "nla_fast::nla_scale_grads: grad_output must hold one value, got ",
              grad_output.sizes());
  TORCH_CHECK(at::isFloatingType(grad_output.scalar_type()),
              "nla_fast::nla_scale_grads: grad_output must be floating point, got ", grad_output.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && at::isFloatingType(a.scalar_type()),
              "nla_fast::nla_scale_grads: both gradients must share a floating-point dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(b.device() == a.device(), "nla_fast::nla_scale_grads: both gradients must be on one device");
}

// in *= g for a contiguous CPU tensor, in the accumulation type.
void scale_cpu_inplace(at::Tensor& t, double g) {
  if (t.numel() == 0) return;
  TORCH_CHECK(t.is_contiguous(), "nla_fast::nla_scale_grads_: the saved gradients must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "nla_fast_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t f = static_cast<acc_t>(g);
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    const int64_t n = t.numel();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) * f);
  });
}

std::tuple<at::Tensor, at::Tensor> nla_scale_grads_cpu(const at::Tensor& grad_output, const at::Tensor& grad_logits,
                                                       const at::Tensor& grad_logits_flip) {
  check_scale_args(grad_output, grad_logits, grad_logits_flip);
  // A 0-d grad_output does not promote: the products keep the gradients' dtype.
  const at::Tensor go = grad_output.reshape({});
  return {at::mul(grad_logits, go), at::mul(grad_logits_flip, go)};
}

// The eager backward: the saved gradients scaled in place, nothing at all when grad_output == 1.
void nla_scale_grads_inplace_cpu(const at::Tensor& grad_output, at::Tensor& grad_logits,
                                 at::Tensor& grad_logits_flip) {
  check_scale_args(grad_output, grad_logits, grad_logits_flip);
  TORCH_CHECK(grad_output.is_cpu(), "nla_fast::nla_scale_grads_: grad_output must be on the CPU here");
  const double g = host_scalar(grad_output);
  if (g == 1.0) return;
  scale_cpu_inplace(grad_logits, g);
  scale_cpu_inplace(grad_logits_flip, g);
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

// eps for a CUDA launch: (device pointer or nullptr, is double, host value). A tensor on the
// logits' device is read by the kernel (a captured CUDA graph sees updates); a CPU scalar is
// read here, from host memory (no device synchronisation).
struct CudaEps {
  const void* ptr = nullptr;
  bool is_double = false;
  double value = 0.0;
  at::Tensor keep;  // a converted copy, kept alive until the launch is queued
};

CudaEps cuda_eps(const std::optional<at::Tensor>& eps_tensor, double eps_value, const at::Tensor& logits) {
  CudaEps out;
  out.value = eps_value;
  if (!eps_tensor.has_value() || !eps_tensor->defined()) return out;
  const at::Tensor& e = *eps_tensor;
  check_eps_tensor(e);
  if (e.is_cpu()) {
    out.value = host_scalar(e);
    return out;
  }
  TORCH_CHECK(e.device() == logits.device(), "nla_fast: eps tensor must be on ", logits.device(), " (or the CPU), got ",
              e.device());
  if (e.scalar_type() == at::kFloat || e.scalar_type() == at::kDouble) {
    out.ptr = e.const_data_ptr();  // one element: its storage offset is already applied
    out.is_double = e.scalar_type() == at::kDouble;
  } else {
    out.keep = e.to(at::kFloat);  // half / bfloat16 eps: one small copy on the stream
    out.ptr = out.keep.const_data_ptr();
  }
  return out;
}

// The kernels read logits as contiguous rows from a 16-byte aligned base (vector loads, no stride
// arithmetic); any other layout (a transposed or sliced view) is copied once into a fresh tensor.
at::Tensor kernel_layout(const at::Tensor& t) {
  const bool aligned = (reinterpret_cast<uintptr_t>(t.const_data_ptr()) & 15u) == 0;
  return t.is_contiguous() && aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

void run_cuda(const at::Tensor& z_in, const at::Tensor* zf_in, const at::Tensor& y, const CudaEps& eps,
              at::ArrayRef<double> constants, bool jsd, bool reg_mean, at::Tensor* gz, at::Tensor* gzf,
              at::Tensor* weights, at::Tensor* loss) {
  const at::Tensor z = kernel_layout(z_in);
  const at::Tensor zf = zf_in ? kernel_layout(*zf_in) : at::Tensor();
  const int64_t B = z.size(0), C = z.size(1);
  CudaRowsArgs a{};
  a.dtype = to_dtype(z.scalar_type());
  a.z = z.const_data_ptr();
  a.zf = zf_in ? zf.const_data_ptr() : nullptr;
  a.y = y.const_data_ptr();
  a.y_s0 = y.stride(0);
  a.y_is_int64 = y.scalar_type() == at::kLong;
  a.B = B;
  a.C = C;
  for (int i = 0; i < kNumConstants; ++i) a.constants[i] = constants[i];
  a.eps_ptr = eps.ptr;
  a.eps_is_double = eps.is_double;
  a.eps_value = eps.value;
  a.jsd = jsd;
  a.reg_mean = reg_mean;
  a.gz = gz ? gz->mutable_data_ptr() : nullptr;
  a.gzf = gzf ? gzf->mutable_data_ptr() : nullptr;
  a.weights = weights ? weights->mutable_data_ptr() : nullptr;
  at::Tensor partials;  // freed after the launch: the caching allocator orders reuse on this stream
  if (loss != nullptr) {
    const CudaPlan plan = cuda_launch_plan(B, C, a.dtype);
    // one block writes the loss itself; several write partials that a second launch sums
    if (plan.grid > 1) {
      partials = at::empty({plan.grid}, z.options().dtype(acc_type_of(z.scalar_type())));
      a.partials = partials.mutable_data_ptr();
    } else {
      a.partials = loss->mutable_data_ptr();
    }
    a.loss = loss->mutable_data_ptr();
  }
  const char* err = cuda_rows(a, c10::cuda::getCurrentCUDAStream(z.device().index()).stream());
  TORCH_CHECK(err == nullptr, "nla_fast: CUDA kernel launch failed: ", err);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nla_loss_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& logits_flip, const at::Tensor& target,
    const std::optional<at::Tensor>& eps_tensor, double eps_value, at::ArrayRef<double> constants, bool jsd,
    bool reg_mean, bool need_grad, bool need_weights) {
  check_inputs(logits, &logits_flip, target, constants);
  TORCH_CHECK(logits.is_cuda(), "nla_fast::nla_loss_fwd (CUDA kernel) got a tensor on ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const CudaEps eps = cuda_eps(eps_tensor, eps_value, logits);
  const auto acc = acc_type_of(logits.scalar_type());
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor loss = at::empty({}, logits.options().dtype(acc));
  at::Tensor gz = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor gzf = need_grad ? at::empty({B, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor w = at::empty({need_weights ? B : 0}, logits.options().dtype(acc));
  run_cuda(logits, &logits_flip, target, eps, constants, jsd, reg_mean, need_grad ? &gz : nullptr,
           need_grad ? &gzf : nullptr, need_weights ? &w : nullptr, &loss);
  return {loss, gz, gzf, w};
}

at::Tensor naw_weight_cuda(const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& eps_tensor, double eps_value,
                           at::ArrayRef<double> constants) {
  check_inputs(logits, nullptr, target, constants);
  TORCH_CHECK(logits.is_cuda(), "nla_fast::naw_weight (CUDA kernel) got a tensor on ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const CudaEps eps = cuda_eps(eps_tensor, eps_value, logits);
  at::Tensor w = at::empty({logits.size(0)}, logits.options().dtype(acc_type_of(logits.scalar_type())));
  run_cuda(logits, nullptr, target, eps, constants, false, false, nullptr, nullptr, &w, nullptr);
  return w;
}

// grad_output for a scale kernel: a float or double on the gradients' device.
at::Tensor cuda_grad_output(const at::Tensor& grad_output, const at::Tensor& like) {
  at::Tensor go = grad_output;
  if (go.device() != like.device()) go = go.to(like.device());  // a host scalar: not what autograd passes
  if (go.scalar_type() != at::kFloat && go.scalar_type() != at::kDouble) go = go.to(at::kFloat);
  return go;
}

std::tuple<at::Tensor, at::Tensor> nla_scale_grads_cuda(const at::Tensor& grad_output, const at::Tensor& grad_logits,
                                                        const at::Tensor& grad_logits_flip) {
  check_scale_args(grad_output, grad_logits, grad_logits_flip);
  TORCH_CHECK(grad_logits.is_cuda(), "nla_fast::nla_scale_grads: the gradients must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  const at::Tensor a = grad_logits.contiguous();
  const at::Tensor b = grad_logits_flip.contiguous();
  const at::Tensor go = cuda_grad_output(grad_output, a);
  at::Tensor out_a = at::empty(a.sizes(), a.options());
  at::Tensor out_b = at::empty(b.sizes(), b.options());
  const char* err = cuda_scale(to_dtype(a.scalar_type()), go.const_data_ptr(), go.scalar_type() == at::kDouble,
                               a.const_data_ptr(), b.const_data_ptr(), out_a.mutable_data_ptr(),
                               out_b.mutable_data_ptr(), a.numel(), b.numel(),
                               c10::cuda::getCurrentCUDAStream(a.device().index()).stream());
  TORCH_CHECK(err == nullptr, "nla_fast: CUDA kernel launch failed: ", err);
  return {out_a, out_b};
}

void nla_scale_grads_inplace_cuda(const at::Tensor& grad_output, at::Tensor& grad_logits,
                                  at::Tensor& grad_logits_flip) {
  check_scale_args(grad_output, grad_logits, grad_logits_flip);
  TORCH_CHECK(grad_logits.is_cuda(), "nla_fast::nla_scale_grads_: the gradients must be on a CUDA device");
  TORCH_CHECK(grad_logits.is_contiguous() && grad_logits_flip.is_contiguous(),
              "nla_fast::nla_scale_grads_: the saved gradients must be contiguous");
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  const at::Tensor go = cuda_grad_output(grad_output, grad_logits);
  // one launch that reads grad_output on the device and exits when it is 1: no host sync
  const char* err = cuda_scale(to_dtype(grad_logits.scalar_type()), go.const_data_ptr(),
                               go.scalar_type() == at::kDouble, grad_logits.const_data_ptr(),
                               grad_logits_flip.const_data_ptr(), grad_logits.mutable_data_ptr(),
                               grad_logits_flip.mutable_data_ptr(), grad_logits.numel(), grad_logits_flip.numel(),
                               c10::cuda::getCurrentCUDAStream(grad_logits.device().index()).stream());
  TORCH_CHECK(err == nullptr, "nla_fast: CUDA kernel launch failed: ", err);
}

#endif  // NLA_WITH_CUDA

}  // namespace
}  // namespace nla_fast

TORCH_LIBRARY(nla_fast, m) {
  m.set_python_module("nla_fast.extension");
  m.def(
      "nla_loss_fwd(Tensor logits, Tensor logits_flip, Tensor target, Tensor? eps_tensor, float eps_value, "
      "float[] constants, bool jsd, bool reg_mean, bool need_grad, bool need_weights) "
      "-> (Tensor loss, Tensor grad_logits, Tensor grad_logits_flip, Tensor weights)");
  m.def("nla_scale_grads(Tensor grad_output, Tensor grad_logits, Tensor grad_logits_flip) -> (Tensor, Tensor)");
  m.def("nla_scale_grads_(Tensor grad_output, Tensor(a!) grad_logits, Tensor(b!) grad_logits_flip) -> ()");
  m.def("naw_weight(Tensor logits, Tensor target, Tensor? eps_tensor, float eps_value, float[] constants) -> Tensor");
}

TORCH_LIBRARY_IMPL(nla_fast, CPU, m) {
  m.impl("nla_loss_fwd", &nla_fast::nla_loss_fwd_cpu);
  m.impl("nla_scale_grads", &nla_fast::nla_scale_grads_cpu);
  m.impl("nla_scale_grads_", &nla_fast::nla_scale_grads_inplace_cpu);
  m.impl("naw_weight", &nla_fast::naw_weight_cpu);
}

#ifdef NLA_WITH_CUDA
TORCH_LIBRARY_IMPL(nla_fast, CUDA, m) {
  m.impl("nla_loss_fwd", &nla_fast::nla_loss_fwd_cuda);
  m.impl("nla_scale_grads", &nla_fast::nla_scale_grads_cuda);
  m.impl("nla_scale_grads_", &nla_fast::nla_scale_grads_inplace_cuda);
  m.impl("naw_weight", &nla_fast::naw_weight_cuda);
}
#endif
