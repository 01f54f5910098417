// One MoE layer's routed experts on the CPU, with the checkpoint's INT4 weights as they are stored
// (compressed-tensors pack-quantized: byte p of a row holds values 2p (low nibble) and 2p + 1
// (high), each stored as value + 8; one bf16 scale per group of G values) and the activations
// quantized to int8 in blocks of 32: the products are integer dot products (AVX-512 VNNI, or
// AVX2's maddubs), so a core keeps up with memory where widening every nibble to float cannot.
//
// One call does the whole layer: group the (token, slot) pairs by expert, gate and up for every
// pair, silu(gate) * up, the down projection, weighted and summed per token. Each weight row is
// read once per call whatever the number of tokens that use it. Work is split over torch's own
// OpenMP threads (this library resolves libgomp to the copy torch loaded), so nothing is handed
// to another pool.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int BLOCK = 32;  // activation quantization block
constexpr int TOKENS = 4;  // tokens multiplied per pass over a weight row (accumulators in registers)
constexpr int ROWS = 16;   // weight rows per work item

// One activation vector of length K, quantized, laid out as the weight's nibbles are: lo[p] is
// value 2p, hi[p] value 2p + 1. A lane is 8 consecutive values (4 weight bytes, one int32 of a
// dot product): scale[L] is the block scale of lane L, bias[L] = -8 * (sum of its int8 values),
// which takes the weights' +8 off.
struct Q8 {
  const int8_t* lo;
  const int8_t* hi;
  const int32_t* bias;
  const float* scale;
};

size_t q8_bytes(int K) { return size_t(K) + size_t(K / 8) * 8; }

Q8 q8_view(uint8_t* base, int K) {
  auto* lo = reinterpret_cast<int8_t*>(base);
  auto* bias = reinterpret_cast<int32_t*>(base + K);
  return {lo, lo + K / 2, bias, reinterpret_cast<float*>(bias + K / 8)};
}

void quantize(const float* x, int K, uint8_t* base) {
  Q8 q = q8_view(base, K);
  auto* lo = const_cast<int8_t*>(q.lo);
  auto* hi = const_cast<int8_t*>(q.hi);
  auto* bias = const_cast<int32_t*>(q.bias);
  auto* scale = const_cast<float*>(q.scale);
  for (int b = 0; b < K; b += BLOCK) {
    float amax = 0.f;
    for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(x[b + i]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int8_t v[BLOCK];
    for (int i = 0; i < BLOCK; ++i) v[i] = static_cast<int8_t>(std::nearbyint(x[b + i] * inv));
    for (int i = 0; i < BLOCK / 2; ++i) {
      lo[b / 2 + i] = v[2 * i];
      hi[b / 2 + i] = v[2 * i + 1];
    }
    for (int l = 0; l < BLOCK / 8; ++l) {
      int s = 0;
      for (int i = 0; i < 8; ++i) s += v[8 * l + i];
      bias[b / 8 + l] = -8 * s;
      scale[b / 8 + l] = d;
    }
  }
}

inline float bf16(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// res[r * nt + t] = row r of w (K values; bytes at w + r * stride, scales at s + r * sstride) . q[t]
using Dots = void (*)(const uint8_t* w, size_t stride, const uint16_t* s, size_t sstride, int rows, int K,
                      const Q8* q, int nt, float* res);

// Each instruction set's `rows<N, G>`: N tokens at once over `rows` rows, the accumulators in
// registers, for scale groups of G.
struct Avx512 {
template <int N, int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void rows(
    const uint8_t* w, size_t stride, const uint16_t* s, size_t sstride, int rows, int K, const Q8* q, int nt,
    float* res) {
  // A 64-byte chunk is 128 values, 16 lanes; lane l of chunk c is in group (128 c + 8 l) / G. One
  // load of 16 scales covers G / 8 chunks: chunk j of them takes lane l's scale from entry
  // j * 128 / G + 8 l / G.
  const __m512i nib = _mm512_set1_epi8(0x0F);
  constexpr int span = G / 8;
  const int chunks = K / 128, groups = K / G;
  __m512i idx[span];
  for (int j = 0; j < span; ++j) {
    alignas(64) int32_t v[16];
    for (int l = 0; l < 16; ++l) v[l] = j * 128 / G + 8 * l / G;
    idx[j] = _mm512_load_si512(v);
  }
  for (int r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * stride;
    const uint16_t* sc = s + r * sstride;
    __m512 acc[N];
    for (int t = 0; t < N; ++t) acc[t] = _mm512_setzero_ps();
    for (int c0 = 0; c0 < chunks; c0 += span) {
      const int g0 = 128 * c0 / G, left = groups - g0;
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 s16 = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, sc + g0)), 16));
      const int end = std::min(chunks, c0 + span);
      for (int c = c0; c < end; ++c) {
        const __m512i b = _mm512_loadu_si512(row + 64 * c);
        const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
        const __m512 ws = _mm512_permutexvar_ps(idx[c - c0], s16);
        for (int t = 0; t < N; ++t) {
          const Q8& x = q[t];
          __m512i d = _mm512_loadu_si512(x.bias + 16 * c);
          d = _mm512_dpbusd_epi32(d, lo, _mm512_loadu_si512(x.lo + 64 * c));
          d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(x.hi + 64 * c));
          acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(x.scale + 16 * c)), ws,
                                   acc[t]);
        }
      }
    }
    for (int t = 0; t < N; ++t) res[r * nt + t] = _mm512_reduce_add_ps(acc[t]);
  }
}
};

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Avx2 {
template <int N, int G>
__attribute__((target("avx2,fma"))) static void rows(const uint8_t* w, size_t stride, const uint16_t* s,
                                                      size_t sstride, int rows, int K, const Q8* q, int nt,
                                                      float* res) {
  // a 32-byte chunk is 64 values, 8 lanes: lanes 0-3 in group 64 c / G, lanes 4-7 in (64 c + 32) / G
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * stride;
    const uint16_t* sc = s + r * sstride;
    __m256 acc[N];
    for (int t = 0; t < N; ++t) acc[t] = _mm256_setzero_ps();
    for (int c = 0; c < K / 64; ++c) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c));
      const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
      const __m256 ws = _mm256_set_m128(_mm_set1_ps(bf16(sc[(64 * c + 32) / G])), _mm_set1_ps(bf16(sc[64 * c / G])));
      for (int t = 0; t < N; ++t) {
        const Q8& x = q[t];
        // u8 x s8 pairs summed to int16 cannot saturate here: 2 * 15 * 127 per product pair
        const __m256i p = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lo + 32 * c))),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hi + 32 * c))));
        const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(p, ones),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.bias + 8 * c)));
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(x.scale + 8 * c)), ws, acc[t]);
      }
    }
    for (int t = 0; t < N; ++t) res[r * nt + t] = hsum256(acc[t]);
  }
}

};

// all `nt` tokens, TOKENS at a time
template <class Isa, int G>
void tokens(const uint8_t* w, size_t stride, const uint16_t* s, size_t sstride, int rows, int K, const Q8* q, int nt,
            float* res) {
  for (int t = 0; t < nt; t += TOKENS) {
    switch (std::min(TOKENS, nt - t)) {
      case 1: Isa::template rows<1, G>(w, stride, s, sstride, rows, K, q + t, nt, res + t); break;
      case 2: Isa::template rows<2, G>(w, stride, s, sstride, rows, K, q + t, nt, res + t); break;
      case 3: Isa::template rows<3, G>(w, stride, s, sstride, rows, K, q + t, nt, res + t); break;
      default: Isa::template rows<4, G>(w, stride, s, sstride, rows, K, q + t, nt, res + t);
    }
  }
}

template <class Isa>
Dots by_group(int G) {
  return G == 32 ? tokens<Isa, 32> : G == 64 ? tokens<Isa, 64> : G == 128 ? tokens<Isa, 128> : nullptr;
}

// the kernel for an instruction set (2: AVX-512 VNNI, 1: AVX2) and group size; null where none
Dots pick(int isa, int G) { return isa == 2 ? by_group<Avx512>(G) : isa == 1 ? by_group<Avx2>(G) : nullptr; }

}  // namespace

extern "C" {

// Instruction sets: 2 = AVX-512 VNNI (K % 128 == 0), 1 = AVX2 (K % 64 == 0). G in {32, 64, 128}.
// x [T, H] fp32; ids [T, k] (a negative id: a slot another backend computes); wts [T, k] fp32;
// gate, up [E, I, H/2] bytes; down [E, H, I/2] bytes; gate_s, up_s [E, I, H/G], down_s [E, H, I/G]
// bf16; out [T, H] fp32, overwritten. Returns 0, or -1 for an instruction set or group size it does not have.
int hybrid_int4_moe(int isa, int T, int H, int I, int G, int E, int k, const float* x, const int64_t* ids,
                    const float* wts, const uint8_t* gate, const uint8_t* up, const uint8_t* down,
                    const uint16_t* gate_s, const uint16_t* up_s, const uint16_t* down_s, float* out) {
  const Dots dots = pick(isa, G);
  if (!dots) return -1;
  std::memset(out, 0, sizeof(float) * size_t(T) * H);

  // the pairs grouped by expert (counting sort): pair i of expert e is token tok[i], weight wt[i]
  std::vector<int> start(E + 1, 0);
  for (int i = 0; i < T * k; ++i)
    if (ids[i] >= 0) ++start[ids[i] + 1];
  for (int e = 0; e < E; ++e) start[e + 1] += start[e];
  const int P = start[E];
  std::vector<int> tok(P), fill(start.begin(), start.end() - 1);
  std::vector<float> wt(P);
  for (int i = 0; i < T * k; ++i)
    if (ids[i] >= 0) {
      const int j = fill[ids[i]]++;
      tok[j] = i / k;
      wt[j] = wts[i];
    }
  std::vector<int> used;
  for (int e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) used.push_back(e);
  const int U = int(used.size());
  if (!P) return 0;

  const size_t qh = q8_bytes(H), qi = q8_bytes(I);
  std::vector<uint8_t> xq(qh * T), hq(qi * P);
  std::vector<float> h(size_t(P) * I);
  std::vector<Q8> xv(T), hv(P);
  for (int t = 0; t < T; ++t) xv[t] = q8_view(xq.data() + qh * t, H);
  for (int p = 0; p < P; ++p) hv[p] = q8_view(hq.data() + qi * p, I);

  // gate and up: work items are (expert, block of ROWS rows); down: blocks of output rows, each
  // over every expert used, so no two threads write the same output. One parallel region: its
  // loops' barriers order the steps.
  const int blocks = (I + ROWS - 1) / ROWS, out_blocks = (H + ROWS - 1) / ROWS;
#pragma omp parallel
  {
    std::vector<Q8> q;
    std::vector<float> g, u;
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) quantize(x + size_t(t) * H, H, xq.data() + qh * t);
#pragma omp for schedule(static)
    for (int item = 0; item < U * blocks; ++item) {
      const int e = used[item / blocks], r0 = item % blocks * ROWS, rows = std::min(ROWS, I - r0);
      const int p0 = start[e], n = start[e + 1] - p0;
      q.resize(n);
      g.resize(size_t(rows) * n);
      u.resize(size_t(rows) * n);
      for (int j = 0; j < n; ++j) q[j] = xv[tok[p0 + j]];
      const size_t row = size_t(e) * I + r0;
      dots(gate + row * (H / 2), H / 2, gate_s + row * (H / G), H / G, rows, H, q.data(), n, g.data());
      dots(up + row * (H / 2), H / 2, up_s + row * (H / G), H / G, rows, H, q.data(), n, u.data());
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < n; ++j) {
          const float a = g[r * n + j];
          h[size_t(p0 + j) * I + r0 + r] = a / (1.f + std::exp(-a)) * u[r * n + j];
        }
    }
#pragma omp for schedule(static)
    for (int p = 0; p < P; ++p) quantize(h.data() + size_t(p) * I, I, hq.data() + qi * p);
#pragma omp for schedule(static)
    for (int item = 0; item < out_blocks; ++item) {
      const int r0 = item * ROWS, rows = std::min(ROWS, H - r0);
      for (int ui = 0; ui < U; ++ui) {
        const int e = used[ui], p0 = start[e], n = start[e + 1] - p0;
        g.resize(size_t(rows) * n);
        const size_t row = size_t(e) * H + r0;
        dots(down + row * (I / 2), I / 2, down_s + row * (I / G), I / G, rows, I, hv.data() + p0, n, g.data());
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < n; ++j) out[size_t(tok[p0 + j]) * H + r0 + r] += wt[p0 + j] * g[r * n + j];
      }
    }
  }
  return 0;
}

}  // extern "C"
