// A MoE layer's router (DeepSeek-V3's noaux_tc) for a few tokens on the CPU, in one call: sigmoid
// scores of the experts, the best `topk_group` of `n_group` groups by the sum of each group's two
// best scores plus their correction bias, the top k experts there by the same, and their unbiased
// scores, normalised and scaled, as weights. As torch's ops it took a dozen calls, 0.08-0.1 ms a
// layer on Zen 4, where its weight (64 x 2048 fp32 at `mini`'s size) is read in ~0.01.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "bf16.h"

namespace {

// w . x for a row of n fp32 weights and n bf16 values, built for each instruction set
__attribute__((target_clones("avx512f", "avx2", "default"))) float dot(const float* w, const uint16_t* x, int n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; ++i) sum += w[i] * bf16_to_float(x[i]);
  return sum;
}

// indices [0, n) ordered by value, largest first (ties: the lower index first)
std::vector<int> ranked(const float* value, int n, int keep) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](int a, int b) { return value[a] > value[b] || (value[a] == value[b] && a < b); });
  order.resize(keep);
  return order;
}

}  // namespace

extern "C" {

// S tokens x [S, H] bf16; w [E, H] and bias [E] fp32. ids [S, k] int64 and weights [S, k] fp32 out,
// each row's experts best first. norm: divide the k weights by their sum (+1e-20). Returns 0.
int hybrid_route(int S, int H, int E, int k, int n_group, int topk_group, int norm, float scaling, const uint16_t* x,
                 const float* w, const float* bias, int64_t* ids, float* weights) {
  std::vector<float> scores(size_t(S) * E);
#pragma omp parallel for schedule(static) collapse(2) if (int64_t(S) * E * H >= (1 << 18))
  for (int s = 0; s < S; ++s)
    for (int e = 0; e < E; ++e)
      scores[size_t(s) * E + e] = 1.f / (1.f + std::exp(-dot(w + size_t(e) * H, x + size_t(s) * H, H)));
  const int per = E / n_group;
  std::vector<float> choice(E), group(n_group);
  for (int s = 0; s < S; ++s) {
    const float* sc = scores.data() + size_t(s) * E;
    for (int e = 0; e < E; ++e) choice[e] = sc[e] + bias[e];
    if (topk_group < n_group) {
      for (int g = 0; g < n_group; ++g) {
        const std::vector<int> two = ranked(choice.data() + g * per, per, 2);
        group[g] = choice[g * per + two[0]] + choice[g * per + two[1]];
      }
      std::vector<bool> kept(n_group, false);
      for (int g : ranked(group.data(), n_group, topk_group)) kept[g] = true;
      for (int e = 0; e < E; ++e)
        if (!kept[e / per]) choice[e] = -INFINITY;
    }
    const std::vector<int> top = ranked(choice.data(), E, k);
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += sc[top[j]];
    for (int j = 0; j < k; ++j) {
      ids[size_t(s) * k + j] = top[j];
      weights[size_t(s) * k + j] = (norm ? sc[top[j]] / (total + 1e-20f) : sc[top[j]]) * scaling;
    }
  }
  return 0;
}

}  // extern "C"
