#include "replay/content.h"

#include <cmath>
#include <cstring>

#include "kvtier/kernels/convert.h"
#include "workload/synthetic_kv.h"

namespace kvtier::replay {
namespace {

uint64_t Key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  return Mix64(Mix64(Mix64(seed ^ 0x9e3779b97f4a7c15ull) + a) + (b << 20) + c);
}

// The content model's normal draws: the workload's Box-Muller over Mix64 below
// (SplitMix64 with its increment, unlike the workload's finalizer-only mix).
void Gaussian(uint64_t key, float* out, int n) { workload::GaussianFill(key, out, n, Mix64); }

void Store(DType dtype, const float* x, int n, char* out) {
  for (int i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::kF32: std::memcpy(out + 4 * i, &x[i], 4); break;
      case DType::kF16: {
        const uint16_t h = kernels::FloatToHalf(x[i]);
        std::memcpy(out + 2 * i, &h, 2);
        break;
      }
      case DType::kBF16: {
        const uint16_t h = kernels::FloatToBf16(x[i]);
        std::memcpy(out + 2 * i, &h, 2);
        break;
      }
    }
  }
}

}  // namespace

uint64_t Mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

ContentModel::ContentModel(const ModelShape& shape, const ContentOptions& options)
    : shape_(shape), o_(options), row_bytes_(shape.head_dim * static_cast<int64_t>(DTypeSize(shape.dtype))) {
  const int d = shape.head_dim, H = shape.kv_heads, V = o_.variants, T = o_.topics;
  classes_ = kTopic + T;
  k_rows_.resize(static_cast<size_t>(H) * classes_ * V * row_bytes_);
  v_rows_.resize(k_rows_.size());
  q_rows_.resize(static_cast<size_t>(shape.q_heads) * T * V * row_bytes_);
  std::vector<float> c(d), cv(d), w(d), ws(d), u(static_cast<size_t>(T) * d), uv(u.size()), g(d), row(d);
  for (int h = 0; h < H; ++h) {
    Gaussian(Key(o_.seed, h, 1, 0), c.data(), d);
    Gaussian(Key(o_.seed, h, 2, 0), cv.data(), d);
    Gaussian(Key(o_.seed, h, 3, 0), w.data(), d);
    Gaussian(Key(o_.seed, h, 4, 0), ws.data(), d);
    for (int t = 0; t < T; ++t) {
      Gaussian(Key(o_.seed, h, 5, t), u.data() + t * d, d);
      Gaussian(Key(o_.seed, h, 6, t), uv.data() + t * d, d);
    }
    for (int cl = 0; cl < classes_; ++cl) {
      const int topic = cl >= kTopic ? cl - kTopic : (cl == kSink ? 0 : 1);
      const float* dir = cl == kSink ? ws.data() : cl == kHeavy ? w.data() : u.data() + topic * d;
      const float weight = cl == kSink ? o_.sink_weight : cl == kHeavy ? o_.heavy_weight : o_.topic_weight;
      for (int var = 0; var < V; ++var) {
        const size_t at = ((static_cast<size_t>(h) * classes_ + cl) * V + var) * row_bytes_;
        Gaussian(Key(o_.seed, h, 7, cl * 4096 + var), g.data(), d);
        for (int j = 0; j < d; ++j) row[j] = o_.offset * c[j] + weight * dir[j] + o_.noise * g[j];
        Store(shape.dtype, row.data(), d, k_rows_.data() + at);
        Gaussian(Key(o_.seed, h, 8, cl * 4096 + var), g.data(), d);
        for (int j = 0; j < d; ++j) row[j] = o_.offset * cv[j] + o_.topic_weight * uv[topic * d + j] + g[j];
        Store(shape.dtype, row.data(), d, v_rows_.data() + at);
      }
    }
    for (int qh = h * shape.group(); qh < (h + 1) * shape.group(); ++qh) {
      for (int t = 0; t < T; ++t) {
        for (int var = 0; var < V; ++var) {
          Gaussian(Key(o_.seed, qh, 9, t * 4096 + var), g.data(), d);
          for (int j = 0; j < d; ++j) {
            row[j] = o_.query_sink * ws[j] + o_.query_heavy * w[j] + o_.query_topic * u[t * d + j] +
                     o_.query_noise * g[j];
          }
          Store(shape.dtype, row.data(), d,
                q_rows_.data() + ((static_cast<size_t>(qh) * T + t) * V + var) * row_bytes_);
        }
      }
    }
  }
}

uint64_t ContentModel::BlockKey(uint64_t request_key, int64_t block, std::span<const int64_t> hash_ids) const {
  if (block < static_cast<int64_t>(hash_ids.size())) return Mix64(static_cast<uint64_t>(hash_ids[block]) ^ o_.seed);
  return Mix64(Mix64(request_key ^ (o_.seed << 1)) + static_cast<uint64_t>(block) + 0x51ed27ull);
}

int ContentModel::TopicOf(uint64_t key) const { return static_cast<int>(Mix64(key ^ 0x70b1c) % o_.topics); }

ContentModel::Class ContentModel::ClassOf(uint64_t key, int64_t pos) const {
  if (pos < o_.sink_tokens) return kSink;
  if (Mix64(key + static_cast<uint64_t>(pos % o_.block_tokens) * 0x2545f4914f6cdd1dull) % o_.heavy_every == 0)
    return kHeavy;
  return kTopic;
}

void ContentModel::KeysValues(std::span<const uint64_t> keys, int64_t first, int64_t n, void* k, void* v) const {
  const int H = shape_.kv_heads, V = o_.variants;
  char* kp = static_cast<char*>(k);
  char* vp = static_cast<char*>(v);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = first + i;
    const uint64_t key = keys[p / o_.block_tokens];
    const Class cl = ClassOf(key, p);
    const int cls = cl == kTopic ? kTopic + TopicOf(key) : cl;
    const uint64_t mix = Mix64(key * 31 + static_cast<uint64_t>(p % o_.block_tokens));
    for (int h = 0; h < H; ++h) {
      const int var = static_cast<int>((mix >> (h % 8 * 8)) % V);
      const size_t at = ((static_cast<size_t>(h) * classes_ + cls) * V + var) * row_bytes_;
      std::memcpy(kp + (i * H + h) * row_bytes_, k_rows_.data() + at, row_bytes_);
      std::memcpy(vp + (i * H + h) * row_bytes_, v_rows_.data() + at, row_bytes_);
    }
  }
}

void ContentModel::Query(std::span<const uint64_t> keys, int64_t pos, void* q) const {
  const int T = o_.topics, V = o_.variants;
  const int topic = TopicOf(keys[pos / o_.block_tokens]);
  const uint64_t mix = Mix64(o_.seed * 131 + static_cast<uint64_t>(pos));
  char* out = static_cast<char*>(q);
  for (int qh = 0; qh < shape_.q_heads; ++qh) {
    const int var = static_cast<int>(Mix64(mix + qh) % V);
    std::memcpy(out + qh * row_bytes_, q_rows_.data() + ((static_cast<size_t>(qh) * T + topic) * V + var) * row_bytes_,
                row_bytes_);
  }
}

void ContentModel::Scores(std::span<const uint64_t> keys, int64_t first, int64_t n, int64_t last, float* out) const {
  const int H = shape_.kv_heads;
  const int last_topic = TopicOf(keys[last / o_.block_tokens]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = first + i;
    const uint64_t key = keys[p / o_.block_tokens];
    const Class cl = ClassOf(key, p);
    const float s = cl == kSink ? 1.0f : cl == kHeavy ? 0.25f : TopicOf(key) == last_topic ? 0.02f : 0.002f;
    for (int h = 0; h < H; ++h) out[i * H + h] = s;
  }
}

}  // namespace kvtier::replay
