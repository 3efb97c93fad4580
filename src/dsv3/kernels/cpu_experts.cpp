// The routed experts of an MoE layer for bf16 CPU training (fp32 master weights), forward and backward.
//
// Per expert e with rows X_e (the tokens routed to it): H = X_e Wgu_e^T, A = silu(G) * U, Y = A Wd_e^T; backward
// dA = dY Wd_e, dH from dA, dX = dH Wgu_e, dWd_e = dY^T A, dWgu_e = dH^T X_e. One oneDNN GEMM per expert and
// product (what autocast runs) reached 0.4-0.5 TFLOP/s for the experts' share of the `small` training step, a
// quarter of the machine's bf16 matmul peak: every call casts or re-packs its operands, the gathers, SwiGLU and its
// gradient are separate passes, and each small GEMM is split across the threads. Here one thread takes
// one expert at a time (largest first): it casts and packs the expert's fp32 weights once into the brgemm B layout
// (VNNI), gathers 64 rows at a time straight from the tokens, runs each product as brgemm micro-kernels
// (AMX, bf16 x bf16 -> fp32) and does the elementwise work on the fp32 results while they are in cache; the
// weight gradients contract over the expert's rows in chunks, written straight into the fp32 gradients.
// Rounding follows autocast: H is stored in bf16 and SwiGLU reads the rounded values; the products sum in fp32.
// A routed call (router weights given) also returns the weighted sum over each token's k experts, in fp32, and
// its backward applies the weights to the products' fp32 results, returns the router weights' gradient (from
// dout Wd and the recomputed SwiGLU output, so the experts' outputs need not be kept) and sums each token's k
// input gradients: the elementwise passes autograd would make over [tokens, k, hidden].
// At the `small` preset's shapes (8192 tokens, 4 of 32 experts, hidden 512, width 256), forward + backward took
// 68-79 ms against 125-128 ms for the per-expert oneDNN path, 2 threads.

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

constexpr int64_t kR = 64;    // rows per block (the M of the row products)
constexpr int64_t kC = 512;   // rows per weight-gradient chunk (the K of dW = dY^T A), a multiple of kR

// Where each expert's rows live: sorted row i (rows grouped by expert, expert e from first[e]) is token slot
// slot(i) (the (token, choice) index, or i itself without `order`) and sits at padded row pstart[e] + (i - first[e])
// of the saved activations, each expert's block padded with zero rows to a multiple of kR.
struct Layout {
  std::vector<int64_t> count, first, pstart, by_size;
  const int64_t* order = nullptr;
  int64_t k = 1, padded = 0;

  Layout(const std::optional<at::Tensor>& ord, int64_t k_, at::IntArrayRef counts) : k(k_) {
    const int64_t E = counts.size();
    count.assign(counts.begin(), counts.end());
    first.resize(E + 1), pstart.resize(E + 1);
    first[0] = pstart[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
      TORCH_CHECK(count[e] >= 0, "experts: negative row count");
      first[e + 1] = first[e] + count[e];
      pstart[e + 1] = pstart[e] + round_up(count[e], kR);
    }
    padded = pstart[E];
    if (ord.has_value() && ord->defined()) {
      TORCH_CHECK(ord->scalar_type() == at::kLong && ord->dim() == 1 && ord->is_contiguous() &&
                  ord->numel() == first[E], "experts: order must be int64 [sum(counts)]");
      order = ord->const_data_ptr<int64_t>();
      TORCH_CHECK(std::all_of(order, order + first[E], [&](int64_t s) { return s >= 0 && s < first[E]; }),
                  "experts: order holds a slot out of range");
    }
    for (int64_t e = 0; e < E; ++e)
      if (count[e]) by_size.push_back(e);
    std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t a, int64_t b) { return count[a] > count[b]; });
  }
  int64_t slot(int64_t i) const { return order ? order[i] : i; }
  int64_t rows() const { return first.back(); }
};

// Run fn(e, scratch) for every expert with rows, each thread taking the next largest expert not yet started
template <typename F>
void for_each_expert(const Layout& L, F fn) {
  for_each_item(L.by_size.size(), [&](int64_t j, Scratch& scratch) { fn(L.by_size[j], scratch); });
}

// dst [kR, D] bf16 (ld ldd) <- rows src_row(0 .. rows-1) of src (ld D), zero rows after
template <typename T, typename Row>
void gather_rows(const T* src, int64_t D, int64_t rows, Row src_row, bf16* dst, int64_t ldd) {
  for (int64_t i = 0; i < kR; ++i) {
    bf16* d = dst + i * ldd;
    if (i >= rows) {
      std::memset(d, 0, D * sizeof(bf16));
      continue;
    }
    const T* s = src + src_row(i) * D;
    if constexpr (std::is_same_v<T, bf16>) std::memcpy(d, s, D * sizeof(bf16));
    else for (int64_t c = 0; c < D; c += 16) store16(d + c, load16(s + c));
  }
}

// dst[0, H) <- src[0, H) rounded to bf16 with streaming stores (vec.h): the experts' output rows go out by token
// slot, scattered over the whole output (forward 1.10x, backward 1.05x at small's shapes, the same bits). dst is
// 64-byte aligned (ATen's allocator, H % 32 == 0); the writer fences before anyone reads it.
inline void stream_row(const float* src, int64_t H, bf16* dst) {
  for (int64_t d = 0; d < H; d += 16) stream16(dst + d, load16(src + d));
}

inline __m512 sigmoid16(__m512 g) {
  return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

template <typename T>
void forward_impl(const T* x, const Layout& L, const float* gate_up, const float* down, int64_t H, int64_t I,
                  bf16* y, bf16* h) {
  const int64_t I2 = 2 * I;
  for_each_expert(L, [&](int64_t e, Scratch& scratch) {
    const auto s = carve(scratch, {H * ld_b(I2) * 2, I * ld_b(H) * 2, kR * ld_a(H) * 2, kR * ld_a(I) * 2,
                                   kR * ld_c(I2) * 4, kR * ld_c(H) * 4});
    bf16* Bgu = (bf16*)s[0];  // VNNI of Wgu^T [H, 2I]
    bf16* Bd = (bf16*)s[1];   // VNNI of Wd^T [I, H]
    bf16* Xb = (bf16*)s[2];   // the block's rows
    bf16* Ab = (bf16*)s[3];   // their SwiGLU output
    float* C1 = (float*)s[4];
    float* C2 = (float*)s[5];
    pack_transposed(gate_up + e * I2 * H, H, I2, H, Bgu, ld_b(I2));
    pack_transposed(down + e * H * I, I, H, I, Bd, ld_b(H));
    for (int64_t r0 = 0; r0 < L.count[e]; r0 += kR) {
      const int64_t rows = std::min(kR, L.count[e] - r0), i0 = L.first[e] + r0, p0 = L.pstart[e] + r0;
      gather_rows(x, H, rows, [&](int64_t i) { return L.slot(i0 + i) / L.k; }, Xb, ld_a(H));
      cpublas::brgemm(kR, I2, H, ld_a(H), ld_b(I2), ld_c(I2), false, Xb, Bgu, C1, true);  // H = X Wgu^T
      bf16* hb = h + p0 * I2;
      for (int64_t i = 0; i < kR; ++i) {
        const float* ci = C1 + i * ld_c(I2);
        for (int64_t d = 0; d < I; d += 16) {
          const __m512 g = round_as<bf16>(load16(ci + d)), u = round_as<bf16>(load16(ci + I + d));
          store16(hb + i * I2 + d, g);
          store16(hb + i * I2 + I + d, u);
          store16(Ab + i * ld_a(I) + d, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u));
        }
      }
      cpublas::brgemm(kR, H, I, ld_a(I), ld_b(H), ld_c(H), false, Ab, Bd, C2, true);  // Y = A Wd^T
      for (int64_t i = 0; i < rows; ++i) stream_row(C2 + i * ld_c(H), H, y + L.slot(i0 + i) * H);
    }
    _mm_sfence();  // the streamed rows visible before the weighted sum reads them
  });
}

template <typename T>
void backward_impl(const T* dy, const Layout& L, const bf16* x, const bf16* h, const float* gate_up,
                   const float* down, const float* w, int64_t H, int64_t I, bf16* dx, float* dgate_up, float* ddown,
                   float* dw) {
  const int64_t I2 = 2 * I, ldT = ld_a(kC);
  for_each_expert(L, [&](int64_t e, Scratch& scratch) {
    const auto s = carve(scratch, {H * ld_b(I) * 2, I2 * ld_b(H) * 2, kR * ld_a(H) * 2, kR * ld_a(I2) * 2, kR * I * 2,
                                   H * ldT * 2, I2 * ldT * 2, kC * ld_b(I) * 2, kC * ld_b(H) * 2,
                                   kR * ld_c(I) * 4, kR * ld_c(H) * 4});
    bf16* Bd = (bf16*)s[0];    // VNNI of Wd [H, I]: B of dA = dY Wd
    bf16* Bgu = (bf16*)s[1];   // VNNI of Wgu [2I, H]: B of dX = dH Wgu
    bf16* dYb = (bf16*)s[2];   // the block's dY rows
    bf16* dHb = (bf16*)s[3];   // the block's dH
    bf16* Ab = (bf16*)s[4];    // the block's SwiGLU output, recomputed
    bf16* dYt = (bf16*)s[5];   // dY^T of the chunk: A of dWd
    bf16* dHt = (bf16*)s[6];   // dH^T of the chunk: A of dWgu
    bf16* Av = (bf16*)s[7];    // VNNI of the chunk's A rows: B of dWd
    bf16* Xv = (bf16*)s[8];    // VNNI of the chunk's X rows: B of dWgu
    float* dA = (float*)s[9];
    float* dXb = (float*)s[10];
    pack_rows(down + e * H * I, I, H, I, Bd, ld_b(I));
    pack_rows(gate_up + e * I2 * H, H, I2, H, Bgu, ld_b(H));
    const int64_t n = L.count[e], np = round_up(n, kR);
    for (int64_t c0 = 0; c0 < np; c0 += kC) {
      const int64_t kc = std::min(kC, np - c0);
      for (int64_t r0 = c0; r0 < c0 + kc; r0 += kR) {
        const int64_t rows = std::min(kR, n - r0), i0 = L.first[e] + r0, p0 = L.pstart[e] + r0, j = r0 - c0;
        auto slot = [&](int64_t i) { return L.slot(i0 + i); };
        if (w) gather_rows(dy, H, rows, [&](int64_t i) { return slot(i) / L.k; }, dYb, ld_a(H));  // unscaled
        else gather_rows(dy, H, rows, slot, dYb, ld_a(H));
        cpublas::brgemm(kR, I, H, ld_a(H), ld_b(I), ld_c(I), false, dYb, Bd, dA, true);  // dA = dY Wd
        const bf16* hb = h + p0 * I2;
        for (int64_t i = 0; i < kR; ++i) {
          // With router weights slot s's dY is w[s] dout[s / k]: w[s] scales dA here and A for dWd = dY^T A, and
          // the weight's gradient dout . y[s] is (dout Wd) . A, so y need not be kept from the forward.
          const __m512 ws = _mm512_set1_ps(!w ? 1.f : i < rows ? w[slot(i)] : 0.f);
          __m512 dot = _mm512_setzero_ps();
          for (int64_t d = 0; d < I; d += 16) {
            const __m512 g = load16(hb + i * I2 + d), u = load16(hb + i * I2 + I + d), dy_wd = load16(dA + i * ld_c(I) + d);
            const __m512 s = sigmoid16(g), sg = _mm512_mul_ps(g, s), a = round_as<bf16>(_mm512_mul_ps(sg, u));
            const __m512 da = _mm512_mul_ps(dy_wd, ws);
            dot = _mm512_fmadd_ps(dy_wd, a, dot);
            // dG = dA U silu'(G) with silu'(g) = s (1 + g (1 - s)); dU = dA silu(G)
            const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(_mm512_set1_ps(1.f), s), _mm512_set1_ps(1.f)));
            store16(Ab + i * I + d, _mm512_mul_ps(a, ws));
            store16(dHb + i * ld_a(I2) + d, _mm512_mul_ps(_mm512_mul_ps(da, u), dsilu));
            store16(dHb + i * ld_a(I2) + I + d, _mm512_mul_ps(da, sg));
          }
          if (w && i < rows) dw[slot(i)] = _mm512_reduce_add_ps(dot);
        }
        cpublas::brgemm(kR, H, I2, ld_a(I2), ld_b(H), ld_c(H), false, dHb, Bgu, dXb, true);  // dX = dH Wgu
        for (int64_t i = 0; i < rows; ++i) stream_row(dXb + i * ld_c(H), H, dx + L.slot(i0 + i) * H);
        transpose(dYb, ld_a(H), kR, H, dYt + j, ldT);
        transpose(dHb, ld_a(I2), kR, I2, dHt + j, ldT);
        pack_rows(Ab, I, kR, I, Av + j * ld_b(I), ld_b(I));
        for (int64_t i = 0; i < kR; i += 2) {  // the block's x rows read again, straight into VNNI pairs
          const bf16* a = i < rows ? x + slot(i) / L.k * H : nullptr;
          const bf16* b = i + 1 < rows ? x + slot(i + 1) / L.k * H : nullptr;
          auto row16 = [](const bf16* r, int64_t n) {
            return r ? _mm256_loadu_si256((const __m256i*)(r + n)) : _mm256_setzero_si256();
          };
          for (int64_t n = 0; n < H; n += 16)
            _mm512_storeu_si512(Xv + (j + i) * ld_b(H) + 2 * n, interleave(row16(a, n), row16(b, n)));
        }
      }
      for (int64_t m0 = 0; m0 < H; m0 += kR)  // dWd (+)= dY^T A
        cpublas::brgemm(std::min(kR, H - m0), I, kc, ldT, ld_b(I), I, c0 > 0, dYt + m0 * ldT, Av, ddown + e * H * I + m0 * I,
                        true);
      for (int64_t m0 = 0; m0 < I2; m0 += kR)  // dWgu (+)= dH^T X
        cpublas::brgemm(std::min(kR, I2 - m0), H, kc, ldT, ld_b(H), H, c0 > 0, dHt + m0 * ldT, Xv,
                        dgate_up + e * I2 * H + m0 * H, true);
    }
    _mm_sfence();  // the streamed dx rows visible before the k-sum reads them
  });
}

void check_weights(const at::Tensor& gate_up, const at::Tensor& down, int64_t E, int64_t H) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat && gate_up.is_contiguous() &&
              down.is_contiguous() && gate_up.dim() == 3 && down.dim() == 3,
              "experts: contiguous fp32 gate_up [E, 2I, H] and down [E, H, I] expected");
  const int64_t I = down.size(2);
  TORCH_CHECK(gate_up.size(0) == E && down.size(0) == E && gate_up.size(1) == 2 * I && gate_up.size(2) == H &&
              down.size(1) == H, "experts: weight shapes do not match the rows and counts");
  TORCH_CHECK(H % 32 == 0 && I % 32 == 0, "experts: hidden and expert sizes must be multiples of 32");
}

// The router weights of a routed call: fp32 [N, k], contiguous, or undefined
at::Tensor router_weights(const std::optional<at::Tensor>& weights, const Layout& L, int64_t N) {
  if (!weights.has_value() || !weights->defined()) return {};
  TORCH_CHECK(L.order && weights->scalar_type() == at::kFloat && weights->is_contiguous() && weights->numel() == N * L.k,
              "experts: weights must be fp32 [N, k] (contiguous), given with order");
  return *weights;
}

// x [R, H] fp32 or bf16 (contiguous); order int64 [M] (token slot of each row sorted by expert; token = slot / k)
// or none (x's rows already sorted, M = R, k = 1); counts [E] rows per expert; weights [R, k] fp32 (with order)
// or none; add [R, H] bf16 or none (with weights: the shared experts' output). Returns y [M, H] bf16 (by slot); for
// the backward H = X Wgu^T [P, 2I] (bf16, padded per expert); and with weights out [R, H] = sum_j weights[t, j]
// y[t k + j] (+ add[t]) in fp32 (else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> experts_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& order, int64_t k, at::IntArrayRef counts,
    const at::Tensor& gate_up, const at::Tensor& down, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& add) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "experts_forward: contiguous fp32 or bf16 x [R, H] expected");
  const int64_t H = x.size(1), I = down.size(2), R = x.size(0);
  check_weights(gate_up, down, counts.size(), H);
  const Layout L(order, k, counts);
  TORCH_CHECK(L.rows() == R * (L.order ? k : 1), "experts_forward: counts do not match x");
  const at::Tensor w = router_weights(weights, L, R);
  const auto bopt = x.options().dtype(at::kBFloat16);
  at::Tensor y = at::empty({L.rows(), H}, bopt), h = at::empty({L.padded, 2 * I}, bopt);
  TORCH_INTERNAL_ASSERT(aligned64(y), "experts_forward: unaligned output");
  AT_DISPATCH_SWITCH(x.scalar_type(), "experts_forward",
      AT_DISPATCH_CASE(at::kFloat, [&] { forward_impl(x.const_data_ptr<float>(), L, gate_up.const_data_ptr<float>(),
                                                      down.const_data_ptr<float>(), H, I, y.data_ptr<bf16>(),
                                                      h.data_ptr<bf16>()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { forward_impl(x.const_data_ptr<bf16>(), L, gate_up.const_data_ptr<float>(),
                                                         down.const_data_ptr<float>(), H, I, y.data_ptr<bf16>(),
                                                         h.data_ptr<bf16>()); }));
  const bool has_add = add.has_value() && add->defined();
  TORCH_CHECK(!has_add || (w.defined() && add->scalar_type() == at::kBFloat16 && add->is_contiguous() &&
                           add->dim() == 2 && add->size(0) == R && add->size(1) == H),
              "experts_forward: add must be bf16 [R, H] (contiguous), with weights");
  at::Tensor out = at::empty({w.defined() ? R : 0, H}, x.options().dtype(at::kFloat));
  if (w.defined()) {
    const float* wp = w.const_data_ptr<float>();
    const bf16* yp = y.const_data_ptr<bf16>();
    const bf16* ap = has_add ? add->const_data_ptr<bf16>() : nullptr;
    float* op = out.data_ptr<float>();
    for_each_block(R, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t c = 0; c < H; c += 16) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t j = 0; j < k; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(wp[t * k + j]), load16(yp + (t * k + j) * H + c), acc);
          if (ap) acc = _mm512_add_ps(acc, load16(ap + t * H + c));  // after the routed sum, as `routed + add` would
          store16(op + t * H + c, acc);
        }
    });
  }
  return {y, h, out};
}

// dy: the gradient of the forward's out [R, H] when it had weights, else of y [M, H] (by slot); fp32 or bf16. x: the
// forward's x in bf16 (its rows are gathered again rather than kept); the rest as for the forward. Returns dx (with
// weights [R, H], each token's k slots (and dx_add [R, H] bf16, another gradient of x) summed in fp32, kept in fp32
// or rounded to bf16 with bf16_dx; else [M, H]
// bf16 by row), dgate_up and ddown fp32 (zero for experts without rows), and with weights dweights [R, k] fp32 (else
// empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward(
    const at::Tensor& dy, const std::optional<at::Tensor>& order, int64_t k, at::IntArrayRef counts,
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate_up, const at::Tensor& down,
    const std::optional<at::Tensor>& weights, bool bf16_dx, const std::optional<at::Tensor>& dx_add) {
  const int64_t H = dy.size(1), I = down.size(2);
  check_weights(gate_up, down, counts.size(), H);
  const Layout L(order, k, counts);
  const int64_t R = L.order ? L.rows() / k : L.rows();
  const at::Tensor w = router_weights(weights, L, R);
  TORCH_CHECK(dy.dim() == 2 && dy.is_contiguous() && dy.size(0) == (w.defined() ? R : L.rows()) &&
              (dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kBFloat16),
              "experts_backward: contiguous fp32 or bf16 dy expected, [R, H] with weights, else [M, H]");
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(0) == R && x.size(1) == H,
              "experts_backward: x must be the forward's x, in bf16");
  TORCH_CHECK(h.is_contiguous() && h.size(0) == L.padded && h.size(1) == 2 * I, "experts_backward: h must be the forward's");
  at::Tensor dxs = at::empty({L.rows(), H}, dy.options().dtype(at::kBFloat16));
  TORCH_INTERNAL_ASSERT(aligned64(dxs), "experts_backward: unaligned output");
  at::Tensor dgate_up = at::empty_like(gate_up), ddown = at::empty_like(down);
  at::Tensor dw = at::empty({w.defined() ? R : 0, k}, dy.options().dtype(at::kFloat));
  for (size_t e = 0; e < L.count.size(); ++e)
    if (!L.count[e]) dgate_up[e].zero_(), ddown[e].zero_();
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_SWITCH(dy.scalar_type(), "experts_backward",
      AT_DISPATCH_CASE(at::kFloat, [&] { backward_impl(dy.const_data_ptr<float>(), L, x.const_data_ptr<bf16>(),
                                                       h.const_data_ptr<bf16>(), gate_up.const_data_ptr<float>(),
                                                       down.const_data_ptr<float>(), wp, H, I, dxs.data_ptr<bf16>(),
                                                       dgate_up.data_ptr<float>(), ddown.data_ptr<float>(),
                                                       dw.data_ptr<float>()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { backward_impl(dy.const_data_ptr<bf16>(), L, x.const_data_ptr<bf16>(),
                                                          h.const_data_ptr<bf16>(), gate_up.const_data_ptr<float>(),
                                                          down.const_data_ptr<float>(), wp, H, I, dxs.data_ptr<bf16>(),
                                                          dgate_up.data_ptr<float>(), ddown.data_ptr<float>(),
                                                          dw.data_ptr<float>()); }));
  if (!w.defined()) return {dxs, dgate_up, ddown, dw};
  const bool has_add = dx_add.has_value() && dx_add->defined();
  TORCH_CHECK(!has_add || (dx_add->scalar_type() == at::kBFloat16 && dx_add->is_contiguous() && dx_add->dim() == 2 &&
                           dx_add->size(0) == R && dx_add->size(1) == H),
              "experts_backward: dx_add must be bf16 [R, H] (contiguous)");
  at::Tensor dx = at::empty({R, H}, dy.options().dtype(bf16_dx ? at::kBFloat16 : at::kFloat));
  const bf16* sp = dxs.const_data_ptr<bf16>();
  const bf16* ap = has_add ? dx_add->const_data_ptr<bf16>() : nullptr;
  auto ksum = [&](auto* dp) {
    for_each_block(R, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t c = 0; c < H; c += 16) {
          __m512 acc = load16(sp + t * k * H + c);
          for (int64_t j = 1; j < k; ++j) acc = _mm512_add_ps(acc, load16(sp + (t * k + j) * H + c));
          if (ap) acc = _mm512_add_ps(acc, load16(ap + t * H + c));
          store16(dp + t * H + c, acc);
        }
    });
  };
  if (bf16_dx) ksum(dx.data_ptr<bf16>());
  else ksum(dx.data_ptr<float>());
  return {dx, dgate_up, ddown, dw};
}

// Keep the n best (value, index) pairs of a stream, best first; ties keep the lower index (seen first). A NaN
// value is never better than another, so the indices stay in range whatever the scores.
struct TopN {
  float val[16];
  int64_t idx[16];
  int64_t n, size = 0;
  explicit TopN(int64_t n_) : n(n_) {}
  void add(float v, int64_t i) {
    if (size == n && !(v > val[n - 1])) return;
    int64_t j = size < n ? size++ : n - 1;
    for (; j > 0 && v > val[j - 1]; --j) val[j] = val[j - 1], idx[j] = idx[j - 1];
    val[j] = v, idx[j] = i;
  }
};

// DeepSeek-V3's expert choice from choice [N, E] fp32 (scores + correction bias): with groups (n_group > 1 and
// topk_group < n_group), each group scored by the sum of its two best (top2) or its best, the topk_group best groups
// kept; then the k best experts of the kept groups, best first -> idx [N, k] int64. The topk / mask / topk chain
// of ATen ops it replaces ran ~1 ms per layer on the `small` step's 8192 x 32 scores.
at::Tensor route_topk(const at::Tensor& choice, int64_t k, int64_t n_group, int64_t topk_group, bool top2) {
  TORCH_CHECK(choice.dim() == 2 && choice.scalar_type() == at::kFloat && choice.stride(1) == 1,
              "route_topk: fp32 choice [N, E] with contiguous rows expected");
  const int64_t N = choice.size(0), E = choice.size(1), ld = choice.stride(0);
  TORCH_CHECK(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group && n_group <= 16,
              "route_topk: n_group must divide E (at most 16 groups), 1 <= topk_group <= n_group");
  const int64_t per = E / n_group;
  TORCH_CHECK(k >= 1 && k <= 16 && k <= topk_group * per && (!top2 || per >= 2 || n_group == topk_group),
              "route_topk: 1 <= k <= 16 experts of the kept groups (two per group for top2 scoring)");
  at::Tensor idx = at::empty({N, k}, choice.options().dtype(at::kLong));
  const float* cp = choice.const_data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  for_each_block(N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * ld;
      bool keep[16];
      std::fill(keep, keep + n_group, true);
      if (topk_group < n_group) {
        TopN groups(topk_group);
        for (int64_t g = 0; g < n_group; ++g) {
          TopN best(top2 ? 2 : 1);
          for (int64_t e = g * per; e < (g + 1) * per; ++e) best.add(c[e], e);
          groups.add(top2 ? best.val[0] + best.val[1] : best.val[0], g);
        }
        std::fill(keep, keep + n_group, false);
        for (int64_t j = 0; j < topk_group; ++j) keep[groups.idx[j]] = true;
      }
      TopN experts(k);
      for (int64_t g = 0; g < n_group; ++g)
        if (keep[g])
          for (int64_t e = g * per; e < (g + 1) * per; ++e) experts.add(c[e], e);
      std::copy(experts.idx, experts.idx + k, ip + t * k);
    }
  });
  return idx;
}

// The token slots of idx [N, k] (int64, contiguous) sorted by expert, stably (what argsort(stable=True) of its flat
// view gives), and the slots per expert: a counting sort, one pass to count and one to place (ATen's argsort and
// count took ~1 ms per MoE layer at the `small` training step's 32768 slots).
std::tuple<at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& idx, int64_t E) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && E >= 1,
              "sort_by_expert: contiguous int64 expert indices and E >= 1 expected");
  const int64_t M = idx.numel();
  at::Tensor order = at::empty({M}, idx.options()), counts = at::zeros({E}, idx.options());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < E, "sort_by_expert: expert index out of range");
    ++cp[ip[i]];
  }
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + cp[e - 1];
  int64_t* op = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) op[next[ip[i]]++] = i;
  return {order, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("experts_forward(Tensor x, Tensor? order, int k, int[] counts, Tensor gate_up, Tensor down, Tensor? weights, "
        "Tensor? add=None) -> (Tensor, Tensor, Tensor)");
  m.def("experts_backward(Tensor dy, Tensor? order, int k, int[] counts, Tensor x, Tensor h, Tensor gate_up, "
        "Tensor down, Tensor? weights, bool bf16_dx=False, Tensor? dx_add=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("route_topk(Tensor choice, int k, int n_group, int topk_group, bool top2) -> Tensor");
  m.def("sort_by_expert(Tensor idx, int E) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("experts_forward", experts_forward);
  m.impl("experts_backward", experts_backward);
  m.impl("route_topk", route_topk);
  m.impl("sort_by_expert", sort_by_expert);
}
