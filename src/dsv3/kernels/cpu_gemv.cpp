// bf16 matrix x few-vectors products for CPU decoding, with AVX512-BF16 dot-product instructions.
//
// grouped_gemv(x [M, K], w [E, N, K], offs [E]) -> y [M, N]: rows offs[e-1]..offs[e] of x (offs are cumulative
// row counts, as torch._grouped_mm takes them) are multiplied by w[e]^T (the experts of a MoE layer).
// gemv(x [M, K], w [N, K]) -> y [M, N] = x w^T (a linear layer without bias).
// Decoding multiplies each weight matrix by 1-16 rows, so the time is the time to stream the weights: ATen's
// bf16 GEMV converts every weight to fp32 before its FMA (about 12 GB/s per core here) and oneDNN pays tens of
// microseconds per call for weight reordering; vdpbf16ps multiplies 32 bf16 pairs per instruction straight
// from the loaded weights. Products are exact in fp32 and summed in fp32; the output is rounded to bf16 once.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kRows = 4;  // weight rows per inner tile: 4 x kCols accumulators stay in registers
constexpr int64_t kCols = 4;  // input rows per inner tile (at most)

// y[m, n] for n in [n0, n0 + nr), m in [0, MR): nr <= kRows. Rows of x and w have K elements. MR is a template
// parameter so that the MR x kRows accumulators are registers (a runtime bound makes the compiler spill them).
template <int64_t MR>
inline void tile(const at::BFloat16* x, const at::BFloat16* w, int64_t K, int64_t nr, at::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][kRows];
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t r = 0; r < kRows; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512bh wv[kRows];
    for (int64_t r = 0; r < kRows; ++r)  // 4 iterations ahead: +10-40% on cold weights over the hardware prefetcher
      _mm_prefetch(reinterpret_cast<const char*>(w + (r < nr ? r : 0) * K + k) + 256, _MM_HINT_T0);
    for (int64_t r = 0; r < kRows; ++r)  // rows past nr read row 0 again: in bounds, results discarded
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (r < nr ? r : 0) * K + k);
    for (int64_t m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int64_t r = 0; r < kRows; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t r = 0; r < nr; ++r) y[m * ldy + r] = at::BFloat16(_mm512_reduce_add_ps(acc[m][r]));
}

// All rows of x (mr of them) against weight rows [0, nr).
inline void rows(const at::BFloat16* x, int64_t mr, const at::BFloat16* w, int64_t K, int64_t nr, at::BFloat16* y,
                 int64_t ldy) {
  for (; mr >= kCols; mr -= kCols, x += kCols * K, y += kCols * ldy) tile<kCols>(x, w, K, nr, y, ldy);
  if (mr == 3) tile<3>(x, w, K, nr, y, ldy);
  if (mr == 2) tile<2>(x, w, K, nr, y, ldy);
  if (mr == 1) tile<1>(x, w, K, nr, y, ldy);
}

// x [M, K], w [E, N, K], off [E] (cumulative, ending at M) -> y [M, N].
at::Tensor grouped(const at::Tensor& x, const at::Tensor& w, const int64_t* off) {
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  auto y = at::empty({M, N}, x.options());

  // Work items: (group, block of weight rows). A block is sized so that there are a few items per thread
  // (load balance) while each item still streams a contiguous run of weights.
  const int64_t block = std::max<int64_t>(kRows, (N / std::max<int64_t>(1, 4 * at::get_num_threads())) & ~(kRows - 1));
  std::vector<int64_t> item_group;
  for (int64_t e = 0; e < E; ++e)
    if (off[e] > (e ? off[e - 1] : 0)) item_group.push_back(e);
  const int64_t blocks = (N + block - 1) / block;
  const int64_t items = static_cast<int64_t>(item_group.size()) * blocks;

  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t e = item_group[it / blocks];
      const int64_t n_begin = (it % blocks) * block, n_end = std::min(N, n_begin + block);
      const int64_t m_begin = e ? off[e - 1] : 0, m_end = off[e];
      const at::BFloat16* we = wp + e * N * K;
      for (int64_t n = n_begin; n < n_end; n += kRows)
          rows(xp + m_begin * K, m_end - m_begin, we + n * K, K, std::min(kRows, n_end - n), yp + m_begin * N + n, N);
    }
  });
  return y;
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t wdim) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "dsv3 CPU kernels: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "dsv3 CPU kernels: bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == wdim && x.size(1) == w.size(wdim - 1),
              "dsv3 CPU kernels: x [M, K] against w [..., N, K]");
}

at::Tensor grouped_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs) {
  check(x, w, 3);
  TORCH_CHECK(offs.dim() == 1 && offs.size(0) == w.size(0), "dsv3::grouped_gemv: offs [E]");
  const auto off = offs.to(at::kLong).contiguous();
  const int64_t E = w.size(0);
  TORCH_CHECK(E == 0 || off.data_ptr<int64_t>()[E - 1] == x.size(0), "dsv3::grouped_gemv: offs must end at M");
  return grouped(x, w, off.data_ptr<int64_t>());
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  check(x, w, 2);
  const int64_t off = x.size(0);
  return grouped(x, w.unsqueeze(0), &off);
}

}  // namespace

TORCH_LIBRARY(dsv3, m) {
  m.def("grouped_gemv(Tensor x, Tensor w, Tensor offs) -> Tensor");
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("grouped_gemv", &grouped_gemv);
  m.impl("gemv", &gemv);
}
