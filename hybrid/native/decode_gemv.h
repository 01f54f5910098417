// What the decode kernel (mla_decode.cpp) reads bf16 weights with: two codes of a pass over bf16
// weights for a few tokens, AVX512-BF16 (bf16 pairs multiplied exactly and
// added in fp32, by vdpbf16ps) and AVX2 with FMA (bf16 widened to fp32 by a shift). Every product
// is accumulated in fp32.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"

namespace {

// The two codes. Each has:
//   tile<R, N>(w, ldw, K, x, ldx, y, ldy): y[n * ldy + r] = w[r] . x[n] for R rows of K bf16 (ldw
//     apart) and N <= 4 bf16 vectors;
//   combine(coef, rows, count, n, out): out[0..n) = sum_j coef[j] * rows[j][0..n), four rows a pass
//     over out (in L1), each row read whole and in order;
//   dots(q, rows, count, n, alpha, out): out[j] = alpha * q . rows[j][0..n), q fp32.
// `rows` are bf16 rows given by pointer (a head's weights, or cache slots anywhere in the cache).
struct Bf16 {
  template <int R, int N>
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void tile(
      const uint16_t* w, int64_t ldw, int K, const uint16_t* x, int64_t ldx, float* y, int64_t ldy) {
    constexpr int U = R * N >= 4 ? 1 : 4 / (R * N);  // independent sums in flight: at least 4
    __m512 acc[U][R][N];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int n = 0; n < N; ++n) acc[u][r][n] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; ++u) {
        __m512bh xs[N];
        for (int n = 0; n < N; ++n) xs[n] = (__m512bh)_mm512_loadu_si512(x + n * ldx + k + 32 * u);
        for (int r = 0; r < R; ++r) {
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * ldw + k + 32 * u);
          for (int n = 0; n < N; ++n) acc[u][r][n] = _mm512_dpbf16_ps(acc[u][r][n], wv, xs[n]);
        }
      }
    for (; k < K; k += 32) {
      const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
      __m512bh xs[N];
      for (int n = 0; n < N; ++n) xs[n] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + n * ldx + k);
      for (int r = 0; r < R; ++r) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * ldw + k);
        for (int n = 0; n < N; ++n) acc[0][r][n] = _mm512_dpbf16_ps(acc[0][r][n], wv, xs[n]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) {
        __m512 sum = acc[0][r][n];
        for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][r][n]);
        y[n * ldy + r] = _mm512_reduce_add_ps(sum);
      }
  }
  __attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512 widen(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
  static inline __mmask16 first(int n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? 0 : __mmask16((1u << n) - 1); }
  __attribute__((target("avx512f,avx512bw,avx512vl"))) static void combine(const float* coef,
                                                                           const uint16_t* const* rows, int count,
                                                                           int n, float* out) {
    std::fill(out, out + n, 0.f);
    for (int j = 0; j < count; j += 4) {
      const uint16_t* r[4];
      __m512 c[4];
      for (int t = 0; t < 4; ++t) {
        r[t] = rows[std::min(j + t, count - 1)];
        c[t] = _mm512_set1_ps(j + t < count ? coef[j + t] : 0.f);
      }
      int i = 0;
      for (; i + 16 <= n; i += 16) {  // unmasked: a masked store does not forward to the next pass's load
        __m512 acc = _mm512_loadu_ps(out + i);
        for (int t = 0; t < 4; ++t) acc = _mm512_fmadd_ps(c[t], widen(r[t] + i, 0xFFFF), acc);
        _mm512_storeu_ps(out + i, acc);
      }
      if (i < n) {
        const __mmask16 m = first(n - i);
        __m512 acc = _mm512_maskz_loadu_ps(m, out + i);
        for (int t = 0; t < 4; ++t) acc = _mm512_fmadd_ps(c[t], widen(r[t] + i, m), acc);
        _mm512_mask_storeu_ps(out + i, m, acc);
      }
    }
  }
  // four rows at a time, each of q's chunks loaded once for them
  __attribute__((target("avx512f,avx512bw,avx512vl"))) static void dots(const float* q, const uint16_t* const* rows,
                                                                        int count, int n, float alpha, float* out) {
    int j = 0;
    for (; j + 4 <= count; j += 4) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int i = 0; i < n; i += 16) {
        const __mmask16 m = first(n - i);
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
        for (int t = 0; t < 4; ++t) acc[t] = _mm512_fmadd_ps(qv, widen(rows[j + t] + i, m), acc[t]);
      }
      for (int t = 0; t < 4; ++t) out[j + t] = alpha * _mm512_reduce_add_ps(acc[t]);
    }
    for (; j < count; ++j) {
      __m512 acc = _mm512_setzero_ps();
      for (int i = 0; i < n; i += 16) {
        const __mmask16 m = first(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), widen(rows[j] + i, m), acc);
      }
      out[j] = alpha * _mm512_reduce_add_ps(acc);
    }
  }
};

struct Avx2 {
  __attribute__((target("avx2,fma"))) static inline __m256 widen(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  __attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  template <int R, int N>
  __attribute__((target("avx2,fma"))) static void tile(const uint16_t* w, int64_t ldw, int K, const uint16_t* x,
                                                       int64_t ldx, float* y, int64_t ldy) {
    constexpr int U = R * N >= 4 ? 1 : 4 / (R * N);
    __m256 acc[U][R][N];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int n = 0; n < N; ++n) acc[u][r][n] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 * U <= K; k += 8 * U)
      for (int u = 0; u < U; ++u) {
        __m256 xs[N];
        for (int n = 0; n < N; ++n) xs[n] = widen(x + n * ldx + k + 8 * u);
        for (int r = 0; r < R; ++r) {
          const __m256 wv = widen(w + r * ldw + k + 8 * u);
          for (int n = 0; n < N; ++n) acc[u][r][n] = _mm256_fmadd_ps(wv, xs[n], acc[u][r][n]);
        }
      }
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) {
        __m256 sum = acc[0][r][n];
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][r][n]);
        float s = hsum(sum);
        for (int i = k; i < K; ++i) s += bf16_to_float(w[r * ldw + i]) * bf16_to_float(x[n * ldx + i]);
        y[n * ldy + r] = s;
      }
  }
  __attribute__((target("avx2,fma"))) static void combine(const float* coef, const uint16_t* const* rows, int count,
                                                          int n, float* out) {
    std::fill(out, out + n, 0.f);
    for (int j = 0; j < count; j += 4) {
      const uint16_t* r[4];
      float cf[4];
      for (int t = 0; t < 4; ++t) {
        r[t] = rows[std::min(j + t, count - 1)];
        cf[t] = j + t < count ? coef[j + t] : 0.f;
      }
      int i = 0;
      for (; i + 8 <= n; i += 8) {
        __m256 acc = _mm256_loadu_ps(out + i);
        for (int t = 0; t < 4; ++t) acc = _mm256_fmadd_ps(_mm256_set1_ps(cf[t]), widen(r[t] + i), acc);
        _mm256_storeu_ps(out + i, acc);
      }
      for (; i < n; ++i)
        for (int t = 0; t < 4; ++t) out[i] += cf[t] * bf16_to_float(r[t][i]);
    }
  }
  __attribute__((target("avx2,fma"))) static void dots(const float* q, const uint16_t* const* rows, int count, int n,
                                                       float alpha, float* out) {
    for (int j = 0; j < count; ++j) {
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      int i = 0;
      for (; i + 16 <= n; i += 16) {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), widen(rows[j] + i), acc[0]);
        acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), widen(rows[j] + i + 8), acc[1]);
      }
      float s = hsum(_mm256_add_ps(acc[0], acc[1]));
      for (; i < n; ++i) s += q[i] * bf16_to_float(rows[j][i]);
      out[j] = alpha * s;
    }
  }
};

// R rows by all N vectors, N / 4 tiles of four and one of what is left
template <class Isa, int R>
void row_tiles(const uint16_t* w, int K, const uint16_t* x, int64_t ldx, int N, float* y, int64_t ldy) {
  int n = 0;
  for (; n + 4 <= N; n += 4) Isa::template tile<R, 4>(w, K, K, x + n * ldx, ldx, y + n * ldy, ldy);
  switch (N - n) {
    case 3: Isa::template tile<R, 3>(w, K, K, x + n * ldx, ldx, y + n * ldy, ldy); break;
    case 2: Isa::template tile<R, 2>(w, K, K, x + n * ldx, ldx, y + n * ldy, ldy); break;
    case 1: Isa::template tile<R, 1>(w, K, K, x + n * ldx, ldx, y + n * ldy, ldy); break;
  }
}

// Inside a parallel region: y[n * ldy + r] = W[r] . x[n] for the rows of W (bf16 [rows][K]) and N
// bf16 vectors x (ldx apart); row r reads x + (r / group) * x_step instead where group > 0 (each
// head's rows, its own input). A barrier at the end. The rows are split over the team in
// contiguous ranges. For up to 3 vectors the pass is memory-bound: each row is read whole, one
// after the other, which the hardware's prefetchers follow (Zen 4, 2 threads: 8 MB at 0.8-0.9 of
// a plain sum's rate, where four rows read side by side reached ~0.6; prefetching further ahead in
// software gained nothing measurable). From 4 vectors on it is compute-bound: tiles of 4 rows by 4
// vectors load 8 vectors for 16 products.
template <class Isa>
void gemv(const uint16_t* w, int64_t rows, int K, const uint16_t* x, int64_t ldx, int N, float* y, int64_t ldy,
          int64_t group = 0, int64_t x_step = 0) {
  const int R = N >= 4 && (group == 0 || group % 4 == 0) ? 4 : 1;
  const int64_t tiles = (rows + R - 1) / R;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r = t * R;
    const uint16_t* xr = group ? x + r / group * x_step : x;
    if (R == 4 && r + 4 <= rows)
      row_tiles<Isa, 4>(w + r * K, K, xr, ldx, N, y + r, ldy);
    else
      for (int64_t i = r; i < std::min(rows, r + R); ++i)
        row_tiles<Isa, 1>(w + i * K, K, group ? x + i / group * x_step : x, ldx, N, y + i, ldy);
  }
}

}  // namespace
