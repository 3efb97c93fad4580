// AdamW with bf16 moments (DeepSeek-V3 report, 3.3.3) for CPU training: one fp32 parameter, its fp32 gradient
// and its two bf16 moments updated in one pass, 20 bytes of memory traffic per parameter. torch's fused AdamW
// only takes moments in the parameter's dtype (fp32: 28 bytes), and the same update in tensor ops makes ~12
// passes (~6x the fused fp32 step on the small preset's 120M parameters).
//
// The arithmetic is torch.optim.AdamW's (foreach=False) as ATen's vectorized CPU ops round it, operation by
// operation in fp32, the scalars computed in double and rounded once as Python scalars reach ATen:
//   m = fma(1 - beta1, g - m, m)                 lerp (ATen's lerp_vec is a fused multiply-add)
//   v = fma((1 - beta2) g, g, v beta2)           mul, then addcmul (fused likewise)
//   p = p (1 - lr wd)
//   p = p + ((-lr / bc1) m) / (sqrt(v) / sqrt(bc2) + eps)     addcdiv; bc = 1 - beta^step, true divisions
// then m and v are rounded to bf16 (to nearest even). Against `dsv3.train.optim.BF16MomentsAdamW`'s tensor-op
// path the moments are bit-identical and the parameters within an ulp or so: ATen's vectorised sqrt is not
// correctly rounded (~4% of its results differ from the exact square root's), the AVX-512 instruction is.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "vec.h"

#include <cmath>

namespace {

using namespace dsv3_vec;

void adamw_bf16_moments_(at::Tensor p, const at::Tensor& g, at::Tensor m, at::Tensor v, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int64_t step) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat && m.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "adamw_bf16_moments_: fp32 parameter and gradient, bf16 moments expected");
  TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous(),
              "adamw_bf16_moments_: contiguous tensors expected");
  TORCH_CHECK(g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel(),
              "adamw_bf16_moments_: tensors of one size expected");
  TORCH_CHECK(step >= 1, "adamw_bf16_moments_: step counts from 1");
  const __m512 w1 = _mm512_set1_ps(float(1 - beta1)), b2 = _mm512_set1_ps(float(beta2)),
               w2 = _mm512_set1_ps(float(1 - beta2)), decay = _mm512_set1_ps(float(1 - lr * weight_decay)),
               bc2_sqrt = _mm512_set1_ps(float(std::sqrt(1 - std::pow(beta2, double(step))))),
               epsv = _mm512_set1_ps(float(eps)),
               step_size = _mm512_set1_ps(float(-lr / (1 - std::pow(beta1, double(step)))));
  float* pp = p.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  bf16* mp = m.data_ptr<at::BFloat16>();
  bf16* vp = v.data_ptr<at::BFloat16>();
  for_each_block(p.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += 16) {
      const int64_t n = std::min<int64_t>(16, end - i);
      const __m512 gi = load16(gp + i, n);
      __m512 mi = load16(mp + i, n), vi = load16(vp + i, n), pi = load16(pp + i, n);
      mi = _mm512_fmadd_ps(w1, _mm512_sub_ps(gi, mi), mi);
      vi = _mm512_fmadd_ps(_mm512_mul_ps(w2, gi), gi, _mm512_mul_ps(vi, b2));
      pi = _mm512_mul_ps(pi, decay);
      const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2_sqrt), epsv);
      pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(step_size, mi), denom));
      store16(pp + i, pi, n);
      store16(mp + i, mi, n);
      store16(vp + i, vi, n);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("adamw_bf16_moments_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) { m.impl("adamw_bf16_moments_", adamw_bf16_moments_); }
