// Operand packing for oneDNN's brgemm micro-kernels (at::native::cpublas::brgemm, AMX bf16): its B operand is
// read in VNNI form, [K/2][N][2] (each pair of consecutive K rows interleaved), and A row-major.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace dsv3_pack {

using dsv3_vec::bf16;

template <typename I>
inline I round_up(I x, I m) { return (x + m - 1) / m * m; }

// Leading dimensions one cache line longer than a row. With rows a power of two bytes apart, the rows of an AMX
// tile land in the same few L1 sets: brgemm 64 x 512 x 256 ran at 1.0 TFLOP/s on one core, 1.7 padded. (Operands
// must also start on 64-byte boundaries: misaligned ones halved the speed again.)
inline int64_t ld_a(int64_t K) { return K + 32; }  // bf16 rows of A
inline int64_t ld_b(int64_t N) { return N + 16; }  // VNNI B: 2 N bf16 per row pair, ld_b(N) pairs apart
inline int64_t ld_c(int64_t N) { return N + 16; }  // fp32 rows of C

// A thread's scratch memory, grown as needed and not zero-filled (every kernel writes what it reads)
struct Scratch {
  std::unique_ptr<char[]> data;
  int64_t size = 0;
};

// Run fn(i, scratch) for i in [0, n), each thread taking the next item not yet started, then release brgemm's AMX
// state. A static split left one of the dev VM's two vCPUs waiting whenever the other ran slower (attention heads:
// the median forward 1.04x, backward 1.07x faster taken one at a time).
template <typename F>
void for_each_item(int64_t n, F fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t i; (i = next.fetch_add(1)) < n;) fn(i, scratch);
    at::native::cpublas::brgemm_release(true);
  });
}

// 64-byte aligned arrays of the given sizes in bytes, carved one after another out of buf
inline std::vector<char*> carve(Scratch& buf, std::initializer_list<int64_t> bytes) {
  int64_t total = 64;
  for (int64_t b : bytes) total += round_up<int64_t>(b, 64);
  if (buf.size < total) {
    buf.data.reset(new char[total]);
    buf.size = total;
  }
  char* p = reinterpret_cast<char*>(round_up<uintptr_t>(reinterpret_cast<uintptr_t>(buf.data.get()), 64));
  std::vector<char*> out;
  for (int64_t b : bytes) out.push_back(p), p += round_up<int64_t>(b, 64);
  return out;
}

// Two rows of 16 bf16 -> 32 bf16 interleaved (a0 b0 a1 b1 ...): the VNNI pairs brgemm reads for its B operand
inline __m512i interleave(__m256i a, __m256i b) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

inline __m512i row_offsets(int64_t ld_dwords) {  // dword offsets of 16 consecutive rows
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(int(ld_dwords)));
}

// r[i] (16 dwords each) <- the transposed 16 x 16 matrix: r[j] holds dword j of every former row, in row order
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: interleave rows 2i, 2i + 1
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: dword 4L + c of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)  // gather the lanes: rows 8i .. 8i + 7
    for (int c = 0; c < 4; ++c) {
      t[8 * i + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
      t[8 * i + 4 + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
  }
}

// dst[c * ldd + r] = src[r * lds + c] for c < cols, r < rows. With cols % 32 == 0, 32 x 32 blocks go through
// registers (rows padded with zeros to a multiple of 32 in dst); else rows % 16 == 0, cols and lds even (gathers).
inline void transpose(const bf16* src, int64_t lds, int64_t rows, int64_t cols, bf16* dst, int64_t ldd) {
  if (cols % 32 == 0) {
    const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26,
                                          24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t r0 = 0; r0 < rows; r0 += 32)
      for (int64_t c = 0; c < cols; c += 32) {
        __m512i a[16], b[16];  // rows r0 .. r0 + 15 and r0 + 16 .. r0 + 31: 32 columns (16 pairs) each
        for (int i = 0; i < 16; ++i) {
          a[i] = r0 + i < rows ? _mm512_loadu_si512(src + (r0 + i) * lds + c) : _mm512_setzero_si512();
          b[i] = r0 + 16 + i < rows ? _mm512_loadu_si512(src + (r0 + 16 + i) * lds + c) : _mm512_setzero_si512();
        }
        transpose16(a);  // a[j]: column pair j of the 16 rows
        transpose16(b);
        for (int j = 0; j < 16; ++j) {
          _mm512_storeu_si512(dst + (c + 2 * j) * ldd + r0, _mm512_permutex2var_epi16(a[j], even, b[j]));
          _mm512_storeu_si512(dst + (c + 2 * j + 1) * ldd + r0, _mm512_permutex2var_epi16(a[j], odd, b[j]));
        }
      }
    return;
  }
  const __m512i idx = row_offsets(lds / 2);
  for (int64_t r = 0; r < rows; r += 16)
    for (int64_t c = 0; c < cols; c += 2) {
      __m512i w = _mm512_i32gather_epi32(idx, src + r * lds + c, 4);  // (src[r + j][c], src[r + j][c + 1])
      _mm256_storeu_si256((__m256i*)(dst + c * ldd + r), _mm512_cvtepi32_epi16(w));
      _mm256_storeu_si256((__m256i*)(dst + (c + 1) * ldd + r), _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
    }
}

// B operand X^T [D, rows] for X [rows, D] (ld lds): its VNNI form [D/2][rows][2] is X's 32-bit words transposed
// (from fp32 X: its pairs of floats, rounded), ldo (>= rows) pairs apart; rows % 16 == 0, D even. With D % 32 == 0,
// 16 x 16 blocks of words are transposed in registers (about twice as fast as the gathers of the general case).
template <typename T>
inline void pack_transposed(const T* src, int64_t lds, int64_t rows, int64_t D, bf16* out, int64_t ldo) {
  auto* o = reinterpret_cast<uint32_t*>(out);
  if (D % 32 == 0) {
    for (int64_t n = 0; n < rows; n += 16)
      for (int64_t p = 0; p < D / 2; p += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const T* s = src + (n + i) * lds + 2 * p;
          if constexpr (std::is_same_v<T, bf16>) r[i] = _mm512_loadu_si512(s);
          else r[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 16), _mm512_loadu_ps(s));
        }
        transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(o + (p + j) * ldo + n, r[j]);
      }
    return;
  }
  if constexpr (std::is_same_v<T, bf16>) {
    const __m512i idx = row_offsets(lds / 2);
    for (int64_t n = 0; n < rows; n += 16)
      for (int64_t p = 0; p < D / 2; ++p)
        _mm512_storeu_si512(o + p * ldo + n, _mm512_i32gather_epi32(idx, src + n * lds + 2 * p, 4));
  } else {
    const __m512i idx = row_offsets(lds);
    for (int64_t n = 0; n < rows; n += 16)
      for (int64_t p = 0; p < D / 2; ++p) {
        const __m512 even = _mm512_i32gather_ps(idx, src + n * lds + 2 * p, 4);
        const __m512 odd = _mm512_i32gather_ps(idx, src + n * lds + 2 * p + 1, 4);
        _mm512_storeu_si512(o + p * ldo + n, interleave(dsv3_vec::to_bf16(even), dsv3_vec::to_bf16(odd)));
      }
  }
}

// B operand X [rows, N] (ld lds, K = rows) -> VNNI [rows/2][ldo][2] (fp32 X rounded): rows even, N % 16 == 0
template <typename T>
inline void pack_rows(const T* src, int64_t lds, int64_t rows, int64_t N, bf16* out, int64_t ldo) {
  auto row16 = [](const T* p) {
    if constexpr (std::is_same_v<T, bf16>) return _mm256_loadu_si256((const __m256i*)p);
    else return dsv3_vec::to_bf16(_mm512_loadu_ps(p));
  };
  for (int64_t k = 0; k < rows; k += 2)
    for (int64_t n = 0; n < N; n += 16)
      _mm512_storeu_si512(out + k * ldo + 2 * n, interleave(row16(src + k * lds + n), row16(src + (k + 1) * lds + n)));
}

}  // namespace dsv3_pack
