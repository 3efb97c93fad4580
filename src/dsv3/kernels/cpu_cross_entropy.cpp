// Token cross-entropy for CPU training: one pass over each row of logits forward (its log-sum-exp) and one
// backward (softmax - one-hot, scaled, written in the logits' dtype). The blockwise PyTorch version
// (`dsv3.model.transformer._BlockwiseCrossEntropy`, kept for GPUs) makes ~6 passes over fp32 copies.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

#include <cmath>

namespace {

using namespace dsv3_vec;

template <typename T>
float row_lse(const T* x, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t c = 0; c < V; c += 16) mx = _mm512_max_ps(mx, _mm512_mask_mov_ps(mx, first(V - c), load16(x + c, V - c)));
  const float m = _mm512_reduce_max_ps(mx);
  if (m == -INFINITY || m == INFINITY || std::isnan(m)) return m;
  const __m512 vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < V; c += 16)
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(first(V - c), exp16(_mm512_sub_ps(load16(x + c, V - c), vm))));
  return m + std::log(_mm512_reduce_add_ps(sum));
}

template <typename T>
void row_grad(const T* x, int64_t V, float lse, int64_t target, float scale, T* dx) {
  const __m512 vl = _mm512_set1_ps(lse), vs = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < V; c += 16) {
    __m512 p = exp16(_mm512_sub_ps(load16(x + c, V - c), vl));
    if (target >= c && target < c + 16)  // the one-hot
      p = _mm512_mask_sub_ps(p, (__mmask16)(1u << (target - c)), p, _mm512_set1_ps(1.f));
    store16(dx + c, _mm512_mul_ps(p, vs), V - c);
  }
}

void check(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "cross_entropy: fp32 or bf16 logits [N, V] with contiguous rows expected");
}

// logits [N, V] -> log-sum-exp of each row [N] fp32
at::Tensor cross_entropy_lse(const at::Tensor& logits) {
  check(logits);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  float* out = lse.data_ptr<float>();
  for_each_block(N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      out[i] = logits.scalar_type() == at::kFloat ? row_lse(logits.const_data_ptr<float>() + i * ld, V)
                                                  : row_lse(logits.const_data_ptr<bf16>() + i * ld, V);
  });
  return lse;
}

// d loss / d logits for loss = sum_i scale[i] * (lse[i] - logits[i, target[i]]): scale [N] fp32 (0 on ignored rows),
// into dx (the logits themselves for the in-place op: each row is read before it is written)
void grad_into(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target, const at::Tensor& scale,
               at::Tensor& dx) {
  check(logits);
  TORCH_CHECK(target.scalar_type() == at::kLong && scale.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat,
              "cross_entropy: int64 targets, fp32 lse and scale expected");
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const int64_t ldx = dx.stride(0);
  const auto tc = target.contiguous(), sc = scale.contiguous(), lc = lse.contiguous();
  const int64_t* t = tc.const_data_ptr<int64_t>();
  const float *s = sc.const_data_ptr<float>(), *l = lc.const_data_ptr<float>();
  for_each_block(N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (logits.scalar_type() == at::kFloat)
        row_grad(logits.const_data_ptr<float>() + i * ld, V, l[i], t[i], s[i], dx.data_ptr<float>() + i * ldx);
      else
        row_grad(logits.const_data_ptr<bf16>() + i * ld, V, l[i], t[i], s[i], dx.data_ptr<bf16>() + i * ldx);
    }
  });
}

at::Tensor cross_entropy_grad(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target,
                              const at::Tensor& scale) {
  at::Tensor dx = at::empty_like(logits, at::MemoryFormat::Contiguous);
  grad_into(logits, lse, target, scale, dx);
  return dx;
}

// the same written over the logits: saves a logits-sized buffer (128 MB for the `small` preset's 16 x 512 batch),
// which the allocator often had to fault in afresh (17 ms when it did not, up to ~100 ms when it did)
void cross_entropy_grad_(at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target, const at::Tensor& scale) {
  grad_into(logits, lse, target, scale, logits);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("cross_entropy_lse(Tensor logits) -> Tensor");
  m.def("cross_entropy_grad(Tensor logits, Tensor lse, Tensor target, Tensor scale) -> Tensor");
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor lse, Tensor target, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("cross_entropy_lse", cross_entropy_lse);
  m.impl("cross_entropy_grad", cross_entropy_grad);
  m.impl("cross_entropy_grad_", cross_entropy_grad_);
}
