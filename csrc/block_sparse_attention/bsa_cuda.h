// Launchers of the CUDA kernels (block_sparse_attention_cuda.cu). Torch-free: raw pointers from
// bsa_params.h and a stream in, a cudaError_t out.
#pragma once

#include <cuda_runtime_api.h>

#include "bsa_params.h"

namespace megadalle {
namespace bsa {

// The kernels are instantiated for these sizes only; the binding checks them first.
constexpr bool cuda_supports(int block_size, int64_t head_dim) {
  return (block_size == 16 || block_size == 32 || block_size == 64) &&
         (head_dim == 32 || head_dim == 64);
}

// dtype: kFloat16 or kBFloat16. Each returns the first CUDA error (launch or attribute setting).
cudaError_t forward_cuda(const ForwardParams& p, DType dtype, cudaStream_t stream);
cudaError_t backward_cuda(const BackwardParams& p, DType dtype, cudaStream_t stream);
cudaError_t decode_cuda(const DecodeParams& p, DType dtype, cudaStream_t stream);

// Tensor-core (WMMA) forward and backward (block_sparse_attention_cuda_tc.cu), OFF by default:
// the binding runs them only when asked to (tensor_cores=True) and every tensor's data pointer
// is 16-byte aligned. Same sizes as the SIMT kernels; same contract and error reporting.
constexpr bool cuda_tc_supports(int block_size, int64_t head_dim) { return cuda_supports(block_size, head_dim); }
cudaError_t forward_cuda_tc(const ForwardParams& p, DType dtype, cudaStream_t stream);
cudaError_t backward_cuda_tc(const BackwardParams& p, DType dtype, cudaStream_t stream);

}  // namespace bsa
}  // namespace megadalle
