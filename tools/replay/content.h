// The seeded content model of kvtier-replay: K/V/Q for --content full and
// attention scores for both content levels, from the same structure.
//
// A sequence is a run of prompt blocks (kTraceBlockTokens / token_scale
// tokens each) followed by generated tokens. Every block has a content key:
// its trace hash_id when the trace has one (so requests sharing a prefix
// block get the same K/V), else a key derived from the request. Per token
// (position p, block key b, offset i in the block), per KV head:
//   class:  sink    p < sink_tokens
//           heavy   mix(b, i) % heavy_every == 0   (persistent heavy hitters)
//           topic   topic(b) = mix(b) % topics    (topics shift at block boundaries)
//   key   = c + weight(class) * dir(class) + noise * g
//   value = c_v + topic_weight * u_v[topic] + g'
//   query = query_sink * w_sink + query_heavy * w + query_topic * u[topic(last token)] + query_noise * g''
// The directions are N(0, I) per KV head; g, g' are drawn from a pool of
// `variants` precomputed rows per class (index mix(b, i, head) % variants),
// so generating a token is a copy of two rows already in the model dtype.
// The same directions serve every layer. Scores (the initial accumulated
// attention of prompt tokens) are the model's expected softmax share:
// sink 1.0, heavy 0.25, tokens of the last block's topic 0.02, others 0.002.
#ifndef KVTIER_TOOLS_REPLAY_CONTENT_H_
#define KVTIER_TOOLS_REPLAY_CONTENT_H_

#include <cstdint>
#include <span>
#include <vector>

#include "kvtier/model_shape.h"

namespace kvtier::replay {

struct ContentOptions {
  uint64_t seed = 1;
  int block_tokens = 512;  // tokens per content block (512 / token_scale)
  int topics = 16;
  int sink_tokens = 4;
  int heavy_every = 64;
  int variants = 64;
  float offset = 1.0f, topic_weight = 0.8f, sink_weight = 1.5f, heavy_weight = 1.0f, noise = 0.6f;
  float query_sink = 0.5f, query_heavy = 0.7f, query_topic = 0.7f, query_noise = 0.5f;
};

class ContentModel {
 public:
  enum Class : uint8_t { kSink = 0, kHeavy = 1, kTopic = 2 };

  ContentModel(const ModelShape& shape, const ContentOptions& options);

  const ContentOptions& options() const { return o_; }
  // Block key of prompt block `block` of a request: its hash id if known, else
  // derived from (request, block). Generated tokens use block keys derived
  // from the request too.
  uint64_t BlockKey(uint64_t request_key, int64_t block, std::span<const int64_t> hash_ids) const;

  // K and V rows ([n][kv_heads][head_dim], model dtype) of positions
  // [first, first + n) whose block keys are keys[(p) / block_tokens].
  void KeysValues(std::span<const uint64_t> keys, int64_t first, int64_t n, void* k, void* v) const;
  // Query ([q_heads][head_dim], model dtype) of the token at `pos`.
  void Query(std::span<const uint64_t> keys, int64_t pos, void* q) const;
  // Initial scores ([n][kv_heads]) of positions [first, first + n) seen from
  // the query at `last` (the prompt's last token).
  void Scores(std::span<const uint64_t> keys, int64_t first, int64_t n, int64_t last, float* out) const;

 private:
  Class ClassOf(uint64_t key, int64_t pos) const;
  int TopicOf(uint64_t key) const;

  ModelShape shape_;
  ContentOptions o_;
  int64_t row_bytes_;
  // [kv_head][class][variant] rows in the model dtype; topic classes follow
  // kTopic + topic.
  std::vector<char> k_rows_, v_rows_;
  std::vector<char> q_rows_;  // [q_head][topic][variant]
  int classes_;
};

uint64_t Mix64(uint64_t z);

}  // namespace kvtier::replay

#endif  // KVTIER_TOOLS_REPLAY_CONTENT_H_
