// Causal / masked softmax attention for bf16 training on CPUs with AMX: forward and backward.
//
// ATen's CPU flash-attention backward costs ~7x its forward at training shapes (16 x 8 heads x 512 tokens x 64):
// it calls a general GEMM per 64 x 512 tile with bf16 results accumulated in place. These kernels work on one
// (batch, head) at a time, 64 queries at a time against up to 512 keys, and run the products as oneDNN brgemm
// micro-kernels (bf16 x bf16 -> fp32, AMX) on operands packed once per head, keeping every sum in fp32 and
// skipping tiles the mask leaves empty. The forward returns the log-sum-exp, from which the backward rebuilds
// P = exp(scale * S - lse), as in FlashAttention-2.
//
// The loops are ordered around a cost of ATen's brgemm: a call with another shape than the thread's previous
// one reloads the AMX tile configuration, ~450-900 cycles on the dev VM, as much as a 64 x 64 x 64 product
// itself. So a query block's scores (and dP) against up to 512 keys are one product, the softmax runs over the
// whole block (no running rescale per tile), and P V, dQ, dK and dV are single products that contract over all
// the block's keys or queries (alone, brgemm runs 64 x 64 x 256 at ~2x the FLOP/s of 64 x 64 x 64).

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

constexpr int64_t kB = 64;        // queries per block and keys per score tile
constexpr int64_t kChunk = 512;   // keys per softmax pass: a block's scores (64 x 512 fp32) stay in L2
constexpr int64_t kAhead = 16;    // rows of [B, T, H, D] tensors prefetched ahead of a row loop (see prefetch)

// The kernels' outputs are rows a token's heads apart ([B, T, H, D] tensors), written with streaming stores
// (vec.h; the backward 1.06x, the forward 1.015x, the same bits). Every row starts on a 32-byte boundary (head
// dims are multiples of 16, ATen allocates 64-byte aligned); each kernel fences (sfence) before its results are read.

// dst[n * ldd + d] = src[d * lds + n] (rounded to T) for n < rows (src holds whole 16-column groups), D % 16 == 0,
// streamed: 16 rows at a time are transposed into a buffer, passed through fn(row, n) in fp32 (when D <= kW: the
// whole row), then written out
template <typename T, typename F>
void stream_transposed(const float* src, int64_t lds, int64_t rows, int64_t D, T* dst, int64_t ldd, F fn) {
  constexpr int64_t kW = 256;
  alignas(64) float buf[16 * kW];
  for (int64_t n = 0; n < rows; n += 16)
    for (int64_t d0 = 0; d0 < D; d0 += kW) {
      const int64_t w = std::min(kW, D - d0);
      for (int64_t d = 0; d < w; d += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(src + (d0 + d + i) * lds + n));
        transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_store_ps(buf + j * kW + d, _mm512_castsi512_ps(r[j]));
      }
      for (int64_t j = 0; j < std::min<int64_t>(16, rows - n); ++j) {
        fn(buf + j * kW, n + j);
        for (int64_t d = 0; d < w; d += 16) stream16(dst + (n + j) * ldd + d0 + d, _mm512_load_ps(buf + j * kW + d));
      }
    }
}

// Rotary embedding of the last `dim` dims of q and k, applied by the kernels (dim 0: none), so that the model
// hands over its projections as they are: no rotated copies, no concatenation of k's shared rope part per head.
struct Rope {
  int64_t dim = 0;
  bool interleave = true;  // pairs (x0, x1), (x2, x3), ... (DeepSeek's layout); else (x_i, x_{i + dim / 2})
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t ld = 0;            // [T, dim / 2] per position (queries and keys share positions)
  const bf16* k_pe = nullptr;
  int64_t ld_kpe = 0;        // the keys' rope dims [Tk, dim], shared by the heads
  float* dk_pe = nullptr;
  int64_t ld_dkpe = 0;       // backward: this head's gradient of k_pe [Tk, dim]
};

// x [rope.dim] (fp32) of position t rotated in place by its angles; sign -1 rotates back (for gradients). The
// products and sums of apply_rotary in dsv3.model.layers, in the same order.
inline void rotate(float* x, const Rope& rope, int64_t t, float sign) {
  const float *c = rope.cos + t * rope.ld, *s = rope.sin + t * rope.ld;
  if (rope.interleave) {
    const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512 alt = _mm512_mul_ps(_mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1), _mm512_set1_ps(sign));
    for (int64_t e = 0; e < rope.dim; e += 16) {  // (x0 c - x1 s, x1 c + x0 s) per pair
      const __m512 cc = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(c + e / 2)));
      const __m512 ss = _mm512_mul_ps(_mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(s + e / 2))), alt);
      const __m512 v = _mm512_loadu_ps(x + e);
      _mm512_storeu_ps(x + e, _mm512_add_ps(_mm512_mul_ps(v, cc), _mm512_mul_ps(_mm512_permute_ps(v, 0xB1), ss)));
    }
  } else {
    const int64_t h = rope.dim / 2;
    for (int64_t e = 0; e < h; e += 16) {
      const __m512 cc = _mm512_loadu_ps(c + e), ss = _mm512_mul_ps(_mm512_loadu_ps(s + e), _mm512_set1_ps(sign));
      const __m512 lo = _mm512_loadu_ps(x + e), hi = _mm512_loadu_ps(x + h + e);
      _mm512_storeu_ps(x + e, _mm512_sub_ps(_mm512_mul_ps(lo, cc), _mm512_mul_ps(hi, ss)));
      _mm512_storeu_ps(x + h + e, _mm512_add_ps(_mm512_mul_ps(hi, cc), _mm512_mul_ps(lo, ss)));
    }
  }
}

constexpr int64_t kMaxRope = 256;  // rope dims the kernels take

// rows [T, D] -> [Tp, D] (ld ldd), zero rows past T: the first D - rope.dim dims from src (ld lds), the last
// rope.dim from pe (ld ldpe) rotated to the row's position
void load_rows(const bf16* src, int64_t lds, const bf16* pe, int64_t ldpe, const Rope& rope, int64_t T, int64_t Tp,
               int64_t D, bf16* dst, int64_t ldd) {
  const int64_t Dn = D - rope.dim;
  alignas(64) float x[kMaxRope];
  for (int64_t i = 0; i < T; ++i) {
    if (i + kAhead < T) {
      prefetch(src + (i + kAhead) * lds, Dn * sizeof(bf16));
      if (rope.dim) prefetch(pe + (i + kAhead) * ldpe, rope.dim * sizeof(bf16));
    }
    std::memcpy(dst + i * ldd, src + i * lds, Dn * sizeof(bf16));
    if (rope.dim == 0) continue;
    for (int64_t e = 0; e < rope.dim; e += 16) store16(x + e, load16(pe + i * ldpe + e));
    rotate(x, rope, i, 1.f);
    for (int64_t e = 0; e < rope.dim; e += 16) store16(dst + i * ldd + Dn + e, load16(x + e));
  }
  for (int64_t i = T; i < Tp; ++i) std::memset(dst + i * ldd, 0, D * sizeof(bf16));
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
  if (!mask.data && n + 16 <= Tk && (!causal || n + 15 <= qi)) return 0xFFFF;  // the common case, cheaply
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

// Forward of one (batch, head): per block of 64 queries and chunk of up to 512 keys, the score tiles
// S = Q K^T, then per row the max and P = exp(scale * S - max) (rounded to bf16 for the P V product, as ATen's
// CPU flash kernel does; summed in fp32), then O += P V in one product; a running max and sum carry across
// chunks. out = O / sum and lse = max + log(sum) for the backward.
void forward_head(const bf16* q, int64_t ldq, const bf16* k, int64_t ldk, const bf16* v, int64_t ldv, const Rope& rope, Mask mask,
                  bool causal, int64_t Tq, int64_t Tk, int64_t Dq, int64_t Dv, float scale, bf16* out, int64_t ldo,
                  float* lse, int64_t ldl, Scratch& scratch) {
  const int64_t Tqp = round_up(Tq, kB), Tkp = round_up(Tk, kB), nqb = Tqp / kB;
  const int64_t kc = std::min(Tkp, kChunk);
  // leading dims padded past powers of two (pack.h): ~1.7x the brgemm speed
  const int64_t ldqa = ld_a(Dq), ldkt = ld_b(Tkp), ldvp = ld_b(Dv), lds = ld_c(kc), ldp = ld_a(kc), ldoc = ld_c(Dv);
  const auto s = carve(scratch, {Tqp * ldqa * 2, Tkp * Dq * 2, Tkp * Dv * 2, Dq * ldkt * 2, Tkp * ldvp * 2,
                                 kB * ldp * 2, kB * lds * 4, kB * ldoc * 4, kB * 4, kB * 4});
  bf16* Qr = (bf16*)s[0];   // [Tqp, Dq] queries, zero rows past Tq (A of S)
  bf16* Kr = (bf16*)s[1];   // [Tkp, Dq] keys, zero rows past Tk
  bf16* Vr = (bf16*)s[2];   // [Tkp, Dv] values
  bf16* KTp = (bf16*)s[3];  // VNNI of K^T [Dq, Tkp] (B of S)
  bf16* Vp = (bf16*)s[4];   // VNNI of V [Tkp, Dv] (B of P V)
  bf16* P = (bf16*)s[5];    // [kB, kc] bf16 (A of P V)
  float* S = (float*)s[6];  // [kB, kc] scores
  float* O = (float*)s[7];  // [kB, Dv] unnormalised output of the query block
  float* M = (float*)s[8];  // [kB] running max of scale * S per row, in base 2 (times log2 e)
  float* L = (float*)s[9];  // [kB] running sum of exp(scale * S) / exp(max)

  load_rows(q, ldq, q + Dq - rope.dim, ldq, rope, Tq, Tqp, Dq, Qr, ldqa);
  load_rows(k, ldk, rope.k_pe, rope.ld_kpe, rope, Tk, Tkp, Dq, Kr, Dq);
  load_rows(v, ldv, nullptr, 0, Rope{}, Tk, Tkp, Dv, Vr, Dv);
  pack_transposed(Kr, Dq, Tkp, Dq, KTp, ldkt);
  pack_rows(Vr, Dv, Tkp, Dv, Vp, ldvp);
  const float scale2 = scale * float(M_LOG2E);  // exponents in base 2: one multiply less per score
  const __m512 vs2 = _mm512_set1_ps(scale2), ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t m0 = qb * kB, rows = std::min(kB, Tq - m0);
    const auto [lo, hi] = key_range(m0, rows, Tk, causal, mask);
    std::fill(M, M + kB, -INFINITY);
    std::fill(L, L + kB, 0.f);
    bool started = false;  // O holds the products of earlier chunks
    for (int64_t c0 = lo / kB * kB; c0 < hi; c0 += kc) {
      const int64_t w = std::min(round_up(hi, kB), c0 + kc) - c0;
      cpublas::brgemm(kB, w, Dq, ldqa, ldkt, lds, false, Qr + m0 * ldqa, KTp + 2 * c0, S, true);  // S = Q K^T
      for (int64_t i = 0; i < kB; ++i) {
        const float* srow = S + i * lds;
        __m512 mx = ninf;
        for (int64_t c = 0; c < w; c += 16)
          mx = _mm512_mask_max_ps(mx, visible(m0 + i, c0 + c, Tq, Tk, causal, mask), mx, _mm512_loadu_ps(srow + c));
        const float m_new = std::max(M[i], _mm512_reduce_max_ps(mx) * scale2);  // scale > 0
        if (m_new == -INFINITY) {  // nothing visible yet in this row
          std::memset(P + i * ldp, 0, w * sizeof(bf16));
          continue;
        }
        const __m512 vm = _mm512_set1_ps(m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < w; c += 16) {
          const __m512 p = _mm512_maskz_mov_ps(visible(m0 + i, c0 + c, Tq, Tk, causal, mask),
                                               exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(srow + c), vs2, vm)));
          sum = _mm512_add_ps(sum, p);  // in fp32, as ATen's kernel sums: the lse the backward starts from
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + i * ldp + c), to_bf16(p));
        }
        if (M[i] != -INFINITY && started) {  // rescale what earlier chunks summed
          const float corr = std::exp2(M[i] - m_new);
          L[i] *= corr;
          const __m512 vc = _mm512_set1_ps(corr);
          for (int64_t d = 0; d < Dv; d += 16) _mm512_storeu_ps(O + i * ldoc + d, _mm512_mul_ps(_mm512_loadu_ps(O + i * ldoc + d), vc));
        }
        L[i] += _mm512_reduce_add_ps(sum);
        M[i] = m_new;
      }
      cpublas::brgemm(kB, Dv, w, ldp, ldvp, ldoc, started, P, Vp + c0 * ldvp, O, true);  // O += P V
      started = true;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float l = L[i];
      const __m512 inv = _mm512_set1_ps(l > 0.f ? 1.f / l : 0.f);
      for (int64_t d = 0; d < Dv; d += 16)
        stream16(out + (m0 + i) * ldo + d, started ? _mm512_mul_ps(_mm512_loadu_ps(O + i * ldoc + d), inv) : _mm512_setzero_ps());
      lse[(m0 + i) * ldl] = l > 0.f ? M[i] * float(M_LN2) + std::log(l) : -INFINITY;
    }
  }
  _mm_sfence();
}

// Backward of one (batch, head). Per block of 64 queries: the score tiles S and dP = dO V^T for up to 512 keys
// at a time, then P and dS = P (dP - rowsum(dO O)) scale per row, then dQ = dS K over all the block's keys.
// Query blocks are taken up to 512 queries at a time (a chunk), whose P and dS columns are kept per key tile,
// so that dV^T += dO^T P and dK^T += Q^T dS contract over the chunk's queries.
void backward_head(const bf16* q, int64_t ldq, const bf16* k, int64_t ldk, const bf16* v, int64_t ldv, const Rope& rope,
                   const bf16* o, int64_t ldo, const bf16* go, int64_t ldgo, const float* lse, int64_t ldl, Mask mask,
                   bool causal, int64_t Tq, int64_t Tk, int64_t Dq, int64_t Dv, float scale, bf16* dq, int64_t lddq,
                   bf16* dk, int64_t lddk, bf16* dv, int64_t lddv, Scratch& scratch) {
  const int64_t Tqp = round_up(Tq, kB), Tkp = round_up(Tk, kB), nqb = Tqp / kB, nkb = Tkp / kB;
  const int64_t kc = std::min(Tkp, kChunk);
  // queries per chunk: its P and dS columns (2 x qc x Tkp bf16) ~1 MB, to stay in L2
  const int64_t qc = std::clamp<int64_t>((int64_t(1) << 18) / Tkp / kB * kB, kB, 8 * kB), nqc = qc / kB;
  // leading dims padded past powers of two (pack.h), for brgemm and for walking down columns
  const int64_t ldqa = ld_a(Dq), ldga = ld_a(Dv), ldt = ld_a(Tqp), ldkt = ld_b(Tkp), ldkp = ld_b(Dq), ldpc = ld_b(kB),
                ldsr = ld_a(Tkp), lds = ld_c(kc), ldg = ld_c(Tkp);
  const auto s = carve(scratch, {Tqp * ldqa * 2, Tqp * ldga * 2, Dq * ldt * 2, Dv * ldt * 2, Tkp * Dq * 2,
                                 Tkp * Dv * 2, Dq * ldkt * 2, Dv * ldkt * 2, Tkp * ldkp * 2,
                                 nkb * qc * ldpc * 2, nkb * qc * ldpc * 2, kB * ldsr * 2, (Dq + Dv) * ldg * 4,
                                 kB * Dq * 4, kB * lds * 4, kB * lds * 4, Tqp * 4, Tqp * 4});
  bf16* Qr = (bf16*)s[0];     // [Tqp, Dq] queries, zero rows past Tq (A of S)
  bf16* GOr = (bf16*)s[1];    // [Tqp, Dv] dO (A of dP)
  bf16* Qt = (bf16*)s[2];     // [Dq, Tqp] Q^T (A of dK^T)
  bf16* GOt = (bf16*)s[3];    // [Dv, Tqp] dO^T (A of dV^T)
  bf16* Kr = (bf16*)s[4];     // [Tkp, Dq] keys, zero rows past Tk
  bf16* Vr = (bf16*)s[5];     // [Tkp, Dv] values
  bf16* KTp = (bf16*)s[6];    // VNNI of K^T [Dq, Tkp] (B of S)
  bf16* VTp = (bf16*)s[7];    // VNNI of V^T [Dv, Tkp] (B of dP)
  bf16* Kp = (bf16*)s[8];     // VNNI of K [Tkp, Dq] (B of dQ)
  bf16* Pc = (bf16*)s[9];     // per key tile: VNNI of P [qc, kB] over the chunk's queries (B of dV^T)
  bf16* dSc = (bf16*)s[10];   // the same for dS (B of dK^T)
  bf16* dSr = (bf16*)s[11];   // dS [kB, Tkp] of the query block (A of dQ)
  float* dKt = (float*)s[12]; // [Dq, Tkp] then dV^T [Dv, Tkp]
  float* dVt = dKt + Dq * ldg;
  float* dQb = (float*)s[13]; // [kB, Dq]
  float* S = (float*)s[14];   // [kB, kc]
  float* dP = (float*)s[15];  // [kB, kc]
  float* L = (float*)s[16];   // [Tqp] log-sum-exp times log2 e
  float* Dd = (float*)s[17];  // [Tqp] scale * rowsum(dO * O)

  load_rows(q, ldq, q + Dq - rope.dim, ldq, rope, Tq, Tqp, Dq, Qr, ldqa);
  load_rows(go, ldgo, nullptr, 0, Rope{}, Tq, Tqp, Dv, GOr, ldga);
  load_rows(k, ldk, rope.k_pe, rope.ld_kpe, rope, Tk, Tkp, Dq, Kr, Dq);
  load_rows(v, ldv, nullptr, 0, Rope{}, Tk, Tkp, Dv, Vr, Dv);
  transpose(Qr, ldqa, Tqp, Dq, Qt, ldt);
  transpose(GOr, ldga, Tqp, Dv, GOt, ldt);
  for (int64_t i = 0; i < Tqp; ++i) {
    __m512 acc = _mm512_setzero_ps();
    if (i + kAhead < Tq) prefetch(o + (i + kAhead) * ldo, Dv * sizeof(bf16));
    if (i < Tq)
      for (int64_t d = 0; d < Dv; d += 16) acc = _mm512_fmadd_ps(load16(GOr + i * ldga + d), load16(o + i * ldo + d), acc);
    Dd[i] = _mm512_reduce_add_ps(acc) * scale;
    L[i] = i < Tq ? lse[i * ldl] * float(M_LOG2E) : INFINITY;  // base 2; padded rows: P = 0
  }
  pack_transposed(Kr, Dq, Tkp, Dq, KTp, ldkt);
  pack_transposed(Vr, Dv, Tkp, Dv, VTp, ldkt);
  pack_rows(Kr, Dq, Tkp, Dq, Kp, ldkp);
  std::fill(dKt, dKt + (Dq + Dv) * ldg, 0.f);
  std::vector<int64_t> first(nkb), last(nkb);  // the chunk's query blocks that saw key tile t: [first, last]

  const __m512 vscale = _mm512_set1_ps(scale), vs2 = _mm512_set1_ps(scale * float(M_LOG2E));
  for (int64_t qb0 = 0; qb0 < nqb; qb0 += nqc) {
    const int64_t qb1 = std::min(nqb, qb0 + nqc);
    std::fill(first.begin(), first.end(), nqb);
    std::fill(last.begin(), last.end(), int64_t(-1));
    for (int64_t qb = qb0; qb < qb1; ++qb) {
      const int64_t m0 = qb * kB, rows = std::min(kB, Tq - m0);
      const auto [lo, hi] = key_range(m0, rows, Tk, causal, mask);
      const int64_t t0 = lo / kB, t1 = (hi + kB - 1) / kB;
      for (int64_t t = t0; t < t1; ++t) {
        if (first[t] < nqb)  // blocks this key tile skipped since its first (only with masks): zeros in its products
          for (int64_t z = last[t] + 1; z < qb; ++z) {
            std::memset(Pc + (t * qc + (z - qb0) * kB) * ldpc, 0, kB * ldpc * sizeof(bf16));
            std::memset(dSc + (t * qc + (z - qb0) * kB) * ldpc, 0, kB * ldpc * sizeof(bf16));
          }
        first[t] = std::min(first[t], qb), last[t] = qb;
      }
      for (int64_t c0 = t0 * kB; c0 < t1 * kB; c0 += kc) {
        const int64_t w = std::min(t1 * kB, c0 + kc) - c0;
        cpublas::brgemm(kB, w, Dq, ldqa, ldkt, lds, false, Qr + m0 * ldqa, KTp + 2 * c0, S, true);    // S = Q K^T
        cpublas::brgemm(kB, w, Dv, ldga, ldkt, lds, false, GOr + m0 * ldga, VTp + 2 * c0, dP, true);  // dP = dO V^T
        for (int64_t i = 0; i < kB; i += 2) {
          for (int64_t c = 0; c < w; c += 16) {
            __m256i p2[2], ds2[2];
            for (int r = 0; r < 2; ++r) {
              const int64_t row = i + r, qi = m0 + row;
              __m512 p = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(S + row * lds + c), vs2, _mm512_set1_ps(L[qi])));
              p = _mm512_maskz_mov_ps(visible(qi, c0 + c, Tq, Tk, causal, mask), p);
              const __m512 ds = _mm512_mul_ps(p, _mm512_fmsub_ps(_mm512_loadu_ps(dP + row * lds + c), vscale, _mm512_set1_ps(Dd[qi])));
              p2[r] = to_bf16(p), ds2[r] = to_bf16(ds);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dSr + row * ldsr + c0 + c), ds2[r]);
            }
            const int64_t n = c0 + c, at = ((n / kB) * qc + (qb - qb0) * kB + i) * ldpc + 2 * (n % kB);
            _mm512_storeu_si512(Pc + at, interleave(p2[0], p2[1]));
            _mm512_storeu_si512(dSc + at, interleave(ds2[0], ds2[1]));
          }
        }
      }
      if (t0 < t1)  // dQ = dS K over the block's keys
        cpublas::brgemm(kB, Dq, (t1 - t0) * kB, ldsr, ldkp, Dq, false, dSr + t0 * kB, Kp + t0 * kB * ldkp, dQb, true);
      if (t0 == t1) std::fill(dQb, dQb + kB * Dq, 0.f);
      for (int64_t i = 0; i < rows; ++i) {
        float* g = dQb + i * Dq;
        if (rope.dim) rotate(g + Dq - rope.dim, rope, m0 + i, -1.f);  // the gradient of q's rope dims before rotation
        for (int64_t d = 0; d < Dq; d += 16) stream16(dq + (m0 + i) * lddq + d, load16(g + d));
      }
    }
    for (int64_t t = 0; t < nkb; ++t)  // dV^T += dO^T P over the chunk's queries
      if (last[t] >= 0)
        cpublas::brgemm(Dv, kB, (last[t] - first[t] + 1) * kB, ldt, ldpc, ldg, true, GOt + first[t] * kB,
                        Pc + (t * qc + (first[t] - qb0) * kB) * ldpc, dVt + t * kB, true);
    for (int64_t t = 0; t < nkb; ++t)  // dK^T += Q^T dS
      if (last[t] >= 0)
        cpublas::brgemm(Dq, kB, (last[t] - first[t] + 1) * kB, ldt, ldpc, ldg, true, Qt + first[t] * kB,
                        dSc + (t * qc + (first[t] - qb0) * kB) * ldpc, dKt + t * kB, true);
  }
  const auto as_is = [](float*, int64_t) {};
  stream_transposed(dKt, ldg, Tk, Dq - rope.dim, dk, lddk, as_is);
  stream_transposed(dVt, ldg, Tk, Dv, dv, lddv, as_is);
  if (rope.dim)  // this head's share of k_pe's gradient, rotated back (rope.dim <= kMaxRope: whole rows)
    stream_transposed(dKt + (Dq - rope.dim) * ldg, ldg, Tk, rope.dim, rope.dk_pe, rope.ld_dkpe,
                      [&](float* row, int64_t j) { rotate(row, rope, j, -1.f); });
  _mm_sfence();
}

// The bool mask broadcast to [B, H, Tq, Tk] with contiguous rows, or undefined
at::Tensor expanded_mask(const std::optional<at::Tensor>& attn_mask, int64_t B, int64_t H, int64_t Tq, int64_t Tk) {
  if (!attn_mask.has_value() || !attn_mask->defined()) return {};
  TORCH_CHECK(attn_mask->scalar_type() == at::kBool, "attention: a bool mask expected");
  at::Tensor mask = attn_mask->expand({B, H, Tq, Tk});
  return mask.stride(3) == 1 ? mask : mask.contiguous();
}

// Checks the operands and returns the rope (dim 0 without k_pe) with its tables; per-batch pointers are set by
// for_batch. q [B, H, Tq, Dq], k [B, H, Tk, Dq - Dr], v [B, H, Tk, Dv] bf16 with contiguous rows; with k_pe
// [B, Tk, Dr] bf16, cos and sin [1 or B, T, Dr / 2] fp32 (Tq == Tk: shared positions).
struct RopeArgs {
  Rope rope;
  at::Tensor cos, sin;
  const at::Tensor* k_pe = nullptr;
  void for_batch(int64_t b) {
    if (!rope.dim) return;
    const int64_t bc = cos.size(0) == 1 ? 0 : b;
    rope.cos = cos.const_data_ptr<float>() + bc * cos.stride(0);
    rope.sin = sin.const_data_ptr<float>() + bc * sin.stride(0);
    rope.k_pe = k_pe->const_data_ptr<bf16>() + b * k_pe->stride(0);
  }
};

RopeArgs check(const char* op, const std::vector<const at::Tensor*>& rows, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v, const std::optional<at::Tensor>& k_pe, const std::optional<at::Tensor>& cos,
               const std::optional<at::Tensor>& sin, bool interleave) {
  for (const at::Tensor* t : rows)
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kBFloat16 && t->stride(3) == 1, op,
                ": bf16 [B, H, T, D] tensors with contiguous rows expected");
  RopeArgs r;
  const int64_t Dr = k_pe.has_value() && k_pe->defined() ? k_pe->size(-1) : 0;
  TORCH_CHECK(q.size(3) == k.size(3) + Dr && v.size(2) == k.size(2), op, ": q's head dim must be k's plus k_pe's");
  TORCH_CHECK(k.size(3) % 16 == 0 && Dr % 16 == 0 && v.size(3) % 16 == 0, op, ": head dims must be multiples of 16");
  if (Dr == 0) return r;
  const int64_t B = q.size(0), T = q.size(2);
  TORCH_CHECK(k.size(2) == T && k_pe->dim() == 3 && k_pe->size(0) == B && k_pe->size(1) == T &&
              k_pe->scalar_type() == at::kBFloat16 && k_pe->stride(2) == 1, op, ": k_pe [B, T, Dr] bf16 expected");
  TORCH_CHECK(Dr <= kMaxRope && (interleave || Dr % 32 == 0), op, ": unsupported rope dims");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->has_value() && (*t)->dim() == 3 && ((*t)->size(0) == 1 || (*t)->size(0) == B) &&
                (*t)->size(1) >= T && (*t)->size(2) == Dr / 2 && (*t)->scalar_type() == at::kFloat,
                op, ": cos and sin [1 or B, T, Dr / 2] fp32 expected");
  r.cos = cos->contiguous(), r.sin = sin->contiguous();
  r.k_pe = &*k_pe;
  r.rope.dim = Dr, r.rope.interleave = interleave, r.rope.ld = Dr / 2, r.rope.ld_kpe = k_pe->stride(1);
  return r;
}

// q [B, H, Tq, Dq], k [B, H, Tk, Dq - Dr], v [B, H, Tk, Dv] bf16, with k_pe / cos / sin (see check) the keys'
// last Dr dims and the rotation of q's and k's last Dr dims, else none (Dr = 0); mask as for the backward.
// Returns out [B, H, Tq, Dv] (stored [B, Tq, H, Dv], the layout the output projection reads) and lse [B, H, Tq].
std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& k_pe,
    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, bool interleave,
    const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale) {
  const RopeArgs ra = check("attention_forward", {&q, &k, &v}, q, k, v, k_pe, cos, sin, interleave);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dq = q.size(3), Tk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(scale > 0, "attention_forward: a positive scale expected");
  const at::Tensor mask = expanded_mask(attn_mask, B, H, Tq, Tk);
  at::Tensor out = at::empty({B, Tq, H, Dv}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  TORCH_INTERNAL_ASSERT(aligned64(out), "attention_forward: unaligned output");  // for the streaming stores
  for_each_item(B * H, [&](int64_t bh, Scratch& scratch) {
    const int64_t bi = bh / H, hi = bh % H;
    auto at4 = [&](const at::Tensor& t) { return t.const_data_ptr<bf16>() + bi * t.stride(0) + hi * t.stride(1); };
    Mask m;
    if (mask.defined()) m = {mask.const_data_ptr<bool>() + bi * mask.stride(0) + hi * mask.stride(1), mask.stride(2)};
    RopeArgs r = ra;
    r.for_batch(bi);
    forward_head(at4(q), q.stride(2), at4(k), k.stride(2), at4(v), v.stride(2), r.rope, m,
                 is_causal && !mask.defined(), Tq, Tk, Dq, Dv, float(scale),
                 out.data_ptr<bf16>() + bi * out.stride(0) + hi * out.stride(1), out.stride(2),
                 lse.data_ptr<float>() + bi * lse.stride(0) + hi * lse.stride(1), lse.stride(2), scratch);
  });
  return {out, lse};
}

// grad_out, out [B, H, Tq, Dv]; lse [B, H, Tq] fp32; the rest as for the forward. Returns dq laid out as q (the
// gradient of q before rotation), dkv [B, Tk, H, Dk + Dv] (dk, then dv: the layout of MLA's kv_b_proj output)
// and dk_pe [B, Tk, Dr] bf16, k_pe's gradient: the heads' fp32 gradients summed in head order, rounded once (empty
// without k_pe).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& k_pe, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
    bool interleave, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, double scale) {
  const RopeArgs ra = check("attention_backward", {&grad_out, &q, &k, &v, &out}, q, k, v, k_pe, cos, sin, interleave);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3, "attention_backward: fp32 lse [B, H, T] expected");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dq = q.size(3), Tk = k.size(2), Dk = k.size(3),
                Dv = v.size(3), Dr = ra.rope.dim;
  const at::Tensor mask = expanded_mask(attn_mask, B, H, Tq, Tk);
  at::Tensor dq = at::empty_like(q), dkv = at::empty({B, Tk, H, Dk + Dv}, k.options());
  at::Tensor dk_pe = at::empty({Dr ? B : 0, Tk, H, Dr}, q.options().dtype(at::kFloat));
  TORCH_INTERNAL_ASSERT(aligned64(dq) && aligned64(dkv) && aligned64(dk_pe), "attention_backward: unaligned outputs");
  for_each_item(B * H, [&](int64_t bh, Scratch& scratch) {
    const int64_t bi = bh / H, hi = bh % H;
    auto at4 = [&](const at::Tensor& t) { return t.const_data_ptr<bf16>() + bi * t.stride(0) + hi * t.stride(1); };
    bf16* dk = dkv.data_ptr<bf16>() + bi * dkv.stride(0) + hi * dkv.stride(2);
    Mask m;
    if (mask.defined()) m = {mask.const_data_ptr<bool>() + bi * mask.stride(0) + hi * mask.stride(1), mask.stride(2)};
    RopeArgs r = ra;
    r.for_batch(bi);
    if (Dr) r.rope.dk_pe = dk_pe.data_ptr<float>() + bi * dk_pe.stride(0) + hi * dk_pe.stride(2), r.rope.ld_dkpe = dk_pe.stride(1);
    backward_head(at4(q), q.stride(2), at4(k), k.stride(2), at4(v), v.stride(2), r.rope, at4(out), out.stride(2),
                  at4(grad_out), grad_out.stride(2), lse.const_data_ptr<float>() + bi * lse.stride(0) + hi * lse.stride(1),
                  lse.stride(2), m, is_causal && !mask.defined(), Tq, Tk, Dq, Dv, float(scale),
                  dq.data_ptr<bf16>() + bi * dq.stride(0) + hi * dq.stride(1), dq.stride(2), dk, dkv.stride(1),
                  dk + Dk, dkv.stride(1), scratch);
  });
  if (!Dr) return {dq, dkv, dk_pe};
  at::Tensor dk_pe_sum = at::empty({B, Tk, Dr}, q.options());
  const float* hp = dk_pe.const_data_ptr<float>();
  bf16* sp = dk_pe_sum.data_ptr<bf16>();
  for_each_block(B * Tk, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t d = 0; d < Dr; d += 16) {
        __m512 acc = _mm512_loadu_ps(hp + t * H * Dr + d);
        for (int64_t h = 1; h < H; ++h) acc = _mm512_add_ps(acc, _mm512_loadu_ps(hp + (t * H + h) * Dr + d));
        store16(sp + t * Dr + d, acc);
      }
  });
  return {dq, dkv, dk_pe_sum};
}

bool attention_supported() { return cpublas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? k_pe, Tensor? cos, Tensor? sin, "
        "bool interleave, Tensor out, Tensor lse, Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? k_pe, Tensor? cos, Tensor? sin, bool interleave, "
        "Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor)");
  m.def("attention_supported() -> bool");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("attention_forward", attention_forward);
  m.impl("attention_backward", attention_backward);
}
TORCH_LIBRARY_IMPL(dsv3, CompositeExplicitAutograd, m) { m.impl("attention_supported", attention_supported); }
