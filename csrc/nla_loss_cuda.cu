// NLA loss (SPEC 1.1): CUDA kernels and plain launchers for the operators of nla_loss.cpp.
//
// No torch header is included (fast nvcc builds); nla_loss.cpp allocates the tensors, takes the
// current stream (c10::cuda::getCurrentCUDAStream()) and calls cuda_rows / cuda_scale.
//
// Design (one sweep, each logit read once):
//   * A row is handled by a group of LANES = min(next_pow2(C), 32) lanes of one warp, each lane
//     holding ELEMS = next_pow2(C) / LANES logits of z and of z' in registers (C <= 1024), so
//     32 / LANES rows share a warp. Lane l holds columns l, l + LANES, ... (coalesced loads).
//     ELEMS is a template parameter (1..32); LANES is a runtime value for ELEMS == 1.
//   * Reductions inside a row are xor-butterflies over the group (__shfl_xor_sync): every lane ends
//     with bitwise the same max / sum / nearest negative. The loss terms, both gradients and the
//     weight follow; gradients are written contiguous.
//   * The loss is reduced deterministically: a fixed-order sum per block into partials[block]
//     (the grid is a fixed function of B and C, cuda_grid), then one block sums the partials in a
//     fixed order in double (skipped when the grid has one block: that block writes the loss).
//     No floating-point atomics. Launches: 1 for a small batch, 2 otherwise.
//   * Maths in float for float/half/bfloat16 inputs, double for double. Arbitrary strides are read
//     as they are (no copies). 64-bit row and element offsets.
//   * eps is read from device memory when given as a tensor (CUDA-graph safe), else a kernel arg.
//   * An out-of-range target never indexes memory (columns are only compared with it); its row
//     gives NaN.
#include "nla_loss.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace nla_fast {
namespace {

constexpr int kThreads = kCudaThreads;
constexpr int kFinalThreads = 256;  // the single block that sums the partials
constexpr unsigned kFullMask = 0xffffffffu;

// ---- loads and stores in the accumulation type (explicit intrinsics: no implicit half conversions)
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const float* p) { return static_cast<acc_t>(*p); }
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const double* p) { return static_cast<acc_t>(*p); }
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const __half* p) { return static_cast<acc_t>(__half2float(*p)); }
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const __nv_bfloat16* p) {
  return static_cast<acc_t>(__bfloat162float(*p));
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename scalar_t, typename acc_t>
struct RowParams {
  const scalar_t* z;
  const scalar_t* zf;  // nullptr: weights only
  int64_t z_s0, z_s1, zf_s0, zf_s1;
  const void* y;
  int64_t y_s0;
  bool y_is_int64;
  int64_t B;
  int C;
  Constants<acc_t> c;
  const acc_t* eps_ptr;  // nullptr: use eps_value
  acc_t eps_value;
  bool jsd;
  scalar_t* gz;  // nullptr: no gradients
  scalar_t* gzf;
  acc_t* weights;   // nullptr: no weights
  acc_t* partials;  // nullptr: no loss (weights only)
  acc_t* loss;      // written by the single block when gridDim.x == 1
};

// Butterfly reductions over aligned groups of `lanes` lanes (a power of two <= 32). All 32 lanes
// take part; xor offsets below `lanes` never leave the group.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T group_max(T v, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) v = nla_max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

template <typename T>
__device__ __forceinline__ void group_argmax(T& v, int& idx, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) {
    const T ov = __shfl_xor_sync(kFullMask, v, off);
    const int oi = __shfl_xor_sync(kFullMask, idx, off);
    if (nla_nn_better(ov, oi, v, idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// ELEMS logits per lane; LANES = 32 when ELEMS > 1, else lanes = next_pow2(C) (runtime).
template <typename scalar_t, typename acc_t, int ELEMS>
__global__ void __launch_bounds__(kThreads) nla_rows_kernel(const RowParams<scalar_t, acc_t> P, const int lanes_arg) {
  const int lanes = ELEMS > 1 ? 32 : lanes_arg;  // a compile-time 32 for the wide rows
  const acc_t half = static_cast<acc_t>(0.5);
  const acc_t ln2 = static_cast<acc_t>(0.69314718055994530942);
  const acc_t one = static_cast<acc_t>(1);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane & (lanes - 1);
  const int grp = lane / lanes;
  const int rows_per_warp = 32 / lanes;
  const int64_t rows_per_block = static_cast<int64_t>(rows_per_warp) * (kThreads / 32);
  const int C = P.C;
  const bool has_flip = P.zf != nullptr;
  const bool jsd = P.jsd;

  const acc_t eps = P.eps_ptr != nullptr ? *P.eps_ptr : P.eps_value;
  const TrueCase<acc_t> tc = make_true_case(P.c, eps);
  const acc_t inv_b = one / static_cast<acc_t>(P.B);
  const acc_t lam_over_b = P.c.lam * inv_b;
  const acc_t one_m_lam = one - P.c.lam;

  acc_t local = 0;  // this lane's share of the block's loss partial

  // The loop bound is uniform over the warp, so every shuffle has all 32 lanes.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block + warp * rows_per_warp; base < P.B;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = base + grp;
    const bool row_ok = row < P.B;
    int64_t y = -1;
    if (row_ok) {
      y = P.y_is_int64 ? static_cast<const int64_t*>(P.y)[row * P.y_s0]
                       : static_cast<int64_t>(static_cast<const int32_t*>(P.y)[row * P.y_s0]);
    }
    const bool y_ok = row_ok && y >= 0 && y < C;

    acc_t z[ELEMS], zf[ELEMS];
    const scalar_t* zr = P.z + (row_ok ? row : 0) * P.z_s0;
    const scalar_t* zfr = has_flip ? P.zf + (row_ok ? row : 0) * P.zf_s0 : nullptr;
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) {
      const int j = e * lanes + sub;
      const bool in = row_ok && j < C;
      z[e] = in ? load_acc<acc_t>(zr + j * P.z_s1) : -nla_inf<acc_t>();
      zf[e] = (in && has_flip) ? load_acc<acc_t>(zfr + j * P.zf_s1) : -nla_inf<acc_t>();
    }

    // pass 1: maxima, z_y, nearest negative (first index of the largest logit among j != y)
    acc_t mz = -nla_inf<acc_t>(), mzf = -nla_inf<acc_t>(), mu = -nla_inf<acc_t>(), zy = 0;
    acc_t best = -nla_inf<acc_t>();
    int k = 0x7fffffff;
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) {
      const int j = e * lanes + sub;
      if (j < C) {
        mz = nla_max(mz, z[e]);
        mzf = nla_max(mzf, zf[e]);
        mu = nla_max(mu, (z[e] + zf[e]) * half);
        if (j == y) zy = z[e];
        if (j != y && nla_nn_better(z[e], j, best, k)) {
          best = z[e];
          k = j;
        }
      }
    }
    mz = group_max(mz, lanes);
    zy = group_sum(zy, lanes);  // one lane holds z_y, the others 0
    group_argmax(best, k, lanes);
    if (has_flip) {
      mzf = group_max(mzf, lanes);
      if (!jsd) mu = group_max(mu, lanes);
    }

    // pass 2: sums of exponentials
    acc_t sz = 0, szf = 0, su = 0;
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) {
      const int j = e * lanes + sub;
      if (j < C) {
        sz += nla_exp(z[e] - mz);
        if (has_flip) {
          szf += nla_exp(zf[e] - mzf);
          if (!jsd) su += nla_exp((z[e] + zf[e]) * half - mu);
        }
      }
    }
    sz = group_sum(sz, lanes);
    const acc_t lse_z = mz + nla_log(sz);
    const acc_t ce = lse_z - zy;
    const acc_t g = nla_exp(zy - lse_z);
    const acc_t n = nla_exp(best - lse_z);
    const NAW<acc_t> r = naw_weight(g, n, P.c, tc);
    if (P.weights != nullptr && row_ok && sub == 0) P.weights[row] = y_ok ? r.w : nla_nan<acc_t>();
    if (!has_flip) continue;  // weights only (uniform over the grid)

    szf = group_sum(szf, lanes);
    const acc_t lse_zf = mzf + nla_log(szf);
    acc_t lse_u = 0, S = 0, Sf = 0;
    acc_t contrib = lam_over_b * (one + r.w) * ce;
    if (!jsd) {
      su = group_sum(su, lanes);
      lse_u = mu + nla_log(su);
      contrib += one_m_lam * (half * (lse_z + lse_zf) - lse_u);
    } else {
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        const int j = e * lanes + sub;
        if (j < C) {
          const acc_t lp = z[e] - lse_z;
          const acc_t lpf = zf[e] - lse_zf;
          const acc_t lm = nla_logaddexp(lp, lpf) - ln2;
          S += nla_exp(lp) * (lp - lm);
          Sf += nla_exp(lpf) * (lpf - lm);
        }
      }
      S = group_sum(S, lanes);
      Sf = group_sum(Sf, lanes);
      contrib += one_m_lam * inv_b * half * (S + Sf);
    }
    if (row_ok && sub == 0) local += y_ok ? contrib : nla_nan<acc_t>();

    if (P.gz != nullptr && row_ok) {
      const NAWGrad<acc_t> ng = naw_grad(r, ce, g, n, lam_over_b);
      scalar_t* gr = P.gz + row * static_cast<int64_t>(C);
      scalar_t* gfr = P.gzf + row * static_cast<int64_t>(C);
      const acc_t h = jsd ? one_m_lam * half * inv_b : one_m_lam * half;
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        const int j = e * lanes + sub;
        if (j < C) {
          acc_t v, vf;
          if (!jsd) {
            const acc_t p = nla_exp(z[e] - lse_z);
            const acc_t pf = nla_exp(zf[e] - lse_zf);
            const acc_t q = nla_exp((z[e] + zf[e]) * half - lse_u);
            v = ng.A * p + h * (p - q);
            vf = h * (pf - q);
          } else {
            const acc_t lp = z[e] - lse_z;
            const acc_t lpf = zf[e] - lse_zf;
            const acc_t lm = nla_logaddexp(lp, lpf) - ln2;
            const acc_t p = nla_exp(lp);
            const acc_t pf = nla_exp(lpf);
            v = ng.A * p + h * p * ((lp - lm) - S);
            vf = h * pf * ((lpf - lm) - Sf);
          }
          if (j == y) v += ng.Ey;
          if (j == k) v += ng.Ek;
          if (!y_ok) v = vf = nla_nan<acc_t>();
          store(gr + j, v);
          store(gfr + j, vf);
        }
      }
    }
  }

  if (P.partials != nullptr) {
    // fixed-order block reduction: butterfly inside each warp, then the warps in index order
    __shared__ acc_t warp_sums[kThreads / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) local += __shfl_xor_sync(kFullMask, local, off);
    if (lane == 0) warp_sums[warp] = local;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t s = 0;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
      if (gridDim.x == 1) {
        *P.loss = s;  // what the final sum of one partial would write
      } else {
        P.partials[blockIdx.x] = s;
      }
    }
  }
}

// One block: the partials summed in a fixed order in double; the loss is written in acc_t.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    nla_final_sum_kernel(const acc_t* __restrict__ partials, int n, acc_t* __restrict__ loss) {
  __shared__ double buf[kFinalThreads];
  double s = 0.0;
  for (int i = threadIdx.x; i < n; i += kFinalThreads) s += static_cast<double>(partials[i]);
  buf[threadIdx.x] = s;
  __syncthreads();
#pragma unroll
  for (int width = kFinalThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) buf[threadIdx.x] += buf[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<acc_t>(buf[0]);
}

// The NaN loss of an empty batch (mean over no rows), written on the stream.
template <typename acc_t>
__global__ void nla_nan_kernel(acc_t* loss) {
  *loss = nla_nan<acc_t>();
}

// a * g and b * g in one launch, g = *grad_output read from memory.
template <typename scalar_t, typename acc_t, typename go_t>
__global__ void nla_scale_kernel(const go_t* __restrict__ grad_output, const scalar_t* __restrict__ a,
                                 const scalar_t* __restrict__ b, scalar_t* __restrict__ out_a,
                                 scalar_t* __restrict__ out_b, int64_t na, int64_t nb) {
  const acc_t g = static_cast<acc_t>(*grad_output);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < na + nb; i += stride) {
    if (i < na) {
      store(out_a + i, load_acc<acc_t>(a + i) * g);
    } else {
      store(out_b + (i - na), load_acc<acc_t>(b + (i - na)) * g);
    }
  }
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename scalar_t, typename acc_t, int ELEMS>
void launch_rows(const RowParams<scalar_t, acc_t>& P, int lanes, int grid, cudaStream_t stream) {
  nla_rows_kernel<scalar_t, acc_t, ELEMS><<<grid, kThreads, 0, stream>>>(P, lanes);
}

template <typename scalar_t, typename acc_t>
const char* rows_typed(const CudaRowsArgs& a, cudaStream_t stream) {
  RowParams<scalar_t, acc_t> P;
  P.z = static_cast<const scalar_t*>(a.z);
  P.zf = static_cast<const scalar_t*>(a.zf);
  P.z_s0 = a.z_s0;
  P.z_s1 = a.z_s1;
  P.zf_s0 = a.zf_s0;
  P.zf_s1 = a.zf_s1;
  P.y = a.y;
  P.y_s0 = a.y_s0;
  P.y_is_int64 = a.y_is_int64;
  P.B = a.B;
  P.C = static_cast<int>(a.C);
  P.c = make_constants<acc_t>(a.constants);
  P.eps_ptr = static_cast<const acc_t*>(a.eps_ptr);
  P.eps_value = static_cast<acc_t>(a.eps_value);
  P.jsd = a.jsd;
  P.gz = static_cast<scalar_t*>(a.gz);
  P.gzf = static_cast<scalar_t*>(a.gzf);
  P.weights = static_cast<acc_t*>(a.weights);
  P.partials = static_cast<acc_t*>(a.partials);
  P.loss = static_cast<acc_t*>(a.loss);

  if (a.B == 0) {
    if (a.partials != nullptr) nla_nan_kernel<acc_t><<<1, 1, 0, stream>>>(static_cast<acc_t*>(a.loss));
    return last_error();
  }
  const int log2c = ceil_log2(a.C);
  const int grid = cuda_grid(a.B, a.C);
  if (log2c <= 5) {
    launch_rows<scalar_t, acc_t, 1>(P, 1 << log2c, grid, stream);
  } else {
    switch (log2c) {
      case 6: launch_rows<scalar_t, acc_t, 2>(P, 32, grid, stream); break;
      case 7: launch_rows<scalar_t, acc_t, 4>(P, 32, grid, stream); break;
      case 8: launch_rows<scalar_t, acc_t, 8>(P, 32, grid, stream); break;
      case 9: launch_rows<scalar_t, acc_t, 16>(P, 32, grid, stream); break;
      case 10: launch_rows<scalar_t, acc_t, 32>(P, 32, grid, stream); break;
      default: return "nla_fast: the CUDA kernels support C <= 1024 classes";
    }
  }
  if (const char* err = last_error()) return err;
  if (a.partials != nullptr && grid > 1) {
    nla_final_sum_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(P.partials, grid, static_cast<acc_t*>(a.loss));
  }
  return last_error();
}

template <typename scalar_t, typename acc_t>
const char* scale_typed(const void* go, bool go_double, const void* a, const void* b, void* oa, void* ob,
                        int64_t na, int64_t nb, cudaStream_t stream) {
  const int threads = 256;
  int64_t blocks = (na + nb + threads - 1) / threads;
  if (blocks > 8192) blocks = 8192;
  if (blocks < 1) return nullptr;
  const auto* pa = static_cast<const scalar_t*>(a);
  const auto* pb = static_cast<const scalar_t*>(b);
  auto* poa = static_cast<scalar_t*>(oa);
  auto* pob = static_cast<scalar_t*>(ob);
  if (go_double) {
    nla_scale_kernel<scalar_t, acc_t, double><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const double*>(go), pa, pb, poa, pob, na, nb);
  } else {
    nla_scale_kernel<scalar_t, acc_t, float><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const float*>(go), pa, pb, poa, pob, na, nb);
  }
  return last_error();
}

}  // namespace

const char* cuda_rows(const CudaRowsArgs& args, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::Float: return rows_typed<float, float>(args, s);
    case DType::Double: return rows_typed<double, double>(args, s);
    case DType::Half: return rows_typed<__half, float>(args, s);
    case DType::BFloat16: return rows_typed<__nv_bfloat16, float>(args, s);
  }
  return "nla_fast: unsupported dtype";
}

const char* cuda_scale(DType dtype, const void* grad_output, bool grad_output_is_double, const void* a,
                       const void* b, void* out_a, void* out_b, int64_t na, int64_t nb, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float: return scale_typed<float, float>(grad_output, grad_output_is_double, a, b, out_a, out_b, na, nb, s);
    case DType::Double:
      return scale_typed<double, double>(grad_output, grad_output_is_double, a, b, out_a, out_b, na, nb, s);
    case DType::Half: return scale_typed<__half, float>(grad_output, grad_output_is_double, a, b, out_a, out_b, na, nb, s);
    case DType::BFloat16:
      return scale_typed<__nv_bfloat16, float>(grad_output, grad_output_is_double, a, b, out_a, out_b, na, nb, s);
  }
  return "nla_fast: unsupported dtype";
}

}  // namespace nla_fast
