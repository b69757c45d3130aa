// NLA loss (SPEC 1.1): CUDA kernels and plain launchers for the operators of nla_loss.cpp.
//
// No torch header is included (fast nvcc builds); nla_loss.cpp allocates the tensors, takes the
// current stream (c10::cuda::getCurrentCUDAStream()) and calls cuda_rows / cuda_scale.
//
// Design (one sweep, each logit read once, each gradient written once; cuda_plan in nla_loss.h):
//   * C <= 32, the tile kernel: a block stages a tile of up to 4 x `threads` consecutive rows of
//     both logit tensors in shared memory (cuda_plan), as raw bytes: with 16-byte vector loads when the rows are
//     contiguous and the tile start is 16-byte aligned (every tile starts on a multiple of
//     64 rows x C x 2 bytes, so that is the base pointer's alignment), else element by element
//     through the strides. Then each thread takes its rows from shared memory into registers
//     (CMAX = next_pow2(C) values, unrolled) and runs nla_row (nla_loss.h, the CPU kernel's row
//     code), writing its gradients back over its own row in shared memory; the block then writes
//     both gradient tiles out with 16-byte stores. Targets and weights are one value per
//     thread, already coalesced.
//   * C > 32, the warp kernel: a warp per row, lane l holding columns l, l + 32, ... (coalesced);
//     rows up to 1024 columns stay in registers (ELEMS = 2..32 per lane), longer rows are
//     swept in chunks of 512 columns, one pass each for the maxima, the sums, the JSD sums and
//     the gradients (the re-reads come from L1/L2). Reductions are xor-butterflies: every lane
//     ends with bitwise the same max / sum / nearest negative.
//   * The loss is reduced deterministically: a fixed-order sum per block into partials[block]
//     (the grid is a fixed function of B, C and the dtype), then one block sums the partials in
//     a fixed order in double; with one block, that block's partial is the loss (one launch).
//     No floating-point atomics, nothing zero-filled beforehand.
//   * Maths in float for float/half/bfloat16 inputs, double for double. 64-bit row and element
//     offsets; any C.
//   * eps is read from device memory when given as a tensor (CUDA-graph safe), else a kernel arg.
//   * An out-of-range target never indexes memory (columns are only compared with it); its row
//     gives NaN.
#include "nla_loss.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nla_fast {
namespace {

constexpr int kFinalThreads = 256;  // the single block that sums the partials
constexpr int kWarpThreads = kCudaWarpThreads;
constexpr int kWarpsPerBlock = kWarpThreads / 32;
constexpr int kChunkElems = 16;  // per lane and chunk in the warp kernel for rows over 1024 columns
constexpr unsigned kFullMask = 0xffffffffu;

// ---- loads and stores in the accumulation type (explicit intrinsics: no implicit half conversions)
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float v) { return static_cast<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double v) { return static_cast<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half v) { return static_cast<acc_t>(__half2float(v)); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 v) { return static_cast<acc_t>(__bfloat162float(v)); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double v);
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename acc_t>
__device__ __forceinline__ acc_t read_eps(const void* ptr, bool is_double, acc_t value) {
  if (ptr == nullptr) return value;
  return is_double ? static_cast<acc_t>(*static_cast<const double*>(ptr))
                   : static_cast<acc_t>(*static_cast<const float*>(ptr));
}

__device__ __forceinline__ int64_t read_target(const void* y, int64_t i, int64_t s0, bool is_int64) {
  return is_int64 ? static_cast<const int64_t*>(y)[i * s0]
                  : static_cast<int64_t>(static_cast<const int32_t*>(y)[i * s0]);
}

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* z;
  const scalar_t* zf;  // nullptr: weights only
  int64_t z_s0, z_s1, zf_s0, zf_s1;
  bool z_contig, zf_contig;  // rows contiguous: (B, C) with strides (C, 1)
  const void* y;
  int64_t y_s0;
  bool y_is_int64;
  int64_t B;
  int64_t C;
  int rows_per_tile;  // tile kernel: rows staged per block and step (cuda_plan)
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

// Fixed-order block reduction of each thread's `local`, written to partials[blockIdx.x].
template <typename acc_t>
__device__ __forceinline__ void write_block_partial(acc_t local, acc_t* partials) {
  __shared__ acc_t warp_sums[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) local += __shfl_xor_sync(kFullMask, local, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s = 0;
    const int warps = static_cast<int>(blockDim.x) >> 5;
    for (int w = 0; w < warps; ++w) s += warp_sums[w];
    partials[blockIdx.x] = s;
  }
}

// ---------------------------------------------------------------- tile kernel (C <= 32)
// n elements of a tile of rows starting at row0 into raw shared memory (the tile's row-major
// layout, C per row).
template <typename scalar_t>
__device__ __forceinline__ void stage_tile(const scalar_t* base, int64_t s0, int64_t s1, bool contig, int64_t row0,
                                           int64_t C, int n, scalar_t* tile) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (contig) {
    const scalar_t* src = base + row0 * C;
    if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
      const int nv = n / kVec;
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      uint4* d4 = reinterpret_cast<uint4*>(tile);
      for (int v = threadIdx.x; v < nv; v += blockDim.x) d4[v] = __ldg(s4 + v);
      for (int e = nv * kVec + threadIdx.x; e < n; e += blockDim.x) tile[e] = src[e];
    } else {
      for (int e = threadIdx.x; e < n; e += blockDim.x) tile[e] = src[e];
    }
    return;
  }
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t r = e / C, col = e - r * C;
    tile[e] = base[(row0 + r) * s0 + col * s1];
  }
}

// n elements of a tile from shared memory to dst (contiguous), 16 bytes at a time when aligned.
template <typename scalar_t>
__device__ __forceinline__ void write_tile(const scalar_t* tile, int n, scalar_t* dst) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if ((reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
    const int nv = n / kVec;
    const uint4* s4 = reinterpret_cast<const uint4*>(tile);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int v = threadIdx.x; v < nv; v += blockDim.x) d4[v] = s4[v];
    for (int e = nv * kVec + threadIdx.x; e < n; e += blockDim.x) dst[e] = tile[e];
  } else {
    for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = tile[e];
  }
}

// Bytes of one staged tile, rounded up to 16 so the second tile starts aligned.
__host__ __device__ __forceinline__ int64_t tile_bytes(int64_t rows, int64_t C, int esize) {
  return (rows * C * esize + 15) / 16 * 16;
}

template <typename scalar_t, typename acc_t, int CMAX>
__global__ void __launch_bounds__(256) nla_tile_kernel(const Params<scalar_t, acc_t> P) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int rows_per_tile = P.rows_per_tile;
  scalar_t* tile_z = reinterpret_cast<scalar_t*>(smem);
  scalar_t* tile_zf =
      reinterpret_cast<scalar_t*>(smem + tile_bytes(rows_per_tile, P.C, static_cast<int>(sizeof(scalar_t))));
  const int64_t C = P.C;
  const bool has_flip = P.zf != nullptr;
  const bool want_grad = P.gz != nullptr;
  const acc_t eps = read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value);
  const RowConsts<acc_t> K = make_row_consts(P.c, eps, P.B, P.jsd, P.reg_mean);
  const int64_t num_tiles = (P.B + rows_per_tile - 1) / rows_per_tile;

  acc_t local = 0;  // this thread's share of the block's loss partial, in a fixed order
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t row0 = t * rows_per_tile;
    const int rows = static_cast<int>(P.B - row0 < rows_per_tile ? P.B - row0 : rows_per_tile);
    const int n = rows * static_cast<int>(C);
    __syncthreads();  // the previous tile is written out before its shared memory is reused
    stage_tile(P.z, P.z_s0, P.z_s1, P.z_contig, row0, C, n, tile_z);
    if (has_flip) stage_tile(P.zf, P.zf_s0, P.zf_s1, P.zf_contig, row0, C, n, tile_zf);
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
      const int64_t row = row0 + r;
      const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
      scalar_t* mine_z = tile_z + static_cast<int64_t>(r) * C;
      scalar_t* mine_zf = tile_zf + static_cast<int64_t>(r) * C;
      acc_t a_reg[CMAX], b_reg[CMAX];
#pragma unroll
      for (int j = 0; j < CMAX; ++j) {
        a_reg[j] = j < C ? to_acc<acc_t>(mine_z[j]) : static_cast<acc_t>(0);
        b_reg[j] = (has_flip && j < C) ? to_acc<acc_t>(mine_zf[j]) : a_reg[j];
      }
      const auto load = [&a_reg, &b_reg](int64_t j, acc_t& a, acc_t& b) {
        a = a_reg[j];
        b = b_reg[j];
      };
      // the row is in registers: its gradients overwrite it in shared memory
      const auto store = [mine_z, mine_zf](int64_t j, acc_t v, acc_t vf) {
        mine_z[j] = from_acc<scalar_t>(v);
        mine_zf[j] = from_acc<scalar_t>(vf);
      };
      acc_t w = 0;
      const acc_t contrib = nla_row<CMAX>(load, C, y, K, has_flip, want_grad, store, &w);
      if (P.weights != nullptr) P.weights[row] = w;
      local += contrib;
    }
    if (want_grad) {
      __syncthreads();
      write_tile(tile_z, n, P.gz + row0 * C);
      write_tile(tile_zf, n, P.gzf + row0 * C);
    }
  }
  if (P.partials != nullptr) write_block_partial(local, P.partials);
}

// ---------------------------------------------------------------- warp kernel (C > 32)
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = nla_max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// (value, index) of the nearest negative: larger value, first index among ties.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int64_t& idx) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_xor_sync(kFullMask, v, off);
    const int64_t oi = __shfl_xor_sync(kFullMask, idx, off);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// ELEMS values per lane per chunk of 32 * ELEMS columns; SINGLE: the row is one chunk (C <= 32 *
// ELEMS), loaded once and kept in registers; else every pass reloads its chunks.
template <typename scalar_t, typename acc_t, int ELEMS, bool SINGLE>
__global__ void __launch_bounds__(kWarpThreads) nla_warp_kernel(const Params<scalar_t, acc_t> P) {
  constexpr int64_t kChunk = 32 * ELEMS;
  const acc_t half = static_cast<acc_t>(0.5);
  const acc_t ln2 = static_cast<acc_t>(0.69314718055994530942);
  const acc_t one = static_cast<acc_t>(1);
  const acc_t zero = static_cast<acc_t>(0);
  const acc_t nan = nla_nan<acc_t>();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t C = P.C;
  const bool has_flip = P.zf != nullptr;
  const bool official = has_flip && !P.jsd;
  const acc_t eps = read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value);
  const RowConsts<acc_t> K = make_row_consts(P.c, eps, P.B, P.jsd, P.reg_mean);

  acc_t local = 0;  // lane 0's share of the block's loss partial
  // the loop bound is uniform over the warp, so every shuffle has all 32 lanes
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < P.B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
    const bool y_ok = y >= 0 && y < C;
    const scalar_t* zr = P.z + row * P.z_s0;
    const scalar_t* zfr = has_flip ? P.zf + row * P.zf_s0 : zr;
    const int64_t zfs = has_flip ? P.zf_s1 : P.z_s1;
    acc_t a[ELEMS], b[ELEMS];
    const auto load_chunk = [&](int64_t c0) {
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        const int64_t j = c0 + e * 32 + lane;
        const bool in = j < C;
        a[e] = in ? to_acc<acc_t>(zr[j * P.z_s1]) : -nla_inf<acc_t>();
        b[e] = (in && has_flip) ? to_acc<acc_t>(zfr[j * zfs]) : -nla_inf<acc_t>();
      }
    };
    if (SINGLE) load_chunk(0);

    // pass 1: maxima, z_y, nearest negative
    acc_t mz = -nla_inf<acc_t>(), mzf = -nla_inf<acc_t>(), mu = -nla_inf<acc_t>(), zy = 0;
    acc_t best = -nla_inf<acc_t>();
    int64_t k = INT64_MAX;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      if (!SINGLE) load_chunk(c0);
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        const int64_t j = c0 + e * 32 + lane;
        if (j < C) {
          mz = nla_max(mz, a[e]);
          mzf = nla_max(mzf, b[e]);
          if (official) mu = nla_max(mu, (a[e] + b[e]) * half);
          if (j == y) zy = a[e];
          if (j != y && (a[e] > best || (a[e] == best && j < k))) {
            best = a[e];
            k = j;
          }
        }
      }
    }
    mz = warp_max(mz);
    zy = warp_sum(zy);  // one lane holds z_y, the others 0
    warp_argmax(best, k);
    if (has_flip) mzf = warp_max(mzf);
    if (official) mu = warp_max(mu);

    // pass 2: sums of exponentials
    acc_t sz = 0, szf = 0, su = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      if (!SINGLE) load_chunk(c0);
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        if (c0 + e * 32 + lane < C) {
          sz += nla_exp(a[e] - mz);
          if (has_flip) szf += nla_exp(b[e] - mzf);
          if (official) su += nla_exp((a[e] + b[e]) * half - mu);
        }
      }
    }
    sz = warp_sum(sz);
    const acc_t lse_z = mz + nla_log(sz);
    const acc_t ce = lse_z - zy;
    const acc_t g = nla_exp(zy - lse_z);
    const acc_t n = nla_exp(best - lse_z);
    const NAW<acc_t> r = naw_weight(g, n, K.c, K.tc);
    if (P.weights != nullptr && lane == 0) P.weights[row] = y_ok ? r.w : nan;
    if (!has_flip) continue;  // weights only (uniform over the grid)

    szf = warp_sum(szf);
    const acc_t lse_zf = mzf + nla_log(szf);
    acc_t lse_u = 0, S = 0, Sf = 0;
    acc_t contrib = K.lam_over_b * (one + r.w) * ce;
    if (official) {
      su = warp_sum(su);
      lse_u = mu + nla_log(su);
      contrib += K.reg_scale * (half * (lse_z + lse_zf) - lse_u);
    } else {
      // pass 3 (JSD): sum p t and sum p' t', t = log p - log m, 0 where p = 0
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        if (!SINGLE) load_chunk(c0);
#pragma unroll
        for (int e = 0; e < ELEMS; ++e) {
          if (c0 + e * 32 + lane < C) {
            const acc_t lp = a[e] - lse_z, lpf = b[e] - lse_zf;
            const acc_t p = nla_exp(lp), pf = nla_exp(lpf);
            if (p > zero || pf > zero) {
              const acc_t lm = nla_log(p + pf) - ln2;  // log m, used only where it is finite
              if (p > zero) S += p * (lp - lm);
              if (pf > zero) Sf += pf * (lpf - lm);
            }
          }
        }
      }
      S = warp_sum(S);
      Sf = warp_sum(Sf);
      contrib += K.reg_scale * half * (S + Sf);
    }
    if (lane == 0) local += y_ok ? contrib : nan;

    if (P.gz != nullptr) {
      // pass 4: both gradients, written contiguous
      const NAWGrad<acc_t> ng = naw_grad(r, ce, g, n, K.lam_over_b);
      const acc_t h = K.reg_scale * half;
      scalar_t* gr = P.gz + row * C;
      scalar_t* gfr = P.gzf + row * C;
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        if (!SINGLE) load_chunk(c0);
#pragma unroll
        for (int e = 0; e < ELEMS; ++e) {
          const int64_t j = c0 + e * 32 + lane;
          if (j < C) {
            acc_t v, vf;
            if (official) {
              const acc_t p = nla_exp(a[e] - lse_z);
              const acc_t pf = nla_exp(b[e] - lse_zf);
              const acc_t q = nla_exp((a[e] + b[e]) * half - lse_u);
              v = ng.A * p + h * (p - q);
              vf = h * (pf - q);
            } else {
              const acc_t lp = a[e] - lse_z, lpf = b[e] - lse_zf;
              const acc_t p = nla_exp(lp), pf = nla_exp(lpf);
              const acc_t lm = (p > zero || pf > zero) ? nla_log(p + pf) - ln2 : zero;
              v = ng.A * p + (p > zero ? h * p * ((lp - lm) - S) : zero);
              vf = pf > zero ? h * pf * ((lpf - lm) - Sf) : zero;
            }
            if (j == y) v += ng.Ey;
            if (j == k) v += ng.Ek;
            if (!y_ok) v = vf = nan;
            gr[j] = from_acc<scalar_t>(v);
            gfr[j] = from_acc<scalar_t>(vf);
          }
        }
      }
    }
  }
  if (P.partials != nullptr) write_block_partial(local, P.partials);
}

// ---------------------------------------------------------------- reductions, scaling
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

// out_a = a * g and out_b = b * g in one launch, g = *grad_output read from memory. In place
// (out == in), g == 1 returns at once: the common loss.backward() moves no data.
template <typename scalar_t, typename acc_t, typename go_t>
__global__ void nla_scale_kernel(const go_t* __restrict__ grad_output, const scalar_t* a, const scalar_t* b,
                                 scalar_t* out_a, scalar_t* out_b, int64_t na, int64_t nb, bool in_place) {
  const acc_t g = static_cast<acc_t>(*grad_output);
  if (in_place && g == static_cast<acc_t>(1)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < na + nb; i += stride) {
    if (i < na) {
      out_a[i] = from_acc<scalar_t>(to_acc<acc_t>(a[i]) * g);
    } else {
      out_b[i - na] = from_acc<scalar_t>(to_acc<acc_t>(b[i - na]) * g);
    }
  }
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename scalar_t, typename acc_t, int CMAX>
void launch_tile(const Params<scalar_t, acc_t>& P, const CudaPlan& plan, cudaStream_t stream) {
  const int64_t smem = 2 * tile_bytes(plan.rows_per_block, P.C, static_cast<int>(sizeof(scalar_t)));
  nla_tile_kernel<scalar_t, acc_t, CMAX><<<plan.grid, plan.threads, static_cast<size_t>(smem), stream>>>(P);
}

template <typename scalar_t, typename acc_t, int ELEMS, bool SINGLE>
void launch_warp(const Params<scalar_t, acc_t>& P, const CudaPlan& plan, cudaStream_t stream) {
  nla_warp_kernel<scalar_t, acc_t, ELEMS, SINGLE><<<plan.grid, kWarpThreads, 0, stream>>>(P);
}

template <typename scalar_t>
bool rows_contiguous(int64_t B, int64_t C, int64_t s0, int64_t s1) {
  return (B <= 1 || s0 == C) && s1 == 1;
}

template <typename scalar_t, typename acc_t>
const char* rows_typed(const CudaRowsArgs& a, cudaStream_t stream) {
  Params<scalar_t, acc_t> P;
  P.z = static_cast<const scalar_t*>(a.z);
  P.zf = static_cast<const scalar_t*>(a.zf);
  P.z_s0 = a.z_s0;
  P.z_s1 = a.z_s1;
  P.zf_s0 = a.zf_s0;
  P.zf_s1 = a.zf_s1;
  P.z_contig = rows_contiguous<scalar_t>(a.B, a.C, a.z_s0, a.z_s1);
  P.zf_contig = a.zf != nullptr && rows_contiguous<scalar_t>(a.B, a.C, a.zf_s0, a.zf_s1);
  P.y = a.y;
  P.y_s0 = a.y_s0;
  P.y_is_int64 = a.y_is_int64;
  P.B = a.B;
  P.C = a.C;
  P.c = make_constants<acc_t>(a.constants);
  P.eps_ptr = a.eps_ptr;
  P.eps_is_double = a.eps_is_double;
  P.eps_value = static_cast<acc_t>(a.eps_value);
  P.jsd = a.jsd;
  P.reg_mean = a.reg_mean;
  P.gz = static_cast<scalar_t*>(a.gz);
  P.gzf = static_cast<scalar_t*>(a.gzf);
  P.weights = static_cast<acc_t*>(a.weights);
  P.partials = static_cast<acc_t*>(a.partials);

  if (a.B == 0) {
    if (a.partials != nullptr) nla_nan_kernel<acc_t><<<1, 1, 0, stream>>>(static_cast<acc_t*>(a.loss));
    return last_error();
  }
  const CudaPlan plan = cuda_plan(a.B, a.C, a.dtype);
  P.rows_per_tile = static_cast<int>(plan.rows_per_block);
  if (plan.tile) {
    const int log2c = ceil_log2(a.C);
    if (log2c <= 2) {
      launch_tile<scalar_t, acc_t, 4>(P, plan, stream);
    } else if (log2c == 3) {
      launch_tile<scalar_t, acc_t, 8>(P, plan, stream);
    } else if (log2c == 4) {
      launch_tile<scalar_t, acc_t, 16>(P, plan, stream);
    } else {
      launch_tile<scalar_t, acc_t, 32>(P, plan, stream);
    }
  } else {
    const int log2c = ceil_log2(a.C);
    switch (log2c) {
      case 6: launch_warp<scalar_t, acc_t, 2, true>(P, plan, stream); break;
      case 7: launch_warp<scalar_t, acc_t, 4, true>(P, plan, stream); break;
      case 8: launch_warp<scalar_t, acc_t, 8, true>(P, plan, stream); break;
      case 9: launch_warp<scalar_t, acc_t, 16, true>(P, plan, stream); break;
      case 10: launch_warp<scalar_t, acc_t, 32, true>(P, plan, stream); break;
      default: launch_warp<scalar_t, acc_t, kChunkElems, false>(P, plan, stream); break;  // C > 1024
    }
  }
  if (const char* err = last_error()) return err;
  if (a.partials != nullptr && plan.grid > 1) {
    nla_final_sum_kernel<acc_t>
        <<<1, kFinalThreads, 0, stream>>>(P.partials, plan.grid, static_cast<acc_t*>(a.loss));
  }
  return last_error();
}

template <typename scalar_t, typename acc_t>
const char* scale_typed(const void* go, bool go_double, const void* a, const void* b, void* oa, void* ob,
                        int64_t na, int64_t nb, cudaStream_t stream) {
  const int threads = 256;
  const bool in_place = a == oa && b == ob;
  // in place with grad_output == 1 every block only reads the scalar: keep that grid small
  const int64_t cap = in_place ? 1024 : 8192;
  int64_t blocks = (na + nb + threads - 1) / threads;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) return nullptr;
  const auto* pa = static_cast<const scalar_t*>(a);
  const auto* pb = static_cast<const scalar_t*>(b);
  auto* poa = static_cast<scalar_t*>(oa);
  auto* pob = static_cast<scalar_t*>(ob);
  if (go_double) {
    nla_scale_kernel<scalar_t, acc_t, double><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const double*>(go), pa, pb, poa, pob, na, nb, in_place);
  } else {
    nla_scale_kernel<scalar_t, acc_t, float><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const float*>(go), pa, pb, poa, pob, na, nb, in_place);
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
