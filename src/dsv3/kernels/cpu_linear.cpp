// Linear layers of bf16 CPU training: the weight gradient dW = dY^T X (fp32, from dY [T, N] and X [T, K] bf16), and
// the SwiGLU between the dense MLPs' products.
//
// ATen runs dY^T X as a oneDNN matmul with a transposed A, which reached ~0.6-0.7 TFLOP/s at the `small` training
// step's shapes (8192 tokens) against ~1.1-1.2 for the same layers' forward products and ~2 for a square one; the
// weight gradients were ~14% of the step. Here X is packed once into brgemm's VNNI B layout (pairs of token rows
// interleaved), dY's columns are transposed (32 x 32 at a time, in registers) into the A operand, and each thread
// accumulates a block of dW's rows over the tokens in an fp32 tile that stays in cache (AMX through oneDNN's
// brgemm, one call shape per layer). The result is fp32 straight away: autocast's path rounds dW to bf16 and then
// casts it up for the fp32 master weight's gradient.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <torch/library.h>

#include "pack.h"
#include "vec.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using namespace dsv3_vec;
using namespace dsv3_pack;
namespace cpublas = at::native::cpublas;

constexpr int64_t kM = 64;    // dW rows per brgemm call
constexpr int64_t kT = 256;   // tokens per chunk (the K of each call)
constexpr int64_t kN = 512;   // largest tile of dW (rows and columns)

// Token pairs [p0, p1) of x [T, K] (rows ldx apart) in VNNI form at out (pair p0's place), zeros past T
inline void pack_pairs(const bf16* x, int64_t ldx, int64_t T, int64_t p0, int64_t p1, int64_t K, bf16* out,
                       int64_t ldb) {
  const int64_t full = std::clamp<int64_t>(T / 2, p0, p1);
  pack_rows(x + 2 * p0 * ldx, ldx, 2 * (full - p0), K, out, ldb);
  for (int64_t p = full; p < p1; ++p) {  // T's last row when odd, then padding
    bf16* o = out + 2 * (p - p0) * ldb;
    std::memset(o, 0, ldb * 2 * sizeof(bf16));
    if (2 * p < T)
      for (int64_t n = 0; n < K; n += 16)
        _mm512_storeu_si512(o + 2 * n, interleave(_mm256_loadu_si256((const __m256i*)(x + 2 * p * ldx + n)),
                                                  _mm256_setzero_si256()));
  }
}

// dy [T, N], x [T, K] bf16 with contiguous rows (N, K multiples of 32) -> dy^T x [N, K] fp32
at::Tensor linear_weight_grad(const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
              dy.stride(1) == 1 && x.stride(1) == 1 && dy.size(0) == x.size(0),
              "linear_weight_grad: bf16 dy [T, N] and x [T, K] with contiguous rows expected");
  const int64_t T = dy.size(0), N = dy.size(1), K = x.size(1), ldy = dy.stride(0), ldx = x.stride(0);
  TORCH_CHECK(N % 32 == 0 && K % 32 == 0, "linear_weight_grad: N and K must be multiples of 32");
  at::Tensor out = at::empty({N, K}, dy.options().dtype(at::kFloat));
  if (T == 0) return out.zero_();
  const bf16* dyp = dy.const_data_ptr<bf16>();
  const bf16* xp = x.const_data_ptr<bf16>();
  float* op = out.data_ptr<float>();

  // Work items: tiles of dW of up to 512 x 512 (their fp32 sums stay in L2), each over all tokens or, with too few
  // tiles to keep the threads busy, over a share of them (the shares' partial sums added at the end). X in VNNI
  // form (zero pairs past T) is packed once for all tiles when several tiles read the same columns, else chunk by
  // chunk by the tile that reads it, into a buffer that stays in cache.
  const int64_t nt = at::get_num_threads(), Tp = round_up<int64_t>(T, 32), chunks = (Tp + kT - 1) / kT;
  const int64_t rblocks = (N + kN - 1) / kN, rb = round_up((N + rblocks - 1) / rblocks, int64_t(32));
  const int64_t cblocks = (K + kN - 1) / kN, cb = round_up((K + cblocks - 1) / cblocks, int64_t(32));
  const int64_t tiles = rblocks * cblocks, split = std::clamp<int64_t>((2 * nt + tiles - 1) / tiles, 1, chunks);
  const int64_t ldv = rblocks > 1 ? ld_b(K) : ld_b(cb), ldc = ld_c(cb);  // VNNI X's (pairs apart), C's
  Scratch xbuf;
  bf16* Xv = rblocks > 1 ? (bf16*)carve(xbuf, {Tp * ldv * 2})[0] : nullptr;
  if (Xv)
    for_each_block(Tp / 2, 64,
                     [&](int64_t b, int64_t e) { pack_pairs(xp, ldx, T, b, e, K, Xv + 2 * b * ldv, ldv); });
  // the first share's sums go straight to out, the others' here (every element written before it is read)
  at::Tensor rest = at::empty({(split - 1) * N * K}, out.options());
  float* partial = rest.data_ptr<float>();
  for_each_item(tiles * split, [&](int64_t item, Scratch& scratch) {
    const auto s = carve(scratch, {rb * ld_a(kT) * 2, rb * ldc * 4, Xv ? 0 : kT * ldv * 2});
    bf16* A = (bf16*)s[0];
    float* C = (float*)s[1];
    const int64_t tile = item / split, part = item % split;
    const int64_t n0 = tile / cblocks * rb, nr = std::min(rb, N - n0);
    const int64_t k0 = tile % cblocks * cb, kw = std::min(cb, K - k0);
    const int64_t t0 = chunks * part / split * kT, t1 = std::min(Tp, chunks * (part + 1) / split * kT);
    for (int64_t tc = t0; tc < t1; tc += kT) {
      const int64_t kc = std::min(kT, t1 - tc);
      transpose(dyp + tc * ldy + n0, ldy, std::min(kc, T - tc), nr, A, ld_a(kT));
      const bf16* B = Xv ? Xv + tc * ldv + 2 * k0 : (bf16*)s[2];
      if (!Xv) pack_pairs(xp + k0, ldx, T, tc / 2, (tc + kc) / 2, kw, (bf16*)s[2], ldv);
      for (int64_t m0 = 0; m0 < nr; m0 += kM)
        cpublas::brgemm(std::min(kM, nr - m0), kw, kc, ld_a(kT), ldv, ldc, tc > t0, A + m0 * ld_a(kT), B,
                        C + m0 * ldc, true);
    }
    float* dst = part == 0 ? op : partial + (part - 1) * N * K;
    for (int64_t i = 0; i < nr; ++i) std::memcpy(dst + (n0 + i) * K + k0, C + i * ldc, kw * 4);
  });
  if (split > 1)
    for_each_block(N * K / 16, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = 16 * b; i < 16 * e; i += 16) {
        __m512 acc = _mm512_loadu_ps(op + i);
        for (int64_t p = 0; p + 1 < split; ++p) acc = _mm512_add_ps(acc, _mm512_loadu_ps(partial + p * N * K + i));
        _mm512_storeu_ps(op + i, acc);
      }
    });
  return out;
}

// SwiGLU as bf16 autocast runs it (silu and the product each rounded to bf16; ATen's silu is g / (1 + exp(-g)) in
// fp32), on gu [T, 2I] bf16 holding each row's gate then up values: one pass where autograd makes two forward and
// three backward, and the gate and up projections can be one product.
at::Tensor swiglu_forward(const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.scalar_type() == at::kBFloat16 && gu.size(1) % 32 == 0,
              "swiglu_forward: contiguous bf16 gu [T, 2I] with I a multiple of 16 expected");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor a = at::empty({T, I}, gu.options());
  const bf16* g = gu.const_data_ptr<bf16>();
  bf16* ap = a.data_ptr<bf16>();
  for_each_block(T, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t d = 0; d < I; d += 16) {
        const __m512 gv = load16(g + t * 2 * I + d), u = load16(g + t * 2 * I + I + d);
        const __m512 e1 = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
        const __m512 sl = round_as<bf16>(_mm512_div_ps(gv, e1));
        store16(ap + t * I + d, _mm512_mul_ps(sl, u));
      }
  });
  return a;
}

// The gradient of gu from da [T, I] bf16: d(up) = da silu(g), d(gate) = (da up) silu'(g) with silu'(g) =
// s (1 + g (1 - s)), s = sigmoid(g) (ATen's silu_backward), each rounded to bf16 where autograd's steps round
at::Tensor swiglu_backward(const at::Tensor& da, const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.scalar_type() == at::kBFloat16 && gu.size(1) % 32 == 0 &&
              da.scalar_type() == at::kBFloat16 && da.is_contiguous() && da.numel() == gu.numel() / 2,
              "swiglu_backward: contiguous bf16 da [T, I] and gu [T, 2I] expected");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor dgu = at::empty_like(gu);
  const bf16* g = gu.const_data_ptr<bf16>();
  const bf16* dap = da.const_data_ptr<bf16>();
  bf16* dp = dgu.data_ptr<bf16>();
  for_each_block(T, 64, [&](int64_t b, int64_t e) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t t = b; t < e; ++t)
      for (int64_t d = 0; d < I; d += 16) {
        const __m512 gv = load16(g + t * 2 * I + d), u = load16(g + t * 2 * I + I + d), dav = load16(dap + t * I + d);
        const __m512 e1 = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
        const __m512 sl = round_as<bf16>(_mm512_div_ps(gv, e1)), s = _mm512_div_ps(one, e1);
        const __m512 ds = round_as<bf16>(_mm512_mul_ps(dav, u));
        const __m512 dsilu = _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, s)));
        store16(dp + t * 2 * I + d, _mm512_mul_ps(_mm512_mul_ps(ds, s), dsilu));
        store16(dp + t * 2 * I + I + d, _mm512_mul_ps(dav, sl));
      }
  });
  return dgu;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("linear_weight_grad(Tensor dy, Tensor x) -> Tensor");
  m.def("swiglu_forward(Tensor gu) -> Tensor");
  m.def("swiglu_backward(Tensor da, Tensor gu) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("linear_weight_grad", linear_weight_grad);
  m.impl("swiglu_forward", swiglu_forward);
  m.impl("swiglu_backward", swiglu_backward);
}
