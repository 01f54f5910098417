// Attention scores of a prompt on the CPU, q . k for bf16 queries and keys, accumulated and written
// in fp32: exactly what fp32 math gives for bf16 values, at the speed of the CPU's bf16 dot products
// (AVX512-BF16: each 32-bit lane multiplies a pair of bf16 and adds both products in fp32). torch
// has no CPU matmul from bf16 to fp32, and its fp32 path through bf16 instructions converts both
// operands at every call (0.2-0.3 TFLOP/s on 2 Zen 4 cores, against 0.7 here).
//
// The keys come packed once per layer as pairs: kp[d / 2][c] holds dims d and d + 1 of key c, so
// that one vector load brings one pair of 16 keys; a query's pair is broadcast against it. A tile of
// M queries by 32 keys keeps its 2M sums in registers over all dims; the keys' tile (dim / 2 x 32
// pairs, 12 KB at MLA's 192 dims) stays in L1 while every query of the block passes over it.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

}  // namespace

extern "C" {

// For each of `heads` heads: out[h][r][c] = alpha * q[h][r] . k[h][c] for `rows` queries and the
// first `keys` keys. q: bf16, head h row r at q + h * q_head + r * dim; kp: the keys as pairs
// [heads][dim / 2][ctx] (int32, each two bf16); out: fp32 [heads][rows][keys]. dim even. Returns 0,
// or -1 where this CPU lacks AVX512-BF16.
int hybrid_bf16_scores(int heads, int rows, int keys, int dim, const uint16_t* q, int64_t q_head,
                       const int32_t* kp, int64_t ctx, float alpha, float* out) {
  if (!__builtin_cpu_supports("avx512bf16")) return -1;
  const int blocks = (keys + KEYS - 1) / KEYS;
#pragma omp parallel for schedule(static) collapse(2)
  for (int h = 0; h < heads; ++h)
    for (int b = 0; b < blocks; ++b) {
      const int c0 = b * KEYS, n = std::min(KEYS, keys - c0);
      const int32_t* k = kp + int64_t(h) * (dim / 2) * ctx + c0;
      for (int r = 0; r < rows; r += ROWS) {
        const int m = std::min(ROWS, rows - r);
        TILES[m](q + h * q_head + int64_t(r) * dim, dim, k, ctx, n, alpha,
                 out + (int64_t(h) * rows + r) * keys + c0, keys);
      }
    }
  return 0;
}

}  // extern "C"
