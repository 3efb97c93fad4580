// Causal / masked softmax attention for bf16 training on CPUs with AMX: forward and backward.
//
// ATen's CPU flash-attention backward costs ~7x its forward at training shapes (16 x 8 heads x 512 tokens x 64):
// it calls a general GEMM per 64 x 512 tile with bf16 results accumulated in place. These kernels tile queries
// and keys by 64 and run each tile's products (forward: S = Q K^T, O += P V; backward: S, dP = dO V^T,
// dV^T += dO^T P, dQ += dS K, dK^T += Q^T dS) as oneDNN brgemm micro-kernels (bf16 x bf16 -> fp32, AMX) on
// operands packed once per head, keep every sum in fp32 and skip tiles the mask leaves empty. The forward keeps
// a running max and sum per row and returns the log-sum-exp, from which the backward rebuilds
// P = exp(scale * S - lse), as in FlashAttention-2.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <torch/library.h>

#include "pack.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using namespace dsv3_vec;
using namespace dsv3_pack;
namespace cpublas = at::native::cpublas;

// dst[n * ldd + d] = bf16(src[d * lds + n]) for n < rows (src holds whole 16-row groups), D and ldd even
void store_transposed(const float* src, int64_t lds, int64_t rows, int64_t D, bf16* dst, int64_t ldd) {
  const __m512i idx = row_offsets(ldd / 2);
  for (int64_t n = 0; n < rows; n += 16) {
    const __mmask16 keep = rows - n >= 16 ? 0xFFFF : (__mmask16)((1u << (rows - n)) - 1);
    for (int64_t d = 0; d < D; d += 2) {
      __m512i w = interleave(to_bf16(_mm512_loadu_ps(src + d * lds + n)), to_bf16(_mm512_loadu_ps(src + (d + 1) * lds + n)));
      _mm512_mask_i32scatter_epi32(dst + n * ldd + d, keep, idx, w, 4);
    }
  }
}

// rows [T, D] (ld lds) -> contiguous [Tp, D], zero rows past T
void copy_rows(const bf16* src, int64_t lds, int64_t T, int64_t Tp, int64_t D, bf16* dst) {
  for (int64_t i = 0; i < T; ++i) std::memcpy(dst + i * D, src + i * lds, D * sizeof(bf16));
  std::memset(dst + T * D, 0, (Tp - T) * D * sizeof(bf16));
}

// [first, last + 1) of the true entries of row[0, n), 64 at a time; (n, 0) when there are none
std::pair<int64_t, int64_t> true_span(const bool* row, int64_t n) {
  auto bits = [&](int64_t c) {  // one bit per entry of row[c, c + 64)
    const __mmask64 in = n - c >= 64 ? ~0ull : (1ull << (n - c)) - 1;
    const __m512i x = _mm512_maskz_loadu_epi8(in, row + c);
    return (uint64_t)_mm512_test_epi8_mask(x, x);
  };
  int64_t a = n, e = 0;
  for (int64_t c = 0; c < n; c += 64)
    if (uint64_t m = bits(c)) { a = c + __builtin_ctzll(m); break; }
  for (int64_t c = (n - 1) / 64 * 64; c >= a && a < n; c -= 64)
    if (uint64_t m = bits(c)) { e = c + 64 - __builtin_clzll(m); break; }
  return {a, e};
}

struct Mask {  // bool [Tq, Tk] of one (batch, head), or none (causal / full)
  const bool* data = nullptr;
  int64_t ld = 0;
};

// Which of keys n .. n + 15 query qi may see: inside Tk, at or before qi when causal, allowed by the mask
inline __mmask16 visible(int64_t qi, int64_t n, int64_t Tq, int64_t Tk, bool causal, const Mask& mask) {
  const int64_t cols = std::min<int64_t>(16, Tk - n);
  if (cols <= 0) return 0;
  __mmask16 keep = cols == 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
  if (causal) {
    const int64_t allowed = qi - n + 1;  // keys n + j with j < allowed
    keep &= allowed <= 0 ? 0 : allowed >= 16 ? 0xFFFF : (__mmask16)((1u << allowed) - 1);
  }
  if (mask.data && qi < Tq) {
    __m128i mb = _mm_maskz_loadu_epi8(keep, mask.data + qi * mask.ld + n);
    keep &= _mm_test_epi8_mask(mb, mb);
  }
  return keep;
}

// [lo, hi): the keys any of queries m0 .. m0 + rows - 1 may see
std::pair<int64_t, int64_t> key_range(int64_t m0, int64_t rows, int64_t Tk, bool causal, const Mask& mask) {
  if (!mask.data) return {0, causal ? std::min(Tk, m0 + rows) : Tk};
  int64_t lo = Tk, hi = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const auto [a, e] = true_span(mask.data + (m0 + i) * mask.ld, Tk);
    if (a < e) lo = std::min(lo, a), hi = std::max(hi, e);
  }
  return {lo, hi};
}

constexpr int64_t kB = 64;  // queries and keys per tile (128: 10-40% slower at 256-2048 tokens)

void backward_head(const bf16* q, int64_t ldq, const bf16* k, int64_t ldk, const bf16* v, int64_t ldv,
                   const bf16* o, int64_t ldo, const bf16* go, int64_t ldgo, const float* lse, int64_t ldl, Mask mask,
                   bool causal, int64_t Tq, int64_t Tk, int64_t Dq, int64_t Dv, float scale, bf16* dq, int64_t lddq,
                   bf16* dk, int64_t lddk, bf16* dv, int64_t lddv, std::vector<char>& scratch) {
  const int64_t Tqp = round_up(Tq, kB), Tkp = round_up(Tk, kB), nqb = Tqp / kB, nkb = Tkp / kB;
  // leading dims of the transposed buffers: an odd number of cache lines, so that walking down a column does not
  // keep landing in the same few L1 sets (power-of-two strides made the packing several times slower)
  const int64_t ldt = Tqp + 32, ldg = Tkp + 16;
  const int64_t n_bf16 = Tqp * (Dq + Dv) + (Dq + Dv) * ldt + 2 * Tkp * (Dq + Dv) + Tkp * Dq + 3 * kB * kB;
  const int64_t n_f32 = (Dq + Dv) * ldg + kB * Dq + 2 * kB * kB + 2 * Tqp;
  scratch.resize(n_bf16 * 2 + n_f32 * 4 + 128);
  auto* b = reinterpret_cast<bf16*>(round_up<uintptr_t>(reinterpret_cast<uintptr_t>(scratch.data()), 64));
  bf16* Qr = b;                 // [Tqp, Dq] queries, zero rows past Tq (A of S)
  bf16* GOr = Qr + Tqp * Dq;    // [Tqp, Dv] dO (A of dP)
  bf16* Qt = GOr + Tqp * Dv;    // [Dq, Tqp] Q^T (A of dK^T)
  bf16* GOt = Qt + Dq * ldt;    // [Dv, Tqp] dO^T (A of dV^T)
  bf16* Kr = GOt + Dv * ldt;    // [Tkp, Dq] keys, zero rows past Tk
  bf16* Vr = Kr + Tkp * Dq;     // [Tkp, Dv] values
  bf16* KTp = Vr + Tkp * Dv;    // per key tile: VNNI of K^T [Dq, kB] (B of S)
  bf16* VTp = KTp + Tkp * Dq;   // per key tile: VNNI of V^T [Dv, kB] (B of dP)
  bf16* Kp = VTp + Tkp * Dv;    // per key tile: VNNI of K [kB, Dq] (B of dQ)
  bf16* Pp = Kp + Tkp * Dq;     // VNNI of P [kB, kB] (B of dV^T)
  bf16* dSp = Pp + kB * kB;     // VNNI of dS [kB, kB] (B of dK^T)
  bf16* dSr = dSp + kB * kB;    // dS [kB, kB] row-major (A of dQ)
  auto* f = reinterpret_cast<float*>(round_up<uintptr_t>(reinterpret_cast<uintptr_t>(dSr + kB * kB), 64));
  float* dKt = f;               // [Dq, Tkp] (ld ldg)
  float* dVt = dKt + Dq * ldg;  // [Dv, Tkp] (ld ldg)
  float* dQb = dVt + Dv * ldg;  // [kB, Dq]
  float* S = dQb + kB * Dq;     // [kB, kB]
  float* dP = S + kB * kB;      // [kB, kB]
  float* L = dP + kB * kB;      // [Tqp] log-sum-exp
  float* Dd = L + Tqp;          // [Tqp] rowsum(dO * O)

  copy_rows(q, ldq, Tq, Tqp, Dq, Qr);
  copy_rows(go, ldgo, Tq, Tqp, Dv, GOr);
  copy_rows(k, ldk, Tk, Tkp, Dq, Kr);
  copy_rows(v, ldv, Tk, Tkp, Dv, Vr);
  transpose(Qr, Dq, Tqp, Dq, Qt, ldt);
  transpose(GOr, Dv, Tqp, Dv, GOt, ldt);
  for (int64_t i = 0; i < Tqp; ++i) {
    __m512 acc = _mm512_setzero_ps();
    if (i < Tq)
      for (int64_t d = 0; d < Dv; d += 16) acc = _mm512_fmadd_ps(load16(go + i * ldgo + d), load16(o + i * ldo + d), acc);
    Dd[i] = _mm512_reduce_add_ps(acc);
    L[i] = i < Tq ? lse[i * ldl] : INFINITY;  // padded rows: P = 0
  }
  for (int64_t t = 0; t < nkb; ++t) {
    pack_transposed(Kr + t * kB * Dq, Dq, kB, Dq, KTp + t * kB * Dq, kB);
    pack_transposed(Vr + t * kB * Dv, Dv, kB, Dv, VTp + t * kB * Dv, kB);
    pack_rows(Kr + t * kB * Dq, Dq, kB, Dq, Kp + t * kB * Dq, Dq);
  }
  std::fill(dKt, dKt + (Dq + Dv) * ldg, 0.f);

  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t m0 = qb * kB, rows = std::min(kB, Tq - m0);
    const auto [lo, hi] = key_range(m0, rows, Tk, causal, mask);
    bool first = true;
    for (int64_t t = lo / kB; t * kB < hi; ++t) {
      const int64_t n0 = t * kB;
      cpublas::brgemm(kB, kB, Dq, Dq, kB, kB, false, Qr + m0 * Dq, KTp + t * kB * Dq, S, true);   // S = Q K^T
      cpublas::brgemm(kB, kB, Dv, Dv, kB, kB, false, GOr + m0 * Dv, VTp + t * kB * Dv, dP, true); // dP = dO V^T
      const __m512 vscale = _mm512_set1_ps(scale);
      for (int64_t i = 0; i < kB; i += 2) {
        for (int64_t c = 0; c < kB; c += 16) {
          __m256i p2[2], ds2[2];
          for (int r = 0; r < 2; ++r) {
            const int64_t row = i + r, qi = m0 + row;
            const __mmask16 keep = visible(qi, n0 + c, Tq, Tk, causal, mask);
            __m512 p = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(S + row * kB + c), vscale, _mm512_set1_ps(L[qi])));
            p = _mm512_maskz_mov_ps(keep, p);
            __m512 dpv = _mm512_loadu_ps(dP + row * kB + c);
            __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dpv, _mm512_set1_ps(Dd[qi]))), vscale);
            p2[r] = to_bf16(p), ds2[r] = to_bf16(ds);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dSr + row * kB + c), ds2[r]);
          }
          _mm512_storeu_si512(Pp + i * kB + 2 * c, interleave(p2[0], p2[1]));
          _mm512_storeu_si512(dSp + i * kB + 2 * c, interleave(ds2[0], ds2[1]));
        }
      }
      cpublas::brgemm(Dv, kB, kB, ldt, kB, ldg, true, GOt + m0, Pp, dVt + n0, true);      // dV^T += dO^T P
      cpublas::brgemm(Dq, kB, kB, ldt, kB, ldg, true, Qt + m0, dSp, dKt + n0, true);      // dK^T += Q^T dS
      cpublas::brgemm(kB, Dq, kB, kB, Dq, Dq, !first, dSr, Kp + t * kB * Dq, dQb, true);  // dQ += dS K
      first = false;
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t d = 0; d < Dq; d += 16)
        _mm256_storeu_si256((__m256i*)(dq + (m0 + i) * lddq + d),
                            first ? _mm256_setzero_si256() : to_bf16(_mm512_loadu_ps(dQb + i * Dq + d)));
  }
  store_transposed(dKt, ldg, Tk, Dq, dk, lddk);
  store_transposed(dVt, ldg, Tk, Dv, dv, lddv);
}

// The bool mask broadcast to [B, H, Tq, Tk] with contiguous rows, or undefined
at::Tensor expanded_mask(const std::optional<at::Tensor>& attn_mask, int64_t B, int64_t H, int64_t Tq, int64_t Tk) {
  if (!attn_mask.has_value() || !attn_mask->defined()) return {};
  TORCH_CHECK(attn_mask->scalar_type() == at::kBool, "attention: a bool mask expected");
  at::Tensor mask = attn_mask->expand({B, H, Tq, Tk});
  return mask.stride(3) == 1 ? mask : mask.contiguous();
}

// Forward of one (batch, head), FlashAttention-2 style: per 64-query tile, a running max and sum per row over
// the visible key tiles, P = exp(scale * S - max) rounded to bf16 for the P V product (as ATen's CPU flash
// kernel does), out = O / sum and lse = max + log(sum) for the backward.
void forward_head(const bf16* q, int64_t ldq, const bf16* k, int64_t ldk, const bf16* v, int64_t ldv, Mask mask,
                  bool causal, int64_t Tq, int64_t Tk, int64_t Dq, int64_t Dv, float scale, bf16* out, int64_t ldo,
                  float* lse, int64_t ldl, std::vector<char>& scratch) {
  const int64_t Tqp = round_up(Tq, kB), Tkp = round_up(Tk, kB), nqb = Tqp / kB, nkb = Tkp / kB;
  const int64_t n_bf16 = Tqp * Dq + 2 * Tkp * (Dq + Dv) + kB * kB;
  const int64_t n_f32 = kB * Dv + kB * kB + 2 * kB;
  scratch.resize(n_bf16 * 2 + n_f32 * 4 + 128);
  auto* b = reinterpret_cast<bf16*>(round_up<uintptr_t>(reinterpret_cast<uintptr_t>(scratch.data()), 64));
  bf16* Qr = b;                // [Tqp, Dq] queries, zero rows past Tq (A of S)
  bf16* Kr = Qr + Tqp * Dq;    // [Tkp, Dq] keys, zero rows past Tk
  bf16* Vr = Kr + Tkp * Dq;    // [Tkp, Dv] values
  bf16* KTp = Vr + Tkp * Dv;   // per key tile: VNNI of K^T [Dq, kB] (B of S)
  bf16* Vp = KTp + Tkp * Dq;   // per key tile: VNNI of V [kB, Dv] (B of P V)
  bf16* Pr = Vp + Tkp * Dv;    // P [kB, kB] bf16 (A of P V)
  auto* f = reinterpret_cast<float*>(round_up<uintptr_t>(reinterpret_cast<uintptr_t>(Pr + kB * kB), 64));
  float* O = f;                // [kB, Dv] unnormalised output of the query tile
  float* S = O + kB * Dv;      // [kB, kB]
  float* M = S + kB * kB;      // [kB] running max of scale * S per row
  float* Lsum = M + kB;        // [kB] running sum of exp(scale * S - max)

  copy_rows(q, ldq, Tq, Tqp, Dq, Qr);
  copy_rows(k, ldk, Tk, Tkp, Dq, Kr);
  copy_rows(v, ldv, Tk, Tkp, Dv, Vr);
  for (int64_t t = 0; t < nkb; ++t) {
    pack_transposed(Kr + t * kB * Dq, Dq, kB, Dq, KTp + t * kB * Dq, kB);
    pack_rows(Vr + t * kB * Dv, Dv, kB, Dv, Vp + t * kB * Dv, Dv);
  }
  const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t m0 = qb * kB, rows = std::min(kB, Tq - m0);
    const auto [lo, hi] = key_range(m0, rows, Tk, causal, mask);
    std::fill(O, O + kB * Dv, 0.f);
    std::fill(M, M + kB, -INFINITY);
    std::fill(Lsum, Lsum + kB, 0.f);
    for (int64_t t = lo / kB; t * kB < hi; ++t) {
      const int64_t n0 = t * kB;
      cpublas::brgemm(kB, kB, Dq, Dq, kB, kB, false, Qr + m0 * Dq, KTp + t * kB * Dq, S, true);  // S = Q K^T
      for (int64_t i = 0; i < kB; ++i) {
        __m512 s[kB / 16];
        __mmask16 keep[kB / 16];
        __m512 mx = ninf;
        for (int64_t c = 0; c < kB; c += 16) {
          keep[c / 16] = visible(m0 + i, n0 + c, Tq, Tk, causal, mask);
          s[c / 16] = _mm512_mask_mov_ps(ninf, keep[c / 16], _mm512_mul_ps(_mm512_loadu_ps(S + i * kB + c), vscale));
          mx = _mm512_max_ps(mx, s[c / 16]);
        }
        const float m_new = std::max(M[i], _mm512_reduce_max_ps(mx));
        if (m_new == -INFINITY) {  // nothing visible yet in this row
          std::memset(Pr + i * kB, 0, kB * sizeof(bf16));
          continue;
        }
        const float corr = std::exp(M[i] - m_new);  // 0 when the row had no visible key before
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < kB; c += 16) {
          __m512 p = _mm512_maskz_mov_ps(keep[c / 16], exp16(_mm512_sub_ps(s[c / 16], _mm512_set1_ps(m_new))));
          sum = _mm512_add_ps(sum, p);  // in fp32, as ATen's kernel sums: the lse the backward starts from
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(Pr + i * kB + c), to_bf16(p));
        }
        Lsum[i] = Lsum[i] * corr + _mm512_reduce_add_ps(sum);
        M[i] = m_new;
        if (corr != 1.f) {
          const __m512 vc = _mm512_set1_ps(corr);
          for (int64_t d = 0; d < Dv; d += 16) _mm512_storeu_ps(O + i * Dv + d, _mm512_mul_ps(_mm512_loadu_ps(O + i * Dv + d), vc));
        }
      }
      cpublas::brgemm(kB, Dv, kB, kB, Dv, Dv, true, Pr, Vp + t * kB * Dv, O, true);  // O += P V
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float l = Lsum[i];
      const __m512 inv = _mm512_set1_ps(l > 0.f ? 1.f / l : 0.f);
      for (int64_t d = 0; d < Dv; d += 16)
        _mm256_storeu_si256((__m256i*)(out + (m0 + i) * ldo + d), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(O + i * Dv + d), inv)));
      lse[(m0 + i) * ldl] = l > 0.f ? M[i] + std::log(l) : -INFINITY;
    }
  }
}

// q [B, H, Tq, Dq], k [B, H, Tk, Dq], v [B, H, Tk, Dv] bf16; mask as for the backward. Returns out [B, H, Tq, Dv]
// (stored [B, Tq, H, Dv], the layout the output projection reads) and lse [B, H, Tq] fp32.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                     double scale) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kBFloat16 && t->stride(3) == 1,
                "attention_forward: bf16 [B, H, T, D] tensors with contiguous rows expected");
  }
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dq = q.size(3), Tk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Dq % 16 == 0 && Dv % 16 == 0, "attention_forward: head dims must be multiples of 16");
  const at::Tensor mask = expanded_mask(attn_mask, B, H, Tq, Tk);
  at::Tensor out = at::empty({B, Tq, H, Dv}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / H, hi = bh % H;
      auto at4 = [&](const at::Tensor& t) { return t.const_data_ptr<bf16>() + bi * t.stride(0) + hi * t.stride(1); };
      Mask m;
      if (mask.defined()) m = {mask.const_data_ptr<bool>() + bi * mask.stride(0) + hi * mask.stride(1), mask.stride(2)};
      forward_head(at4(q), q.stride(2), at4(k), k.stride(2), at4(v), v.stride(2), m, is_causal && !mask.defined(), Tq,
                   Tk, Dq, Dv, float(scale), out.data_ptr<bf16>() + bi * out.stride(0) + hi * out.stride(1),
                   out.stride(2), lse.data_ptr<float>() + bi * lse.stride(0) + hi * lse.stride(1), lse.stride(2),
                   scratch);
    }
    cpublas::brgemm_release(true);
  });
  return {out, lse};
}

// grad_out, out [B, H, Tq, Dv]; q [B, H, Tq, Dq]; k [B, H, Tk, Dq]; v [B, H, Tk, Dv]; lse [B, H, Tq] fp32;
// mask: bool broadcastable to [B, H, Tq, Tk] (True = may attend) or none. Returns dq, dk, dv laid out as q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale) {
  for (const at::Tensor* t : {&grad_out, &q, &k, &v, &out}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kBFloat16 && t->stride(3) == 1,
                "attention_backward: bf16 [B, H, T, D] tensors with contiguous rows expected");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3, "attention_backward: fp32 lse [B, H, T] expected");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dq = q.size(3), Tk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Dq % 16 == 0 && Dv % 16 == 0, "attention_backward: head dims must be multiples of 16");
  const at::Tensor mask = expanded_mask(attn_mask, B, H, Tq, Tk);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / H, hi = bh % H;
      auto at4 = [&](const at::Tensor& t) { return t.const_data_ptr<bf16>() + bi * t.stride(0) + hi * t.stride(1); };
      auto mut4 = [&](at::Tensor& t) { return t.data_ptr<bf16>() + bi * t.stride(0) + hi * t.stride(1); };
      Mask m;
      if (mask.defined()) m = {mask.const_data_ptr<bool>() + bi * mask.stride(0) + hi * mask.stride(1), mask.stride(2)};
      backward_head(at4(q), q.stride(2), at4(k), k.stride(2), at4(v), v.stride(2), at4(out), out.stride(2),
                    at4(grad_out), grad_out.stride(2), lse.const_data_ptr<float>() + bi * lse.stride(0) + hi * lse.stride(1),
                    lse.stride(2), m, is_causal && !mask.defined(), Tq, Tk, Dq, Dv, float(scale), mut4(dq), dq.stride(2),
                    mut4(dk), dk.stride(2), mut4(dv), dv.stride(2), scratch);
    }
    cpublas::brgemm_release(true);
  });
  return {dq, dk, dv};
}

bool attention_supported() { return cpublas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
        "bool is_causal, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor)");
  m.def("attention_supported() -> bool");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("attention_forward", attention_forward);
  m.impl("attention_backward", attention_backward);
}
TORCH_LIBRARY_IMPL(dsv3, CompositeExplicitAutograd, m) { m.impl("attention_supported", attention_supported); }
