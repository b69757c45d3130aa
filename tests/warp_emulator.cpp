// The CUDA warp kernels' row code (csrc/nla_loss.h, its NLA_WARP_EMULATOR section: warp_row, the
// row layouts PieceRow and ColumnRow) run on the CPU by an emulated warp, for tests/test_warp_rows.py.
//
// A warp is 32 threads, one per lane, running the row code the GPU runs; each __shfl_xor_sync is a
// barrier of the 32 (a lane that skipped a shuffle another lane made would hang the warp: the test
// runs this program under a timeout). Loads and stores are plain; the CUDA types and intrinsics
// the row code uses are the stand-ins below. The kernel, width and consistency variant are the
// ones cuda_launch_plan picks, as the launchers of nla_loss_cuda.cu pick them. Maths as on the
// host (RowMath: exact exp2 / log2 instead of the GPU's MUFU approximations).
//
//   warp_emulator IN OUT
// IN (little-endian): int32 dtype (DType), int32 consistency (0 none, 1 official, 2 jsd),
// int32 want_grad, int32 reg_mean, int64 B, int64 C, float64 eps, float64 constants[12], the
// logits (B * C of dtype), the flipped logits (absent for none), the targets (B int64).
// OUT: int32 kernel (CudaKernel), int32 width, then per row its share of the loss and its weight
// (B each, the accumulation type), then the two gradients (B * C each, dtype; with want_grad).
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

// ---- stand-ins for the CUDA types and intrinsics the row code uses
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __half2float(__half h) {
  const unsigned sign = (h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m 2^-24
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return __uint_as_float(sign | (e == 31 ? 0x7f800000u : (e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {  // round to nearest even, as the CUDA intrinsic
  unsigned x;
  std::memcpy(&x, &f, 4);
  const unsigned sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
  const int exponent = static_cast<int>((x >> 23) & 0xffu), e = exponent - 127 + 15;
  if (exponent == 0xff) return {static_cast<unsigned short>(sign | 0x7c00u | (mant ? 0x200u : 0u))};
  if (e >= 31) return {static_cast<unsigned short>(sign | 0x7c00u)};
  const unsigned full = e > 0 ? mant : mant | 0x800000u;
  const int shift = e > 0 ? 13 : 14 - e;  // bits dropped
  if (shift > 24) return {static_cast<unsigned short>(sign)};
  unsigned h = (e > 0 ? static_cast<unsigned>(e) << 10 : 0u) | (full >> shift);
  const unsigned rest = full & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) ++h;  // a carry into the exponent is right too
  return {static_cast<unsigned short>(sign | h)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  if (f != f) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<unsigned short>(u >> 16)};
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcs(const T* p) {
  return *p;
}
template <typename T>
void __stcs(T* p, T v) {
  *p = v;
}

// The emulated warp: lane l's value goes to slot l, the 32 meet, each reads its partner's slot,
// the 32 meet again before the slots are reused.
struct Warp {
  std::mutex mutex;
  std::condition_variable all_here;
  int waiting = 0;
  long generation = 0;
  alignas(8) unsigned char slot[32][8];

  void meet() {
    std::unique_lock<std::mutex> lock(mutex);
    const long arrived_in = generation;
    if (++waiting == 32) {
      waiting = 0;
      ++generation;
      all_here.notify_all();
    } else {
      all_here.wait(lock, [&] { return generation != arrived_in; });
    }
  }
};
thread_local Warp* this_warp = nullptr;
thread_local int this_lane = 0;

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes here");
  std::memcpy(this_warp->slot[this_lane], &v, sizeof(T));
  this_warp->meet();
  T r;
  std::memcpy(&r, this_warp->slot[this_lane ^ lane_mask], sizeof(T));
  this_warp->meet();
  return r;
}

#define NLA_WARP_EMULATOR
#include "nla_loss.h"

namespace {
using namespace nla_fast;

template <typename T>
void read_into(std::istream& in, T* out, size_t n) {
  in.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(n * sizeof(T)));
  if (!in) throw std::runtime_error("warp_emulator: the input ended early");
}

struct Input {
  int32_t dtype, consistency, want_grad, reg_mean;
  int64_t B, C;
  double eps, constants[kNumConstants];
};

// Every row on one emulated warp, rows in order: lane threads run the kernel's row function, each
// row with a loss slot of its own (the GPU adds a warp's rows into one slot).
template <typename scalar_t, typename acc_t, typename RowFn>
void run_rows(const Params<scalar_t, acc_t>& P, std::vector<acc_t>& loss, const RowFn& row_fn) {
  SharedRowConsts<acc_t> shared;
  const RowConsts<acc_t> K = make_row_consts(P.c, P.eps_value, P.B, P.jsd, P.reg_mean);
  shared.tc = K.tc;
  shared.lam_over_b = K.lam_over_b;
  shared.reg_scale = K.reg_scale;
  Warp warp;
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < 32; ++lane) {
    lanes.emplace_back([&, lane] {
      this_warp = &warp;
      this_lane = lane;
      for (int64_t row = 0; row < P.B; ++row) row_fn(P, row, lane, &shared, &loss[row]);
    });
  }
  for (auto& t : lanes) t.join();
}

template <typename scalar_t, int ELEMS>
void run_piece(const Params<scalar_t, float>& P, int consistency, std::vector<float>& loss) {
  if (consistency == 0) {
    run_rows(P, loss, piece_kernel_row<scalar_t, ELEMS, Consistency::None>);
  } else if (consistency == 1) {
    run_rows(P, loss, piece_kernel_row<scalar_t, ELEMS, Consistency::Official>);
  } else {
    run_rows(P, loss, piece_kernel_row<scalar_t, ELEMS, Consistency::Jsd>);
  }
}

template <typename scalar_t>
int run(const Input& in, std::istream& data, std::ostream& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t n = in.B * in.C;
  const bool flip = in.consistency != 0;
  const bool grad = flip && in.want_grad != 0;
  std::vector<scalar_t> z(n), zf(flip ? n : 0), gz(grad ? n : 0), gzf(grad ? n : 0);
  std::vector<int64_t> y(in.B);
  read_into(data, z.data(), n);
  if (flip) read_into(data, zf.data(), n);
  read_into(data, y.data(), in.B);
  std::vector<acc_t> weights(in.B), loss(in.B, 0);
  Params<scalar_t, acc_t> P{};
  P.z = z.data();
  P.zf = flip ? zf.data() : nullptr;
  P.y = y.data();
  P.y_s0 = 1;
  P.y_is_int64 = true;
  P.B = in.B;
  P.C = in.C;
  P.c = make_constants<acc_t>(in.constants);
  P.eps_value = static_cast<acc_t>(in.eps);
  P.jsd = in.consistency == 2;
  P.reg_mean = in.reg_mean != 0;
  P.gz = grad ? gz.data() : nullptr;
  P.gzf = grad ? gzf.data() : nullptr;
  P.weights = weights.data();
  const CudaPlan plan = cuda_launch_plan(in.B, in.C, static_cast<DType>(in.dtype));
  if (plan.kernel == CudaKernel::WarpChunked) {
    run_rows(P, loss, chunked_kernel_row<scalar_t, acc_t>);
  } else if (plan.kernel == CudaKernel::WarpRow) {
    if constexpr (sizeof(scalar_t) <= 4) {
      switch (plan.width) {  // as launch_plan in nla_loss_cuda.cu
        case 2: run_piece<scalar_t, 2>(P, in.consistency, loss); break;
        case 4: run_piece<scalar_t, 4>(P, in.consistency, loss); break;
        case 8: run_piece<scalar_t, 8>(P, in.consistency, loss); break;
        case 16: run_piece<scalar_t, 16>(P, in.consistency, loss); break;
        default: run_piece<scalar_t, 32>(P, in.consistency, loss); break;
      }
    }
  } else {
    std::cerr << "warp_emulator: (" << in.B << ", " << in.C << ") runs on a tile kernel, not a warp kernel\n";
    return 2;
  }
  const int32_t head[2] = {static_cast<int32_t>(plan.kernel), plan.width};
  out.write(reinterpret_cast<const char*>(head), sizeof head);
  out.write(reinterpret_cast<const char*>(loss.data()), static_cast<std::streamsize>(loss.size() * sizeof(acc_t)));
  out.write(reinterpret_cast<const char*>(weights.data()), static_cast<std::streamsize>(weights.size() * sizeof(acc_t)));
  out.write(reinterpret_cast<const char*>(gz.data()), static_cast<std::streamsize>(gz.size() * sizeof(scalar_t)));
  out.write(reinterpret_cast<const char*>(gzf.data()), static_cast<std::streamsize>(gzf.size() * sizeof(scalar_t)));
  return out ? 0 : 1;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: warp_emulator IN OUT\n";
    return 2;
  }
  std::ifstream data(argv[1], std::ios::binary);
  std::ofstream out(argv[2], std::ios::binary);
  Input in{};
  try {
    read_into(data, &in.dtype, 4);
    read_into(data, &in.B, 2);
    read_into(data, &in.eps, 1 + kNumConstants);
    switch (static_cast<DType>(in.dtype)) {
      case DType::Float: return run<float>(in, data, out);
      case DType::Double: return run<double>(in, data, out);
      case DType::Half: return run<__half>(in, data, out);
      case DType::BFloat16: return run<__nv_bfloat16>(in, data, out);
    }
  } catch (const std::exception& err) {
    std::cerr << err.what() << "\n";
    return 1;
  }
  std::cerr << "warp_emulator: unknown dtype " << in.dtype << "\n";
  return 2;
}
