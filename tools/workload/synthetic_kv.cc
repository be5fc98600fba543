#include "synthetic_kv.h"

#include <cmath>

namespace kvtier::workload {
uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

namespace {

uint64_t Key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  return Mix64(Mix64(Mix64(seed ^ 0x9e3779b97f4a7c15ull) + a) + (b << 20) + c);
}

}  // namespace

void GaussianFill(uint64_t key, float* out, int n, uint64_t (*mix)(uint64_t)) {
  for (int i = 0; i < n; i += 2) {
    const uint64_t z = mix(key + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(i + 1));
    const double u1 = (static_cast<double>(z >> 40) + 0.5) * (1.0 / 16777216.0);
    const double u2 = (static_cast<double>(z & 0xffffff) + 0.5) * (1.0 / 16777216.0);
    const double r = std::sqrt(-2.0 * std::log(u1));
    out[i] = static_cast<float>(r * std::cos(2.0 * M_PI * u2));
    if (i + 1 < n) out[i + 1] = static_cast<float>(r * std::sin(2.0 * M_PI * u2));
  }
}

SyntheticKv::SyntheticKv(const ModelShape& shape, const SyntheticKvOptions& options) : shape_(shape), o_(options) {
  const int d = shape.head_dim;
  bases_.resize(static_cast<size_t>(shape.layers) * shape.kv_heads);
  for (int l = 0; l < shape.layers; ++l) {
    for (int h = 0; h < shape.kv_heads; ++h) {
      HeadBasis& b = bases_[static_cast<size_t>(l) * shape.kv_heads + h];
      auto fill = [&](std::vector<float>& v, int count, uint64_t tag, float scale) {
        v.resize(static_cast<size_t>(count) * d);
        for (int t = 0; t < count; ++t) GaussianFill(Key(o_.seed, l, h, tag * 1000 + t), v.data() + t * d, d);
        for (float& x : v) x *= scale;
      };
      fill(b.c, 1, 1, o_.offset);
      fill(b.c_v, 1, 2, o_.offset);
      fill(b.w, 1, 3, 1.0f);
      fill(b.w_sink, 1, 4, 1.0f);
      fill(b.u, o_.topics, 5, 1.0f);
      fill(b.u_v, o_.topics, 6, 1.0f);
    }
  }
}

bool SyntheticKv::IsHeavyHitter(int64_t pos) const {
  return pos >= o_.sink_tokens && Mix64(o_.seed * 31 + static_cast<uint64_t>(pos)) % o_.heavy_every == 0;
}

int SyntheticKv::Topic(int64_t pos) const {
  return static_cast<int>(Mix64(o_.seed * 7 + static_cast<uint64_t>(pos / o_.topic_tokens)) % o_.topics);
}

void SyntheticKv::KeysValues(int layer, int64_t first, int64_t n, float* k, float* v) const {
  const int d = shape_.head_dim;
  const int H = shape_.kv_heads;
  std::vector<float> g(d);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = first + i;
    const int topic = Topic(p);
    for (int h = 0; h < H; ++h) {
      const HeadBasis& b = Basis(layer, h);
      float* kp = k + (i * H + h) * d;
      float* vp = v + (i * H + h) * d;
      GaussianFill(Key(o_.seed, layer, h, 1000000 + 2 * static_cast<uint64_t>(p)), g.data(), d);
      const float* dir = b.u.data() + topic * d;
      float weight = o_.topic_weight;
      if (p < o_.sink_tokens) {
        dir = b.w_sink.data();
        weight = o_.sink_weight;
      } else if (IsHeavyHitter(p)) {
        dir = b.w.data();
        weight = o_.heavy_weight;
      }
      for (int j = 0; j < d; ++j) kp[j] = b.c[j] + weight * dir[j] + o_.noise * g[j];
      GaussianFill(Key(o_.seed, layer, h, 1000001 + 2 * static_cast<uint64_t>(p)), g.data(), d);
      for (int j = 0; j < d; ++j) vp[j] = b.c_v[j] + o_.topic_weight * b.u_v[topic * d + j] + g[j];
    }
  }
}

void SyntheticKv::Query(int layer, int64_t pos, float* q) const {
  const int d = shape_.head_dim;
  const int G = shape_.group();
  const int topic = Topic(pos);
  std::vector<float> g(d);
  for (int qh = 0; qh < shape_.q_heads; ++qh) {
    const HeadBasis& b = Basis(layer, qh / G);
    GaussianFill(Key(o_.seed, layer, qh, 5000000000ull + static_cast<uint64_t>(pos)), g.data(), d);
    float* out = q + static_cast<int64_t>(qh) * d;
    for (int j = 0; j < d; ++j) {
      out[j] = o_.query_sink * b.w_sink[j] + o_.query_heavy * b.w[j] + o_.query_topic * b.u[topic * d + j] +
               o_.query_noise * g[j];
    }
  }
}

}  // namespace kvtier::workload
