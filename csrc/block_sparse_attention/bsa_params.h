// Block-sparse attention: the torch-free contract shared by the CPU implementation, the CUDA
// kernels and the torch binding. Nothing here includes torch, so the .cu files compile with a bare
// nvcc (CI has nvcc but torch's CPU wheel lacks its CUDA headers).
//
// Tensors are contiguous [B, H, S, D] (row-major); `lse` and `delta` are fp32 [B, H, S].
// The layout is the CSR of megadalle/ops/layout.py: query block i keeps key blocks
// col_idx[row_ptr[i] .. row_ptr[i+1]); partial_idx[k] is -1 for a full block or indexes
// block_masks [n_partial, bs, bs] (1 = allowed, [query row][key col] inside the block).
// The transposed (CSC) copy lists, for key block j, the query blocks that keep it; the
// backward pass uses it to compute dK/dV per key block without atomics.
// Positions >= S (padding of the last block) are always masked, whatever the layout says.
// A query row with no allowed key gets out = 0 and lse = -inf.
#pragma once

#include <cstdint>

namespace megadalle {
namespace bsa {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct Layout {
  int block_size = 0;   // bs
  int n_blocks = 0;     // ceil(S / bs)
  const int32_t* row_ptr = nullptr;      // [n_blocks + 1]
  const int32_t* col_idx = nullptr;      // [nnz]
  const int32_t* partial_idx = nullptr;  // [nnz]
  const uint8_t* block_masks = nullptr;  // [n_partial, bs, bs]
  // Transposed copy (backward only): key block j is kept by query blocks
  // t_row_idx[t_col_ptr[j] .. t_col_ptr[j+1]); t_partial_idx indexes block_masks as above.
  const int32_t* t_col_ptr = nullptr;
  const int32_t* t_row_idx = nullptr;
  const int32_t* t_partial_idx = nullptr;
};

struct Shape {
  int64_t batch = 0, heads = 0, seq = 0, head_dim = 0;
};

struct ForwardParams {
  Shape shape;
  Layout layout;
  float scale = 1.f;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // [B, H, S, D], same dtype as q
  float* lse = nullptr;  // [B, H, S]
};

struct BackwardParams {
  Shape shape;
  Layout layout;
  float scale = 1.f;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;  // from the forward
  float* delta = nullptr;      // scratch [B, H, S]: rowsum(dout * out)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

// One new query token at sequence position `pos` against a KV cache [B, H, cache_len, D]
// (cache_len > pos; entries after pos are never read). Allowed keys are row `pos` of the layout.
struct DecodeParams {
  Shape shape;  // seq = cache_len
  Layout layout;
  float scale = 1.f;
  int64_t pos = 0;
  const void* q = nullptr;        // [B, H, 1, D]
  const void* k_cache = nullptr;  // [B, H, cache_len, D]
  const void* v_cache = nullptr;
  void* out = nullptr;            // [B, H, 1, D]
};

// CPU implementation (block_sparse_attention_cpu.cpp): fp32, bf16 and fp64 (fp64 for gradcheck).
void forward_cpu(const ForwardParams& p, DType dtype);
void backward_cpu(const BackwardParams& p, DType dtype);
void decode_cpu(const DecodeParams& p, DType dtype);

}  // namespace bsa
}  // namespace megadalle
