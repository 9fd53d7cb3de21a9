// A CPU emulator for the block-sparse attention kernels, just enough to run their arithmetic and
// their synchronisation without a GPU (tests/test_cuda_emulated.py).
//
// tests/test_cuda_emulated.py rewrites a .cu file textually before g++ compiles it with this
// header forced in first (-include):
//   extern __shared__ T name[];   ->  T* name = ::emu::dynamic_smem<T>();
//   __shared__                    ->  static   (one thread block runs at a time)
//   kernel<<<grid, block, smem, stream>>>(args);  ->  ::emu::launch(kernel, grid, block, smem, stream, args);
// Each thread block runs as blockDim real threads (std::thread): __syncthreads is a barrier of
// the block, __shfl_xor_sync a barrier of the 32 threads of a warp around an exchange buffer, so
// a missing __syncthreads can show up as a wrong result (not reliably: a race may not fire).
// WMMA fragments hold the whole 16x16 tile in every thread (the mapping of elements to lanes is
// unspecified in CUDA, so kernels may only fill, load, store, mma and scale them uniformly);
// load/store check the 32-byte alignment and leading-dimension rules of the real API. Dynamic
// shared memory starts as NaN bytes with a guard behind it, checked after each block; a launch
// must not ask for more than sm_80's 163 KB, nor more than 48 KB without cudaFuncSetAttribute.
// What this cannot show: speed, bank conflicts, real warp divergence, the hardware's rounding
// inside an mma (fp32 accumulation is exact-order here), or anything about sm_80/sm_90 codegen.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>  // empty for a host compiler; the emulated nvcuda::wmma is below

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

inline thread_local uint3 t_thread{0, 0, 0};
inline thread_local uint3 t_block{0, 0, 0};
inline dim3 g_block_dim{1, 1, 1};
inline dim3 g_grid_dim{1, 1, 1};

constexpr size_t kMaxSmem = 166912;  // sm_80's opt-in limit per block (163 KB)
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kGuard = 4096;

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> exchange;  // one float per thread
  unsigned char* smem = nullptr;
};
inline BlockState g_state;
inline std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncSetAttribute per kernel

inline int lane() { return static_cast<int>(t_thread.x % 32); }
inline int warp() { return static_cast<int>(t_thread.x / 32); }

inline void sync_block() { g_state.block_barrier->arrive_and_wait(); }
inline void sync_warp() { g_state.warp_barriers[warp()]->arrive_and_wait(); }

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(std::is_same<T, float>::value, "the emulator shuffles floats only");
  float* ex = g_state.exchange.data() + warp() * 32;
  ex[lane()] = v;
  sync_warp();
  const float r = ex[lane() ^ lane_mask];
  sync_warp();
  return r;
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(g_state.smem);
}

inline cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kMaxSmem) return cudaErrorInvalidValue;
    g_max_dynamic_smem[kernel] = value;
  }
  return cudaSuccess;
}

inline cudaError_t g_last_error = cudaSuccess;
inline cudaError_t last_error() {
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args&&... args) {
  const unsigned n = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || n % 32 != 0 || n > 1024) fail("blocks must be 1-D with a multiple of 32 threads");
  const auto limit = g_max_dynamic_smem.count(reinterpret_cast<const void*>(kernel))
                         ? static_cast<size_t>(g_max_dynamic_smem[reinterpret_cast<const void*>(kernel)])
                         : kDefaultSmem;
  if (smem_bytes > limit) {
    std::fprintf(stderr, "emu: launch asks for %zu bytes of dynamic shared memory, the kernel allows %zu\n",
                 smem_bytes, limit);
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  g_block_dim = block;
  g_grid_dim = grid;
  std::vector<unsigned char> storage(smem_bytes + kGuard + 256);
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + 255) / 256 * 256);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(smem, 0xFF, smem_bytes + kGuard);  // NaN in every float/half/bf16
        g_state.smem = smem;
        g_state.block_barrier = std::make_unique<std::barrier<>>(n);
        g_state.warp_barriers.clear();
        for (unsigned w = 0; w < n / 32; ++w) g_state.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        g_state.exchange.assign(n, 0.f);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            t_thread = uint3{t, 0, 0};
            t_block = uint3{bx, by, bz};
            kernel(args...);
          });
        for (auto& th : threads) th.join();
        for (size_t i = 0; i < kGuard; ++i)
          if (smem[smem_bytes + i] != 0xFF) fail("a kernel wrote past the end of its dynamic shared memory");
      }
}

}  // namespace emu

// ----------------------------------------------------------------------------- CUDA built-ins

#define __launch_bounds__(...)
#define threadIdx (::emu::t_thread)
#define blockIdx (::emu::t_block)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define __syncthreads() ::emu::sync_block()
#define __syncwarp(...) ::emu::sync_warp()
#define __shfl_xor_sync(mask, v, lane_mask) ::emu::shfl_xor((v), (lane_mask))
#define __expf(x) std::exp(x)
#define cudaFuncSetAttribute(kernel, attr, value) \
  ::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), (attr), (value))
#define cudaGetLastError() ::emu::last_error()

// --------------------------------------------------------------------------------------- WMMA

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];  // the whole tile, row-major, in every thread
};

template <typename T>
void check_ptr(const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail("wmma load/store: pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail("wmma load/store: ldm is not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  for (float& e : f.x) e = static_cast<float>(v);
}

// matrix_a / matrix_b: the layout is part of the fragment's type.
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout_t");
  static_assert(std::is_same<T, P>::value, "fragment and memory element types differ");
  check_ptr(ptr, ldm);
  using Frag = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c)
      f.x[r * Frag::cols + c] =
          to_f(std::is_same<Layout, row_major>::value ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  check_ptr(ptr, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_ptr(ptr, ldm);
  if (emu::lane() != 0) return;  // one writer; kernels must synchronise before others read
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.x[r * N + c];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
