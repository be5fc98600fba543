// Seeded synthetic K/V/Q with the structure attention shows in real models:
// attention sinks, a few persistent heavy hitters, topic shifts, and a common
// offset shared by all keys. Every value is a pure function of (seed, layer,
// KV head, position), so any token can be generated alone, in any order.
//
// Per (layer, KV head), with g a fresh N(0, I) vector per use:
//   key(p)   = c + topic_weight * u[topic(p)] + noise * g        (ordinary token)
//            = c + sink_weight * w_sink + noise * g              (p < sink_tokens)
//            = c + heavy_weight * w + noise * g                  (heavy hitter: hash(p) % heavy_every == 0)
//   value(p) = c_v + topic_weight * u_v[topic(p)] + g
//   query(p) = query_sink * w_sink + query_heavy * w + query_topic * u[topic(p)] + query_noise * g
// where topic(p) changes every topic_tokens tokens. Thread-safe (no state).
#ifndef KVTIER_TOOLS_WORKLOAD_SYNTHETIC_KV_H_
#define KVTIER_TOOLS_WORKLOAD_SYNTHETIC_KV_H_

#include <cstdint>
#include <vector>

#include "kvtier/model_shape.h"

namespace kvtier::workload {

struct SyntheticKvOptions {
  uint64_t seed = 1;
  int topics = 16;
  int topic_tokens = 256;
  int sink_tokens = 4;
  int heavy_every = 64;
  float offset = 1.0f;        // scale of the common key offset c
  float topic_weight = 0.8f;
  float sink_weight = 1.5f;
  float heavy_weight = 1.0f;
  float noise = 0.6f;
  float query_sink = 0.5f;
  float query_heavy = 0.7f;
  float query_topic = 0.7f;
  float query_noise = 0.5f;
};

class SyntheticKv {
 public:
  SyntheticKv(const ModelShape& shape, const SyntheticKvOptions& options);

  const ModelShape& shape() const { return shape_; }
  bool IsHeavyHitter(int64_t pos) const;
  int Topic(int64_t pos) const;

  // k, v: [n][kv_heads][head_dim] fp32 for positions [first, first + n).
  void KeysValues(int layer, int64_t first, int64_t n, float* k, float* v) const;
  // q: [q_heads][head_dim] fp32, the query of the token at `pos`.
  void Query(int layer, int64_t pos, float* q) const;

 private:
  // Fixed directions of one (layer, KV head).
  struct HeadBasis {
    std::vector<float> c, c_v, w, w_sink;  // [d]
    std::vector<float> u, u_v;              // [topics][d]
  };
  const HeadBasis& Basis(int layer, int kv_head) const {
    return bases_[static_cast<size_t>(layer) * shape_.kv_heads + kv_head];
  }

  ModelShape shape_;
  SyntheticKvOptions o_;
  std::vector<HeadBasis> bases_;
};

// The 64-bit mixing function (SplitMix64's finalizer) of the synthetic workload.
uint64_t Mix64(uint64_t z);

// Fills out with N(0, 1) values that depend only on (key, index): Box-Muller
// over mix(key + golden ratio x (index + 1)); mix defaults to Mix64.
void GaussianFill(uint64_t key, float* out, int n, uint64_t (*mix)(uint64_t) = Mix64);

}  // namespace kvtier::workload

#endif  // KVTIER_TOOLS_WORKLOAD_SYNTHETIC_KV_H_
