// CUDA kernels of block-sparse attention (contract: bsa_params.h). Torch-free on purpose, so CI
// compiles this file with a bare `nvcc -c` for sm_80 and sm_90 (tests/test_cuda_compile.py).
//
// Design (correctness first; SIMT FMA, fp32 accumulation, no tensor cores yet):
//   forward   one thread block per (batch*head, query block). Q tile in shared memory; for each
//             key block the layout keeps: load K/V tiles, scores with element masks, online
//             softmax (running max m, sum l, rescale alpha) and O += P V, O in registers.
//             Saves lse = m + log(l) per row for the backward.
//   backward  FlashAttention-2 split without atomics: a preprocess kernel computes
//             delta = rowsum(dO * O); dq_kernel walks the CSR (per query block), dkdv_kernel the
//             transposed CSC (per key block). Both recompute P = exp(scale q.k - lse).
//   decode    one thread block per batch*head for a single query row; each warp keeps its own
//             online softmax over a strided share of the allowed keys, merged at the end.
// Tiles are fp32 in shared memory with rows padded to D + 1 floats where threads of a warp read
// different rows at the same column (no bank conflicts). Shared memory is sized at run time from
// the block size; the largest case (bs 64, D 64) needs ~82 KB (dq_kernel), within sm_80's 163 KB
// opt-in. Head dims 32 (tiny preset) and 64 (every other preset, the paper) are instantiated;
// each more doubles the CI compile time.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "bsa_cuda.h"

namespace megadalle {
namespace bsa {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlock = 64;
constexpr int kDecodeThreads = 128;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ bool element_allowed(const Layout& L, int pidx, int r, int c) {
  return pidx < 0 || L.block_masks[(static_cast<int64_t>(pidx) * L.block_size + r) * L.block_size + c] != 0;
}

// Rows [row0, row0 + bs) of one head's [S, D] matrix into an fp32 tile with row stride `ld`;
// rows past the sequence end are zero.
template <typename T, int D>
__device__ __forceinline__ void load_tile(const T* head, int64_t row0, int bs, int64_t S, float* tile, int ld) {
  for (int idx = threadIdx.x; idx < bs * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t row = row0 + r;
    tile[r * ld + d] = row < S ? to_float(head[row * D + d]) : 0.f;
  }
}

template <int D>
__device__ __forceinline__ float dot_rows(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll 16
  for (int d = 0; d < D; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

// ------------------------------------------------------------------------------------ forward

template <int D>
size_t forward_smem(int bs) {
  // Q [bs][D], K [bs][D+1], V [bs][D], P [bs][bs], m / l / alpha [bs]
  return sizeof(float) * (size_t(bs) * D + size_t(bs) * (D + 1) + size_t(bs) * D + size_t(bs) * bs + 3 * bs);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams p) {
  extern __shared__ float smem[];
  const Layout& L = p.layout;
  const int bs = L.block_size;
  const int64_t S = p.shape.seq;
  float* Qs = smem;
  float* Ks = Qs + bs * D;
  float* Vs = Ks + bs * (D + 1);
  float* Ps = Vs + bs * D;
  float* row_m = Ps + bs * bs;
  float* row_l = row_m + bs;
  float* row_alpha = row_l + bs;

  const int64_t bh = blockIdx.x;
  const int qb = blockIdx.y;
  const int64_t q0 = int64_t(qb) * bs;
  const T* q = static_cast<const T*>(p.q) + bh * S * D;
  const T* k = static_cast<const T*>(p.k) + bh * S * D;
  const T* v = static_cast<const T*>(p.v) + bh * S * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile<T, D>(q, q0, bs, S, Qs, D);
  for (int r = threadIdx.x; r < bs; r += blockDim.x) {
    row_m[r] = -INFINITY;
    row_l[r] = 0.f;
  }
  // This thread's output elements: idx = threadIdx.x + i * kThreads over the [bs][D] tile.
  constexpr int kMaxPer = kMaxBlock * D / kThreads;
  const int n_per = bs * D / kThreads;
  float acc[kMaxPer];
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) acc[i] = 0.f;

  for (int e = L.row_ptr[qb]; e < L.row_ptr[qb + 1]; ++e) {
    const int64_t k0 = int64_t(L.col_idx[e]) * bs;
    const int pidx = L.partial_idx[e];
    __syncthreads();  // the previous block's K/V/P are no longer read
    load_tile<T, D>(k, k0, bs, S, Ks, D + 1);
    load_tile<T, D>(v, k0, bs, S, Vs, D);
    __syncthreads();
    for (int idx = threadIdx.x; idx < bs * bs; idx += blockDim.x) {
      const int r = idx / bs, c = idx % bs;
      const bool ok = q0 + r < S && k0 + c < S && element_allowed(L, pidx, r, c);
      Ps[idx] = ok ? p.scale * dot_rows<D>(Qs + r * D, Ks + c * (D + 1)) : -INFINITY;
    }
    __syncthreads();
    // Online softmax, one warp per row.
    for (int r = warp; r < bs; r += kWarps) {
      float mx = -INFINITY;
      for (int c = lane; c < bs; c += 32) mx = fmaxf(mx, Ps[r * bs + c]);
      mx = warp_max(mx);
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int c = lane; c < bs; c += 32) {
        const float s = Ps[r * bs + c];
        const float pr = s == -INFINITY ? 0.f : __expf(s - m_new);
        Ps[r * bs + c] = pr;
        sum += pr;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        // m_new == -inf: nothing allowed so far, acc and l are still 0.
        const float alpha = m_new == -INFINITY ? 1.f : __expf(m_old - m_new);
        row_alpha[r] = alpha;
        row_l[r] = row_l[r] * alpha + sum;
        row_m[r] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i) {
      if (i < n_per) {
        const int idx = threadIdx.x + i * kThreads;
        const int r = idx / D, d = idx % D;
        float a = acc[i] * row_alpha[r];
        const float* prow = Ps + r * bs;
        for (int c = 0; c < bs; ++c) a = fmaf(prow[c], Vs[c * D + d], a);
        acc[i] = a;
      }
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + bh * S * D;
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) {
    if (i < n_per) {
      const int idx = threadIdx.x + i * kThreads;
      const int r = idx / D, d = idx % D;
      if (q0 + r < S) {
        const float l = row_l[r];
        out[(q0 + r) * D + d] = from_float<T>(l > 0.f ? acc[i] / l : 0.f);
      }
    }
  }
  for (int r = threadIdx.x; r < bs; r += blockDim.x) {
    if (q0 + r < S) {
      const float l = row_l[r];
      p.lse[bh * S + q0 + r] = l > 0.f ? row_m[r] + logf(l) : -INFINITY;
    }
  }
}

// ----------------------------------------------------------------------------------- backward

template <typename T>
__global__ void delta_kernel(BackwardParams p) {
  // One warp per row: delta = rowsum(dO * O).
  const int64_t rows = p.shape.batch * p.shape.heads * p.shape.seq;
  const int64_t D = p.shape.head_dim;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const T* o = static_cast<const T*>(p.out) + row * D;
  const T* dout = static_cast<const T*>(p.dout) + row * D;
  float s = 0.f;
  for (int64_t d = threadIdx.x % 32; d < D; d += 32) s += to_float(o[d]) * to_float(dout[d]);
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) p.delta[row] = s;
}

template <int D>
size_t dq_smem(int bs) {
  // Q, dO [bs][D]; K, V [bs][D+1]; dS [bs][bs]; lse, delta [bs]
  return sizeof(float) * (2 * size_t(bs) * D + 2 * size_t(bs) * (D + 1) + size_t(bs) * bs + 2 * bs);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(BackwardParams p) {
  extern __shared__ float smem[];
  const Layout& L = p.layout;
  const int bs = L.block_size;
  const int64_t S = p.shape.seq;
  float* Qs = smem;
  float* dOs = Qs + bs * D;
  float* Ks = dOs + bs * D;
  float* Vs = Ks + bs * (D + 1);
  float* dS = Vs + bs * (D + 1);
  float* lse_s = dS + bs * bs;
  float* delta_s = lse_s + bs;

  const int64_t bh = blockIdx.x;
  const int qb = blockIdx.y;
  const int64_t q0 = int64_t(qb) * bs;
  const int64_t head = bh * S * D;
  load_tile<T, D>(static_cast<const T*>(p.q) + head, q0, bs, S, Qs, D);
  load_tile<T, D>(static_cast<const T*>(p.dout) + head, q0, bs, S, dOs, D);
  for (int r = threadIdx.x; r < bs; r += blockDim.x) {
    const bool in = q0 + r < S;
    lse_s[r] = in ? p.lse[bh * S + q0 + r] : -INFINITY;
    delta_s[r] = in ? p.delta[bh * S + q0 + r] : 0.f;
  }
  constexpr int kMaxPer = kMaxBlock * D / kThreads;
  const int n_per = bs * D / kThreads;
  float acc[kMaxPer];
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) acc[i] = 0.f;

  for (int e = L.row_ptr[qb]; e < L.row_ptr[qb + 1]; ++e) {
    const int64_t k0 = int64_t(L.col_idx[e]) * bs;
    const int pidx = L.partial_idx[e];
    __syncthreads();
    load_tile<T, D>(static_cast<const T*>(p.k) + head, k0, bs, S, Ks, D + 1);
    load_tile<T, D>(static_cast<const T*>(p.v) + head, k0, bs, S, Vs, D + 1);
    __syncthreads();
    for (int idx = threadIdx.x; idx < bs * bs; idx += blockDim.x) {
      const int r = idx / bs, c = idx % bs;
      float ds = 0.f;
      if (lse_s[r] != -INFINITY && k0 + c < S && element_allowed(L, pidx, r, c)) {
        const float pr = __expf(p.scale * dot_rows<D>(Qs + r * D, Ks + c * (D + 1)) - lse_s[r]);
        ds = pr * (dot_rows<D>(dOs + r * D, Vs + c * (D + 1)) - delta_s[r]);
      }
      dS[idx] = ds;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i) {
      if (i < n_per) {
        const int idx = threadIdx.x + i * kThreads;
        const int r = idx / D, d = idx % D;
        float a = acc[i];
        for (int c = 0; c < bs; ++c) a = fmaf(dS[r * bs + c], Ks[c * (D + 1) + d], a);
        acc[i] = a;
      }
    }
  }
  T* dq = static_cast<T*>(p.dq) + head;
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) {
    if (i < n_per) {
      const int idx = threadIdx.x + i * kThreads;
      const int r = idx / D, d = idx % D;
      if (q0 + r < S) dq[(q0 + r) * D + d] = from_float<T>(acc[i] * p.scale);
    }
  }
}

template <int D>
size_t dkdv_smem(int bs) {
  // K, V, Q, dO [bs][D+1]; P / dS [bs][bs]; lse, delta [bs]
  return sizeof(float) * (4 * size_t(bs) * (D + 1) + size_t(bs) * bs + 2 * bs);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(BackwardParams p) {
  extern __shared__ float smem[];
  const Layout& L = p.layout;
  const int bs = L.block_size;
  const int64_t S = p.shape.seq;
  constexpr int ld = D + 1;
  float* Ks = smem;
  float* Vs = Ks + bs * ld;
  float* Qs = Vs + bs * ld;
  float* dOs = Qs + bs * ld;
  float* Ps = dOs + bs * ld;
  float* lse_s = Ps + bs * bs;
  float* delta_s = lse_s + bs;

  const int64_t bh = blockIdx.x;
  const int kb = blockIdx.y;
  const int64_t k0 = int64_t(kb) * bs;
  const int64_t head = bh * S * D;
  load_tile<T, D>(static_cast<const T*>(p.k) + head, k0, bs, S, Ks, ld);
  load_tile<T, D>(static_cast<const T*>(p.v) + head, k0, bs, S, Vs, ld);
  // This thread's dK/dV elements: idx = threadIdx.x + i * kThreads over the [bs][D] tile, (c, d).
  constexpr int kMaxPer = kMaxBlock * D / kThreads;
  const int n_per = bs * D / kThreads;
  float dk_acc[kMaxPer], dv_acc[kMaxPer];
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) dk_acc[i] = dv_acc[i] = 0.f;

  for (int e = L.t_col_ptr[kb]; e < L.t_col_ptr[kb + 1]; ++e) {
    const int64_t q0 = int64_t(L.t_row_idx[e]) * bs;
    const int pidx = L.t_partial_idx[e];
    __syncthreads();
    load_tile<T, D>(static_cast<const T*>(p.q) + head, q0, bs, S, Qs, ld);
    load_tile<T, D>(static_cast<const T*>(p.dout) + head, q0, bs, S, dOs, ld);
    for (int r = threadIdx.x; r < bs; r += blockDim.x) {
      const bool in = q0 + r < S;
      lse_s[r] = in ? p.lse[bh * S + q0 + r] : -INFINITY;
      delta_s[r] = in ? p.delta[bh * S + q0 + r] : 0.f;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < bs * bs; idx += blockDim.x) {
      const int r = idx / bs, c = idx % bs;
      float pr = 0.f;
      if (lse_s[r] != -INFINITY && k0 + c < S && element_allowed(L, pidx, r, c))
        pr = __expf(p.scale * dot_rows<D>(Qs + r * ld, Ks + c * ld) - lse_s[r]);
      Ps[idx] = pr;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i) {
      if (i < n_per) {
        const int idx = threadIdx.x + i * kThreads;
        const int c = idx / D, d = idx % D;
        float a = dv_acc[i];
        for (int r = 0; r < bs; ++r) a = fmaf(Ps[r * bs + c], dOs[r * ld + d], a);
        dv_acc[i] = a;
      }
    }
    __syncthreads();
    // P -> dS in place (each entry is owned by the thread that wrote it above).
    for (int idx = threadIdx.x; idx < bs * bs; idx += blockDim.x) {
      const int r = idx / bs, c = idx % bs;
      const float pr = Ps[idx];
      if (pr != 0.f) Ps[idx] = pr * (dot_rows<D>(dOs + r * ld, Vs + c * ld) - delta_s[r]);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i) {
      if (i < n_per) {
        const int idx = threadIdx.x + i * kThreads;
        const int c = idx / D, d = idx % D;
        float a = dk_acc[i];
        for (int r = 0; r < bs; ++r) a = fmaf(Ps[r * bs + c], Qs[r * ld + d], a);
        dk_acc[i] = a;
      }
    }
  }
  T* dk = static_cast<T*>(p.dk) + head;
  T* dv = static_cast<T*>(p.dv) + head;
#pragma unroll
  for (int i = 0; i < kMaxPer; ++i) {
    if (i < n_per) {
      const int idx = threadIdx.x + i * kThreads;
      const int c = idx / D, d = idx % D;
      if (k0 + c < S) {
        dk[(k0 + c) * D + d] = from_float<T>(dk_acc[i] * p.scale);
        dv[(k0 + c) * D + d] = from_float<T>(dv_acc[i]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------- decode

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(DecodeParams p) {
  constexpr int kW = kDecodeThreads / 32;
  constexpr int kPerLane = (D + 31) / 32;
  __shared__ float qs[D];
  __shared__ float warp_m[kW], warp_l[kW];
  __shared__ float warp_acc[kW][D];
  const Layout& L = p.layout;
  const int bs = L.block_size;
  const int64_t C = p.shape.seq;  // cache length
  const int64_t bh = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qb = static_cast<int>(p.pos / bs), r = static_cast<int>(p.pos % bs);
  const T* kc = static_cast<const T*>(p.k_cache) + bh * C * D;
  const T* vc = static_cast<const T*>(p.v_cache) + bh * C * D;

  for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = to_float(static_cast<const T*>(p.q)[bh * D + d]);
  __syncthreads();

  float m = -INFINITY, l = 0.f, acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  const int e0 = L.row_ptr[qb], n_keys = (L.row_ptr[qb + 1] - e0) * bs;
  for (int j = warp; j < n_keys; j += kW) {
    const int e = e0 + j / bs, c = j % bs;
    const int64_t key = int64_t(L.col_idx[e]) * bs + c;
    // Keys after pos are not in the cache yet: decode is causal whatever the layout says.
    if (key > p.pos || key >= C || !element_allowed(L, L.partial_idx[e], r, c)) continue;  // warp-uniform
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) s += qs[d] * to_float(kc[key * D + d]);
    }
    s = warp_sum(s) * p.scale;
    const float m_new = fmaxf(m, s);
    const float alpha = __expf(m - m_new);  // m == -inf -> 0, acc and l are 0 then anyway
    const float pr = __expf(s - m_new);
    l = l * alpha + pr;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) acc[i] = acc[i] * alpha + pr * to_float(vc[key * D + d]);
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) warp_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int w = 0; w < kW; ++w) m_all = fmaxf(m_all, warp_m[w]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (m_all != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kW; ++w) {
        const float f = warp_m[w] == -INFINITY ? 0.f : __expf(warp_m[w] - m_all);
        num += f * warp_acc[w][d];
        den += f * warp_l[w];
      }
    }
    static_cast<T*>(p.out)[bh * D + d] = from_float<T>(den > 0.f ? num / den : 0.f);
  }
}

// ------------------------------------------------------------------------------------ launchers

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int D>
cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream) {
  const size_t smem = forward_smem<D>(p.layout.block_size);
  cudaError_t err = set_smem(forward_kernel<T, D>, smem);
  if (err != cudaSuccess) return err;
  // batch*head on x (up to 2^31 - 1 blocks), sequence blocks on y (up to 65535).
  const dim3 grid(static_cast<unsigned>(p.shape.batch * p.shape.heads), p.layout.n_blocks);
  forward_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_backward(const BackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.shape.batch * p.shape.heads * p.shape.seq;
  const int rows_per_block = kThreads / 32;
  delta_kernel<T><<<static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int bs = p.layout.block_size;
  // batch*head on x (up to 2^31 - 1 blocks), sequence blocks on y (up to 65535).
  const dim3 grid(static_cast<unsigned>(p.shape.batch * p.shape.heads), p.layout.n_blocks);
  if ((err = set_smem(dq_kernel<T, D>, dq_smem<D>(bs))) != cudaSuccess) return err;
  dq_kernel<T, D><<<grid, kThreads, dq_smem<D>(bs), stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = set_smem(dkdv_kernel<T, D>, dkdv_smem<D>(bs))) != cudaSuccess) return err;
  dkdv_kernel<T, D><<<grid, kThreads, dkdv_smem<D>(bs), stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  decode_kernel<T, D><<<static_cast<unsigned>(p.shape.batch * p.shape.heads), kDecodeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// dtype x head_dim dispatch; the binding has checked cuda_supports() already.
template <template <typename, int> class Launch, typename Params>
cudaError_t dispatch(const Params& p, DType dtype, cudaStream_t stream) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (!bf16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (!cuda_supports(p.layout.block_size, p.shape.head_dim)) return cudaErrorInvalidValue;
  switch (p.shape.head_dim) {
    case 32: return bf16 ? Launch<__nv_bfloat16, 32>::run(p, stream) : Launch<__half, 32>::run(p, stream);
    default: return bf16 ? Launch<__nv_bfloat16, 64>::run(p, stream) : Launch<__half, 64>::run(p, stream);
  }
}

template <typename T, int D> struct ForwardLaunch {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return launch_forward<T, D>(p, s); }
};
template <typename T, int D> struct BackwardLaunch {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return launch_backward<T, D>(p, s); }
};
template <typename T, int D> struct DecodeLaunch {
  static cudaError_t run(const DecodeParams& p, cudaStream_t s) { return launch_decode<T, D>(p, s); }
};

}  // namespace

cudaError_t forward_cuda(const ForwardParams& p, DType dtype, cudaStream_t stream) {
  return dispatch<ForwardLaunch>(p, dtype, stream);
}
cudaError_t backward_cuda(const BackwardParams& p, DType dtype, cudaStream_t stream) {
  return dispatch<BackwardLaunch>(p, dtype, stream);
}
cudaError_t decode_cuda(const DecodeParams& p, DType dtype, cudaStream_t stream) {
  return dispatch<DecodeLaunch>(p, dtype, stream);
}

}  // namespace bsa
}  // namespace megadalle
