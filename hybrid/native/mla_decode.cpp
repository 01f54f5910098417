// One decode step of MLA attention on the CPU, for S sequences of one new token each, in one call:
// the projections, norms and rope, the new latent written to the cache, attention over the cached
// latents with kv_b folded in, and o_proj. The step reads ~23 MB of weights per layer at `mini`'s
// size: as a chain of torch ops it took 2.2-2.6x that read's time (Zen 4, 2 threads), each op paying
// a thread wake-up, a cold start and an intermediate; here the phases run on one team of threads
// with a barrier between them, each streaming its weight, in ~1.25x.
//
// Weights are bf16 as the checkpoint holds them (decode_gemv.h reads them). Values are rounded to
// bf16 where torch's path rounds them too (the normalised query latent, the cached latent and rope
// key, the heads' outputs before o_proj); the rest stays fp32.
#include "decode_gemv.h"

namespace {

// x [n] (fp32) normalised by its RMS, rounded to bf16, times the bf16 weight, rounded to bf16: what
// hybrid/model/norm.py computes
void rms_norm(const float* x, int n, const uint16_t* weight, float eps, uint16_t* out) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = 1.f / std::sqrt(float(ss / n) + eps);
  for (int i = 0; i < n; ++i)
    out[i] = float_to_bf16(bf16_to_float(weight[i]) * bf16_to_float(float_to_bf16(x[i] * inv)));
}

// rope on interleaved pairs, the result as [evens' | odds'] (hybrid/model/rope.py)
void rope(const float* x, int dim, const float* cos, const float* sin, float* out) {
  const int half = dim / 2;
  for (int i = 0; i < half; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1];
    out[i] = a * cos[i] - b * sin[i];
    out[half + i] = b * cos[i] + a * sin[i];
  }
}

struct Dims {
  int hidden, q_rank, heads, nope, rope, v, rank;
};

template <class Isa>
int decode(int S, const Dims& d, const uint16_t* x, const uint16_t* w_qa, const uint16_t* qa_norm,
           const uint16_t* w_q, const uint16_t* w_kva, const uint16_t* kva_norm, const uint16_t* w_uk,
           const uint16_t* w_uv, const uint16_t* w_o, const float* cos, const float* sin, uint16_t* cache,
           const int64_t* slots, const int64_t* lens, int C, float eps, float scale, uint16_t* out) {
  const int qk = d.nope + d.rope, width = d.rank + d.rope, H = d.heads;
  const int q_in = w_qa ? d.q_rank : d.hidden;  // the query projection's input: its latent, or x itself
  const int a_rows = (w_qa ? d.q_rank : 0) + width;
  std::vector<float> a(size_t(S) * a_rows), q(size_t(S) * H * qk), q_latent(size_t(S) * H * width),
      probs(size_t(S) * H * C), o_latent(size_t(S) * H * d.rank), heads_out(size_t(S) * H * d.v),
      result(size_t(S) * d.hidden);
  std::vector<uint16_t> q_norm(size_t(S) * q_in), o_bf16(size_t(S) * H * d.rank), v_bf16(size_t(S) * H * d.v);
#pragma omp parallel
  {
    // the query's low-rank projection and the latent with its rope key, in one pass over x
    if (w_qa) gemv<Isa>(w_qa, d.q_rank, d.hidden, x, d.hidden, S, a.data(), a_rows);
    gemv<Isa>(w_kva, width, d.hidden, x, d.hidden, S, a.data() + (w_qa ? d.q_rank : 0), a_rows);
#pragma omp for schedule(static)
    for (int s = 0; s < S; ++s) {
      const float* as = a.data() + size_t(s) * a_rows;
      if (w_qa) rms_norm(as, d.q_rank, qa_norm, eps, q_norm.data() + size_t(s) * q_in);
      else std::memcpy(q_norm.data() + size_t(s) * q_in, x + size_t(s) * d.hidden, sizeof(uint16_t) * d.hidden);
      const float* kv = as + (w_qa ? d.q_rank : 0);
      uint16_t* row = cache + slots[size_t(s) * C + lens[s] - 1] * width;  // the new token's slot
      rms_norm(kv, d.rank, kva_norm, eps, row);
      float k_rope[256];
      rope(kv + d.rank, d.rope, cos + size_t(s) * d.rope / 2, sin + size_t(s) * d.rope / 2, k_rope);
      for (int i = 0; i < d.rope; ++i) row[d.rank + i] = float_to_bf16(k_rope[i]);
    }
    gemv<Isa>(w_q, int64_t(H) * qk, q_in, q_norm.data(), q_in, S, q.data(), int64_t(H) * qk);
    // per head: the query on the latents (w_uk folded in) and its rope part, then its softmax over
    // the context and its output on the latents
#pragma omp for schedule(static) collapse(2)
    for (int s = 0; s < S; ++s)
      for (int h = 0; h < H; ++h) {
        const float* qh = q.data() + (size_t(s) * H + h) * qk;
        float* ql = q_latent.data() + (size_t(s) * H + h) * width;
        std::vector<const uint16_t*> rows(std::max<int64_t>(d.nope, C));
        float q_nope[512], q_pe[256];
        for (int n = 0; n < d.nope; ++n) {
          rows[n] = w_uk + (size_t(h) * d.nope + n) * d.rank;
          q_nope[n] = bf16_to_float(float_to_bf16(qh[n]));  // torch's path rounds q to bf16
        }
        Isa::combine(q_nope, rows.data(), d.nope, d.rank, ql);
        for (int i = 0; i < d.rope; ++i) q_pe[i] = bf16_to_float(float_to_bf16(qh[d.nope + i]));
        rope(q_pe, d.rope, cos + size_t(s) * d.rope / 2, sin + size_t(s) * d.rope / 2, ql + d.rank);
        const int n_keys = int(lens[s]);
        for (int c = 0; c < n_keys; ++c) rows[c] = cache + slots[size_t(s) * C + c] * width;
        float* p = probs.data() + (size_t(s) * H + h) * C;
        Isa::dots(ql, rows.data(), n_keys, width, scale, p);
        const float top = *std::max_element(p, p + n_keys);
        float total = 0;
        for (int c = 0; c < n_keys; ++c) total += (p[c] = std::exp(p[c] - top));
        for (int c = 0; c < n_keys; ++c) p[c] /= total;
        float* ol = o_latent.data() + (size_t(s) * H + h) * d.rank;
        Isa::combine(p, rows.data(), n_keys, d.rank, ol);
        uint16_t* ob = o_bf16.data() + (size_t(s) * H + h) * d.rank;
        for (int r = 0; r < d.rank; ++r) ob[r] = float_to_bf16(ol[r]);
      }
    // each head's values (w_uv folded in): head h's rows read head h's output on the latents
    gemv<Isa>(w_uv, int64_t(H) * d.v, d.rank, o_bf16.data(), int64_t(H) * d.rank, S, heads_out.data(),
              int64_t(H) * d.v, d.v, d.rank);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < int64_t(S) * H * d.v; ++i) v_bf16[i] = float_to_bf16(heads_out[i]);
    gemv<Isa>(w_o, d.hidden, H * d.v, v_bf16.data(), int64_t(H) * d.v, S, result.data(), d.hidden);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < int64_t(S) * d.hidden; ++i) out[i] = float_to_bf16(result[i]);
  }
  return 0;
}

}  // namespace

extern "C" {

// MLA decode of S sequences, one new token each (see the top of this file). isa 2: AVX512-BF16, 1:
// AVX2 with FMA. dims: hidden, q_rank, heads, nope, rope, v, rank. x [S, hidden]; w_qa [q_rank,
// hidden] and qa_norm, or null where the model projects queries from x (w_q then [heads * qk,
// hidden], else [heads * qk, q_rank]); w_kva [rank + rope, hidden], kva_norm [rank]; w_uk [heads,
// nope, rank], w_uv [heads, v, rank], w_o [hidden, heads * v]; cos, sin [S, rope / 2] fp32; cache
// [slots, rank + rope]; slots [S, C] (each sequence's context, its new token at lens[s] - 1, which
// is written there). All bf16 but cos, sin and slots. out [S, hidden]. Returns 0, or -1 where this
// CPU lacks the instruction set.
int hybrid_mla_decode(int isa, int S, const int* dims, const uint16_t* x, const uint16_t* w_qa,
                      const uint16_t* qa_norm, const uint16_t* w_q, const uint16_t* w_kva, const uint16_t* kva_norm,
                      const uint16_t* w_uk, const uint16_t* w_uv, const uint16_t* w_o, const float* cos,
                      const float* sin, uint16_t* cache, const int64_t* slots, const int64_t* lens, int C,
                      float eps, float scale, uint16_t* out) {
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  if (d.rope > 256 || d.nope > 512) return -2;
  if (isa == 2 && __builtin_cpu_supports("avx512bf16"))
    return decode<Bf16>(S, d, x, w_qa, qa_norm, w_q, w_kva, kva_norm, w_uk, w_uv, w_o, cos, sin, cache, slots, lens,
                        C, eps, scale, out);
  if (isa == 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return decode<Avx2>(S, d, x, w_qa, qa_norm, w_q, w_kva, kva_norm, w_uk, w_uv, w_o, cos, sin, cache, slots, lens,
                        C, eps, scale, out);
  return -1;
}

}  // extern "C"
