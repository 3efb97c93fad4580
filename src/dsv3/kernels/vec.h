// Helpers shared by the training kernels: AVX-512 on 16 floats at a time (bf16 <-> fp32, exp), and row loops
// shared out between the threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace dsv3_vec {

using bf16 = at::BFloat16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
// 16 floats -> 16 bf16 (round to nearest even)
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
// masked versions: the first n of the 16 (n <= 16)
inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline __m512 load16(const bf16* p, int64_t n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p)), 16));
}
inline void store16(float* p, __m512 v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
inline void store16(bf16* p, __m512 v, int64_t n) { _mm256_mask_storeu_epi16(p, first(n), to_bf16(v)); }
// Streaming stores, for outputs scattered or strided over memory: a plain store reads each cache line before
// writing it, a streaming store writes whole lines without reading them. p 32-byte (bf16) or 64-byte (fp32)
// aligned; the writer's _mm_sfence() must come before another thread reads the lines.
inline void stream16(bf16* p, __m512 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
inline void stream16(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline bool aligned64(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 64 == 0; }

// Ask for `bytes` of memory at p in L1 ahead of use. Rows that lie a token's heads apart (a head's rows of
// [B, T, H, D] activations) defeat the hardware prefetchers: each row read or written was a cache miss, and the
// attention kernels spent ~30% of their time on them before they fetched 16 rows ahead.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T0);
}

// v rounded to T's precision (and back to fp32)
template <typename T>
inline __m512 round_as(__m512 v) {
  if constexpr (std::is_same_v<T, bf16>) return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v));
  return v;
}

// 2^t on 16 floats: 2^round(t) times a degree-6 fit of 2^f on [-1/2, 1/2] (relative error < 1e-7); 2^-inf = 0
inline __m512 exp2_16(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.4990888e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3393083e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6196737e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503473e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022637e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// exp on 16 floats, as 2^(x log2 e); exp(-inf) = 0
inline __m512 exp16(__m512 x) { return exp2_16(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f))); }

// fn(begin, end) over [0, n) in blocks of `block`, each thread taking the next block not yet started. Where
// at::parallel_for would give each thread a fixed share: the dev VM's two vCPUs change speed independently (one
// read 1.0 TFLOP/s on a bf16 matmul while the other read 0.4), and with fixed shares the faster one waits.
template <typename F>
void for_each_block(int64_t n, int64_t block, F fn) {
  const int64_t blocks = (n + block - 1) / block;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), blocks), 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(1)) < blocks;) fn(b * block, std::min(n, (b + 1) * block));
  });
}

}  // namespace dsv3_vec
