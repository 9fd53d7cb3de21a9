// Torch binding of block-sparse attention: the one place that checks inputs and the one place
// that registers the ops (namespace `megadalle`) with torch.library. Kernels live in
// block_sparse_attention_cpu.cpp and block_sparse_attention_cuda.cu and know nothing of torch.
//
// Ops (fake/meta implementations and the autograd.Function are in
// megadalle/ops/block_sparse_attention.py):
//   bsa_forward(q, k, v, row_ptr, col_idx, partial_idx, block_masks, block_size, scale,
//               tensor_cores=False) -> (out, lse)
//   bsa_backward(dout, q, k, v, out, lse, row_ptr, col_idx, partial_idx, t_col_ptr, t_row_idx,
//                t_partial_idx, block_masks, block_size, scale, tensor_cores=False) -> (dq, dk, dv)
// tensor_cores=True runs the WMMA kernels (block_sparse_attention_cuda_tc.cu) on CUDA tensors
// whose data pointers are all 16-byte aligned, the SIMT kernels otherwise; it changes nothing on
// CPU. Off by default until tests/test_block_sparse_cuda.py has passed with it on a GPU.
//   bsa_decode(q, k_cache, v_cache, row_ptr, col_idx, partial_idx, block_masks, block_size, pos,
//              scale) -> out
// The layout's content (ascending columns, index ranges) is validated once per layout in Python
// (BlockLayout.validate); here only what can be checked without reading device memory.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "bsa_params.h"

#ifdef MEGADALLE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <initializer_list>

#include "bsa_cuda.h"
#endif

namespace megadalle {
namespace bsa {
namespace {

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "block_sparse_attention: dtype ", t.scalar_type(),
                  " is not supported (use float16 or bfloat16 on CUDA; float32, bfloat16, float16 or float64 on CPU)");
  }
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t dim) {
  TORCH_CHECK(t.defined(), "block_sparse_attention: ", name, " is undefined");
  TORCH_CHECK(t.dim() == dim, "block_sparse_attention: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "block_sparse_attention: ", name, " is on ", t.device(),
              " but q is on ", like.device(), "; move all inputs (and the layout) to one device");
  TORCH_CHECK(t.is_contiguous(), "block_sparse_attention: ", name,
              " must be contiguous (call .contiguous() on it; [B, H, S, D] row-major)");
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_tensor(t, name, q, q.dim());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "block_sparse_attention: ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type(), "; q, k, v must share one dtype");
}

void check_device_dtype(const at::Tensor& q) {
  const DType dt = to_dtype(q);
  if (q.is_cuda()) {
    TORCH_CHECK(dt == DType::kFloat16 || dt == DType::kBFloat16,
                "block_sparse_attention: the CUDA kernel takes float16 or bfloat16, got ", q.scalar_type());
  } else {
    TORCH_CHECK(q.is_cpu(), "block_sparse_attention: unsupported device ", q.device());
  }
}

Layout make_layout(const at::Tensor& q, int64_t seq, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                   const at::Tensor& partial_idx, const at::Tensor& block_masks, int64_t block_size) {
  TORCH_CHECK(block_size >= 1, "block_sparse_attention: block_size must be >= 1, got ", block_size);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{row_ptr, "layout.row_ptr"},
                         {col_idx, "layout.col_idx"},
                         {partial_idx, "layout.partial_idx"}}) {
    check_tensor(t, name, q, 1);
    TORCH_CHECK(t.scalar_type() == at::kInt, "block_sparse_attention: ", name, " must be int32, got ", t.scalar_type());
  }
  check_tensor(block_masks, "layout.block_masks", q, 3);
  TORCH_CHECK(block_masks.scalar_type() == at::kBool, "block_sparse_attention: layout.block_masks must be bool");
  TORCH_CHECK(block_masks.size(1) == block_size && block_masks.size(2) == block_size,
              "block_sparse_attention: layout.block_masks must be (n_partial, ", block_size, ", ", block_size,
              "), got ", block_masks.sizes());
  const int64_t nb = (seq + block_size - 1) / block_size;
  TORCH_CHECK(row_ptr.numel() == nb + 1, "block_sparse_attention: the layout has ", row_ptr.numel() - 1,
              " query blocks but a sequence of ", seq, " tokens in blocks of ", block_size, " needs ", nb,
              "; build the layout for this sequence length");
  TORCH_CHECK(partial_idx.numel() == col_idx.numel(),
              "block_sparse_attention: layout.partial_idx must have one entry per col_idx entry");
  Layout L;
  L.block_size = static_cast<int>(block_size);
  L.n_blocks = static_cast<int>(nb);
  L.row_ptr = row_ptr.data_ptr<int32_t>();
  L.col_idx = col_idx.data_ptr<int32_t>();
  L.partial_idx = partial_idx.data_ptr<int32_t>();
  L.block_masks = reinterpret_cast<const uint8_t*>(block_masks.data_ptr<bool>());
  return L;
}

Shape shape_of(const at::Tensor& q) { return Shape{q.size(0), q.size(1), q.size(2), q.size(3)}; }

#ifdef MEGADALLE_WITH_CUDA
void check_cuda_sizes(const at::Tensor& q, int64_t block_size) {
  TORCH_CHECK(cuda_supports(static_cast<int>(block_size), q.size(3)),
              "block_sparse_attention: the CUDA kernel supports block_size 16, 32 or 64 and head_dim 32 or 64; "
              "got block_size ", block_size, ", head_dim ", q.size(3));
  TORCH_CHECK(q.size(0) * q.size(1) < (int64_t(1) << 31) && q.size(2) <= 65535 * block_size,
              "block_sparse_attention: batch*heads must be < 2^31 and the sequence at most 65535 blocks");
}

void check_cuda_status(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "block_sparse_attention: ", what, " failed: ", cudaGetErrorString(err));
}

// The tensor-core kernels move 16 bytes at a time between global and shared memory.
bool aligned16(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  return true;
}
#endif

std::tuple<at::Tensor, at::Tensor> bsa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                               const at::Tensor& partial_idx, const at::Tensor& block_masks,
                                               int64_t block_size, double scale, bool tensor_cores) {
  check_tensor(q, "q", q, 4);
  check_same(k, "k", q);
  check_same(v, "v", q);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "block_sparse_attention: q, k, v must all be [B, H, S, D] ",
              "of one shape, got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  check_device_dtype(q);
  ForwardParams p;
  p.shape = shape_of(q);
  p.layout = make_layout(q, q.size(2), row_ptr, col_idx, partial_idx, block_masks, block_size);
  p.scale = static_cast<float>(scale);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse.fill_(-INFINITY)};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
#ifdef MEGADALLE_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda_sizes(q, block_size);
    c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    if (tensor_cores && cuda_tc_supports(static_cast<int>(block_size), q.size(3)) && aligned16({&q, &k, &v, &out}))
      check_cuda_status(forward_cuda_tc(p, to_dtype(q), stream), "tensor-core forward kernel");
    else
      check_cuda_status(forward_cuda(p, to_dtype(q), stream), "forward kernel");
    return {out, lse};
  }
#endif
  forward_cpu(p, to_dtype(q));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsa_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& partial_idx,
    const at::Tensor& t_col_ptr, const at::Tensor& t_row_idx, const at::Tensor& t_partial_idx,
    const at::Tensor& block_masks, int64_t block_size, double scale, bool tensor_cores) {
  check_tensor(q, "q", q, 4);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}, {out, "out"}, {dout, "dout"}}) {
    check_same(t, name, q);
    TORCH_CHECK(t.sizes() == q.sizes(), "block_sparse_attention backward: ", name, " has shape ", t.sizes(),
                " but q has ", q.sizes());
  }
  check_tensor(lse, "lse", q, 3);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3),
              "block_sparse_attention backward: lse must be float32 [B, H, S]");
  check_device_dtype(q);
  BackwardParams p;
  p.shape = shape_of(q);
  p.layout = make_layout(q, q.size(2), row_ptr, col_idx, partial_idx, block_masks, block_size);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{t_col_ptr, "layout t_col_ptr"},
                         {t_row_idx, "layout t_row_idx"},
                         {t_partial_idx, "layout t_partial_idx"}}) {
    check_tensor(t, name, q, 1);
    TORCH_CHECK(t.scalar_type() == at::kInt, "block_sparse_attention: ", name, " must be int32");
  }
  TORCH_CHECK(t_col_ptr.numel() == row_ptr.numel() && t_row_idx.numel() == col_idx.numel() &&
                  t_partial_idx.numel() == col_idx.numel(),
              "block_sparse_attention backward: the transposed layout does not match the layout "
              "(use BlockLayout.transposed())");
  p.layout.t_col_ptr = t_col_ptr.data_ptr<int32_t>();
  p.layout.t_row_idx = t_row_idx.data_ptr<int32_t>();
  p.layout.t_partial_idx = t_partial_idx.data_ptr<int32_t>();
  p.scale = static_cast<float>(scale);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk, dv};
  at::Tensor delta = at::empty_like(lse);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
#ifdef MEGADALLE_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda_sizes(q, block_size);
    c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    if (tensor_cores && cuda_tc_supports(static_cast<int>(block_size), q.size(3)) &&
        aligned16({&q, &k, &v, &out, &dout, &dq, &dk, &dv}))
      check_cuda_status(backward_cuda_tc(p, to_dtype(q), stream), "tensor-core backward kernels");
    else
      check_cuda_status(backward_cuda(p, to_dtype(q), stream), "backward kernels");
    return {dq, dk, dv};
  }
#endif
  backward_cpu(p, to_dtype(q));
  return {dq, dk, dv};
}

at::Tensor bsa_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& partial_idx,
                      const at::Tensor& block_masks, int64_t block_size, int64_t pos, double scale) {
  check_tensor(q, "q", q, 4);
  check_same(k_cache, "k_cache", q);
  check_same(v_cache, "v_cache", q);
  TORCH_CHECK(q.size(2) == 1, "block_sparse_attention_decode: q must be [B, H, 1, D] (one new token), got ", q.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "block_sparse_attention_decode: k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " differ");
  TORCH_CHECK(k_cache.size(0) == q.size(0) && k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3),
              "block_sparse_attention_decode: the cache must be [B, H, cache_len, D] matching q ", q.sizes(),
              ", got ", k_cache.sizes());
  check_device_dtype(q);
  const int64_t nb = row_ptr.numel() - 1;
  TORCH_CHECK(pos >= 0 && pos < k_cache.size(2) && pos < nb * block_size,
              "block_sparse_attention_decode: pos=", pos, " must be in [0, min(cache_len=", k_cache.size(2),
              ", layout length=", nb * block_size, "))");
  DecodeParams p;
  p.shape = shape_of(k_cache);
  // The layout is checked against its own length (the cache may be allocated longer).
  p.layout = make_layout(q, nb * block_size, row_ptr, col_idx, partial_idx, block_masks, block_size);
  p.scale = static_cast<float>(scale);
  p.pos = pos;
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
#ifdef MEGADALLE_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda_sizes(q, block_size);
    c10::cuda::CUDAGuard guard(q.device());
    check_cuda_status(decode_cuda(p, to_dtype(q), c10::cuda::getCurrentCUDAStream().stream()), "decode kernel");
    return out;
  }
#endif
  decode_cpu(p, to_dtype(q));
  return out;
}

}  // namespace
}  // namespace bsa
}  // namespace megadalle

// FRAGMENT: other parts of megadalle may register their own ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(megadalle, m) {
  m.def("bsa_forward(Tensor q, Tensor k, Tensor v, Tensor row_ptr, Tensor col_idx, Tensor partial_idx, "
        "Tensor block_masks, int block_size, float scale, bool tensor_cores=False) -> (Tensor, Tensor)");
  m.def("bsa_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor row_ptr, "
        "Tensor col_idx, Tensor partial_idx, Tensor t_col_ptr, Tensor t_row_idx, Tensor t_partial_idx, "
        "Tensor block_masks, int block_size, float scale, bool tensor_cores=False) -> (Tensor, Tensor, Tensor)");
  m.def("bsa_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor row_ptr, Tensor col_idx, "
        "Tensor partial_idx, Tensor block_masks, int block_size, int pos, float scale) -> Tensor");
}

// One implementation for both devices: the functions above branch on q's device after the checks,
// so CPU and CUDA give the same error messages.
TORCH_LIBRARY_IMPL(megadalle, CPU, m) {
  m.impl("bsa_forward", &megadalle::bsa::bsa_forward);
  m.impl("bsa_backward", &megadalle::bsa::bsa_backward);
  m.impl("bsa_decode", &megadalle::bsa::bsa_decode);
}

#ifdef MEGADALLE_WITH_CUDA
TORCH_LIBRARY_IMPL(megadalle, CUDA, m) {
  m.impl("bsa_forward", &megadalle::bsa::bsa_forward);
  m.impl("bsa_backward", &megadalle::bsa::bsa_backward);
  m.impl("bsa_decode", &megadalle::bsa::bsa_decode);
}
#endif
