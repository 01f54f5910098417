// The softmax probabilities of a prompt's causal attention on the CPU, for bf16 queries and keys:
// scores q . k accumulated in fp32 on the CPU's bf16 dot products (AVX512-BF16: each 32-bit lane
// multiplies a pair of bf16 and adds both products in fp32), exactly what fp32 math gives for bf16
// values, then masked, softmaxed and rounded to bf16 while they are in L2. torch has no CPU matmul
// from bf16 to fp32; its fp32 path through bf16 instructions converts both operands at every call
// (0.2-0.3 TFLOP/s on 2 Zen 4 cores, against 0.7 here), and its softmax and conversions are three
// more passes over the scores.
//
// The keys come packed once per layer as pairs: kp[d / 2][c] holds dims d and d + 1 of key c, so
// that one vector load brings one pair of 16 keys; a query's pair is broadcast against it. A tile of
// M queries by 32 keys keeps its 2M sums in registers over all dims. A work item is one head's M
// queries against all the keys they see; its scores (M rows, fp32) stay in L2 for the softmax.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int KEYS = 32;  // keys per tile: two vectors of 16 lanes

// out[i][c] = alpha * q_i . k_c for M queries (rows of q, `dim` bf16 apart) and n <= 32 keys of kp
// (pairs, rows `ctx` apart) from key c0
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void tile(const uint16_t* q, int dim,
                                                                          const int32_t* kp, int64_t ctx, int n,
                                                                          float alpha, float* out, int64_t stride) {
  const __mmask16 lo = __mmask16(n >= 16 ? 0xFFFF : (1u << n) - 1);
  const __mmask16 hi = __mmask16(n >= 32 ? 0xFFFF : n > 16 ? (1u << (n - 16)) - 1 : 0);
  __m512 acc[M][2];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int p = 0; p < dim / 2; ++p) {
    const int32_t* row = kp + p * ctx;
    const __m512bh k0 = (__m512bh)_mm512_maskz_loadu_epi32(lo, row);
    const __m512bh k1 = (__m512bh)_mm512_maskz_loadu_epi32(hi, row + 16);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512bh a = (__m512bh)_mm512_castps_si512(_mm512_set1_ps(*reinterpret_cast<const float*>(q + i * dim + 2 * p)));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, k0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, k1);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
    _mm512_mask_storeu_ps(out + i * stride, lo, _mm512_mul_ps(acc[i][0], scale));
    _mm512_mask_storeu_ps(out + i * stride + 16, hi, _mm512_mul_ps(acc[i][1], scale));
  }
}

constexpr int ROWS = 8;  // queries per tile: 16 sums in registers, plus two key vectors and a query's pair

using Tile = void (*)(const uint16_t*, int, const int32_t*, int64_t, int, float, float*, int64_t);
constexpr Tile TILES[ROWS + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

// e^x for x <= 0 (to within 2e-6 relative; below -87 it is 0 for a bf16 probability anyway):
// 2^(x log2 e) as 2^n times a degree-7 polynomial in the fraction
__attribute__((target("avx512f"))) inline __m512 exp_negative(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  constexpr float c[8] = {1.f, 0.693147181f, 0.240226507f, 0.0555041087f, 0.00961812911f, 0.00133335581f,
                          0.000154035304f, 0.0000152527338f};  // ln(2)^k / k!
  __m512 p = _mm512_set1_ps(c[7]);
  for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 first(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// probs[0..keys) of one query: softmax of its scores x[0..n) (n <= keys), zeros past n, in bf16
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void softmax_row(float* x, int n, int keys,
                                                                                  uint16_t* probs) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int c = 0; c < n; c += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first(n - c), x + c));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < n; c += 16) {
    const __mmask16 k = first(n - c);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_negative(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), m)));
    _mm512_mask_storeu_ps(x + c, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int c = 0; c < keys; c += 16) {
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(c < n ? first(n - c) : 0, x + c), inv);
    _mm256_mask_storeu_epi16(probs + c, first(keys - c), (__m256i)_mm512_cvtneps_pbh(p));
  }
}

}  // namespace

extern "C" {

// For each of `heads` heads and `rows` queries: the softmax over the keys query r sees, the first
// seen + r, of alpha * q[h][r] . k[h][c], as bf16 probs[h][r][c] for c < keys = seen + rows - 1
// (zeros past what r sees). q: bf16, head h row r at q + h * q_head + r * dim; kp: the keys as
// pairs [heads][dim / 2][ctx] (int32, each two bf16). dim even, seen >= 1. Returns 0, or -1 where
// this CPU lacks AVX512-BF16.
int hybrid_attention_probs(int heads, int rows, int seen, int dim, const uint16_t* q, int64_t q_head,
                           const int32_t* kp, int64_t ctx, float alpha, uint16_t* probs) {
  if (!__builtin_cpu_supports("avx512bf16")) return -1;
  const int keys = seen + rows - 1, groups = (rows + ROWS - 1) / ROWS, stride = (keys + 15) / 16 * 16;
#pragma omp parallel
  {
    std::vector<float> scores(size_t(ROWS) * stride);
#pragma omp for schedule(static) collapse(2)
    for (int h = 0; h < heads; ++h)
      for (int g = 0; g < groups; ++g) {
        const int r = g * ROWS, m = std::min(ROWS, rows - r), n = seen + r + m - 1;  // the last one's keys
        const uint16_t* qr = q + h * q_head + int64_t(r) * dim;
        const int32_t* k = kp + int64_t(h) * (dim / 2) * ctx;
        for (int c = 0; c < n; c += KEYS)
          TILES[m](qr, dim, k + c, ctx, std::min(KEYS, n - c), alpha, scores.data() + c, stride);
        for (int i = 0; i < m; ++i)
          softmax_row(scores.data() + size_t(i) * stride, seen + r + i, keys,
                      probs + (int64_t(h) * rows + r + i) * keys);
      }
  }
  return 0;
}

}  // extern "C"
