// NLA loss (SPEC 1.1): CUDA kernels and plain launchers for the operators of nla_loss.cpp.
//
// No torch header is included (fast nvcc builds); nla_loss.cpp allocates the tensors, takes the
// current stream (c10::cuda::getCurrentCUDAStream()) and calls cuda_rows / cuda_scale.
//
// Design (each logit read once from DRAM, each gradient written once; which kernel, block and
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
//   * C > 32, the warp kernels (their row code: warp_row in nla_loss.h, which the CPU tests also
//     run on an emulated warp): a warp per row, nothing held per column. Sweep 1 reads the row
//     once: each lane folds its columns, a group at a time, into running maxima and sums of
//     exponentials (online softmax: the sums rescaled once per group) and the nearest-negative
//     candidate; xor-butterflies combine the lanes (every lane ends with bitwise the same row
//     statistics). Sweep 2 re-reads the row, from L1 / L2 (it was just read), and writes both
//     gradients; the target's and the nearest negative's extra terms are written after it by
//     the lane that owns their columns. JSD needs a sweep more. nla_warp_kernel takes rows up to
//     1024 columns that are whole 16-byte pieces (lane l: pieces l, l + 32, ..., two a loop
//     iteration, their loads issued together; 16-byte loads and stores), the chunked kernel any
//     row element by element. At most 64 registers a thread (80 for JSD): 32 resident warps per
//     SM (24). Row constants and the lanes' shares of the loss wait in shared memory, not in
//     registers held through the sweeps.
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
// Their row code is in nla_loss.h (warp_row and the row layouts PieceRow, ColumnRow): a warp per
// row, each row swept once from DRAM into running statistics, then once more for the gradients.
// The row constants that depend on eps and B: once per block, into shared memory (SharedRowConsts).
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

// Lane 0 of each warp adds its rows' shares of the loss into a slot of its own in shared memory
// (volatile: not a register held through a row's sweeps, RowSink); the block's partial is their sum
// in warp order, as write_block_partial would sum them.
template <typename acc_t>
__device__ __forceinline__ void write_warp_partials(const volatile acc_t* warp_local, acc_t* partials) {
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) s += warp_local[w];
    partials[blockIdx.x] = s;
  }
}


// A warp per row in 16-byte pieces (MODE: the consistency variant, as template so the kernel holds
// only its own code; gradients when P.gz is set). Rows of up to 32 * ELEMS columns.
template <typename scalar_t, int ELEMS, Consistency MODE>
__global__ void __launch_bounds__(kCudaWarpThreads, cuda_warp_min_blocks(MODE))
    nla_warp_kernel(const Params<scalar_t, float> P) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __shared__ SharedRowConsts<float> shared;
  share_row_consts(P.c, read_eps<float>(P.eps_ptr, P.eps_is_double, P.eps_value), P.B, MODE == Consistency::Jsd,
                   P.reg_mean, &shared);
  __shared__ volatile float warp_local[kWarpsPerBlock];
  if (lane == 0) warp_local[warp] = 0;
  // the loop bound is uniform over the warp, so every shuffle has all 32 lanes
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < P.B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    piece_kernel_row<scalar_t, ELEMS, MODE>(P, row, lane, &shared, &warp_local[warp]);
  }
  if (P.partials != nullptr) write_warp_partials(warp_local, P.partials);
}

// A warp per row of any width and dtype, element by element (rows that are not whole 16-byte
// pieces, longer than 1024 columns, or double). The consistency variant is read at run time.
template <typename scalar_t>
__global__ void __launch_bounds__(kCudaWarpThreads, sizeof(scalar_t) == 8 ? 2 : kCudaWarpMinBlocks)
    nla_warp_chunked_kernel(const Params<scalar_t, typename AccOf<scalar_t>::type> P) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __shared__ SharedRowConsts<acc_t> shared;
  share_row_consts(P.c, read_eps<acc_t>(P.eps_ptr, P.eps_is_double, P.eps_value), P.B, P.jsd, P.reg_mean, &shared);
  __shared__ volatile acc_t warp_local[kWarpsPerBlock];
  if (lane == 0) warp_local[warp] = 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < P.B;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    chunked_kernel_row(P, row, lane, &shared, &warp_local[warp]);
  }
  if (P.partials != nullptr) write_warp_partials(warp_local, P.partials);
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
