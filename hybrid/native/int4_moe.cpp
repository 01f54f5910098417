// One MoE layer's routed experts on the CPU, on INT4 weights as compressed-tensors stores them
// (byte p of a row holds values 2p (low nibble) and 2p + 1 (high), each stored as value + 8; one
// bf16 scale per group of G values) with the activations quantized to int8 in blocks of 32: the
// products are integer dot products (AVX-512 VNNI, or AVX2's maddubs), so a core keeps up with
// memory where widening every nibble to float cannot.
//
// The weights' bytes are reordered once at load (`hybrid_int4_repack`, nothing re-quantized) so
// that each 32-bit lane of a vector holds one block of 32 values throughout: a row is cut into
// super-blocks of LANES blocks (16 for AVX-512, 8 for AVX2), each laid out as 4 chunks of one
// vector, chunk j holding bytes 4j..4j+3 of every block. Four dot products then add into the same
// lanes, and each block's scales are applied once, per lane, in float. Activations are laid out
// the same way when they are quantized.
//
// One call does the whole layer: group the (token, slot) pairs by expert, gate and up for every
// pair, silu(gate) * up, the down projection, weighted and summed per token. Each weight row is
// read once per call whatever the number of tokens that use it. Work is split over torch's own
// OpenMP threads (this library resolves libgomp to the copy torch loaded), so nothing is handed
// to another pool.
//
// A prompt's experts are compute-bound instead; `hybrid_int4_dequantize` turns tiles of the same
// reordered weights into bf16 for GEMMs on the CPU's bf16 instructions (dot_backend.py).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"

namespace {

constexpr int ROWS = 16;     // weight rows per work item
constexpr int AHEAD = 4096;  // bytes of a weight stream prefetched ahead: a core alone draws more of the memory

// Where byte m (0..15) of block b of a row of `blocks` blocks goes in the reordered layout: its
// super-block, then chunk m / 4 (of `left` blocks' 4 bytes each: fewer in a last, partial
// super-block), then the block's lane, then the byte.
inline size_t position(int b, int m, int blocks, int lanes) {
  const int s = b / lanes, left = std::min(lanes, blocks - s * lanes);
  return size_t(s) * lanes * 16 + (m / 4) * left * 4 + (b % lanes) * 4 + m % 4;
}

// One activation vector of length K quantized in blocks of 32, in the weights' reordered layout:
// lo holds the even values, hi the odd ones, each byte where the weight byte it meets is. Per
// block b: scale[b], and corr[b] = -8 * scale[b] * (sum of its int8 values), which takes the
// weights' +8 off. The per-block arrays are padded to whole super-blocks (with zeros).
struct Q8 {
  const int8_t* lo;
  const int8_t* hi;
  const float* scale;
  const float* corr;
};

int padded_blocks(int K, int lanes) { return (K / 32 + lanes - 1) / lanes * lanes; }

size_t q8_bytes(int K, int lanes) { return size_t(K) + size_t(padded_blocks(K, lanes)) * 8; }

Q8 q8_view(uint8_t* base, int K, int lanes) {
  auto* lo = reinterpret_cast<int8_t*>(base);
  auto* scale = reinterpret_cast<float*>(base + K);
  return {lo, lo + K / 2, scale, scale + padded_blocks(K, lanes)};
}

void quantize(const float* x, int K, int lanes, uint8_t* base) {
  Q8 q = q8_view(base, K, lanes);
  auto* lo = const_cast<int8_t*>(q.lo);
  auto* hi = const_cast<int8_t*>(q.hi);
  auto* scale = const_cast<float*>(q.scale);
  auto* corr = const_cast<float*>(q.corr);
  const int blocks = K / 32;
  for (int b = 0; b < padded_blocks(K, lanes); ++b) scale[b] = corr[b] = 0.f;
  for (int b = 0; b < blocks; ++b) {
    const float* v = x + 32 * b;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int m = 0; m < 16; ++m) {
      const int8_t a = static_cast<int8_t>(std::nearbyint(v[2 * m] * inv));
      const int8_t c = static_cast<int8_t>(std::nearbyint(v[2 * m + 1] * inv));
      const size_t at = position(b, m, blocks, lanes);
      lo[at] = a;
      hi[at] = c;
      sum += a + c;
    }
    scale[b] = amax / 127.f;
    corr[b] = -8.f * scale[b] * float(sum);
  }
}

// res[r * nt + t] = row r of w (K values, reordered; bytes at w + r * stride, scales at
// s + r * sstride) . q[t]
using Dots = void (*)(const uint8_t* w, size_t stride, const uint16_t* s, size_t sstride, int rows, int K,
                      const Q8* q, int nt, float* res);

// Each instruction set's `rows<N, G>`: N tokens at once over `rows` rows, the accumulators in
// registers, for scale groups of G; lane l of super-block sb is block 16 sb + l (8 sb + l on
// AVX2), in group (LANES sb + l) * 32 / G.
struct Avx512 {
  static constexpr int LANES = 16;
  static constexpr int TOKENS = 4;  // tokens per pass over a row, accumulators in registers (more measured slower)

  template <int N, int G>
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void rows(
      const uint8_t* w, size_t stride, const uint16_t* s, size_t sstride, int rows, int K, const Q8* q, int nt,
      float* res) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    alignas(64) int32_t v[16];
    for (int l = 0; l < 16; ++l) v[l] = l * 32 / G;
    const __m512i group = _mm512_load_si512(v);
    const int blocks = K / 32, groups = K / G;
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = w + r * stride;
      const uint16_t* sc = s + r * sstride;
      __m512 acc[N];
      for (int t = 0; t < N; ++t) acc[t] = _mm512_setzero_ps();
      for (int sb = 0; sb * 16 < blocks; ++sb) {
        const int left = std::min(16, blocks - 16 * sb), g0 = sb * 512 / G, ng = std::min(16, groups - g0);
        const __mmask64 bytes = left == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * left)) - 1;
        const __mmask16 lanes = __mmask16((1u << left) - 1);
        const __m512 ws = _mm512_permutexvar_ps(group, _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(__mmask16((1u << ng) - 1), sc + g0)), 16)));
        const size_t at = size_t(sb) * 256;
        __m512i d[N];
        for (int t = 0; t < N; ++t) d[t] = _mm512_setzero_si512();
        for (int j = 0; j < 4; ++j) {
          const size_t c = at + j * 4 * left;
          _mm_prefetch(reinterpret_cast<const char*>(row + c) + AHEAD, _MM_HINT_T0);
          const __m512i b = _mm512_maskz_loadu_epi8(bytes, row + c);
          const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
          for (int t = 0; t < N; ++t) {
            d[t] = _mm512_dpbusd_epi32(d[t], lo, _mm512_maskz_loadu_epi8(bytes, q[t].lo + c));
            d[t] = _mm512_dpbusd_epi32(d[t], hi, _mm512_maskz_loadu_epi8(bytes, q[t].hi + c));
          }
        }
        for (int t = 0; t < N; ++t) {
          const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[t]), _mm512_maskz_loadu_ps(lanes, q[t].scale + 16 * sb),
                                           _mm512_maskz_loadu_ps(lanes, q[t].corr + 16 * sb));
          acc[t] = _mm512_fmadd_ps(f, ws, acc[t]);
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
  static constexpr int LANES = 8;
  static constexpr int TOKENS = 4;  // 16 vector registers: 4 tokens' two accumulators and the row's

  // a chunk of `left` lanes: whole, or copied into a zeroed buffer (AVX2 has no masked byte loads)
  __attribute__((target("avx2,fma"))) static __m256i load(const void* p, int left, uint8_t* part) {
    if (left == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    std::memcpy(part, p, 4 * left);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
  }

  template <int N, int G>
  __attribute__((target("avx2,fma"))) static void rows(const uint8_t* w, size_t stride, const uint16_t* s,
                                                        size_t sstride, int rows, int K, const Q8* q, int nt,
                                                        float* res) {
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int blocks = K / 32;
    alignas(32) uint8_t part[3][32] = {};
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = w + r * stride;
      const uint16_t* sc = s + r * sstride;
      __m256 acc[N];
      for (int t = 0; t < N; ++t) acc[t] = _mm256_setzero_ps();
      for (int sb = 0; sb * 8 < blocks; ++sb) {
        const int left = std::min(8, blocks - 8 * sb);
        __m256 ws;
        if (G == 32 && left == 8) {  // the super-block's 8 scales, one per lane
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 8 * sb));
          ws = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        } else {
          alignas(32) float v[8] = {};
          for (int l = 0; l < left; ++l) v[l] = bf16_to_float(sc[(8 * sb + l) * 32 / G]);
          ws = _mm256_load_ps(v);
        }
        const size_t at = size_t(sb) * 128;
        __m256i d[N];
        for (int t = 0; t < N; ++t) d[t] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          const size_t c = at + j * 4 * left;
          _mm_prefetch(reinterpret_cast<const char*>(row + c) + AHEAD, _MM_HINT_T0);
          const __m256i b = load(row + c, left, part[0]);
          const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
          for (int t = 0; t < N; ++t) {
            // u8 x s8 pairs summed to int16 cannot saturate here: 2 * 15 * 127 per product pair
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load(q[t].lo + c, left, part[1])),
                                               _mm256_maddubs_epi16(hi, load(q[t].hi + c, left, part[2])));
            d[t] = _mm256_add_epi32(d[t], _mm256_madd_epi16(p, ones));
          }
        }
        for (int t = 0; t < N; ++t) {
          const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[t]), _mm256_loadu_ps(q[t].scale + 8 * sb),
                                           _mm256_loadu_ps(q[t].corr + 8 * sb));
          acc[t] = _mm256_fmadd_ps(f, ws, acc[t]);
        }
      }
      for (int t = 0; t < N; ++t) res[r * nt + t] = hsum256(acc[t]);
    }
  }
};

// n (<= N) tokens in one pass
template <class Isa, int G, int N>
void pass(int n, const uint8_t* w, size_t stride, const uint16_t* s, size_t sstride, int rows, int K, const Q8* q,
          int nt, float* res) {
  if (n == N)
    Isa::template rows<N, G>(w, stride, s, sstride, rows, K, q, nt, res);
  else if constexpr (N > 1)
    pass<Isa, G, N - 1>(n, w, stride, s, sstride, rows, K, q, nt, res);
}

// all `nt` tokens, Isa::TOKENS at a time
template <class Isa, int G>
void tokens(const uint8_t* w, size_t stride, const uint16_t* s, size_t sstride, int rows, int K, const Q8* q, int nt,
            float* res) {
  for (int t = 0; t < nt; t += Isa::TOKENS)
    pass<Isa, G, Isa::TOKENS>(std::min(Isa::TOKENS, nt - t), w, stride, s, sstride, rows, K, q + t, nt, res + t);
}

template <class Isa>
Dots by_group(int G) {
  return G == 32 ? tokens<Isa, 32> : G == 64 ? tokens<Isa, 64> : G == 128 ? tokens<Isa, 128> : nullptr;
}

// the kernel for an instruction set (2: AVX-512 VNNI, 1: AVX2) and group size, and its lanes
Dots pick(int isa, int G) { return isa == 2 ? by_group<Avx512>(G) : isa == 1 ? by_group<Avx2>(G) : nullptr; }

int lanes_of(int isa) { return isa == 2 ? Avx512::LANES : Avx2::LANES; }

// Rows of INT4 values in the AVX-512 layout as bf16, for GEMMs: (value - 8) * scale, each exact in
// fp32 and rounded to nearest even (AVX512-BF16's conversion, which every CPU that runs the GEMMs
// has). The columns come in the layout's order, not the checkpoint's: column c < K / 2 is the low
// nibble of the row's reordered byte c, column K / 2 + c its high nibble. A product needs only its
// input in the same order (`layout_order` in dot_backend.py).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dequantize_row(
    const uint8_t* row, const uint16_t* sc, int K, int G, uint16_t* out) {
  const __m512i nib = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi32(8);
  alignas(64) int32_t v[16], four[16];
  for (int l = 0; l < 16; ++l) v[l] = l * 32 / G, four[l] = l / 4;
  const __m512i group = _mm512_load_si512(v), quad = _mm512_load_si512(four);
  const int blocks = K / 32, groups = K / G;
  alignas(64) uint8_t nibs[2][64];
  for (int sb = 0; sb * 16 < blocks; ++sb) {
    const int left = std::min(16, blocks - 16 * sb), g0 = sb * 512 / G, ng = std::min(16, groups - g0);
    const __m512 ws = _mm512_permutexvar_ps(group, _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(__mmask16((1u << ng) - 1), sc + g0)), 16)));
    for (int j = 0; j < 4; ++j) {
      const size_t c = size_t(sb) * 256 + j * 4 * left;
      const int n = 4 * left;  // bytes in this chunk: lane l's four are bytes 4l..4l+3
      const __m512i b = _mm512_maskz_loadu_epi8(n == 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1, row + c);
      _mm512_store_si512(nibs[0], _mm512_and_si512(b, nib));
      _mm512_store_si512(nibs[1], _mm512_and_si512(_mm512_srli_epi16(b, 4), nib));
      for (int q = 0; q * 16 < n; ++q) {  // 16 bytes, lanes 4q..4q+3
        const __m512 s = _mm512_permutexvar_ps(_mm512_add_epi32(quad, _mm512_set1_epi32(4 * q)), ws);
        const __mmask16 keep = __mmask16((1u << std::min(16, n - 16 * q)) - 1);
        for (int h = 0; h < 2; ++h) {
          const __m512i raw = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(nibs[h] + 16 * q)));
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(raw, eight)), s);
          _mm256_mask_storeu_epi16(out + h * (K / 2) + c + 16 * q, keep, (__m256i)_mm512_cvtneps_pbh(f));
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// The layout the kernel reads, for an instruction set: `rows` rows of K INT4 values (K / 2 bytes
// each, as stored) from src into dst. Returns -1 for an instruction set it does not have.
int hybrid_int4_repack(int isa, int64_t rows, int K, const uint8_t* src, uint8_t* dst) {
  if (isa != 1 && isa != 2) return -1;
  const int lanes = lanes_of(isa), blocks = K / 32;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int b = 0; b < blocks; ++b)
      for (int m = 0; m < 16; ++m) dst[r * (K / 2) + position(b, m, blocks, lanes)] = src[r * (K / 2) + 16 * b + m];
  return 0;
}

// Instruction sets: 2 = AVX-512 VNNI, 1 = AVX2; hidden and intermediate sizes multiples of 128; G
// in {32, 64, 128}. x [T, H] fp32; ids [T, k] (a negative id: a slot another backend computes);
// wts [T, k] fp32; gate, up [E, I, H/2] bytes; down [E, H, I/2] bytes, each reordered for this
// instruction set by `hybrid_int4_repack`; gate_s, up_s [E, I, H/G], down_s [E, H, I/G] bf16 as
// stored; out [T, H] fp32, overwritten. Returns 0, or -1 for an instruction set or group size it
// does not have.
int hybrid_int4_moe(int isa, int T, int H, int I, int G, int E, int k, const float* x, const int64_t* ids,
                    const float* wts, const uint8_t* gate, const uint8_t* up, const uint8_t* down,
                    const uint16_t* gate_s, const uint16_t* up_s, const uint16_t* down_s, float* out) {
  const Dots dots = pick(isa, G);
  if (!dots) return -1;
  const int lanes = lanes_of(isa);
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

  const size_t qh = q8_bytes(H, lanes), qi = q8_bytes(I, lanes);
  std::vector<uint8_t> xq(qh * T), hq(qi * P);
  std::vector<float> h(size_t(P) * I), part(size_t(P) * H);
  std::vector<int> pstart(T + 1, 0), pairs(P);  // each token's pairs
  for (int p = 0; p < P; ++p) ++pstart[tok[p] + 1];
  for (int t = 0; t < T; ++t) pstart[t + 1] += pstart[t];
  {
    std::vector<int> at(pstart.begin(), pstart.end() - 1);
    for (int p = 0; p < P; ++p) pairs[at[tok[p]]++] = p;
  }
  std::vector<Q8> xv(T), hv(P);
  for (int t = 0; t < T; ++t) xv[t] = q8_view(xq.data() + qh * t, H, lanes);
  for (int p = 0; p < P; ++p) hv[p] = q8_view(hq.data() + qi * p, I, lanes);

  // gate and up, then down: work items are (expert, block of ROWS rows), so each thread streams
  // long runs of one expert's rows; down writes each pair's weighted output apart, and each token
  // then sums its own pairs, so no two threads write the same output. One parallel region: its
  // loops' barriers order the steps.
  const int blocks = (I + ROWS - 1) / ROWS, out_blocks = (H + ROWS - 1) / ROWS;
#pragma omp parallel
  {
    std::vector<Q8> q;
    std::vector<float> g, u;
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) quantize(x + size_t(t) * H, H, lanes, xq.data() + qh * t);
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
    for (int p = 0; p < P; ++p) quantize(h.data() + size_t(p) * I, I, lanes, hq.data() + qi * p);
#pragma omp for schedule(static)
    for (int item = 0; item < U * out_blocks; ++item) {
      const int e = used[item / out_blocks], r0 = item % out_blocks * ROWS, rows = std::min(ROWS, H - r0);
      const int p0 = start[e], n = start[e + 1] - p0;
      g.resize(size_t(rows) * n);
      const size_t row = size_t(e) * H + r0;
      dots(down + row * (I / 2), I / 2, down_s + row * (I / G), I / G, rows, I, hv.data() + p0, n, g.data());
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < n; ++j) part[size_t(p0 + j) * H + r0 + r] = wt[p0 + j] * g[r * n + j];
    }
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t)
      for (int i = pstart[t]; i < pstart[t + 1]; ++i) {
        const float* src = part.data() + size_t(pairs[i]) * H;
        float* dst = out + size_t(t) * H;
        for (int c = 0; c < H; ++c) dst[c] += src[c];
      }
  }
  return 0;
}

// `rows` rows of the AVX-512 layout (isa 2) as bf16 [rows, K] in the layout's column order
// (dequantize_row); row r of out is row from[r] of w. Returns -1 for
// another instruction set's layout, or where this CPU lacks AVX512-BF16.
int hybrid_int4_dequantize(int isa, int64_t rows, int K, int G, const uint8_t* w, const uint16_t* s,
                           const int64_t* from, uint16_t* out) {
  if (isa != 2 || !__builtin_cpu_supports("avx512bf16")) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    dequantize_row(w + from[r] * (K / 2), s + from[r] * (K / G), K, G, out + r * K);
  }
  return 0;
}

}  // extern "C"
