// NLA loss (SPEC 1.1): CUDA kernels and plain launchers for the operators of nla_loss.cpp.
//
// No torch header is included (fast nvcc builds); nla_loss.cpp allocates the tensors, takes the
// current stream (c10::cuda::getCurrentCUDAStream()) and calls cuda_rows / cuda_scale.
//
// Design (one sweep, each logit read once, each gradient written once; which kernel, block and
// grid: cuda_launch_plan in nla_loss.h):
//   * C = 7 or 8 (float, half, bfloat16), the fixed-width tile kernel: a block of 128 threads
//     stages a tile of 128 consecutive rows of both logit tensors in shared memory with 16-byte
//     loads (when the rows are contiguous and the base 16-byte aligned, else element by element
//     through the strides), in the bank-conflict-free layout of tile_layout (nla_loss.h). Each
//     thread takes its row into registers and runs nla_row_fixed (the CPU runs the same code for
//     these widths), writes its gradients back over its row, and the block writes both gradient
//     tiles out with 16-byte stores. At most 64 registers a thread: 8 blocks (32 warps) per SM.
//     The consistency variant and whether gradients are wanted are template parameters, so a
//     kernel holds only the code it runs.
//   * other C <= 32, the generic tile kernel: the same staging (elements scattered into rows of an
//     odd number of words), nla_row (any width) reading its row from shared memory.
//   * C > 32, the warp kernel: a warp per row, lane l holding the 16-byte pieces l, l + 32, ... of
//     the row (vector loads and stores when C is a multiple of the piece), rows up to 1024
//     columns in registers; longer rows are swept in chunks by the chunked kernel. Reductions are
//     xor-butterflies: every lane ends with bitwise the same max / sum / nearest negative.
//   * The loss is reduced deterministically: a fixed-order sum per block into partials[block]
//     (the grid is a fixed function of B, C and the dtype), then one block sums the partials in
//     a fixed order in double; with one block, that block's partial is the loss (one launch).
//     No floating-point atomics, nothing zero-filled beforehand.
//   * Maths in float for float/half/bfloat16 inputs (MUFU exponentials of pre-scaled logits,
//     RowMath), double for double. 64-bit row and element offsets; any C.
//   * eps is read from device memory when given as a tensor (CUDA-graph safe), else a kernel arg.
//   * An out-of-range target never indexes memory; its row gives NaN.
#include "nla_loss.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace nla_fast {
namespace {

constexpr int kFinalThreads = 256;  // the single block that sums the partials
constexpr int kWarpsPerBlock = kCudaWarpThreads / 32;
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
__device__ __forceinline__ acc_t raw_elem(const Raw& raw, int i) {
  return to_acc<acc_t>(reinterpret_cast<const scalar_t*>(&raw)[i]);
}

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

// ---------------------------------------------------------------- fixed-width tile kernel (C = 7, 8)
// A tile of `rows` rows starting at row0 into shared memory (tile_layout), 16 bytes a thread at a
// time; the loop has a compile-time trip count (a full tile is 128 * R bytes, a multiple of 16).
template <typename scalar_t, int C>
__device__ __forceinline__ int tile_offset(int q) {  // shared-memory byte offset of the q-th 16-byte piece
  constexpr TileLayout L = tile_layout(C, sizeof(scalar_t));
  return L.stride == L.row_bytes ? q * 16 : (q / (L.row_bytes / 16)) * L.stride + (q % (L.row_bytes / 16)) * 16;
}

// FULL: a whole tile (no tail); else `rows` rows, whose bytes may end inside a 16-byte piece.
template <typename scalar_t, int C, bool FULL>
__device__ __forceinline__ void stage_fixed(const scalar_t* src, int rows, unsigned char* tile) {
  constexpr TileLayout L = tile_layout(C, sizeof(scalar_t));
  constexpr int kRows = kCudaTileThreads;
  constexpr int kIters = (kRows * L.row_bytes / 16 + kRows - 1) / kRows;
  const int nchunks = FULL ? kRows * L.row_bytes / 16 : rows * L.row_bytes / 16;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int q = static_cast<int>(threadIdx.x) + i * kRows;
    if (q < nchunks) {
      *reinterpret_cast<uint4*>(tile + tile_offset<scalar_t, C>(q)) = __ldcs(reinterpret_cast<const uint4*>(src) + q);
    }
  }
  if (!FULL && L.stride == L.row_bytes) {
    const int e = nchunks * (16 / static_cast<int>(sizeof(scalar_t))) + static_cast<int>(threadIdx.x);
    if (e < rows * C) reinterpret_cast<scalar_t*>(tile)[e] = src[e];
  }
}

// The gradients of `rows` rows from shared memory (tile_layout) to dst (contiguous, aligned).
template <typename scalar_t, int C, bool FULL>
__device__ __forceinline__ void write_fixed(const unsigned char* tile, int rows, scalar_t* dst) {
  constexpr TileLayout L = tile_layout(C, sizeof(scalar_t));
  constexpr int kRows = kCudaTileThreads;
  constexpr int kIters = (kRows * L.row_bytes / 16 + kRows - 1) / kRows;
  const int nchunks = FULL ? kRows * L.row_bytes / 16 : rows * L.row_bytes / 16;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int q = static_cast<int>(threadIdx.x) + i * kRows;
    if (q < nchunks) {
      __stcs(reinterpret_cast<uint4*>(dst) + q, *reinterpret_cast<const uint4*>(tile + tile_offset<scalar_t, C>(q)));
    }
  }
  if (!FULL && L.stride == L.row_bytes) {
    const int e = nchunks * (16 / static_cast<int>(sizeof(scalar_t))) + static_cast<int>(threadIdx.x);
    if (e < rows * C) dst[e] = reinterpret_cast<const scalar_t*>(tile)[e];
  }
}

// A thread's row from shared memory into registers, with VEC-byte loads.
template <typename scalar_t, int C, int VEC>
__device__ __forceinline__ void read_row(const unsigned char* p, float (&v)[C]) {
  constexpr int kPer = VEC / static_cast<int>(sizeof(scalar_t));  // elements per load
  using Raw = typename RawVec<VEC>::type;
#pragma unroll
  for (int i = 0; i < C / kPer; ++i) {
    const Raw raw = reinterpret_cast<const Raw*>(p)[i];
#pragma unroll
    for (int e = 0; e < kPer; ++e) v[i * kPer + e] = raw_elem<float, scalar_t>(raw, e);
  }
}

template <typename scalar_t, int C, int VEC>
__device__ __forceinline__ void write_row(unsigned char* p, const float (&v)[C]) {
  constexpr int kPer = VEC / static_cast<int>(sizeof(scalar_t));
  using Raw = typename RawVec<VEC>::type;
#pragma unroll
  for (int i = 0; i < C / kPer; ++i) {
    Raw raw;
    scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
    for (int k = 0; k < kPer; ++k) e[k] = from_acc<scalar_t>(v[i * kPer + k]);
    reinterpret_cast<Raw*>(p)[i] = raw;
  }
}

// One tile of the fixed-width kernel: stage, a row per thread, write the gradients out. FULL: a
// whole tile of 128 rows (every tile but a partial last one).
template <typename scalar_t, int C, Consistency MODE, bool GRAD, bool FULL>
__device__ __forceinline__ void fixed_tile(const Params<scalar_t, float>& P, const RowConsts<float>& K, int64_t t, int r,
                                           unsigned char* tile_z, unsigned char* tile_zf, float& local) {
  using acc_t = float;
  constexpr TileLayout L = tile_layout(C, sizeof(scalar_t));
  constexpr int kRows = kCudaTileThreads;
  constexpr bool kFlip = MODE != Consistency::None;
  const int64_t row0 = t * kRows;
  const int rows = FULL ? kRows : static_cast<int>(P.B - row0);
  const int64_t row = row0 + r;
  const int64_t y = (FULL || r < rows) ? read_target(P.y, row, P.y_s0, P.y_is_int64) : 0;
  __syncthreads();  // the previous tile is read and written out before its shared memory is reused
  stage_fixed<scalar_t, C, FULL>(P.z + row0 * C, rows, tile_z);
  if (kFlip) stage_fixed<scalar_t, C, FULL>(P.zf + row0 * C, rows, tile_zf);
  __syncthreads();
  if (FULL || r < rows) {
    unsigned char* const mine_z = tile_z + r * L.stride;
    unsigned char* const mine_zf = tile_zf + (kFlip ? r * L.stride : 0);
    acc_t a[C], b[C], w, gz[C], gzf[C];
    read_row<scalar_t, C, L.vec>(mine_z, a);
    if (kFlip) {
      read_row<scalar_t, C, L.vec>(mine_zf, b);
    } else {
#pragma unroll
      for (int j = 0; j < C; ++j) b[j] = a[j];
    }
    const bool y_ok = static_cast<uint64_t>(y) < static_cast<uint64_t>(C);
    const int yi = y_ok ? static_cast<int>(y) : 0;
    const acc_t zy = y_ok ? to_acc<acc_t>(reinterpret_cast<const scalar_t*>(mine_z)[yi]) : nla_nan<acc_t>();
    local += nla_row_fixed<C, MODE, GRAD>(a, b, yi, zy, K, w, gz, gzf);
    if (P.weights != nullptr) P.weights[row] = w;
    if (GRAD) {
      write_row<scalar_t, C, L.vec>(mine_z, gz);
      write_row<scalar_t, C, L.vec>(mine_zf, gzf);
    }
  }
  if (GRAD) {
    __syncthreads();
    write_fixed<scalar_t, C, FULL>(tile_z, rows, P.gz + row0 * C);
    write_fixed<scalar_t, C, FULL>(tile_zf, rows, P.gzf + row0 * C);
  }
}

template <typename scalar_t, int C, Consistency MODE, bool GRAD>
__global__ void __launch_bounds__(kCudaTileThreads, cuda_tile_min_blocks(MODE, GRAD))
    nla_tile_fixed_kernel(const Params<scalar_t, float> P) {
  using acc_t = float;
  constexpr TileLayout L = tile_layout(C, sizeof(scalar_t));
  constexpr int kRows = kCudaTileThreads;
  constexpr bool kFlip = MODE != Consistency::None;
  __shared__ __align__(16) unsigned char tile_z[kRows * L.stride];
  __shared__ __align__(16) unsigned char tile_zf[kFlip ? kRows * L.stride : 16];

  const acc_t eps = read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value);
  const RowConsts<acc_t> K = make_row_consts(P.c, eps, P.B, MODE == Consistency::Jsd, P.reg_mean);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // this thread's row in a tile: consecutive lanes take rows lane_rows apart (tile_layout)
  const int r = L.lane_rows == 1 ? static_cast<int>(threadIdx.x) : (warp >> 1) * 64 + 2 * lane + (warp & 1);
  const int64_t full_tiles = P.B / kRows;

  acc_t local = 0;  // this thread's share of the block's loss partial, in a fixed order
  int64_t t = blockIdx.x;
  for (; t < full_tiles; t += gridDim.x) fixed_tile<scalar_t, C, MODE, GRAD, true>(P, K, t, r, tile_z, tile_zf, local);
  // a partial last tile: the block whose grid-stride sequence reaches it, after its full tiles
  if (t * kRows < P.B) fixed_tile<scalar_t, C, MODE, GRAD, false>(P, K, t, r, tile_z, tile_zf, local);
  if (P.partials != nullptr) write_block_partial(local, P.partials);
}

// ---------------------------------------------------------------- generic tile kernel (other C <= 32)
// Rows of tile_generic_stride(C, esize) bytes; 16-byte global loads scattered element by element
// (the tile starts 16-byte aligned: rows_per_block * C * esize is a multiple of 16).
template <typename scalar_t>
__device__ __forceinline__ void stage_generic(const scalar_t* src, int rows, int C, int stride, unsigned char* tile) {
  constexpr int kEsize = sizeof(scalar_t);
  constexpr int kPer = 16 / kEsize;
  const int n = rows * C;
  const int nvec = n / kPer;
  for (int q = threadIdx.x; q < nvec; q += blockDim.x) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(src) + q);
    int r = q * kPer / C, col = q * kPer - r * C;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      *reinterpret_cast<scalar_t*>(tile + r * stride + col * kEsize) = reinterpret_cast<const scalar_t*>(&raw)[i];
      if (++col == C) {
        col = 0;
        ++r;
      }
    }
  }
  for (int e = nvec * kPer + threadIdx.x; e < n; e += blockDim.x) {
    const int r = e / C, col = e - r * C;
    *reinterpret_cast<scalar_t*>(tile + r * stride + col * kEsize) = src[e];
  }
}

template <typename scalar_t>
__device__ __forceinline__ void write_generic(const unsigned char* tile, int rows, int C, int stride, scalar_t* dst) {
  constexpr int kEsize = sizeof(scalar_t);
  constexpr int kPer = 16 / kEsize;
  const int n = rows * C;
  const int nvec = n / kPer;
  for (int q = threadIdx.x; q < nvec; q += blockDim.x) {
    uint4 raw;
    int r = q * kPer / C, col = q * kPer - r * C;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      reinterpret_cast<scalar_t*>(&raw)[i] = *reinterpret_cast<const scalar_t*>(tile + r * stride + col * kEsize);
      if (++col == C) {
        col = 0;
        ++r;
      }
    }
    __stcs(reinterpret_cast<uint4*>(dst) + q, raw);
  }
  for (int e = nvec * kPer + threadIdx.x; e < n; e += blockDim.x) {
    const int r = e / C, col = e - r * C;
    dst[e] = *reinterpret_cast<const scalar_t*>(tile + r * stride + col * kEsize);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kCudaTileThreads, sizeof(scalar_t) == 8 ? 2 : kCudaTileMinBlocks)
    nla_tile_generic_kernel(const Params<scalar_t, typename AccOf<scalar_t>::type> P) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int kEsize = sizeof(scalar_t);
  extern __shared__ __align__(16) unsigned char smem[];
  const int rows_per_tile = blockDim.x;
  const int C = static_cast<int>(P.C);
  const int stride = tile_generic_stride(C, kEsize);
  unsigned char* const tile_z = smem;
  unsigned char* const tile_zf = smem + rows_per_tile * stride;
  const bool has_flip = P.zf != nullptr;
  const bool want_grad = P.gz != nullptr;
  const acc_t eps = read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value);
  const RowConsts<acc_t> K = make_row_consts(P.c, eps, P.B, P.jsd, P.reg_mean);
  const int64_t num_tiles = (P.B + rows_per_tile - 1) / rows_per_tile;
  const int r = threadIdx.x;
  unsigned char* const mine_z = tile_z + r * stride;
  unsigned char* const mine_zf = tile_zf + r * stride;

  acc_t local = 0;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t row0 = t * rows_per_tile;
    const int rows = P.B - row0 < rows_per_tile ? static_cast<int>(P.B - row0) : rows_per_tile;
    const int64_t row = row0 + r;
    const int64_t y = r < rows ? read_target(P.y, row, P.y_s0, P.y_is_int64) : 0;
    __syncthreads();
    stage_generic(P.z + row0 * C, rows, C, stride, tile_z);
    if (has_flip) stage_generic(P.zf + row0 * C, rows, C, stride, tile_zf);
    __syncthreads();
    if (r < rows) {
      const auto load = [mine_z, mine_zf, has_flip](int64_t j, acc_t& a, acc_t& b) {
        a = to_acc<acc_t>(reinterpret_cast<const scalar_t*>(mine_z)[j]);
        b = has_flip ? to_acc<acc_t>(reinterpret_cast<const scalar_t*>(mine_zf)[j]) : a;
      };
      // the gradient pass reads column j before it writes it: the row is overwritten in place
      const auto store = [mine_z, mine_zf](int64_t j, acc_t v, acc_t vf) {
        reinterpret_cast<scalar_t*>(mine_z)[j] = from_acc<scalar_t>(v);
        reinterpret_cast<scalar_t*>(mine_zf)[j] = from_acc<scalar_t>(vf);
      };
      acc_t w = 0;
      local += nla_row<kCudaTileMaxC>(load, P.C, y, K, has_flip, want_grad, store, &w);
      if (P.weights != nullptr) P.weights[row] = w;
    }
    if (want_grad) {
      __syncthreads();
      write_generic(tile_z, rows, C, stride, P.gz + row0 * C);
      write_generic(tile_zf, rows, C, stride, P.gzf + row0 * C);
    }
  }
  if (P.partials != nullptr) write_block_partial(local, P.partials);
}

// ---------------------------------------------------------------- warp kernels (C > 32)
// A warp per row, nothing held per column. Sweep 1 reads the row once from DRAM: each lane folds
// its columns, a group at a time, into running statistics (maxima, sums of exponentials rescaled
// once per group: online softmax; the nearest-negative candidate). The warp combines the lanes'
// statistics with xor-butterflies (every lane ends with bitwise the same row statistics). Sweep 2
// re-reads the row (from L1 / L2: it was just read) and writes both gradients; JSD needs a sweep
// more (its sums of p t) before that one. So a thread keeps a few running values instead of the
// row: at most 64 registers, 32 resident warps per SM.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = RowMath<T>::max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// (value, index) of the nearest negative: larger value, first index among ties.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int& idx) {
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

  __device__ __forceinline__ static acc_t shift_of(acc_t max) { return M::max(max * kScale, kLowest); }
  __device__ __forceinline__ void init() {
    m = -nla_inf<acc_t>();
    h = kLowest;
    s = 0;
  }
  // the running maximum, raised to at least `bound` (an upper bound on the group about to be added):
  // one rescale per group
  __device__ __forceinline__ void rescale(acc_t bound) {
    m = M::max(m, bound);
    const acc_t shift = shift_of(m);
    s *= M::exp_scaled(h - shift);
    h = shift;
  }
  __device__ __forceinline__ void add(acc_t x) { s += M::exp_scaled(M::fma(x, kScale, -h)); }
  __device__ __forceinline__ void reduce_warp() {
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
__device__ __forceinline__ void lane_fold(LaneStats<acc_t>& st, const acc_t (&a)[N], const acc_t (&b)[N],
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
__device__ __forceinline__ void share_row_consts(const Constants<acc_t>& c, acc_t eps, int64_t B, bool jsd,
                                                 bool reg_mean, SharedRowConsts<acc_t>* out) {
  if (threadIdx.x == 0) {
    const RowConsts<acc_t> K = make_row_consts(c, eps, B, jsd, reg_mean);
    out->tc = K.tc;
    out->lam_over_b = K.lam_over_b;
    out->reg_scale = K.reg_scale;
  }
  __syncthreads();
}

template <typename acc_t>
__device__ __forceinline__ RowConsts<acc_t> row_consts(const Constants<acc_t>& c,
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

  __device__ __forceinline__ void operator()(acc_t a, acc_t b, acc_t& v, acc_t& vf) const {
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

// One row on one warp, the loop body of both warp kernels. `row` sweeps the row's columns in groups
// (row.read(f): f(a, b, col) per group, b = a without flipped logits; row.write(g): the gradients
// g(a, b, v, vf) of every column written), numbers them its own way (row.number(j), row.column(n)),
// says which lane wrote column j (row.owns(j)) and reads and writes single columns (row.zf_at(j),
// row.store_gz(j, v)). The target's and the nearest negative's extra terms (Ey, Ek) are added by the
// lane that wrote their columns, after the sweep: no per-column test for them in the sweep.
// Returns the row's share of the loss (lane-uniform); its weight in w.
template <Consistency MODE, typename acc_t, typename Row>
__device__ __forceinline__ acc_t warp_row(const Row& row, int64_t y, acc_t zy, const Constants<acc_t>& c,
                                          const volatile SharedRowConsts<acc_t>* shared, bool want_grad, acc_t& w) {
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
  w = h.naw.w;
  if (!kFlip) return static_cast<acc_t>(0);
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
        jsd_accumulate(a[e], b[e], exp_shifted(a[e], grad.mz_s) * h.inv_sz, exp_shifted(b[e], grad.mzf_s) * grad.jh.inv_szf,
                       h.lse_z, grad.jh.lse_zf, S, Sf);
      }
    });
    grad.S = warp_sum(S);
    grad.Sf = warp_sum(Sf);
    grad.jc = jsd_coef(s, h, K, grad.S, grad.Sf, want_grad);
    contrib = grad.jc.contrib;
    Ey = grad.jc.Ey;
    Ek = grad.jc.Ek;
  }
  if (want_grad) {
    row.write(grad);
    // the lane that wrote column y (k) writes it again with Ey (Ek) added: program order on one thread
    if (y_ok && row.owns(static_cast<int>(y))) {
      acc_t v, vf;
      grad(zy, row.zf_at(static_cast<int>(y)), v, vf);
      row.store_gz(static_cast<int>(y), v + Ey);
    }
    if (st.k != INT32_MAX && row.owns(st.k)) {
      acc_t v, vf;
      grad(st.best, row.zf_at(st.k), v, vf);
      row.store_gz(st.k, v + Ek);
    }
  }
  return contrib;
}

// Loads of a row: sweeps before the last keep the row in L1 for the next one; the last streams.
template <bool LAST, typename Raw>
__device__ __forceinline__ Raw load_piece(const Raw* p) {
  return LAST ? __ldcs(p) : __ldg(p);
}
template <bool LAST, typename scalar_t>
__device__ __forceinline__ scalar_t load_elem(const scalar_t* p) {
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
__device__ __forceinline__ float piece_elem(const Raw& raw, int e) {
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
  const scalar_t* z;  // the row
  const scalar_t* zf;
  scalar_t* gz;
  scalar_t* gzf;
  int first;  // the lane's first column, lane * V
  int C;

  __device__ __forceinline__ int number(int j) const { return j - first; }
  __device__ __forceinline__ int column(int n) const { return n + first; }
  __device__ __forceinline__ bool owns(int j) const { return (j / V) % 32 == first / V; }
  __device__ __forceinline__ acc_t zf_at(int j) const { return to_acc<acc_t>(zf[j]); }
  __device__ __forceinline__ void store_gz(int j, acc_t v) const { gz[j] = from_acc<scalar_t>(v); }
  __device__ __forceinline__ int whole_steps() const { return C / (32 * V * S); }
  __device__ __forceinline__ bool inside(int p) const { return first + 32 * V * p < C; }

  template <bool FLIP>
  __device__ __forceinline__ static void unpack(const Raw& ra, const Raw& rb, acc_t (&a)[V], acc_t (&b)[V]) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      a[e] = piece_elem<scalar_t>(ra, e);
      b[e] = FLIP ? piece_elem<scalar_t>(rb, e) : a[e];
    }
  }

  // pieces p0 .. p0 + COUNT - 1 of z (and z' when FLIP), their loads issued together; MASKED: those
  // past the row's end read as -inf (and are not loaded)
  template <int COUNT, bool FLIP, bool LAST, bool MASKED>
  __device__ __forceinline__ void load_pieces(int p0, Raw (&ra)[COUNT], Raw (&rb)[COUNT]) const {
    const Raw* pz = reinterpret_cast<const Raw*>(z + first) + 32 * p0;
    const Raw* pzf = reinterpret_cast<const Raw*>((FLIP ? zf : z) + first) + 32 * p0;
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
  __device__ __forceinline__ void read_step(int p0, const F& f) const {
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
  __device__ __forceinline__ void read(const F& f) const {
    const int steps = whole_steps();
#pragma unroll 1
    for (int i = 0; i < steps; ++i) read_step<false, FLIP, LAST>(i * S, f);
    if (steps * S * 32 * V < C) read_step<true, FLIP, LAST>(steps * S, f);
  }

  template <bool MASKED, typename G>
  __device__ __forceinline__ void write_step(int p0, const G& grad) const {
    Raw* qz = reinterpret_cast<Raw*>(gz + first) + 32 * p0;
    Raw* qzf = reinterpret_cast<Raw*>(gzf + first) + 32 * p0;
    Raw ra[S], rb[S];
    load_pieces<S, true, true, MASKED>(p0, ra, rb);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      acc_t a[V], b[V];
      unpack<true>(ra[s], rb[s], a, b);
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
  __device__ __forceinline__ void write(const G& grad) const {
    const int steps = whole_steps();
#pragma unroll 1
    for (int i = 0; i < steps; ++i) write_step<false>(i * S, grad);
    if (steps * S * 32 * V < C) write_step<true>(steps * S, grad);
  }
};

// A warp per row in 16-byte pieces (MODE: the consistency variant, as template so the kernel holds
// only its own code; gradients when P.gz is set). Rows of up to 32 * ELEMS columns.
template <typename scalar_t, int ELEMS, Consistency MODE>
__global__ void __launch_bounds__(kCudaWarpThreads, cuda_warp_min_blocks(MODE))
    nla_warp_kernel(const Params<scalar_t, float> P) {
  using acc_t = float;
  using Row = PieceRow<scalar_t, ELEMS, MODE>;
  constexpr bool kFlip = MODE != Consistency::None;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int C = static_cast<int>(P.C);
  const bool want_grad = P.gz != nullptr;
  __shared__ SharedRowConsts<acc_t> shared;
  share_row_consts(P.c, read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value), P.B, MODE == Consistency::Jsd,
                   P.reg_mean, &shared);

  acc_t local = 0;  // lane 0's share of the block's loss partial
  // the loop bound is uniform over the warp, so every shuffle has all 32 lanes
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < P.B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
    const int64_t at = row * C;
    const Row r{P.z + at, kFlip ? P.zf + at : nullptr, want_grad ? P.gz + at : nullptr,
                want_grad ? P.gzf + at : nullptr, lane * Row::V, C};
    const acc_t zy = (y >= 0 && y < C) ? to_acc<acc_t>(P.z[at + y]) : nla_nan<acc_t>();
    acc_t w;
    const acc_t contrib = warp_row<MODE>(r, y, zy, P.c, &shared, want_grad, w);
    if (lane == 0) {
      local += contrib;
      if (P.weights != nullptr) P.weights[row] = w;
    }
  }
  if (P.partials != nullptr) write_block_partial(local, P.partials);
}

// Columns of a row of any width, read element by element: lane l takes columns c + l + 32 e of a
// group (e < G = kCudaChunkColumns, increasing), groups c = 0, 32 G, ...: the whole groups in a
// loop (floor(C / 32 G) of them, no bounds test), the last partial one after it (columns past C
// read as -inf, never stored). Columns are numbered as they are.
template <typename scalar_t>
struct ColumnRow {
  using acc_t = typename AccOf<scalar_t>::type;
  static constexpr int G = kCudaChunkColumns;
  const scalar_t* z;  // the row
  const scalar_t* zf;
  scalar_t* gz;
  scalar_t* gzf;
  int lane;
  int C;

  __device__ __forceinline__ int number(int j) const { return j; }
  __device__ __forceinline__ int column(int n) const { return n; }
  __device__ __forceinline__ bool owns(int j) const { return j % 32 == lane; }
  __device__ __forceinline__ acc_t zf_at(int j) const { return to_acc<acc_t>(zf[j]); }
  __device__ __forceinline__ void store_gz(int j, acc_t v) const { gz[j] = from_acc<scalar_t>(v); }

  template <bool FLIP, bool LAST, bool FULL>
  __device__ __forceinline__ void group(int c, acc_t (&a)[G], acc_t (&b)[G]) const {
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int j = c + lane + 32 * e;
      a[e] = b[e] = -nla_inf<acc_t>();
      if (FULL || j < C) {
        a[e] = to_acc<acc_t>(load_elem<LAST>(z + j));
        b[e] = FLIP ? to_acc<acc_t>(load_elem<LAST>(zf + j)) : a[e];
      }
    }
  }

  template <bool FLIP, bool LAST, typename F>
  __device__ __forceinline__ void read(const F& f) const {
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
  __device__ __forceinline__ void write_group(int c, const Grad& grad) const {
    acc_t a[G], b[G];
    group<true, true, FULL>(c, a, b);
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int j = c + lane + 32 * e;
      acc_t v, vf;
      grad(a[e], b[e], v, vf);
      if (FULL || j < C) {
        gz[j] = from_acc<scalar_t>(v);
        gzf[j] = from_acc<scalar_t>(vf);
      }
    }
  }

  template <typename Grad>
  __device__ __forceinline__ void write(const Grad& grad) const {
    int c = 0;
#pragma unroll 1
    for (; c + 32 * G <= C; c += 32 * G) write_group<true>(c, grad);
    if (c < C) write_group<false>(c, grad);
  }
};

// A warp per row of any width and dtype, element by element (rows that are not whole 16-byte
// pieces, longer than 1024 columns, or double). The consistency variant is read at run time.
template <typename scalar_t>
__global__ void __launch_bounds__(kCudaWarpThreads, sizeof(scalar_t) == 8 ? 2 : kCudaWarpMinBlocks)
    nla_warp_chunked_kernel(const Params<scalar_t, typename AccOf<scalar_t>::type> P) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int C = static_cast<int>(P.C);
  const bool has_flip = P.zf != nullptr;
  const bool want_grad = P.gz != nullptr;
  __shared__ SharedRowConsts<acc_t> shared;
  share_row_consts(P.c, read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value), P.B, P.jsd, P.reg_mean, &shared);

  acc_t local = 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < P.B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
    const ColumnRow<scalar_t> r{P.z + row * C, has_flip ? P.zf + row * C : nullptr,
                                want_grad ? P.gz + row * C : nullptr, want_grad ? P.gzf + row * C : nullptr, lane, C};
    const acc_t zy = (y >= 0 && y < C) ? to_acc<acc_t>(P.z[row * C + y]) : nla_nan<acc_t>();
    acc_t w, contrib;
    if (!has_flip) {
      contrib = warp_row<Consistency::None>(r, y, zy, P.c, &shared, false, w);
    } else if (!P.jsd) {
      contrib = warp_row<Consistency::Official>(r, y, zy, P.c, &shared, want_grad, w);
    } else {
      contrib = warp_row<Consistency::Jsd>(r, y, zy, P.c, &shared, want_grad, w);
    }
    if (lane == 0) {
      local += contrib;
      if (P.weights != nullptr) P.weights[row] = w;
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

template <typename scalar_t, int C, Consistency MODE, bool GRAD>
void launch_fixed(const Params<scalar_t, float>& P, const CudaPlan& plan, cudaStream_t stream) {
  nla_tile_fixed_kernel<scalar_t, C, MODE, GRAD><<<plan.grid, plan.threads, 0, stream>>>(P);
}

// The fixed-width kernel's instantiation: width C, the consistency variant, gradients or not.
template <typename scalar_t, int C>
void launch_fixed_mode(const Params<scalar_t, float>& P, const CudaPlan& plan, cudaStream_t stream) {
  if (P.zf == nullptr) {
    launch_fixed<scalar_t, C, Consistency::None, false>(P, plan, stream);
  } else if (!P.jsd) {
    if (P.gz != nullptr) {
      launch_fixed<scalar_t, C, Consistency::Official, true>(P, plan, stream);
    } else {
      launch_fixed<scalar_t, C, Consistency::Official, false>(P, plan, stream);
    }
  } else if (P.gz != nullptr) {
    launch_fixed<scalar_t, C, Consistency::Jsd, true>(P, plan, stream);
  } else {
    launch_fixed<scalar_t, C, Consistency::Jsd, false>(P, plan, stream);
  }
}

template <typename scalar_t, int ELEMS>
void launch_warp_mode(const Params<scalar_t, float>& P, const CudaPlan& plan, cudaStream_t stream) {
  if (P.zf == nullptr) {
    nla_warp_kernel<scalar_t, ELEMS, Consistency::None><<<plan.grid, plan.threads, 0, stream>>>(P);
  } else if (!P.jsd) {
    nla_warp_kernel<scalar_t, ELEMS, Consistency::Official><<<plan.grid, plan.threads, 0, stream>>>(P);
  } else {
    nla_warp_kernel<scalar_t, ELEMS, Consistency::Jsd><<<plan.grid, plan.threads, 0, stream>>>(P);
  }
}

template <typename scalar_t, typename acc_t>
void launch_plan(const Params<scalar_t, acc_t>& P, const CudaPlan& plan, cudaStream_t stream) {
  switch (plan.kernel) {
    case CudaKernel::TileFixed:
      if constexpr (sizeof(scalar_t) <= 4) {
        if (plan.width == 7) {
          launch_fixed_mode<scalar_t, 7>(P, plan, stream);
        } else {
          launch_fixed_mode<scalar_t, 8>(P, plan, stream);
        }
      }
      break;
    case CudaKernel::TileGeneric:
      nla_tile_generic_kernel<scalar_t><<<plan.grid, plan.threads, plan.smem_bytes, stream>>>(P);
      break;
    case CudaKernel::WarpRow:
      if constexpr (sizeof(scalar_t) <= 4) {
        switch (plan.width) {
          case 2: launch_warp_mode<scalar_t, 2>(P, plan, stream); break;
          case 4: launch_warp_mode<scalar_t, 4>(P, plan, stream); break;
          case 8: launch_warp_mode<scalar_t, 8>(P, plan, stream); break;
          case 16: launch_warp_mode<scalar_t, 16>(P, plan, stream); break;
          default: launch_warp_mode<scalar_t, 32>(P, plan, stream); break;
        }
      }
      break;
    case CudaKernel::WarpChunked:
      nla_warp_chunked_kernel<scalar_t><<<plan.grid, plan.threads, 0, stream>>>(P);
      break;
  }
}

template <typename scalar_t, typename acc_t>
const char* rows_typed(const CudaRowsArgs& a, cudaStream_t stream) {
  Params<scalar_t, acc_t> P;
  P.z = static_cast<const scalar_t*>(a.z);
  P.zf = static_cast<const scalar_t*>(a.zf);
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
  const CudaPlan plan = cuda_launch_plan(a.B, a.C, a.dtype);
  launch_plan(P, plan, stream);
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
