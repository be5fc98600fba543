// Shared helpers of the kvtier tests: random tensors, a shadow copy of every
// appended token for reference attention, and status matchers.
#ifndef KVTIER_TESTS_TEST_UTIL_H_
#define KVTIER_TESTS_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kvtier/kernels/kernel_set.h"
#include "kvtier/runtime.h"
#include "workload/reference.h"
#include "workload/tensor.h"

namespace kvtier::testing {

#define KVTIER_ASSERT_OK(expr)                             \
  do {                                                     \
    const absl::Status _st = (expr);                       \
    ASSERT_TRUE(_st.ok()) << #expr << ": " << _st.ToString(); \
  } while (0)

#define KVTIER_EXPECT_OK(expr)                             \
  do {                                                     \
    const absl::Status _st = (expr);                       \
    EXPECT_TRUE(_st.ok()) << #expr << ": " << _st.ToString(); \
  } while (0)

// Inserts (sign +1) or removes (sign -1) fp32 tokens ([n][head_dim] keys and
// values, ids) into sketch s with kernel set ks; centroid buckets ([n][rows])
// are written to `buckets` on insert and read from it on remove.
inline void UpdateSketchF32(kernels::KernelSet& ks, const kernels::SketchState& s, float sign,
                            const std::vector<float>& k, const std::vector<float>& v,
                            const std::vector<uint32_t>& ids, std::vector<uint32_t>* buckets) {
  kernels::SketchUpdateParams p;
  p.sketch = s;
  p.sign = sign;
  p.n = static_cast<int32_t>(ids.size());
  p.ids = ids.data();
  p.keys = k.data();
  p.values = v.data();
  p.stride = s.head_dim;
  p.dtype = DType::kF32;
  if (s.kind == SketchKind::kCentroid) {
    if (sign > 0) buckets->assign(ids.size() * s.rows, 0);
    if (buckets->size() < ids.size() * s.rows) {
      ADD_FAILURE() << "removing " << ids.size() << " centroid tokens needs their buckets, got " << buckets->size();
      return;
    }
    p.buckets = buckets->data();
  }
  ks.SketchUpdate({&p, 1});
}

inline std::vector<float> RandomNormal(int64_t n, uint64_t seed, float scale = 1.0f, float offset = 0.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = offset + scale * dist(rng);
  return v;
}

// Keeps every appended token (rounded to the dtype) to compute exact
// attention over all of them.
class Shadow {
 public:
  explicit Shadow(const ModelShape& shape) : shape_(shape), keys_(shape.layers), values_(shape.layers) {}

  const ModelShape& shape() const { return shape_; }
  int64_t length(int layer) const {
    return static_cast<int64_t>(keys_[layer].size()) / (shape_.kv_heads * shape_.head_dim);
  }

  // Rounds k, v ([n][kv_heads][head_dim] fp32) to the dtype, appends them to
  // the runtime and to the shadow.
  absl::Status Append(Runtime& rt, SequenceId seq, int layer, const std::vector<float>& k,
                      const std::vector<float>& v, int64_t n, const AppendOptions& opts = {}) {
    workload::Tensor kt(shape_.dtype, 0), vt(shape_.dtype, 0);
    kt.Assign(k.data(), n * shape_.kv_heads * shape_.head_dim);
    vt.Assign(v.data(), n * shape_.kv_heads * shape_.head_dim);
    absl::Status st = rt.Append(seq, layer, kt.data(), vt.data(), n, opts);
    if (st.ok()) {
      const std::vector<float> kr = kt.ToFloat(), vr = vt.ToFloat();
      keys_[layer].insert(keys_[layer].end(), kr.begin(), kr.end());
      values_[layer].insert(values_[layer].end(), vr.begin(), vr.end());
    }
    return st;
  }

  // Exact attention of every query head ([q_heads][head_dim], already rounded)
  // over all tokens of the layer, in double precision.
  std::vector<double> Attention(int layer, const std::vector<float>& q) const {
    const int d = shape_.head_dim, H = shape_.kv_heads, G = shape_.group();
    std::vector<double> out(static_cast<size_t>(shape_.q_heads) * d);
    for (int qh = 0; qh < shape_.q_heads; ++qh) {
      const int h = qh / G;
      workload::ExactAttention(q.data() + qh * d, keys_[layer].data() + h * d, values_[layer].data() + h * d,
                               length(layer), d, static_cast<int64_t>(H) * d, 1.0 / std::sqrt(double(d)), nullptr,
                               out.data() + qh * d);
    }
    return out;
  }

  const float* Key(int layer, int64_t pos, int kv_head) const {
    return keys_[layer].data() + (pos * shape_.kv_heads + kv_head) * shape_.head_dim;
  }
  const float* Value(int layer, int64_t pos, int kv_head) const {
    return values_[layer].data() + (pos * shape_.kv_heads + kv_head) * shape_.head_dim;
  }

 private:
  ModelShape shape_;
  std::vector<std::vector<float>> keys_, values_;
};

// Rounds q to the dtype; returns the tensor and its rounded fp32 values.
inline std::pair<workload::Tensor, std::vector<float>> RoundedQuery(DType dtype, const std::vector<float>& q) {
  workload::Tensor t(dtype, 0);
  t.Assign(q.data(), static_cast<int64_t>(q.size()));
  return {t, t.ToFloat()};
}

// Largest per-query-head relative error ||out - ref|| / ||ref||.
inline double MaxHeadError(const std::vector<float>& out, const std::vector<double>& ref, int q_heads, int d) {
  double worst = 0;
  for (int qh = 0; qh < q_heads; ++qh) {
    worst = std::max(worst, workload::RelativeError(out.data() + qh * d, ref.data() + qh * d, d));
  }
  return worst;
}

}  // namespace kvtier::testing

#endif  // KVTIER_TESTS_TEST_UTIL_H_
