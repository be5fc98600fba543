// CPU decode attention over resident slots plus the sketch of the vague tokens,
// in one softmax.
//
// Count-Sketch (DESIGN.md section 1): project the scaled query onto every
// bucket once; a vague token's logit is then q.mu + alpha/rows * sum_r s_r(t) *
// proj[r][h_r(t)], and the value side aggregates probabilities per bucket.
// With one row, tokens of equal (bucket, sign) share a logit, so attention runs
// per bucket and sign: O(width * head_dim), independent of the token count.
// Centroid: each non-empty bucket is a pseudo-token with logit
// q.centroid + log(count/rows) and value the bucket's mean value.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.h"
#include "cpu_math.h"
#include "kvtier/kernels/hash.h"

namespace kvtier::kernels::cpu {
namespace {

int64_t ResidentCount(const AttendParams& p) {
  int64_t n = 0;
  for (int i = 0; i < p.num_ranges; ++i) n += p.ranges[i].count;
  return n;
}

int64_t SketchBuckets(const AttendParams& p) {
  return p.sketch.kind == SketchKind::kNone ? 0 : static_cast<int64_t>(p.sketch.rows) * p.sketch.width;
}

// Pointer to slot `slot` of a slot array as fp32: the slot itself for fp32
// storage, else its conversion into `tmp`.
const float* SlotF32(const void* base, DType t, int64_t slot, int d, float* tmp) {
  const void* src = RowPtr(base, t, slot, d);
  if (t == DType::kF32) return static_cast<const float*>(src);
  LoadF32(src, t, d, tmp);
  return tmp;
}

// Everything the sketch side of one head needs, in workspace memory.
struct SketchTerms {
  float n = 0.0f;        // sketched tokens
  float alpha = 1.0f;    // shrinkage of keys and values
  float* mu_k = nullptr;
  float* mu_v = nullptr;
  float* qmu = nullptr;   // [group] q . mu_k
  float* proj = nullptr;  // [group][buckets]
  float* logit = nullptr; // [group][2 * buckets] (count-sketch, one row: per bucket and sign)
  float* agg = nullptr;   // [group][buckets] probability mass per bucket (signed for Count-Sketch)
  float* zsk = nullptr;   // [group]
};

// Count-Sketch, one row: logits per (bucket, sign) class; returns via m the max.
void CountSketchOneRowLogits(const AttendParams& p, const SketchTerms& t, float* m) {
  const SketchState& s = p.sketch;
  const int64_t B = s.width;
  for (int g = 0; g < p.group; ++g) {
    for (int64_t c = 0; c < B; ++c) {
      const float pr = t.alpha * t.proj[g * B + c];
      const float lp = t.qmu[g] + pr, ln = t.qmu[g] - pr;
      t.logit[g * 2 * B + 2 * c] = lp;
      t.logit[g * 2 * B + 2 * c + 1] = ln;
      if (s.counts[2 * c] > 0.5f) m[g] = std::max(m[g], lp);
      if (s.counts[2 * c + 1] > 0.5f) m[g] = std::max(m[g], ln);
    }
  }
}

void CountSketchOneRowMass(const AttendParams& p, const SketchTerms& t, const float* m) {
  const SketchState& s = p.sketch;
  const int64_t B = s.width;
  for (int g = 0; g < p.group; ++g) {
    float z = 0.0f;
    for (int64_t c = 0; c < B; ++c) {
      const float cp = s.counts[2 * c], cn = s.counts[2 * c + 1];
      const float ep = cp > 0.5f ? cp * FastExp(t.logit[g * 2 * B + 2 * c] - m[g]) : 0.0f;
      const float en = cn > 0.5f ? cn * FastExp(t.logit[g * 2 * B + 2 * c + 1] - m[g]) : 0.0f;
      z += ep + en;
      t.agg[g * B + c] = ep - en;
    }
    t.zsk[g] = z;
  }
}

// Count-Sketch, rows >= 2: per-token logits by lookup. With exps == false the
// pass only raises m; with exps == true it accumulates mass and agg.
void CountSketchTokenPass(const AttendParams& p, const SketchTerms& t, float* m, bool exps) {
  const SketchState& s = p.sketch;
  const int64_t B = static_cast<int64_t>(s.rows) * s.width;
  const int G = p.group;
  uint32_t row_seed[kMaxSketchRows];
  int64_t bucket[kMaxSketchRows];
  float sign[kMaxSketchRows];
  for (int r = 0; r < s.rows; ++r) row_seed[r] = RowSeed(s.seed, r);
  const float coef = t.alpha / s.rows;
  for (int32_t i = 0; i < p.num_vague; ++i) {
    for (int r = 0; r < s.rows; ++r) {
      const uint32_t h = TokenHash(row_seed[r], p.vague_ids[i]);
      bucket[r] = static_cast<int64_t>(r) * s.width + Bucket(h, s.width);
      sign[r] = Sign(h);
    }
    for (int g = 0; g < G; ++g) {
      float acc = 0.0f;
      for (int r = 0; r < s.rows; ++r) acc += sign[r] * t.proj[g * B + bucket[r]];
      const float logit = t.qmu[g] + coef * acc;
      if (!exps) {
        m[g] = std::max(m[g], logit);
      } else {
        const float e = FastExp(logit - m[g]);
        t.zsk[g] += e;
        for (int r = 0; r < s.rows; ++r) t.agg[g * B + bucket[r]] += sign[r] * e;
      }
    }
  }
}

// Adds the Count-Sketch value side to acc: sum_t p_t v_hat_t =
// mass * mu_v + c * sum_b agg_b * (V_b - sigma_b * mu_v), c = alpha / rows.
void CountSketchValues(const AttendParams& p, const SketchTerms& t, float* acc) {
  const SketchState& s = p.sketch;
  const int d = p.head_dim;
  const int64_t B = static_cast<int64_t>(s.rows) * s.width;
  const float c = t.alpha / s.rows;
  for (int g = 0; g < p.group; ++g) {
    float* out = acc + g * d;
    float sigma_term = 0.0f;
    for (int64_t b = 0; b < B; ++b) {
      const float a = t.agg[g * B + b];
      if (a == 0.0f) continue;
      sigma_term += a * (s.counts[2 * b] - s.counts[2 * b + 1]);
      Axpy(c * a, s.value_sums + b * d, out, d);
    }
    Axpy(t.zsk[g] - c * sigma_term, t.mu_v, out, d);
  }
}

void CentroidLogits(const AttendParams& p, const float* qf, const SketchTerms& t, float* m) {
  const SketchState& s = p.sketch;
  const int d = p.head_dim;
  const int64_t B = static_cast<int64_t>(s.rows) * s.width;
  const float inv_rows = 1.0f / s.rows;
  for (int64_t b = 0; b < B; ++b) {
    const float cnt = s.counts[2 * b];
    if (cnt < 0.5f) continue;
    const float bias = std::log(cnt * inv_rows);
    const float inv = 1.0f / cnt;
    for (int g = 0; g < p.group; ++g) {
      const float l = Dot(qf + g * d, s.key_sums + b * d, d) * inv + bias;
      t.logit[g * B + b] = l;
      m[g] = std::max(m[g], l);
    }
  }
}

void CentroidMassAndValues(const AttendParams& p, const SketchTerms& t, const float* m, float* acc) {
  const SketchState& s = p.sketch;
  const int d = p.head_dim;
  const int64_t B = static_cast<int64_t>(s.rows) * s.width;
  for (int64_t b = 0; b < B; ++b) {
    const float cnt = s.counts[2 * b];
    if (cnt < 0.5f) continue;
    for (int g = 0; g < p.group; ++g) {
      const float e = FastExp(t.logit[g * B + b] - m[g]);
      t.zsk[g] += e;
      Axpy(e / cnt, s.value_sums + b * d, acc + g * d, d);
    }
  }
}

}  // namespace

int64_t AttendWorkspaceFloats(const AttendParams& p) {
  const int64_t B = SketchBuckets(p);
  return p.group * (3LL * p.head_dim + ResidentCount(p) + 4 * B + 8) + 4LL * p.head_dim + 16;
}

void AttendHead(const AttendParams& p, float* ws) {
  const int d = p.head_dim;
  const int G = p.group;
  const int64_t n_res = ResidentCount(p);
  const int64_t B = SketchBuckets(p);

  float* qf = ws;               // [G][d] scaled query
  float* acc = qf + G * d;      // [G][d] unnormalised output
  float* tmp = acc + G * d;     // [d]
  float* m = tmp + d;           // [G] running max logit
  float* zres = m + G;          // [G]
  float* lres = zres + G;       // [G][n_res] logits, then probabilities
  SketchTerms t;
  t.mu_k = lres + G * n_res;
  t.mu_v = t.mu_k + d;
  t.qmu = t.mu_v + d;
  t.zsk = t.qmu + G;
  t.proj = t.zsk + G;
  t.logit = t.proj + G * B;
  t.agg = t.logit + 2 * G * B;

  for (int g = 0; g < G; ++g) {
    LoadF32(RowPtr(p.q, p.dtype, g, d), p.dtype, d, qf + g * d);
    for (int j = 0; j < d; ++j) qf[g * d + j] *= p.scale;
    m[g] = -INFINITY;
    zres[g] = 0.0f;
    t.zsk[g] = 0.0f;
  }
  std::memset(acc, 0, sizeof(float) * G * d);

  // 1. Exact logits of the resident slots.
  int64_t idx = 0;
  for (int ri = 0; ri < p.num_ranges; ++ri) {
    for (int32_t j = 0; j < p.ranges[ri].count; ++j, ++idx) {
      const float* k = SlotF32(p.k_slots, p.dtype, p.ranges[ri].begin + j, d, tmp);
      for (int g = 0; g < G; ++g) {
        const float l = Dot(qf + g * d, k, d);
        lres[g * n_res + idx] = l;
        m[g] = std::max(m[g], l);
      }
    }
  }

  // 2. Sketch logits (they may raise the max), then 3. their mass and values.
  const SketchState& s = p.sketch;
  bool use_sketch = p.policy != VaguePolicy::kDrop && s.kind != SketchKind::kNone;
  if (use_sketch) {
    t.n = SketchMeans(s, t.mu_k, t.mu_v);
    use_sketch = t.n > 0.0f;
  }
  if (use_sketch) {
    t.alpha = SketchAlpha(s, p.policy, t.n);
    if (s.kind == SketchKind::kCountSketch) {
      for (int g = 0; g < G; ++g) t.qmu[g] = Dot(qf + g * d, t.mu_k, d);
      for (int64_t b = 0; b < B; ++b) {
        const float sigma = s.counts[2 * b] - s.counts[2 * b + 1];
        for (int g = 0; g < G; ++g) t.proj[g * B + b] = Dot(qf + g * d, s.key_sums + b * d, d) - sigma * t.qmu[g];
      }
      if (s.rows == 1) {
        CountSketchOneRowLogits(p, t, m);
        CountSketchOneRowMass(p, t, m);
      } else {
        std::memset(t.agg, 0, sizeof(float) * G * B);
        CountSketchTokenPass(p, t, m, /*exps=*/false);
        CountSketchTokenPass(p, t, m, /*exps=*/true);
      }
      CountSketchValues(p, t, acc);
    } else {
      CentroidLogits(p, qf, t, m);
      CentroidMassAndValues(p, t, m, acc);
    }
  }

  // 4. Resident probabilities and values.
  for (int g = 0; g < G; ++g) {
    float* l = lres + g * n_res;
    const float mg = m[g];
    float z = 0.0f;
#pragma omp simd reduction(+ : z)
    for (int64_t i = 0; i < n_res; ++i) {
      const float e = FastExp(l[i] - mg);
      l[i] = e;
      z += e;
    }
    zres[g] = z;
  }
  idx = 0;
  for (int ri = 0; ri < p.num_ranges; ++ri) {
    for (int32_t j = 0; j < p.ranges[ri].count; ++j, ++idx) {
      const float* v = SlotF32(p.v_slots, p.dtype, p.ranges[ri].begin + j, d, tmp);
      for (int g = 0; g < G; ++g) Axpy(lres[g * n_res + idx], v, acc + g * d, d);
    }
  }

  // 5. Normalise and store.
  for (int g = 0; g < G; ++g) {
    const float z = zres[g] + t.zsk[g];
    const float inv = z > 0.0f ? 1.0f / z : 0.0f;
    zres[g] = inv;  // reused: 1/Z per query head
    for (int j = 0; j < d; ++j) acc[g * d + j] *= inv;
    StoreF32(acc + g * d, p.out_dtype,
             d, static_cast<char*>(p.out) + static_cast<int64_t>(g) * d * DTypeSize(p.out_dtype));
  }
  if (p.slot_probs != nullptr) {
    idx = 0;
    for (int ri = 0; ri < p.num_ranges; ++ri) {
      for (int32_t j = 0; j < p.ranges[ri].count; ++j, ++idx) {
        float sum = 0.0f;
        for (int g = 0; g < G; ++g) sum += lres[g * n_res + idx] * zres[g];
        p.slot_probs[p.ranges[ri].begin + j] = sum;
      }
    }
  }
}

}  // namespace kvtier::kernels::cpu
