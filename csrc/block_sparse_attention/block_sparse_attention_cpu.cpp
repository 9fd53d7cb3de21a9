// CPU implementation of the block-sparse attention contract in bsa_params.h.
//
// Same semantics as the CUDA kernels, written for clarity first: one task per (batch*head,
// query block) in the forward, one per batch*head in the backward (dK/dV of a head are
// accumulated by one task, so no atomics). Inputs are converted block by block into an
// accumulation type (fp32 for fp32/bf16/fp16, fp64 for fp64) and results rounded once.
// Only ATen's parallel_for and c10's scalar types are used, which keeps this translation unit
// cheap to compile.

#include "bsa_params.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace megadalle {
namespace bsa {
namespace {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// Copy rows [row0, row0 + n) of one head's [S, D] matrix into dst [n, D] in acc_t.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* head, int64_t row0, int64_t n, int64_t D, acc_t* dst) {
  const scalar_t* src = head + row0 * D;
  for (int64_t i = 0; i < n * D; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// `omp simd` (we compile with -fopenmp) lets -O2 vectorise these, the reduction included, without
// -ffast-math for the whole file.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename acc_t>
inline void axpy(acc_t alpha, const acc_t* __restrict__ x, acc_t* __restrict__ y, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += alpha * x[d];
}

// Rows [row0, row0 + n) of a head's [S, D] matrix transposed into dst [D, bs] (columns past n are
// zero), so that a row of scores q . K^T is a sum of contiguous axpys over the bs keys.
template <typename scalar_t, typename acc_t>
void load_rows_transposed(const scalar_t* head, int64_t row0, int64_t n, int64_t D, int64_t bs, acc_t* dst) {
  std::fill(dst, dst + D * bs, acc_t(0));
  const scalar_t* src = head + row0 * D;
  for (int64_t c = 0; c < n; ++c)
    for (int64_t d = 0; d < D; ++d) dst[d * bs + c] = static_cast<acc_t>(src[c * D + d]);
}

// out[c] = sum_d x[d] * t[d, c] for c < bs, with t from load_rows_transposed.
template <typename acc_t>
inline void row_times(const acc_t* x, const acc_t* t, int64_t D, int64_t bs, acc_t* __restrict__ out) {
  std::fill(out, out + bs, acc_t(0));
  for (int64_t d = 0; d < D; ++d) {
    const acc_t a = x[d];
    const acc_t* __restrict__ td = t + d * bs;
#pragma omp simd
    for (int64_t c = 0; c < bs; ++c) out[c] += a * td[c];
  }
}

inline bool element_allowed(const Layout& L, int32_t pidx, int r, int c) {
  return pidx < 0 || L.block_masks[(static_cast<int64_t>(pidx) * L.block_size + r) * L.block_size + c] != 0;
}

template <typename scalar_t>
void forward_impl(const ForwardParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const Layout& L = p.layout;
  const int64_t S = p.shape.seq, D = p.shape.head_dim, bs = L.block_size, nb = L.n_blocks;
  const int64_t BH = p.shape.batch * p.shape.heads;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);

  at::parallel_for(0, BH * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(bs * D), kT(bs * D), vt(bs * D), ot(bs * D), srow(bs), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nb, qb = task % nb;
      const int64_t q0 = qb * bs, nr = std::min(bs, S - q0);
      const int64_t e0 = L.row_ptr[qb], e1 = L.row_ptr[qb + 1], width = (e1 - e0) * bs;
      const int64_t head = bh * S * D;
      load_rows(q + head, q0, nr, D, qt.data());
      // Pass 1: scores of every kept key (-inf where masked), row r at scores[r * width].
      scores.assign(nr * width, neg_inf);
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t k0 = static_cast<int64_t>(L.col_idx[e]) * bs, nc = std::min(bs, S - k0);
        const int32_t pidx = L.partial_idx[e];
        load_rows_transposed(k + head, k0, nc, D, bs, kT.data());
        for (int64_t r = 0; r < nr; ++r) {
          row_times(&qt[r * D], kT.data(), D, bs, srow.data());
          for (int64_t c = 0; c < nc; ++c)
            if (element_allowed(L, pidx, r, c)) scores[r * width + (e - e0) * bs + c] = scale * srow[c];
        }
      }
      // Pass 2: softmax per row; weights overwrite the scores.
      std::vector<acc_t> inv_l(nr);
      for (int64_t r = 0; r < nr; ++r) {
        acc_t* s = &scores[r * width];
        const acc_t m = width ? *std::max_element(s, s + width) : neg_inf;
        float* lse = p.lse + bh * S + q0 + r;
        if (m == neg_inf) {  // no allowed key: out row is 0, lse is -inf
          for (int64_t j = 0; j < width; ++j) s[j] = 0;
          inv_l[r] = 0;
          *lse = -std::numeric_limits<float>::infinity();
          continue;
        }
        acc_t l = 0;
        for (int64_t j = 0; j < width; ++j) {
          s[j] = s[j] == neg_inf ? acc_t(0) : std::exp(s[j] - m);
          l += s[j];
        }
        inv_l[r] = acc_t(1) / l;
        *lse = static_cast<float>(m + std::log(l));
      }
      // Pass 3: out = P V / l.
      std::fill(ot.begin(), ot.begin() + nr * D, acc_t(0));
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t k0 = static_cast<int64_t>(L.col_idx[e]) * bs, nc = std::min(bs, S - k0);
        load_rows(v + head, k0, nc, D, vt.data());
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t w = scores[r * width + (e - e0) * bs + c];
            if (w != 0) axpy(w, &vt[c * D], &ot[r * D], D);
          }
      }
      scalar_t* o = out + head + q0 * D;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < D; ++d) o[r * D + d] = static_cast<scalar_t>(ot[r * D + d] * inv_l[r]);
    }
  });
}

template <typename scalar_t>
void backward_impl(const BackwardParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const Layout& L = p.layout;
  const int64_t S = p.shape.seq, D = p.shape.head_dim, bs = L.block_size, nb = L.n_blocks;
  const int64_t BH = p.shape.batch * p.shape.heads;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* o = static_cast<const scalar_t*>(p.out);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);

  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(bs * D), dot_(bs * D), kt(bs * D), kT(bs * D), vT(bs * D), dqt(bs * D);
    std::vector<acc_t> srow(bs), dprow(bs);
    std::vector<acc_t> dk_acc(S * D), dv_acc(S * D), orow(D), delta(S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t head = bh * S * D;
      const float* lse = p.lse + bh * S;
      // delta_i = rowsum(dO_i * O_i): the softmax-Jacobian term of dS = P * (dP - delta).
      for (int64_t i = 0; i < S; ++i) {
        load_rows(o + head, i, 1, D, orow.data());
        load_rows(dout + head, i, 1, D, dqt.data());
        delta[i] = dot(orow.data(), dqt.data(), D);
        if (p.delta) p.delta[bh * S + i] = static_cast<float>(delta[i]);
      }
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t qb = 0; qb < nb; ++qb) {
        const int64_t q0 = qb * bs, nr = std::min(bs, S - q0);
        load_rows(q + head, q0, nr, D, qt.data());
        load_rows(dout + head, q0, nr, D, dot_.data());
        std::fill(dqt.begin(), dqt.begin() + nr * D, acc_t(0));
        for (int64_t e = L.row_ptr[qb]; e < L.row_ptr[qb + 1]; ++e) {
          const int64_t k0 = static_cast<int64_t>(L.col_idx[e]) * bs, nc = std::min(bs, S - k0);
          const int32_t pidx = L.partial_idx[e];
          load_rows(k + head, k0, nc, D, kt.data());
          load_rows_transposed(k + head, k0, nc, D, bs, kT.data());
          load_rows_transposed(v + head, k0, nc, D, bs, vT.data());
          for (int64_t r = 0; r < nr; ++r) {
            const float row_lse = lse[q0 + r];
            if (row_lse == -std::numeric_limits<float>::infinity()) continue;  // empty row
            row_times(&qt[r * D], kT.data(), D, bs, srow.data());
            row_times(&dot_[r * D], vT.data(), D, bs, dprow.data());
            for (int64_t c = 0; c < nc; ++c) {
              if (!element_allowed(L, pidx, r, c)) continue;
              // Recompute P from the saved logsumexp instead of storing it in the forward.
              const acc_t pr = std::exp(scale * srow[c] - static_cast<acc_t>(row_lse));
              axpy(pr, &dot_[r * D], &dv_acc[(k0 + c) * D], D);
              const acc_t ds = pr * (dprow[c] - delta[q0 + r]) * scale;
              axpy(ds, &kt[c * D], &dqt[r * D], D);
              axpy(ds, &qt[r * D], &dk_acc[(k0 + c) * D], D);
            }
          }
        }
        for (int64_t i = 0; i < nr * D; ++i) dq[head + q0 * D + i] = static_cast<scalar_t>(dqt[i]);
      }
      for (int64_t i = 0; i < S * D; ++i) {
        dk[head + i] = static_cast<scalar_t>(dk_acc[i]);
        dv[head + i] = static_cast<scalar_t>(dv_acc[i]);
      }
    }
  });
}

template <typename scalar_t>
void decode_impl(const DecodeParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const Layout& L = p.layout;
  const int64_t C = p.shape.seq, D = p.shape.head_dim, bs = L.block_size;
  const int64_t BH = p.shape.batch * p.shape.heads;
  const int64_t qb = p.pos / bs, r = p.pos % bs;
  const int64_t e0 = L.row_ptr[qb], e1 = L.row_ptr[qb + 1];
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* kc = static_cast<const scalar_t*>(p.k_cache);
  const auto* vc = static_cast<const scalar_t*>(p.v_cache);
  auto* out = static_cast<scalar_t*>(p.out);

  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qrow(D), kv(D), acc(D), w;
    std::vector<int64_t> keys;
    for (int64_t bh = begin; bh < end; ++bh) {
      load_rows(q + bh * D, 0, 1, D, qrow.data());
      keys.clear();
      w.clear();
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t k0 = static_cast<int64_t>(L.col_idx[e]) * bs;
        for (int64_t c = 0; c < bs; ++c) {
          const int64_t key = k0 + c;
          // Keys after pos are not in the cache yet: decode is causal whatever the layout says.
          if (key > p.pos || key >= C || !element_allowed(L, L.partial_idx[e], static_cast<int>(r), c)) continue;
          load_rows(kc + bh * C * D, key, 1, D, kv.data());
          keys.push_back(key);
          w.push_back(scale * dot(qrow.data(), kv.data(), D));
        }
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t inv_l = 0;
      if (!w.empty()) {
        const acc_t m = *std::max_element(w.begin(), w.end());
        acc_t l = 0;
        for (size_t j = 0; j < w.size(); ++j) {
          const acc_t pj = std::exp(w[j] - m);
          l += pj;
          load_rows(vc + bh * C * D, keys[j], 1, D, kv.data());
          axpy(pj, kv.data(), acc.data(), D);
        }
        inv_l = acc_t(1) / l;
      }
      for (int64_t d = 0; d < D; ++d) out[bh * D + d] = static_cast<scalar_t>(acc[d] * inv_l);
    }
  });
}

template <template <typename> class Fn, typename Params>
void dispatch(DType dtype, const Params& p) {
  switch (dtype) {
    case DType::kFloat32: return Fn<float>::run(p);
    case DType::kFloat64: return Fn<double>::run(p);
    case DType::kBFloat16: return Fn<c10::BFloat16>::run(p);
    case DType::kFloat16: return Fn<c10::Half>::run(p);
  }
  TORCH_CHECK(false, "block_sparse_attention (CPU): unsupported dtype");
}

template <typename T> struct ForwardFn { static void run(const ForwardParams& p) { forward_impl<T>(p); } };
template <typename T> struct BackwardFn { static void run(const BackwardParams& p) { backward_impl<T>(p); } };
template <typename T> struct DecodeFn { static void run(const DecodeParams& p) { decode_impl<T>(p); } };

}  // namespace

void forward_cpu(const ForwardParams& p, DType dtype) { dispatch<ForwardFn>(dtype, p); }
void backward_cpu(const BackwardParams& p, DType dtype) { dispatch<BackwardFn>(dtype, p); }
void decode_cpu(const DecodeParams& p, DType dtype) { dispatch<DecodeFn>(dtype, p); }

}  // namespace bsa
}  // namespace megadalle
