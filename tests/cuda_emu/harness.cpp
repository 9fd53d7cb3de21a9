// Runs the block-sparse attention CUDA kernels on the CPU emulator (emu.h) for cases written by
// tests/test_cuda_emulated.py, which also computes the reference and compares.
//
//   harness CASE OUT [CASE OUT ...]
//
// CASE (little-endian): int32 magic 0x31415342 ("BSA1"), int32 kernel (0 SIMT, 1 tensor cores),
// dtype (1 fp16, 2 bf16), B, H, S, D, block_size, n_blocks, nnz, n_partial, decode_pos (-1: no
// decode); float scale; then row_ptr, col_idx, partial_idx, t_col_ptr, t_row_idx, t_partial_idx
// (int32), block_masks (uint8), q, k, v, dout (16-bit [B, H, S, D]) and, with decode, the decode
// query (16-bit [B, H, 1, D]; the cache is k, v).
// OUT: out (16-bit), lse (fp32), dq, dk, dv (16-bit) and, with decode, the decode output.
// Every output buffer has a guard on both sides, checked after the kernels ran.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "bsa_cuda.h"

using namespace megadalle::bsa;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "harness: %s\n", what.c_str());
  std::exit(2);
}

template <typename T>
std::vector<T> read(std::ifstream& f, size_t n) {
  std::vector<T> v(n);
  if (n && !f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T))))
    die("short case file");
  return v;
}

constexpr size_t kGuardWords = 64;
constexpr uint32_t kCanary = 0xA5A5A5A5u;

// An output buffer of n elements of `bytes` each, 256-byte aligned, with canaries around it.
struct Guarded {
  std::vector<uint32_t> storage;
  size_t bytes;
  unsigned char* data;
  Guarded(size_t n, size_t elem) : bytes(n * elem) {
    const size_t words = (bytes + 3) / 4 + 2 * kGuardWords + 64;
    storage.assign(words, kCanary);
    uintptr_t p = reinterpret_cast<uintptr_t>(storage.data() + kGuardWords);
    p = (p + 255) / 256 * 256;
    data = reinterpret_cast<unsigned char*>(p);
    std::memset(data, 0xFF, bytes);  // NaN until written
  }
  void check(const char* name) const {
    const unsigned char* lo = reinterpret_cast<const unsigned char*>(storage.data());
    const unsigned char* hi = lo + storage.size() * 4;
    for (const unsigned char* b = lo; b < data; ++b)
      if (*b != 0xA5) die(std::string("write before the start of ") + name);
    for (const unsigned char* b = data + bytes; b < hi; ++b)
      if (*b != 0xA5) die(std::string("write past the end of ") + name);
  }
};

// 16-byte aligned copies of the inputs (the tensor-core kernels move 16 bytes at a time).
template <typename T>
struct Aligned {
  std::vector<unsigned char> storage;
  T* data;
  explicit Aligned(const std::vector<T>& v) : storage(v.size() * sizeof(T) + 256) {
    uintptr_t p = (reinterpret_cast<uintptr_t>(storage.data()) + 255) / 256 * 256;
    data = reinterpret_cast<T*>(p);
    if (!v.empty()) std::memcpy(data, v.data(), v.size() * sizeof(T));
  }
};

void run_case(const char* in_path, const char* out_path) {
  std::ifstream f(in_path, std::ios::binary);
  if (!f) die(std::string("cannot open ") + in_path);
  const auto hdr = read<int32_t>(f, 12);
  if (static_cast<uint32_t>(hdr[0]) != 0x31415342u) die("bad magic");
  const int kernel = hdr[1], dtype_i = hdr[2];
  const int64_t B = hdr[3], H = hdr[4], S = hdr[5], D = hdr[6];
  const int bs = hdr[7], nb = hdr[8], nnz = hdr[9], n_partial = hdr[10], decode_pos = hdr[11];
  const float scale = read<float>(f, 1)[0];
  const DType dtype = dtype_i == 1 ? DType::kFloat16 : DType::kBFloat16;
  Aligned<int32_t> row_ptr(read<int32_t>(f, nb + 1)), col_idx(read<int32_t>(f, nnz)),
      partial_idx(read<int32_t>(f, nnz)), t_col_ptr(read<int32_t>(f, nb + 1)), t_row_idx(read<int32_t>(f, nnz)),
      t_partial_idx(read<int32_t>(f, nnz));
  Aligned<uint8_t> masks(read<uint8_t>(f, size_t(n_partial) * bs * bs));
  const size_t n = size_t(B * H * S * D);
  Aligned<uint16_t> q(read<uint16_t>(f, n)), k(read<uint16_t>(f, n)), v(read<uint16_t>(f, n)),
      dout(read<uint16_t>(f, n));

  Layout L;
  L.block_size = bs;
  L.n_blocks = nb;
  L.row_ptr = row_ptr.data;
  L.col_idx = col_idx.data;
  L.partial_idx = partial_idx.data;
  L.block_masks = masks.data;
  L.t_col_ptr = t_col_ptr.data;
  L.t_row_idx = t_row_idx.data;
  L.t_partial_idx = t_partial_idx.data;
  const Shape shape{B, H, S, D};

  Guarded out(n, 2), lse(size_t(B * H * S), 4), dq(n, 2), dk(n, 2), dv(n, 2), delta(size_t(B * H * S), 4);
  ForwardParams fp;
  fp.shape = shape;
  fp.layout = L;
  fp.scale = scale;
  fp.q = q.data;
  fp.k = k.data;
  fp.v = v.data;
  fp.out = out.data;
  fp.lse = reinterpret_cast<float*>(lse.data);
  cudaError_t err = kernel == 1 ? forward_cuda_tc(fp, dtype, nullptr) : forward_cuda(fp, dtype, nullptr);
  if (err != cudaSuccess) die("forward returned an error");

  BackwardParams bp;
  bp.shape = shape;
  bp.layout = L;
  bp.scale = scale;
  bp.q = q.data;
  bp.k = k.data;
  bp.v = v.data;
  bp.out = out.data;
  bp.dout = dout.data;
  bp.lse = reinterpret_cast<const float*>(lse.data);
  bp.delta = reinterpret_cast<float*>(delta.data);
  bp.dq = dq.data;
  bp.dk = dk.data;
  bp.dv = dv.data;
  err = kernel == 1 ? backward_cuda_tc(bp, dtype, nullptr) : backward_cuda(bp, dtype, nullptr);
  if (err != cudaSuccess) die("backward returned an error");

  std::vector<Guarded*> outputs{&out, &lse, &dq, &dk, &dv};
  Guarded dec_out(size_t(B * H * D), 2);
  if (decode_pos >= 0) {
    Aligned<uint16_t> dq1(read<uint16_t>(f, size_t(B * H * D)));
    DecodeParams dp;
    dp.shape = shape;
    dp.layout = L;
    dp.scale = scale;
    dp.pos = decode_pos;
    dp.q = dq1.data;
    dp.k_cache = k.data;
    dp.v_cache = v.data;
    dp.out = dec_out.data;
    if (decode_cuda(dp, dtype, nullptr) != cudaSuccess) die("decode returned an error");
    outputs.push_back(&dec_out);
  }
  const char* names[] = {"out", "lse", "dq", "dk", "dv", "decode out"};
  std::ofstream o(out_path, std::ios::binary);
  for (size_t i = 0; i < outputs.size(); ++i) {
    outputs[i]->check(names[i]);
    o.write(reinterpret_cast<const char*>(outputs[i]->data), static_cast<std::streamsize>(outputs[i]->bytes));
  }
  delta.check("delta");
  if (!o) die(std::string("cannot write ") + out_path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc % 2 != 1) die("usage: harness CASE OUT [CASE OUT ...]");
  for (int i = 1; i < argc; i += 2) run_case(argv[i], argv[i + 1]);
  return 0;
}
