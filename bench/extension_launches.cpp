// What the CUDA extension launches, asked of its own C++ on a machine without a GPU
// (bench/extension_launches.py builds and runs this; bench/kernel_model.py models what it prints).
//
// Built two ways:
//   * header only (the host compiler and csrc/nla_loss.h): the launch plan (cuda_launch_plan) and
//     the tile layouts, for the tests of their rules;
//   * with NLA_RECORD_LAUNCHES, linked with nvcc's host object of csrc/nla_loss_cuda.cu: the real
//     launchers (cuda_rows, cuda_scale) run against the stand-in CUDA runtime below, which records
//     each launch (the kernel's mangled name as nvcc registered it, grid, block, dynamic shared
//     memory) instead of running it. So the kernel instantiation, the follow-up launches and their
//     sizes are the ones the extension's code picks, not a copy of its rules.
//
// One query per line of stdin, one JSON object per line of stdout:
//   plan B C DTYPE                                  -> {"plan": {...}}
//   layout C ESIZE                                  -> {"layout": {...}}
//   launches B C DTYPE CONSISTENCY GRAD WEIGHTS     -> {"plan": {...}, "lane_columns": N, "launches": [...]}
//                                                      (NLA_RECORD_LAUNCHES only; N: cuda_lane_columns,
//                                                      the columns a lane of a warp kernel takes per
//                                                      iteration of its sweep loops)
// DTYPE: float32 | float64 | float16 | bfloat16; CONSISTENCY: none (naw_weight: no flipped logits)
// | official | jsd; GRAD, WEIGHTS: 0 or 1. "launches" is one eager fwd + bwd call: the op
// nla_loss_fwd (glue as run_cuda in nla_loss.cpp) then, with gradients, the in-place
// nla_scale_grads_ of the first backward.
#include "nla_loss.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

bool parse_dtype(const std::string& name, nla_fast::DType& out) {
  static const std::map<std::string, nla_fast::DType> kNames = {{"float32", nla_fast::DType::Float},
                                                               {"float64", nla_fast::DType::Double},
                                                               {"float16", nla_fast::DType::Half},
                                                               {"bfloat16", nla_fast::DType::BFloat16}};
  const auto it = kNames.find(name);
  if (it == kNames.end()) return false;
  out = it->second;
  return true;
}

std::string plan_json(const nla_fast::CudaPlan& p) {
  static const char* kKernels[] = {"TileFixed", "TileGeneric", "WarpRow", "WarpChunked"};
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "{\"kernel\": \"%s\", \"width\": %d, \"threads\": %d, \"rows_per_block\": %d, \"smem_bytes\": %d, "
                "\"grid\": %d}",
                kKernels[static_cast<int>(p.kernel)], p.width, p.threads, p.rows_per_block, p.smem_bytes, p.grid);
  return buf;
}

std::string layout_json(int C, int esize) {
  const nla_fast::TileLayout L = nla_fast::tile_layout(C, esize);
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "{\"C\": %d, \"esize\": %d, \"row_bytes\": %d, \"stride\": %d, \"vec\": %d, \"lane_rows\": %d, "
                "\"generic_stride\": %d}",
                C, esize, L.row_bytes, L.stride, L.vec, L.lane_rows, nla_fast::tile_generic_stride(C, esize));
  return buf;
}

}  // namespace

#ifdef NLA_RECORD_LAUNCHES
// ---- a stand-in for the CUDA runtime entry points nvcc's host code calls ----
// Signatures as in crt/host_runtime.h and cuda_runtime_api.h; the types are spelled out here
// (dim3: three unsigned ints by value) so the toolkit's own declarations are not needed.
namespace {
struct Dim3 {
  unsigned x, y, z;
};

struct Launch {
  std::string function;
  Dim3 grid, block;
  size_t shared_dynamic;
};

std::map<const void*, std::string>& registered() {  // host stub -> the kernel's mangled name
  static std::map<const void*, std::string> names;
  return names;
}
std::vector<Launch> launches;
Dim3 pending_grid, pending_block;
size_t pending_shared = 0;
void* pending_stream = nullptr;

int record(const void* stub, Dim3 grid, Dim3 block, size_t shared) {
  const auto it = registered().find(stub);
  launches.push_back({it == registered().end() ? std::string("?") : it->second, grid, block, shared});
  return 0;
}
}  // namespace

extern "C" {
void** __cudaRegisterFatBinary(void*) {
  static void* handle = nullptr;
  return &handle;
}
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char* host_stub, char*, const char* device_name, int, void*, void*, void*,
                            void*, int*) {
  registered()[host_stub] = device_name;
}
void __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
unsigned __cudaPushCallConfiguration(Dim3 grid, Dim3 block, size_t shared, void* stream) {
  pending_grid = grid;
  pending_block = block;
  pending_shared = shared;
  pending_stream = stream;
  return 0;
}
int __cudaPopCallConfiguration(Dim3* grid, Dim3* block, size_t* shared, void* stream) {
  *grid = pending_grid;
  *block = pending_block;
  *shared = pending_shared;
  *static_cast<void**>(stream) = pending_stream;
  return 0;
}
int __cudaGetKernel(const void** kernel, const void* host_stub) {  // CUDA 13: a handle per kernel
  *kernel = host_stub;
  return 0;
}
int __cudaLaunchKernel(const void* kernel, Dim3 grid, Dim3 block, void**, size_t shared, void*) {
  return record(kernel, grid, block, shared);
}
int __cudaLaunchKernel_ptsz(const void* kernel, Dim3 grid, Dim3 block, void**, size_t shared, void*) {
  return record(kernel, grid, block, shared);
}
int cudaLaunchKernel(const void* host_stub, Dim3 grid, Dim3 block, void**, size_t shared, void*) {  // CUDA 12
  return record(host_stub, grid, block, shared);
}
int cudaLaunchKernel_ptsz(const void* host_stub, Dim3 grid, Dim3 block, void**, size_t shared, void*) {
  return record(host_stub, grid, block, shared);
}
int cudaGetLastError() { return 0; }
const char* cudaGetErrorString(int) { return "no error"; }
}

namespace {
// Distinct non-null device addresses: nothing is dereferenced on the host.
void* fake(uintptr_t n) { return reinterpret_cast<void*>(n << 20); }

std::string launches_json(int64_t B, int64_t C, nla_fast::DType dtype, const std::string& consistency, bool grad,
                          bool weights) {
  using namespace nla_fast;
  launches.clear();
  const bool flip = consistency != "none";
  CudaRowsArgs a{};
  a.dtype = dtype;
  a.z = fake(1);
  a.zf = flip ? fake(2) : nullptr;
  a.y = fake(3);
  a.y_s0 = 1;
  a.y_is_int64 = true;
  a.B = B;
  a.C = C;
  a.eps_value = 0.4;
  a.jsd = consistency == "jsd";
  a.gz = flip && grad ? fake(4) : nullptr;
  a.gzf = flip && grad ? fake(5) : nullptr;
  a.weights = weights || !flip ? fake(6) : nullptr;
  const CudaPlan plan = cuda_launch_plan(B, C, dtype);
  if (flip) {  // as run_cuda: one block writes the loss itself, several write partials
    a.loss = fake(7);
    a.partials = plan.grid > 1 ? fake(8) : a.loss;
  }
  const char* err = cuda_rows(a, nullptr);
  if (err == nullptr && flip && grad) {  // the first backward: in place, grad_output 1 on the device
    err = cuda_scale(dtype, fake(9), dtype == DType::Double, a.gz, a.gzf, a.gz, a.gzf, B * C, B * C, nullptr);
  }
  const Consistency mode = !flip ? Consistency::None : (a.jsd ? Consistency::Jsd : Consistency::Official);
  std::ostringstream out;
  out << "{\"plan\": " << plan_json(plan) << ", \"error\": " << (err ? "\"" + std::string(err) + "\"" : "null")
      << ", \"lane_columns\": " << cuda_lane_columns(plan, dtype, mode) << ", \"launches\": [";
  for (size_t i = 0; i < launches.size(); ++i) {
    const Launch& l = launches[i];
    out << (i ? ", " : "") << "{\"function\": \"" << l.function << "\", \"grid\": [" << l.grid.x << ", " << l.grid.y
        << ", " << l.grid.z << "], \"block\": [" << l.block.x << ", " << l.block.y << ", " << l.block.z
        << "], \"shared_dynamic\": " << l.shared_dynamic << "}";
  }
  out << "]}";
  return out.str();
}
}  // namespace
#endif  // NLA_RECORD_LAUNCHES

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string what, dtype_name, consistency;
    long long B = 0, C = 0;
    int grad = 0, weights = 0;
    nla_fast::DType dtype{};
    in >> what;
    if (what == "layout" && (in >> C >> B)) {  // C, element size
      std::cout << "{\"layout\": " << layout_json(static_cast<int>(C), static_cast<int>(B)) << "}\n";
    } else if (what == "plan" && (in >> B >> C >> dtype_name) && parse_dtype(dtype_name, dtype)) {
      std::cout << "{\"plan\": " << plan_json(nla_fast::cuda_launch_plan(B, C, dtype)) << "}\n";
#ifdef NLA_RECORD_LAUNCHES
    } else if (what == "launches" && (in >> B >> C >> dtype_name >> consistency >> grad >> weights) &&
               parse_dtype(dtype_name, dtype) &&
               (consistency == "none" || consistency == "official" || consistency == "jsd")) {
      std::cout << launches_json(B, C, dtype, consistency, grad != 0, weights != 0) << "\n";
#endif
    } else {
      std::cout << "{\"error\": \"cannot read the query\"}\n";
    }
  }
  return 0;
}
