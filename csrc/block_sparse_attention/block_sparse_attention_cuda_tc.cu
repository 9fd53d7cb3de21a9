// Tensor-core kernels of block-sparse attention (contract: bsa_params.h), OFF by default.
//
// Same layout, same binding checks and same results (to rounding) as the SIMT kernels in
// block_sparse_attention_cuda.cu, which stay the default: the binding runs these only when the
// caller asks for tensor cores (bsa_forward/bsa_backward(..., tensor_cores=True), i.e.
// MEGADALLE_BSA_TENSOR_CORES=1 or block_sparse_attention.use_tensor_cores(True)), and nothing
// asks by default until tests/test_block_sparse_cuda.py has passed with them on a GPU
// (benchmarks/gpu_check.py runs those tests). Torch-free, so CI compiles this file with a bare
// `nvcc -c` for sm_80 and sm_90 and requires no register spills (tests/test_cuda_compile.py), and
// tests/test_cuda_emulated.py runs it on the CPU against a reference (WMMA emulated per tile).
//
// Design: WMMA (nvcuda::wmma, 16x16x16 bf16/fp16 tiles, fp32 accumulation; mma.sync on sm_80
// and sm_90). Eight warps per thread block; the block size BS (16/32/64) and head dim D (32/64)
// are template parameters, so every tile loop has a compile-time trip count.
//   forward   one thread block per (batch*head, query block). Q, K, V tiles in shared memory as
//             bf16/fp16; S = Q K^T on tensor cores into an fp32 tile; masks and online softmax by
//             kTcThreads/BS threads per row (running max and sum in registers), P rounded to the
//             input dtype; O (fp32, shared memory) rescaled per row, then O += P V on tensor cores.
//   backward  FlashAttention-2 split without atomics, as the SIMT path: delta = rowsum(dO * O);
//             dq per query block over the CSR (S = Q K^T, dP = dO V^T, dS = P (dP - delta),
//             dQ += dS K); dk/dv per key block over the CSC (dV += P^T dO, dK += dS^T Q).
//             P and dS are rounded to the input dtype before their products (as FlashAttention).
// Shared memory rows are padded by 16 bytes (WMMA needs 32-byte aligned tile pointers and a
// leading dimension of a multiple of 16 bytes; the padding also spreads rows over the banks).
// Largest footprint (bs 64, D 64): forward 70 KB, dq 96 KB, dk/dv 122 KB (sm_80 opts in to 163 KB).
// Tiles are moved between global and shared memory 16 bytes at a time: the binding runs these
// kernels only when every tensor's data pointer is 16-byte aligned (else the SIMT kernels).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "bsa_cuda.h"

namespace megadalle {
namespace bsa {
namespace {

using namespace nvcuda;

constexpr int kTcThreads = 256;
constexpr int kTcWarps = kTcThreads / 32;
// Two resident blocks per SM cap the kernels at 128 registers a thread. Without a minimum, ptxas
// aims at 64 for some instantiations and spills; with none at all, it takes up to ~180.
constexpr int kTcMinBlocks = 2;
constexpr int kTile = 16;  // WMMA m = n = k
constexpr int kVec = 8;    // 16-bit elements per 16-byte move

__device__ __forceinline__ float tc_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float tc_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T tc_from_float(float x);
template <> __device__ __forceinline__ __half tc_from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 tc_from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ bool tc_allowed(const Layout& L, int pidx, int r, int c) {
  return pidx < 0 || L.block_masks[(static_cast<int64_t>(pidx) * L.block_size + r) * L.block_size + c] != 0;
}

// Max / sum over the TPR consecutive lanes that share one row (TPR divides 32).
template <int TPR>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <int TPR>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Leading dimensions (elements) of the shared-memory tiles and the rows each thread owns.
template <int BS, int D>
struct Tiles {
  static_assert(BS % kTile == 0 && D % kTile == 0 && kTcThreads % BS == 0, "unsupported tile sizes");
  static constexpr int ld_h = D + kVec;   // 16-bit [BS][D]  (Q, K, V, dO)
  static constexpr int ld_p = BS + kVec;  // 16-bit [BS][BS] (P, dS)
  static constexpr int ld_s = BS + 4;     // fp32 [BS][BS]   (S, dP)
  static constexpr int ld_o = D + 4;      // fp32 [BS][D]    (O, dQ, dK, dV accumulators)
  static constexpr int TPR = kTcThreads / BS;  // threads per row
  static constexpr size_t h_bytes = size_t(BS) * ld_h * 2;
  static constexpr size_t p_bytes = size_t(BS) * ld_p * 2;
  static constexpr size_t s_bytes = size_t(BS) * ld_s * 4;
  static constexpr size_t o_bytes = size_t(BS) * ld_o * 4;
  // Every region starts at a multiple of 128 bytes (each size above is a multiple of 32; round up).
  static constexpr size_t up(size_t b) { return (b + 127) / 128 * 128; }
  static constexpr size_t forward_bytes = 3 * up(h_bytes) + up(s_bytes) + up(p_bytes) + up(o_bytes);
  static constexpr size_t dq_bytes = 4 * up(h_bytes) + 2 * up(s_bytes) + up(p_bytes) + up(o_bytes);
  static constexpr size_t dkdv_bytes = 4 * up(h_bytes) + 2 * up(s_bytes) + 2 * up(p_bytes) + 2 * up(o_bytes);
};

// Carves consecutive 128-byte-aligned regions out of the dynamic shared memory.
struct Carver {
  unsigned char* at;
  template <typename U>
  __device__ __forceinline__ U* take(size_t bytes) {
    U* r = reinterpret_cast<U*>(at);
    at += (bytes + 127) / 128 * 128;
    return r;
  }
};

// Rows [row0, row0 + BS) of one head's [S, D] matrix into a 16-bit tile with row stride ld_h,
// 16 bytes per move; rows past the sequence end are zero.
template <typename T, int BS, int D>
__device__ __forceinline__ void load_rows(const T* head, int64_t row0, int64_t S, T* tile) {
  constexpr int kChunks = D / kVec;
  for (int idx = threadIdx.x; idx < BS * kChunks; idx += kTcThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * kVec;
    const int64_t row = row0 + r;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row < S) v = *reinterpret_cast<const uint4*>(head + row * D + c);
    *reinterpret_cast<uint4*>(tile + r * Tiles<BS, D>::ld_h + c) = v;
  }
}

template <int N>
__device__ __forceinline__ void zero_floats(float* x) {
  for (int i = threadIdx.x; i < N; i += kTcThreads) x[i] = 0.f;
}

// C[M][N] (fp32, ldc) = A[M][K] B[N][K]^T: A and B row-major 16-bit tiles (lda, ldb).
template <typename T, int M, int N, int K>
__device__ __forceinline__ void gemm_nt(const T* A, int lda, const T* B, int ldb, float* C, int ldc) {
  constexpr int kTn = N / kTile;
  const int warp = threadIdx.x / 32;
  for (int t = warp; t < (M / kTile) * kTn; t += kTcWarps) {
    const int i = t / kTn, j = t % kTn;
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int k = 0; k < K / kTile; ++k) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> b;  // B^T
      wmma::load_matrix_sync(a, A + i * kTile * lda + k * kTile, lda);
      wmma::load_matrix_sync(b, B + j * kTile * ldb + k * kTile, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + i * kTile * ldc + j * kTile, acc, ldc, wmma::mem_row_major);
  }
}

// C[M][N] (fp32, ldc) += op(A)[M][K] B[K][N], B row-major. ALayout row_major: A stored [M][K];
// col_major: A stored transposed, [K][M] (lda is that array's row stride).
template <typename T, typename ALayout, int M, int N, int K>
__device__ __forceinline__ void gemm_acc(const T* A, int lda, const T* B, int ldb, float* C, int ldc) {
  constexpr int kTn = N / kTile;
  constexpr bool a_rows = std::is_same<ALayout, wmma::row_major>::value;
  const int warp = threadIdx.x / 32;
  for (int t = warp; t < (M / kTile) * kTn; t += kTcWarps) {
    const int i = t / kTn, j = t % kTn;
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
    float* c = C + i * kTile * ldc + j * kTile;
    wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
#pragma unroll
    for (int k = 0; k < K / kTile; ++k) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, ALayout> a;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> b;
      wmma::load_matrix_sync(a, a_rows ? A + i * kTile * lda + k * kTile : A + k * kTile * lda + i * kTile, lda);
      wmma::load_matrix_sync(b, B + k * kTile * ldb + j * kTile, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
  }
}

// ------------------------------------------------------------------------------------ forward

template <typename T, int BS, int D>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks) forward_tc_kernel(ForwardParams p) {
  using G = Tiles<BS, D>;
  constexpr int TPR = G::TPR;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  Carver carve{tc_smem};
  T* Qs = carve.take<T>(G::h_bytes);
  T* Ks = carve.take<T>(G::h_bytes);
  T* Vs = carve.take<T>(G::h_bytes);
  float* Ss = carve.take<float>(G::s_bytes);
  T* Ps = carve.take<T>(G::p_bytes);
  float* Os = carve.take<float>(G::o_bytes);

  const Layout& L = p.layout;
  const int64_t S = p.shape.seq;
  const int64_t bh = blockIdx.x;
  const int qb = blockIdx.y;
  const int64_t q0 = int64_t(qb) * BS;
  const int64_t head = bh * S * D;
  const T* k = static_cast<const T*>(p.k) + head;
  const T* v = static_cast<const T*>(p.v) + head;
  const int row = threadIdx.x / TPR, part = threadIdx.x % TPR;  // this thread's row and share of it
  const bool row_in = q0 + row < S;

  load_rows<T, BS, D>(static_cast<const T*>(p.q) + head, q0, S, Qs);
  zero_floats<BS * G::ld_o>(Os);
  float m = -INFINITY, l = 0.f;  // the row's running max and sum (same in all TPR threads)

  for (int e = L.row_ptr[qb]; e < L.row_ptr[qb + 1]; ++e) {
    const int64_t k0 = int64_t(L.col_idx[e]) * BS;
    const int pidx = L.partial_idx[e];
    __syncthreads();  // the previous block's K/V/P are no longer read
    load_rows<T, BS, D>(k, k0, S, Ks);
    load_rows<T, BS, D>(v, k0, S, Vs);
    __syncthreads();
    gemm_nt<T, BS, BS, D>(Qs, G::ld_h, Ks, G::ld_h, Ss, G::ld_s);
    __syncthreads();
    float* srow = Ss + row * G::ld_s;
    float mx = -INFINITY;
#pragma unroll 2
    for (int j = 0; j < BS / TPR; ++j) {
      const int c = part + j * TPR;
      const bool ok = row_in && k0 + c < S && tc_allowed(L, pidx, row, c);
      const float s = ok ? p.scale * srow[c] : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = group_max<TPR>(mx);
    const float m_new = fmaxf(m, mx);
    float sum = 0.f;
#pragma unroll 2
    for (int j = 0; j < BS / TPR; ++j) {
      const int c = part + j * TPR;
      const float s = srow[c];
      const float pr = s == -INFINITY ? 0.f : __expf(s - m_new);
      Ps[row * G::ld_p + c] = tc_from_float<T>(pr);
      sum += pr;
    }
    sum = group_sum<TPR>(sum);
    // m_new == -inf: nothing allowed so far, O and l are still 0.
    const float alpha = m_new == -INFINITY ? 1.f : __expf(m - m_new);
    l = l * alpha + sum;
    m = m_new;
    for (int d = part; d < D; d += TPR) Os[row * G::ld_o + d] *= alpha;
    __syncthreads();
    gemm_acc<T, wmma::row_major, BS, D, BS>(Ps, G::ld_p, Vs, G::ld_h, Os, G::ld_o);
  }
  __syncthreads();
  if (row_in) {
    T* out = static_cast<T*>(p.out) + head + (q0 + row) * D;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int d = part; d < D; d += TPR) out[d] = tc_from_float<T>(Os[row * G::ld_o + d] * inv);
    if (part == 0) p.lse[bh * S + q0 + row] = l > 0.f ? m + logf(l) : -INFINITY;
  }
}

// ----------------------------------------------------------------------------------- backward

template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks) delta_tc_kernel(BackwardParams p) {
  // One row per D / kVec threads: delta = rowsum(dO * O), 16 bytes per load.
  constexpr int kPer = D / kVec;
  const int64_t rows = p.shape.batch * p.shape.heads * p.shape.seq;
  const int64_t row = (int64_t(blockIdx.x) * kTcThreads + threadIdx.x) / kPer;
  const int c = (threadIdx.x % kPer) * kVec;
  float s = 0.f;
  if (row < rows) {
    const uint4 ov = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + row * D + c);
    const uint4 gv = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + row * D + c);
    const T* o = reinterpret_cast<const T*>(&ov);
    const T* g = reinterpret_cast<const T*>(&gv);
#pragma unroll
    for (int i = 0; i < kVec; ++i) s += tc_to_float(o[i]) * tc_to_float(g[i]);
  }
  s = group_sum<kPer>(s);  // every lane takes part (rows past the end add 0)
  if (row < rows && threadIdx.x % kPer == 0) p.delta[row] = s;
}

template <typename T, int BS, int D>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks) dq_tc_kernel(BackwardParams p) {
  using G = Tiles<BS, D>;
  constexpr int TPR = G::TPR;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  Carver carve{tc_smem};
  T* Qs = carve.take<T>(G::h_bytes);
  T* dOs = carve.take<T>(G::h_bytes);
  T* Ks = carve.take<T>(G::h_bytes);
  T* Vs = carve.take<T>(G::h_bytes);
  float* Ss = carve.take<float>(G::s_bytes);
  float* dPs = carve.take<float>(G::s_bytes);
  T* dSs = carve.take<T>(G::p_bytes);
  float* dQs = carve.take<float>(G::o_bytes);

  const Layout& L = p.layout;
  const int64_t S = p.shape.seq;
  const int64_t bh = blockIdx.x;
  const int qb = blockIdx.y;
  const int64_t q0 = int64_t(qb) * BS;
  const int64_t head = bh * S * D;
  const int row = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const bool row_in = q0 + row < S;
  const float lse = row_in ? p.lse[bh * S + q0 + row] : -INFINITY;
  const float delta = row_in ? p.delta[bh * S + q0 + row] : 0.f;

  load_rows<T, BS, D>(static_cast<const T*>(p.q) + head, q0, S, Qs);
  load_rows<T, BS, D>(static_cast<const T*>(p.dout) + head, q0, S, dOs);
  zero_floats<BS * G::ld_o>(dQs);

  for (int e = L.row_ptr[qb]; e < L.row_ptr[qb + 1]; ++e) {
    const int64_t k0 = int64_t(L.col_idx[e]) * BS;
    const int pidx = L.partial_idx[e];
    __syncthreads();
    load_rows<T, BS, D>(static_cast<const T*>(p.k) + head, k0, S, Ks);
    load_rows<T, BS, D>(static_cast<const T*>(p.v) + head, k0, S, Vs);
    __syncthreads();
    gemm_nt<T, BS, BS, D>(Qs, G::ld_h, Ks, G::ld_h, Ss, G::ld_s);
    gemm_nt<T, BS, BS, D>(dOs, G::ld_h, Vs, G::ld_h, dPs, G::ld_s);
    __syncthreads();
#pragma unroll 2
    for (int j = 0; j < BS / TPR; ++j) {
      const int c = part + j * TPR;
      float ds = 0.f;
      if (lse != -INFINITY && k0 + c < S && tc_allowed(L, pidx, row, c)) {
        const float pr = __expf(p.scale * Ss[row * G::ld_s + c] - lse);
        ds = pr * (dPs[row * G::ld_s + c] - delta);
      }
      dSs[row * G::ld_p + c] = tc_from_float<T>(ds);
    }
    __syncthreads();
    gemm_acc<T, wmma::row_major, BS, D, BS>(dSs, G::ld_p, Ks, G::ld_h, dQs, G::ld_o);
  }
  __syncthreads();
  if (row_in) {
    T* dq = static_cast<T*>(p.dq) + head + (q0 + row) * D;
    for (int d = part; d < D; d += TPR) dq[d] = tc_from_float<T>(dQs[row * G::ld_o + d] * p.scale);
  }
}

template <typename T, int BS, int D>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks) dkdv_tc_kernel(BackwardParams p) {
  using G = Tiles<BS, D>;
  constexpr int TPR = G::TPR;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  Carver carve{tc_smem};
  T* Ks = carve.take<T>(G::h_bytes);
  T* Vs = carve.take<T>(G::h_bytes);
  T* Qs = carve.take<T>(G::h_bytes);
  T* dOs = carve.take<T>(G::h_bytes);
  float* Ss = carve.take<float>(G::s_bytes);
  float* dPs = carve.take<float>(G::s_bytes);
  T* Ps = carve.take<T>(G::p_bytes);
  T* dSs = carve.take<T>(G::p_bytes);
  float* dKs = carve.take<float>(G::o_bytes);
  float* dVs = carve.take<float>(G::o_bytes);

  const Layout& L = p.layout;
  const int64_t S = p.shape.seq;
  const int64_t bh = blockIdx.x;
  const int kb = blockIdx.y;
  const int64_t k0 = int64_t(kb) * BS;
  const int64_t head = bh * S * D;
  // In the score tiles this thread owns query row `row`; in the dK/dV tiles, key row `row`.
  const int row = threadIdx.x / TPR, part = threadIdx.x % TPR;

  load_rows<T, BS, D>(static_cast<const T*>(p.k) + head, k0, S, Ks);
  load_rows<T, BS, D>(static_cast<const T*>(p.v) + head, k0, S, Vs);
  zero_floats<BS * G::ld_o>(dKs);
  zero_floats<BS * G::ld_o>(dVs);

  for (int e = L.t_col_ptr[kb]; e < L.t_col_ptr[kb + 1]; ++e) {
    const int64_t q0 = int64_t(L.t_row_idx[e]) * BS;
    const int pidx = L.t_partial_idx[e];
    const bool row_in = q0 + row < S;
    const float lse = row_in ? p.lse[bh * S + q0 + row] : -INFINITY;
    const float delta = row_in ? p.delta[bh * S + q0 + row] : 0.f;
    __syncthreads();
    load_rows<T, BS, D>(static_cast<const T*>(p.q) + head, q0, S, Qs);
    load_rows<T, BS, D>(static_cast<const T*>(p.dout) + head, q0, S, dOs);
    __syncthreads();
    gemm_nt<T, BS, BS, D>(Qs, G::ld_h, Ks, G::ld_h, Ss, G::ld_s);
    gemm_nt<T, BS, BS, D>(dOs, G::ld_h, Vs, G::ld_h, dPs, G::ld_s);
    __syncthreads();
#pragma unroll 2
    for (int j = 0; j < BS / TPR; ++j) {
      const int c = part + j * TPR;
      float pr = 0.f, ds = 0.f;
      if (lse != -INFINITY && k0 + c < S && tc_allowed(L, pidx, row, c)) {
        pr = __expf(p.scale * Ss[row * G::ld_s + c] - lse);
        ds = pr * (dPs[row * G::ld_s + c] - delta);
      }
      Ps[row * G::ld_p + c] = tc_from_float<T>(pr);
      dSs[row * G::ld_p + c] = tc_from_float<T>(ds);
    }
    __syncthreads();
    // dV += P^T dO and dK += dS^T Q: P and dS are stored [query][key], i.e. transposed.
    gemm_acc<T, wmma::col_major, BS, D, BS>(Ps, G::ld_p, dOs, G::ld_h, dVs, G::ld_o);
    gemm_acc<T, wmma::col_major, BS, D, BS>(dSs, G::ld_p, Qs, G::ld_h, dKs, G::ld_o);
  }
  __syncthreads();
  if (k0 + row < S) {
    T* dk = static_cast<T*>(p.dk) + head + (k0 + row) * D;
    T* dv = static_cast<T*>(p.dv) + head + (k0 + row) * D;
    for (int d = part; d < D; d += TPR) {
      dk[d] = tc_from_float<T>(dKs[row * G::ld_o + d] * p.scale);
      dv[d] = tc_from_float<T>(dVs[row * G::ld_o + d]);
    }
  }
}

// ------------------------------------------------------------------------------------ launchers

template <typename Kernel>
cudaError_t set_tc_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int BS, int D>
cudaError_t launch_forward_tc(const ForwardParams& p, cudaStream_t stream) {
  constexpr size_t smem = Tiles<BS, D>::forward_bytes;
  cudaError_t err = set_tc_smem(forward_tc_kernel<T, BS, D>, smem);
  if (err != cudaSuccess) return err;
  // batch*head on x (up to 2^31 - 1 blocks), sequence blocks on y (up to 65535).
  const dim3 grid(static_cast<unsigned>(p.shape.batch * p.shape.heads), p.layout.n_blocks);
  forward_tc_kernel<T, BS, D><<<grid, kTcThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int BS, int D>
cudaError_t launch_backward_tc(const BackwardParams& p, cudaStream_t stream) {
  using G = Tiles<BS, D>;
  const int64_t rows = p.shape.batch * p.shape.heads * p.shape.seq;
  const int64_t rows_per_block = kTcThreads / (D / kVec);
  delta_tc_kernel<T, D><<<static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), kTcThreads, 0,
                          stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.shape.batch * p.shape.heads), p.layout.n_blocks);
  if ((err = set_tc_smem(dq_tc_kernel<T, BS, D>, G::dq_bytes)) != cudaSuccess) return err;
  dq_tc_kernel<T, BS, D><<<grid, kTcThreads, G::dq_bytes, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = set_tc_smem(dkdv_tc_kernel<T, BS, D>, G::dkdv_bytes)) != cudaSuccess) return err;
  dkdv_tc_kernel<T, BS, D><<<grid, kTcThreads, G::dkdv_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int BS, int D> struct ForwardTc {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return launch_forward_tc<T, BS, D>(p, s); }
};
template <typename T, int BS, int D> struct BackwardTc {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return launch_backward_tc<T, BS, D>(p, s); }
};

template <template <typename, int, int> class Launch, typename T, int BS, typename Params>
cudaError_t by_head_dim(const Params& p, cudaStream_t stream) {
  return p.shape.head_dim == 32 ? Launch<T, BS, 32>::run(p, stream) : Launch<T, BS, 64>::run(p, stream);
}

template <template <typename, int, int> class Launch, typename T, typename Params>
cudaError_t by_block(const Params& p, cudaStream_t stream) {
  switch (p.layout.block_size) {
    case 16: return by_head_dim<Launch, T, 16>(p, stream);
    case 32: return by_head_dim<Launch, T, 32>(p, stream);
    default: return by_head_dim<Launch, T, 64>(p, stream);
  }
}

// dtype x block size x head dim dispatch; the binding has checked cuda_tc_supports() already.
template <template <typename, int, int> class Launch, typename Params>
cudaError_t dispatch_tc(const Params& p, DType dtype, cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (!cuda_tc_supports(p.layout.block_size, p.shape.head_dim)) return cudaErrorInvalidValue;
  return dtype == DType::kBFloat16 ? by_block<Launch, __nv_bfloat16>(p, stream) : by_block<Launch, __half>(p, stream);
}

}  // namespace

cudaError_t forward_cuda_tc(const ForwardParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_tc<ForwardTc>(p, dtype, stream);
}
cudaError_t backward_cuda_tc(const BackwardParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_tc<BackwardTc>(p, dtype, stream);
}

}  // namespace bsa
}  // namespace megadalle
