// CPU sketch kernels: insert/remove, per-token reconstruction, recall scores.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.h"
#include "cpu_math.h"
#include "kvtier/kernels/hash.h"

namespace kvtier::kernels::cpu {
namespace {

int Bits(int width) { return __builtin_ctz(static_cast<unsigned>(width)); }

void ZeroBucket(const SketchState& s, int64_t bb) {
  std::memset(s.key_sums + bb * s.head_dim, 0, sizeof(float) * s.head_dim);
  std::memset(s.value_sums + bb * s.head_dim, 0, sizeof(float) * s.head_dim);
  s.counts[2 * bb] = 0.0f;
  s.counts[2 * bb + 1] = 0.0f;
}

// Adds sign*(k, v) to the running totals; clears them exactly when empty.
void UpdateTotals(const SketchState& s, float sign, const float* k, const float* v) {
  const int d = s.head_dim;
  Axpy(sign, k, s.totals, d);
  Axpy(sign, v, s.totals + d, d);
  s.totals[2 * d] += sign;
  if (s.totals[2 * d] <= 0.5f) std::memset(s.totals, 0, sizeof(float) * (2 * d + 2));
}

void LoadToken(const SketchUpdateParams& p, int i, float* k, float* v) {
  const int d = p.sketch.head_dim;
  const int64_t row = p.rows_index ? p.rows_index[i] : i;
  LoadF32(RowPtr(p.keys, p.dtype, row, p.stride), p.dtype, d, k);
  LoadF32(RowPtr(p.values, p.dtype, row, p.stride), p.dtype, d, v);
}

void CountSketchUpdate(const SketchUpdateParams& p, float* ws) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  float* k = ws;
  float* v = ws + d;
  uint32_t row_seed[kMaxSketchRows];
  for (int r = 0; r < s.rows; ++r) row_seed[r] = RowSeed(s.seed, r);
  for (int i = 0; i < p.n; ++i) {
    LoadToken(p, i, k, v);
    UpdateTotals(s, p.sign, k, v);
    for (int r = 0; r < s.rows; ++r) {
      const uint32_t h = TokenHash(row_seed[r], p.ids[i]);
      const float sg = Sign(h);
      const int64_t bb = static_cast<int64_t>(r) * s.width + Bucket(h, s.width);
      Axpy(p.sign * sg, k, s.key_sums + bb * d, d);
      Axpy(p.sign * sg, v, s.value_sums + bb * d, d);
      s.counts[2 * bb + (sg < 0 ? 1 : 0)] += p.sign;
      if (s.counts[2 * bb] + s.counts[2 * bb + 1] <= 0.5f) ZeroBucket(s, bb);
    }
  }
}

void CentroidUpdate(const SketchUpdateParams& p, float* ws) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  const int bits = Bits(s.width);
  float* k = ws;
  float* v = ws + d;
  float* x = ws + 2 * d;
  if (p.sign > 0) {
    // The batch joins the mean first, so its keys hash around a mean that
    // includes them (a prefill chunk centres on itself).
    for (int i = 0; i < p.n; ++i) {
      LoadToken(p, i, k, v);
      UpdateTotals(s, 1.0f, k, v);
    }
  }
  const float inv_n = s.totals[2 * d] > 0.5f ? 1.0f / s.totals[2 * d] : 0.0f;
  for (int i = 0; i < p.n; ++i) {
    LoadToken(p, i, k, v);
    if (p.sign > 0) {
      for (int j = 0; j < d; ++j) x[j] = k[j] - s.totals[j] * inv_n;
    } else {
      UpdateTotals(s, -1.0f, k, v);
    }
    for (int r = 0; r < s.rows; ++r) {
      uint32_t b;
      if (p.sign > 0) {
        b = SimHash(x, s.planes + static_cast<int64_t>(r) * bits * d, bits, d);
        p.buckets[static_cast<int64_t>(i) * s.rows + r] = b;
      } else {
        b = p.buckets[static_cast<int64_t>(i) * s.rows + r];
      }
      const int64_t bb = static_cast<int64_t>(r) * s.width + b;
      Axpy(p.sign, k, s.key_sums + bb * d, d);
      Axpy(p.sign, v, s.value_sums + bb * d, d);
      s.counts[2 * bb] += p.sign;
      if (s.counts[2 * bb] <= 0.5f) ZeroBucket(s, bb);
    }
  }
}

}  // namespace

float SketchMeans(const SketchState& s, float* mu_k, float* mu_v) {
  const int d = s.head_dim;
  const float n = s.totals[2 * d];
  const float inv = n > 0.5f ? 1.0f / n : 0.0f;
  for (int j = 0; j < d; ++j) {
    mu_k[j] = s.totals[j] * inv;
    mu_v[j] = s.totals[d + j] * inv;
  }
  return n > 0.5f ? n : 0.0f;
}

float SketchAlpha(const SketchState& s, VaguePolicy policy, float n) {
  if (s.kind != SketchKind::kCountSketch || policy != VaguePolicy::kShrink) return 1.0f;
  const float cells = static_cast<float>(s.rows) * static_cast<float>(s.width);
  return cells / (cells + std::max(n - 1.0f, 0.0f));
}

int64_t SketchWorkspaceFloats(const SketchState& s, int group) {
  const int64_t buckets = static_cast<int64_t>(s.rows) * s.width;
  return group * (s.head_dim + buckets + 1) + 4LL * s.head_dim + 16;
}

void SketchUpdateOne(const SketchUpdateParams& p, float* ws) {
  if (p.n <= 0) return;
  if (p.sketch.kind == SketchKind::kCountSketch) CountSketchUpdate(p, ws);
  if (p.sketch.kind == SketchKind::kCentroid) CentroidUpdate(p, ws);
}

void SketchEstimateAll(const SketchEstimateParams& p, float* ws) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  float* mu_k = ws;
  float* mu_v = ws + d;
  const float n = SketchMeans(s, mu_k, mu_v);
  const float alpha = SketchAlpha(s, p.policy, n);
  for (int i = 0; i < p.n; ++i) {
    float* k = p.keys + static_cast<int64_t>(i) * d;
    float* v = p.values + static_cast<int64_t>(i) * d;
    std::memset(k, 0, sizeof(float) * d);
    std::memset(v, 0, sizeof(float) * d);
    for (int r = 0; r < s.rows; ++r) {
      if (s.kind == SketchKind::kCountSketch) {
        const uint32_t h = TokenHash(RowSeed(s.seed, r), p.ids[i]);
        const float sg = Sign(h);
        const int64_t bb = static_cast<int64_t>(r) * s.width + Bucket(h, s.width);
        const float sigma = s.counts[2 * bb] - s.counts[2 * bb + 1];
        const float c = alpha * sg / s.rows;
        for (int j = 0; j < d; ++j) {
          k[j] += c * (s.key_sums[bb * d + j] - sigma * mu_k[j]);
          v[j] += c * (s.value_sums[bb * d + j] - sigma * mu_v[j]);
        }
      } else {
        const int64_t bb = static_cast<int64_t>(r) * s.width + p.buckets[static_cast<int64_t>(i) * s.rows + r];
        const float cnt = s.counts[2 * bb];
        const float c = cnt > 0.5f ? 1.0f / (cnt * s.rows) : 0.0f;
        Axpy(c, s.key_sums + bb * d, k, d);
        Axpy(c, s.value_sums + bb * d, v, d);
      }
    }
    if (s.kind == SketchKind::kCountSketch) {
      Axpy(1.0f, mu_k, k, d);
      Axpy(1.0f, mu_v, v, d);
    }
  }
}

void SketchScoresAll(const SketchScoreParams& p, float* ws) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  const int g_count = p.group;
  const int64_t buckets = static_cast<int64_t>(s.rows) * s.width;
  float* qf = ws;                      // [group][d]
  float* proj = qf + g_count * d;      // [group][buckets]
  float* qmu = proj + g_count * buckets;  // [group]
  float* mu_k = qmu + g_count;
  float* mu_v = mu_k + d;
  const float n = SketchMeans(s, mu_k, mu_v);
  const float alpha = SketchAlpha(s, p.policy, n);
  for (int g = 0; g < g_count; ++g) {
    LoadF32(RowPtr(p.q, p.dtype, g, d), p.dtype, d, qf + g * d);
    for (int j = 0; j < d; ++j) qf[g * d + j] *= p.scale;
    qmu[g] = Dot(qf + g * d, mu_k, d);
  }
  // Per bucket: Count-Sketch q . centred bucket; centroid q . centroid.
  for (int64_t bb = 0; bb < buckets; ++bb) {
    const float* ks = s.key_sums + bb * d;
    const float c0 = s.counts[2 * bb], c1 = s.counts[2 * bb + 1];
    for (int g = 0; g < g_count; ++g) {
      const float dot = Dot(qf + g * d, ks, d);
      proj[g * buckets + bb] = s.kind == SketchKind::kCountSketch ? dot - (c0 - c1) * qmu[g]
                                                                  : (c0 > 0.5f ? dot / c0 : 0.0f);
    }
  }
  uint32_t row_seed[kMaxSketchRows];
  for (int r = 0; r < s.rows; ++r) row_seed[r] = RowSeed(s.seed, r);
  const float coef = alpha / s.rows;
  for (int i = 0; i < p.n; ++i) {
    float best = -INFINITY;
    for (int g = 0; g < g_count; ++g) {
      float acc = 0.0f;
      for (int r = 0; r < s.rows; ++r) {
        if (s.kind == SketchKind::kCountSketch) {
          const uint32_t h = TokenHash(row_seed[r], p.ids[i]);
          acc += Sign(h) * proj[g * buckets + static_cast<int64_t>(r) * s.width + Bucket(h, s.width)];
        } else {
          acc += proj[g * buckets + static_cast<int64_t>(r) * s.width + p.buckets[static_cast<int64_t>(i) * s.rows + r]];
        }
      }
      const float logit = s.kind == SketchKind::kCountSketch ? qmu[g] + coef * acc : acc / s.rows;
      best = std::max(best, logit);
    }
    p.scores[i] = best;
  }
}

}  // namespace kvtier::kernels::cpu
