// RMSNorm for CPU training, forward and backward each in one pass over the rows.
//
// y = w * cast(x * rsqrt(mean(x^2) + eps)): normalised in fp32, rounded to x's dtype, scaled by the fp32 weight
// (the order of transformers and the official model, which `dsv3.model.layers.RMSNorm` spells with
// F.rms_norm). Autograd runs that as ~6 elementwise passes forward and ~10 backward over [tokens, dim]; on the
// `small` preset's 16 x 512 training step its norms cost ~0.6 s of ~4.5 s. Under bf16 autocast the norms whose
// outputs only feed matmuls write y rounded to bf16 (what autocast would cast it to) and take a bf16 dy.
// The residual stream's adds can run inside: forward h + r is summed, kept and normalised in one pass, and the
// backward adds the sum's own gradient to the norm's (the two extra passes of a separate add and its gradient).
// Outputs go out with streaming stores (no read of each line before it is written): at [8192, 512] forward 1.06x,
// backward 1.22x, neutral at 128 or 256 wide; the experts' and SwiGLU's outputs, streamed too, gained nothing.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <cmath>

namespace {

using namespace dsv3_vec;

// With r: x is the fp32 sum h + r, written here first (the sum the norm reads is x's row)
template <typename T, typename Y, typename R = float>
void forward_rows(const T* x, int64_t ldx, const float* w, float eps, int64_t D, int64_t begin, int64_t end, Y* y,
                  float* rstd, const float* h = nullptr, const R* r = nullptr) {
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = x + i * ldx;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      __m512 v;
      if constexpr (std::is_same_v<T, float>) {
        if (h) store16(const_cast<float*>(xr) + d, v = _mm512_add_ps(load16(h + i * D + d), load16(r + i * D + d)));
        else v = load16(xr + d);
      } else {
        v = load16(xr + d);
      }
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(D) + eps);
    rstd[i] = r;
    const __m512 vr = _mm512_set1_ps(r);
    for (int64_t d = 0; d < D; d += 16)
      stream16(y + i * D + d, _mm512_mul_ps(_mm512_loadu_ps(w + d), round_as<T>(_mm512_mul_ps(load16(xr + d), vr))));
  }
  _mm_sfence();
}

// dn = cast(dy * w) (the gradient reaching the rounded normalised x), n = x * r:
// dx = r * (dn - n * mean(dn * n)), dw += dy * cast(n)
// With dres (the gradient of the fp32 sum x = h + r itself): dx += dres
template <typename T, typename G>
void backward_rows(const G* dy, const T* x, int64_t ldx, const float* w, const float* rstd, int64_t D, int64_t begin,
                   int64_t end, T* dx, int64_t lddx, float* dw, const float* dres = nullptr, bf16* dx_bf16 = nullptr) {
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = x + i * ldx;
    const G* g = dy + i * D;
    const __m512 vr = _mm512_set1_ps(rstd[i]);
    __m512 s = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      __m512 n = _mm512_mul_ps(load16(xr + d), vr), gd = load16(g + d);
      s = _mm512_fmadd_ps(round_as<T>(_mm512_mul_ps(gd, _mm512_loadu_ps(w + d))), n, s);
      _mm512_storeu_ps(dw + d, _mm512_fmadd_ps(gd, round_as<T>(n), _mm512_loadu_ps(dw + d)));
    }
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / float(D));
    for (int64_t d = 0; d < D; d += 16) {
      __m512 n = _mm512_mul_ps(load16(xr + d), vr);
      __m512 dn = round_as<T>(_mm512_mul_ps(load16(g + d), _mm512_loadu_ps(w + d)));
      const __m512 g = _mm512_mul_ps(vr, _mm512_fnmadd_ps(n, mean, dn));
      const __m512 v = dres ? _mm512_add_ps(g, load16(dres + i * D + d)) : g;
      stream16(dx + i * lddx + d, v);
      if (dx_bf16) stream16(dx_bf16 + i * D + d, v);
    }
  }
  _mm_sfence();
}

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: x must be fp32 or bf16 [rows, dim] with contiguous rows");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(1) && x.size(1) % 16 == 0,
              "rms_norm: an fp32 weight [dim] with dim a multiple of 16 expected");
}

// x [R, D] -> y [R, D] (fp32, or rounded to bf16 with bf16_out: what autocast would feed the next matmul) and
// rstd [R] fp32
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& w, double eps, bool bf16_out) {
  check(x, w);
  const int64_t R = x.size(0), D = x.size(1);
  at::Tensor y = at::empty({R, D}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  at::Tensor rstd = at::empty({R}, x.options().dtype(at::kFloat));
  TORCH_INTERNAL_ASSERT(aligned64(y), "rms_norm_forward: unaligned output");  // streamed rows
  for_each_block(R, 64, [&](int64_t begin, int64_t end) {
    auto rows = [&](auto* xp, auto* yp) {
      forward_rows(xp, x.stride(0), w.const_data_ptr<float>(), float(eps), D, begin, end, yp, rstd.data_ptr<float>());
    };
    const bool xf = x.scalar_type() == at::kFloat;
    if (xf && !bf16_out) rows(x.const_data_ptr<float>(), y.data_ptr<float>());
    else if (xf) rows(x.const_data_ptr<float>(), y.data_ptr<bf16>());
    else if (!bf16_out) rows(x.const_data_ptr<bf16>(), y.data_ptr<float>());
    else rows(x.const_data_ptr<bf16>(), y.data_ptr<bf16>());
  });
  return {y, rstd};
}

// h [R, D] fp32 and r [R, D] fp32 or bf16 (contiguous) -> their sum s [R, D] fp32, y = RMSNorm(s) as above, rstd
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_forward(const at::Tensor& h, const at::Tensor& r,
                                                                    const at::Tensor& w, double eps, bool bf16_out) {
  check(h, w);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && r.is_contiguous() && r.sizes() == h.sizes() &&
              (r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16),
              "add_rms_norm: contiguous fp32 h and fp32 or bf16 r of the same shape expected");
  const int64_t R = h.size(0), D = h.size(1);
  at::Tensor s = at::empty({R, D}, h.options());
  at::Tensor y = at::empty({R, D}, h.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  at::Tensor rstd = at::empty({R}, h.options());
  TORCH_INTERNAL_ASSERT(aligned64(y), "add_rms_norm_forward: unaligned output");
  for_each_block(R, 64, [&](int64_t begin, int64_t end) {
    auto rows = [&](auto* yp, auto* rp) {
      forward_rows(s.const_data_ptr<float>(), D, w.const_data_ptr<float>(), float(eps), D, begin, end, yp,
                   rstd.data_ptr<float>(), h.const_data_ptr<float>(), rp);
    };
    const bool rf = r.scalar_type() == at::kFloat;
    if (bf16_out) rf ? rows(y.data_ptr<bf16>(), r.const_data_ptr<float>()) : rows(y.data_ptr<bf16>(), r.const_data_ptr<bf16>());
    else rf ? rows(y.data_ptr<float>(), r.const_data_ptr<float>()) : rows(y.data_ptr<float>(), r.const_data_ptr<bf16>());
  });
  return {s, y, rstd};
}

constexpr int64_t kRows = 256;  // rows per block of the backward: one partial sum of dw each

// -> dx [R, D] in x's dtype (plus dres [R, D] fp32 when given: the gradient reaching x by another way, for an fp32
// x), dw [D] fp32 (partial sums per block of kRows rows, added in block order: the same for any number of threads),
// and with bf16_copy dx rounded to bf16 as well (for an fp32 x: the gradient of a bf16 residual, which autograd
// would otherwise cast in a pass). With out ([R, D] in x's dtype, rows aligned to 16 elements for the streaming
// stores: columns of a wider gradient buffer), dx is written there and returned as out.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& w, const at::Tensor& rstd,
                                                                 const std::optional<at::Tensor>& dres, bool bf16_copy,
                                                                 const std::optional<at::Tensor>& out) {
  check(x, w);
  TORCH_CHECK((dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kBFloat16) && dy.is_contiguous() &&
              dy.sizes() == x.sizes(), "rms_norm: dy must be contiguous fp32 or bf16 shaped like x");
  const bool with_res = dres.has_value() && dres->defined();
  TORCH_CHECK(!with_res || (dres->scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && dres->is_contiguous() &&
                            dres->sizes() == x.sizes()), "rms_norm: dres must be contiguous fp32 shaped like an fp32 x");
  const float* rp = with_res ? dres->const_data_ptr<float>() : nullptr;
  const int64_t R = x.size(0), D = x.size(1);
  const bool given = out.has_value() && out->defined();
  TORCH_CHECK(!given || (out->scalar_type() == x.scalar_type() && out->dim() == 2 && out->size(0) == R &&
                         out->size(1) == D && out->stride(1) == 1 &&
                         out->stride(0) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out->data_ptr()) % (16 * out->element_size()) == 0),
              "rms_norm: out must be [R, D] in x's dtype with contiguous rows aligned to 16 elements");
  at::Tensor dx = given ? *out : at::empty({R, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t lddx = given ? out->stride(0) : D;
  TORCH_CHECK(!bf16_copy || x.scalar_type() == at::kFloat, "rms_norm: bf16_copy is for an fp32 x");
  at::Tensor dxb = at::empty({bf16_copy ? R : 0, D}, x.options().dtype(at::kBFloat16));
  bf16* dxbp = bf16_copy ? dxb.data_ptr<bf16>() : nullptr;
  TORCH_INTERNAL_ASSERT((given || aligned64(dx)) && aligned64(dxb), "rms_norm_backward: unaligned output");
  at::Tensor partial = at::zeros({std::max<int64_t>(1, (R + kRows - 1) / kRows), D}, w.options());
  for_each_block(R, kRows, [&](int64_t begin, int64_t end) {
    float* dw = partial.data_ptr<float>() + begin / kRows * D;
    auto rows = [&](auto* gp, auto* xp, auto* dxp) {
      backward_rows(gp, xp, x.stride(0), w.const_data_ptr<float>(), rstd.const_data_ptr<float>(), D, begin, end, dxp, lddx, dw,
                    rp, dxbp);
    };
    const bool gf = dy.scalar_type() == at::kFloat;
    if (x.scalar_type() == at::kFloat) {
      if (gf) rows(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), dx.data_ptr<float>());
      else rows(dy.const_data_ptr<bf16>(), x.const_data_ptr<float>(), dx.data_ptr<float>());
    } else {
      if (gf) rows(dy.const_data_ptr<float>(), x.const_data_ptr<bf16>(), dx.data_ptr<bf16>());
      else rows(dy.const_data_ptr<bf16>(), x.const_data_ptr<bf16>(), dx.data_ptr<bf16>());
    }
  });
  return {dx, partial.sum(0), dxb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("rms_norm_forward(Tensor x, Tensor w, float eps, bool bf16_out=False) -> (Tensor, Tensor)");
  m.def("add_rms_norm_forward(Tensor h, Tensor r, Tensor w, float eps, bool bf16_out=False) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor w, Tensor rstd, Tensor? dres=None, bool bf16_copy=False, "
        "Tensor? out=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("rms_norm_forward", rms_norm_forward);
  m.impl("add_rms_norm_forward", add_rms_norm_forward);
  m.impl("rms_norm_backward", rms_norm_backward);
}
