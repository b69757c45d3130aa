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

// Hides a raw piece's value from the compiler: what was derived from it before (converted values,
// exponentials) is recomputed after, not kept alive in registers across a pass of a long row.
__device__ __forceinline__ void opaque(uint4& r) { asm volatile("" : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)); }
__device__ __forceinline__ void opaque(uint2& r) { asm volatile("" : "+r"(r.x), "+r"(r.y)); }
__device__ __forceinline__ void opaque(unsigned int& r) { asm volatile("" : "+r"(r)); }

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

// Pass 1's per-lane state of a warp row: maxima and the nearest-negative candidate.
template <typename acc_t>
struct LaneMax {
  acc_t mz, mzf, ms, best;
  int k;
};

template <typename acc_t>
__device__ __forceinline__ void lane_max_add(LaneMax<acc_t>& m, acc_t a, acc_t b, int j, int64_t y, bool has_flip,
                                             bool official) {
  using M = RowMath<acc_t>;
  m.mz = M::max(m.mz, a);
  if (has_flip) m.mzf = M::max(m.mzf, b);
  if (official) m.ms = M::max(m.ms, a + b);
  if (j != y && a > m.best) {  // columns come in increasing order per lane: the first index wins ties
    m.best = a;
    m.k = j;
  }
}

// The row's statistics from every lane's maxima and exponential sums (lane-uniform results).
template <typename acc_t>
__device__ __forceinline__ void warp_reduce_max(LaneMax<acc_t>& m, bool has_flip, bool official) {
  m.mz = warp_max(m.mz);
  if (has_flip) m.mzf = warp_max(m.mzf);
  if (official) m.ms = warp_max(m.ms);
  warp_argmax(m.best, m.k);
}

// Pieces of a warp row: V = min(16 / esize, ELEMS) consecutive columns, lane l holding pieces
// l, l + 32, ... (ELEMS / V of them, C <= 32 * ELEMS). cuda_launch_plan takes this kernel only when
// C is a multiple of V, so every piece is one aligned vector load and store.
template <typename scalar_t, int ELEMS>
struct WarpPieces {
  static constexpr int kEsize = sizeof(scalar_t);
  static constexpr int V = cuda_warp_piece(ELEMS, kEsize);
  static constexpr int NV = ELEMS / V;
  using Raw = typename RawVec<V * kEsize>::type;
};

// A warp per row held in registers (MODE: the consistency variant, as template so the kernel
// holds only its own code; gradients when P.gz is set).
template <typename scalar_t, int ELEMS, Consistency MODE>
__global__ void __launch_bounds__(kCudaWarpThreads, cuda_warp_min_blocks(ELEMS, MODE))
    nla_warp_kernel(const Params<scalar_t, float> P) {
  using acc_t = float;
  using M = RowMath<acc_t>;
  using W = WarpPieces<scalar_t, ELEMS>;
  constexpr int V = W::V, NV = W::NV;
  using Raw = typename W::Raw;
  constexpr bool kFlip = MODE != Consistency::None;
  constexpr bool kOfficial = MODE == Consistency::Official;
  // long rows recompute per pass what shorter ones keep in registers (ELEMS = 32 would spill)
  constexpr bool kLong = ELEMS > 16;
  const auto forget = [](Raw (&x)[NV], Raw (&y)[NV]) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      opaque(x[i]);
      opaque(y[i]);
    }
  };
  const acc_t ninf = -nla_inf<acc_t>();
  Raw ninf_piece;
#pragma unroll
  for (int e = 0; e < V; ++e) reinterpret_cast<scalar_t*>(&ninf_piece)[e] = from_acc<scalar_t>(ninf);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int C = static_cast<int>(P.C);
  const bool want_grad = P.gz != nullptr;
  const acc_t eps = read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value);
  const RowConsts<acc_t> K = make_row_consts(P.c, eps, P.B, MODE == Consistency::Jsd, P.reg_mean);

  acc_t local = 0;  // lane 0's share of the block's loss partial
  // the loop bound is uniform over the warp, so every shuffle has all 32 lanes
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < P.B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
    const bool y_ok = y >= 0 && y < C;
    const scalar_t* zr = P.z + row * C;
    const scalar_t* zfr = kFlip ? P.zf + row * C : zr;
    // the row into registers as loaded (half / bfloat16 stay packed, two to a register), converted
    // on each use; pieces past C hold -inf (they add nothing and are never the nearest negative)
    Raw ra[NV], rb[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col0 = (lane + 32 * i) * V;
      ra[i] = rb[i] = ninf_piece;
      if (col0 < C) {
        ra[i] = __ldcs(reinterpret_cast<const Raw*>(zr + col0));
        if (kFlip) rb[i] = __ldcs(reinterpret_cast<const Raw*>(zfr + col0));
      }
    }
    const auto a = [&ra](int e) { return raw_elem<acc_t, scalar_t>(ra[e / V], e % V); };
    const auto b = [&rb](int e) { return raw_elem<acc_t, scalar_t>(rb[e / V], e % V); };
    RowStats<acc_t> s;
    s.zy = y_ok ? to_acc<acc_t>(zr[y]) : nla_nan<acc_t>();
    // pass 1: maxima and the nearest negative
    // column indices relative to the lane's first column, rel(e) = 32 V (e / V) + e % V, compile-time
    // constants: no per-column index registers (they would be hoisted out of the row loop)
    const auto rel = [](int e) { return 32 * V * (e / V) + e % V; };
    const int y_rel = y_ok ? static_cast<int>(y) - lane * V : -1;  // -1: matches no column (rel >= 0)
    LaneMax<acc_t> m{ninf, ninf, ninf, ninf, INT32_MAX};
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) lane_max_add(m, a(e), b(e), rel(e), y_rel, kFlip, kOfficial);
    if (m.k != INT32_MAX) m.k += lane * V;
    warp_reduce_max(m, kFlip, kOfficial);
    const int k_rel = m.k - lane * V;
    s.mz = m.mz;
    s.mzf = m.mzf;
    s.ms = m.ms;
    s.best = m.best;
    // pass 2: sums of exponentials
    const acc_t mz_s = s.mz * M::kScale;
    const acc_t mzf_s = s.mzf * M::kScale;
    const acc_t ms_s = s.ms * (M::kScale * 0.5f);
    s.sz = s.szf = s.su = 0;
    if (kLong) forget(ra, rb);
#pragma unroll
    for (int e = 0; e < ELEMS; ++e) {
      s.sz += exp_shifted(a(e), mz_s);
      if (kFlip) s.szf += exp_shifted(b(e), mzf_s);
      if (kOfficial) s.su += exp_shifted<acc_t, true>(a(e) + b(e), ms_s);
    }
    s.sz = warp_sum(s.sz);
    if (kFlip) s.szf = warp_sum(s.szf);
    if (kOfficial) s.su = warp_sum(s.su);
    const RowHead<acc_t> h = row_head(s, K);
    if (P.weights != nullptr && lane == 0) P.weights[row] = h.naw.w;
    if (!kFlip) continue;

    OfficialCoef<acc_t> oc{};
    JsdCoef<acc_t> jc{};
    JsdHead<acc_t> jh{};
    acc_t S = 0, Sf = 0;
    if (kOfficial) {
      oc = official_coef(s, h, K, want_grad);
      if (lane == 0) local += oc.contrib;
    } else {
      // pass 3 (JSD): sum p t and sum p' t' (padding columns have p = p' = 0: nothing added)
      jh = jsd_head(s);
      if (kLong) forget(ra, rb);
#pragma unroll
      for (int e = 0; e < ELEMS; ++e) {
        jsd_accumulate(a(e), b(e), exp_shifted(a(e), mz_s) * h.inv_sz, exp_shifted(b(e), mzf_s) * jh.inv_szf, h.lse_z,
                       jh.lse_zf, S, Sf);
      }
      S = warp_sum(S);
      Sf = warp_sum(Sf);
      jc = jsd_coef(s, h, K, S, Sf, want_grad);
      if (lane == 0) local += jc.contrib;
    }
    if (!want_grad) continue;
    // pass 4: both gradients, a piece at a time, written contiguous
    const acc_t Ey = kOfficial ? oc.Ey : jc.Ey, Ek = kOfficial ? oc.Ek : jc.Ek;
    scalar_t* gr = P.gz + row * C;
    scalar_t* gfr = P.gzf + row * C;
    if (kLong) forget(ra, rb);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col0 = (lane + 32 * i) * V;
      Raw rv, rvf;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const acc_t za = a(i * V + e), zb = b(i * V + e);
        acc_t v, vf;
        if (kOfficial) {
          const acc_t t = exp_shifted<acc_t, true>(za + zb, ms_s) * oc.beta;
          v = M::fma(exp_shifted(za, mz_s), oc.alpha, -t);
          vf = M::fma(exp_shifted(zb, mzf_s), oc.gamma, -t);
        } else {
          jsd_grad(jc, za, zb, exp_shifted(za, mz_s) * h.inv_sz, exp_shifted(zb, mzf_s) * jh.inv_szf, h.lse_z,
                   jh.lse_zf, S, Sf, v, vf);
        }
        if (rel(i * V + e) == y_rel) v += Ey;
        if (rel(i * V + e) == k_rel) v += Ek;
        reinterpret_cast<scalar_t*>(&rv)[e] = from_acc<scalar_t>(v);
        reinterpret_cast<scalar_t*>(&rvf)[e] = from_acc<scalar_t>(vf);
      }
      if (col0 < C) {
        __stcs(reinterpret_cast<Raw*>(gr + col0), rv);
        __stcs(reinterpret_cast<Raw*>(gfr + col0), rvf);
      }
    }
  }
  if (P.partials != nullptr) write_block_partial(local, P.partials);
}

// A warp per row of any width and dtype, swept column by column (lane l: columns l, l + 32, ...),
// each pass re-reading its columns (from L1/L2): nothing is held per column.
template <typename scalar_t>
__global__ void __launch_bounds__(kCudaWarpThreads, sizeof(scalar_t) == 8 ? 2 : kCudaWarpMinBlocks)
    nla_warp_chunked_kernel(const Params<scalar_t, typename AccOf<scalar_t>::type> P) {
  using acc_t = typename AccOf<scalar_t>::type;
  using M = RowMath<acc_t>;
  const acc_t ninf = -nla_inf<acc_t>();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int C = static_cast<int>(P.C);
  const bool has_flip = P.zf != nullptr;
  const bool official = has_flip && !P.jsd;
  const bool want_grad = P.gz != nullptr;
  const acc_t eps = read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value);
  const RowConsts<acc_t> K = make_row_consts(P.c, eps, P.B, P.jsd, P.reg_mean);

  acc_t local = 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < P.B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t y = read_target(P.y, row, P.y_s0, P.y_is_int64);
    const scalar_t* zr = P.z + row * C;
    const scalar_t* zfr = has_flip ? P.zf + row * C : zr;
    const auto load = [&](int j, acc_t& a, acc_t& b) {
      a = to_acc<acc_t>(zr[j]);
      b = has_flip ? to_acc<acc_t>(zfr[j]) : a;
    };
    RowStats<acc_t> s;
    s.zy = (y >= 0 && y < C) ? to_acc<acc_t>(zr[y]) : nla_nan<acc_t>();
    LaneMax<acc_t> m{ninf, ninf, ninf, ninf, INT32_MAX};
#pragma unroll 4
    for (int j = lane; j < C; j += 32) {
      acc_t a, b;
      load(j, a, b);
      lane_max_add(m, a, b, j, y, has_flip, official);
    }
    warp_reduce_max(m, has_flip, official);
    s.mz = m.mz;
    s.mzf = m.mzf;
    s.ms = m.ms;
    s.best = m.best;
    const acc_t mz_s = s.mz * M::kScale;
    const acc_t mzf_s = s.mzf * M::kScale;
    const acc_t ms_s = s.ms * (M::kScale * static_cast<acc_t>(0.5));
    s.sz = s.szf = s.su = 0;
#pragma unroll 4
    for (int j = lane; j < C; j += 32) {
      acc_t a, b;
      load(j, a, b);
      s.sz += exp_shifted(a, mz_s);
      if (has_flip) s.szf += exp_shifted(b, mzf_s);
      if (official) s.su += exp_shifted<acc_t, true>(a + b, ms_s);
    }
    s.sz = warp_sum(s.sz);
    if (has_flip) s.szf = warp_sum(s.szf);
    if (official) s.su = warp_sum(s.su);
    const RowHead<acc_t> h = row_head(s, K);
    if (P.weights != nullptr && lane == 0) P.weights[row] = h.naw.w;
    if (!has_flip) continue;
    scalar_t* gr = P.gz + row * C;
    scalar_t* gfr = P.gzf + row * C;
    if (official) {
      const OfficialCoef<acc_t> o = official_coef(s, h, K, want_grad);
      if (lane == 0) local += o.contrib;
      if (!want_grad) continue;
#pragma unroll 4
      for (int j = lane; j < C; j += 32) {
        acc_t a, b;
        load(j, a, b);
        const acc_t t = exp_shifted<acc_t, true>(a + b, ms_s) * o.beta;
        acc_t v = M::fma(exp_shifted(a, mz_s), o.alpha, -t);
        if (j == y) v += o.Ey;
        if (j == m.k) v += o.Ek;
        gr[j] = from_acc<scalar_t>(v);
        gfr[j] = from_acc<scalar_t>(M::fma(exp_shifted(b, mzf_s), o.gamma, -t));
      }
      continue;
    }
    const JsdHead<acc_t> jh = jsd_head(s);
    acc_t S = 0, Sf = 0;
#pragma unroll 4
    for (int j = lane; j < C; j += 32) {
      acc_t a, b;
      load(j, a, b);
      jsd_accumulate(a, b, exp_shifted(a, mz_s) * h.inv_sz, exp_shifted(b, mzf_s) * jh.inv_szf, h.lse_z, jh.lse_zf,
                     S, Sf);
    }
    S = warp_sum(S);
    Sf = warp_sum(Sf);
    const JsdCoef<acc_t> o = jsd_coef(s, h, K, S, Sf, want_grad);
    if (lane == 0) local += o.contrib;
    if (!want_grad) continue;
#pragma unroll 4
    for (int j = lane; j < C; j += 32) {
      acc_t a, b, v, vf;
      load(j, a, b);
      jsd_grad(o, a, b, exp_shifted(a, mz_s) * h.inv_sz, exp_shifted(b, mzf_s) * jh.inv_szf, h.lse_z, jh.lse_zf, S,
               Sf, v, vf);
      if (j == y) v += o.Ey;
      if (j == m.k) v += o.Ek;
      gr[j] = from_acc<scalar_t>(v);
      gfr[j] = from_acc<scalar_t>(vf);
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
