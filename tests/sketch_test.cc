// The sketch kernels against the math they implement: Count-Sketch error
// within the bound its hashing gives, centring, the fast attention paths
// against attention over per-token reconstructions, and the centroid sketch's
// bucket means, pseudo-token attention and SimHash locality.
#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>

#include "gtest/gtest.h"
#include "kvtier/kernels/hash.h"
#include "kvtier/kernels/kernel_set.h"
#include "test_util.h"

namespace kvtier {
namespace {

using kernels::SketchState;
using testing::RandomNormal;

// A sketch in test-owned memory.
struct OwnedSketch {
  OwnedSketch(SketchKind kind, int rows, int width, int d, uint32_t seed) {
    mem.assign(kernels::SketchStateFloats(rows, width, d), 0.0f);
    const int64_t cells = static_cast<int64_t>(rows) * width;
    s.kind = kind;
    s.rows = rows;
    s.width = width;
    s.head_dim = d;
    s.seed = seed;
    s.key_sums = mem.data();
    s.value_sums = mem.data() + cells * d;
    s.counts = mem.data() + 2 * cells * d;
    s.totals = s.counts + 2 * cells;
    if (kind == SketchKind::kCentroid) {
      planes = RandomNormal(static_cast<int64_t>(rows) * std::countr_zero(static_cast<unsigned>(width)) * d, seed + 99);
      s.planes = planes.data();
    }
  }
  std::vector<float> mem, planes;
  SketchState s;
};

class SketchTest : public ::testing::Test {
 protected:
  // Inserts (or removes) n fp32 tokens with ids first..first+n-1; returns the
  // centroid buckets ([n][rows]).
  std::vector<uint32_t> Update(const SketchState& s, float sign, const std::vector<float>& k,
                               const std::vector<float>& v, const std::vector<uint32_t>& ids,
                               std::vector<uint32_t> buckets = {}) {
    testing::UpdateSketchF32(*ks, s, sign, k, v, ids, &buckets);
    return buckets;
  }

  void Estimate(const SketchState& s, VaguePolicy policy, const std::vector<uint32_t>& ids,
                const std::vector<uint32_t>& buckets, std::vector<float>& k, std::vector<float>& v) {
    k.assign(ids.size() * s.head_dim, 0.0f);
    v.assign(ids.size() * s.head_dim, 0.0f);
    kernels::SketchEstimateParams p;
    p.sketch = s;
    p.policy = policy;
    p.n = static_cast<int32_t>(ids.size());
    p.ids = ids.data();
    p.buckets = buckets.empty() ? nullptr : buckets.data();
    p.keys = k.data();
    p.values = v.data();
    ks->SketchEstimate(p);
  }

  std::unique_ptr<kernels::KernelSet> ks = kernels::MakeCpuKernelSet();
};

std::vector<uint32_t> Iota(int n, uint32_t first = 0) {
  std::vector<uint32_t> ids(n);
  std::iota(ids.begin(), ids.end(), first);
  return ids;
}

double SqDist(const float* a, const float* b, int d) {
  double s = 0;
  for (int j = 0; j < d; ++j) s += (double(a[j]) - b[j]) * (double(a[j]) - b[j]);
  return s;
}

// Count-Sketch with rows R: the estimate of token i is k_i plus
// (1/R) sum_r sum_{j != i, h_r(j) = h_r(i)} s_r(i) s_r(j) (k_j - mu). With
// signs independent of the data, its expected squared norm given the bucket
// loads is E_i = (1/R^2) sum_r sum_{j != i in the bucket} ||k_j - mu||^2.
TEST_F(SketchTest, CountSketchErrorWithinBoundFromBucketLoads) {
  const int d = 64, n = 2000, rows = 3, width = 128;
  OwnedSketch os(SketchKind::kCountSketch, rows, width, d, 12345);
  const std::vector<float> k = RandomNormal(n * d, 1), v = RandomNormal(n * d, 2);
  const std::vector<uint32_t> ids = Iota(n);
  Update(os.s, 1.0f, k, v, ids);

  std::vector<double> mu(d, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) mu[j] += k[i * d + j] / n;
  std::vector<double> energy(n);  // ||k_j - mu||^2
  for (int i = 0; i < n; ++i) {
    energy[i] = 0;
    for (int j = 0; j < d; ++j) energy[i] += (k[i * d + j] - mu[j]) * (k[i * d + j] - mu[j]);
  }
  std::vector<double> bucket_energy(rows * width, 0.0);
  std::vector<std::vector<int>> bucket_of(rows, std::vector<int>(n));
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < n; ++i) {
      const uint32_t h = kernels::TokenHash(kernels::RowSeed(os.s.seed, r), ids[i]);
      bucket_of[r][i] = static_cast<int>(kernels::Bucket(h, width));
      bucket_energy[r * width + bucket_of[r][i]] += energy[i];
    }
  }
  std::vector<float> kh, vh;
  Estimate(os.s, VaguePolicy::kEstimate, ids, {}, kh, vh);
  double ratio_sum = 0, worst = 0, best = 1e9;
  for (int i = 0; i < n; ++i) {
    double expected = 0;
    for (int r = 0; r < rows; ++r) expected += bucket_energy[r * width + bucket_of[r][i]] - energy[i];
    expected /= rows * rows;
    const double ratio = SqDist(kh.data() + i * d, k.data() + i * d, d) / expected;
    ratio_sum += ratio;
    worst = std::max(worst, ratio);
    best = std::min(best, ratio);
  }
  // Each ratio is a normalised sum of ~3 x 16 random-signed 64-dimensional
  // vectors: mean 1, relative spread about sqrt(2/64) = 0.18. The mean over
  // 2000 tokens (about 125 independent bucket groups) has std ~0.02; 0.1 is
  // five of those. Single tokens stay within [0.25, 3] (chi-square tails at 64+
  // degrees of freedom are far below 1/2000 there).
  EXPECT_NEAR(ratio_sum / n, 1.0, 0.1);
  EXPECT_LT(worst, 3.0);
  EXPECT_GT(best, 0.25);
}

// Shrinking the reconstructed residual by alpha = RW / (RW + n - 1) is the
// linear MMSE estimate when collision noise has (n - 1)/(RW) times the
// residual energy: its error is the noise times alpha, well below unshrunk.
TEST_F(SketchTest, CountSketchShrinkageLowersErrorAsPredicted) {
  const int d = 64, n = 4000, rows = 1, width = 64;
  OwnedSketch os(SketchKind::kCountSketch, rows, width, d, 7);
  const std::vector<float> k = RandomNormal(n * d, 3), v = RandomNormal(n * d, 4);
  const std::vector<uint32_t> ids = Iota(n);
  Update(os.s, 1.0f, k, v, ids);
  std::vector<float> ke, ve, kshr, vshr;
  Estimate(os.s, VaguePolicy::kEstimate, ids, {}, ke, ve);
  Estimate(os.s, VaguePolicy::kShrink, ids, {}, kshr, vshr);
  double err_e = 0, err_s = 0;
  for (int i = 0; i < n; ++i) {
    err_e += SqDist(ke.data() + i * d, k.data() + i * d, d) / n;
    err_s += SqDist(kshr.data() + i * d, k.data() + i * d, d) / n;
  }
  const double signal = d;                                  // E||k - mu||^2 for N(0, I)
  const double noise = signal * (n - 1.0) / (rows * width);  // ~62x the signal
  const double alpha = 1.0 / (1.0 + (n - 1.0) / (rows * width));
  // Unshrunk: error = noise. Shrunk: (1-alpha)^2 signal + alpha^2 noise = alpha * noise.
  EXPECT_NEAR(err_e / noise, 1.0, 0.1);
  EXPECT_NEAR(err_s / (alpha * noise), 1.0, 0.1);
  EXPECT_LT(err_s, err_e / 30);
}

// Keys sharing a large offset: the sketch centres on the running mean at
// query time, so collisions carry only the small residuals; an uncentred
// estimate (read from the same raw bucket sums) carries the offset too.
TEST_F(SketchTest, CentringRemovesCommonOffsetFromCollisions) {
  const int d = 64, n = 1000, rows = 2, width = 64;
  OwnedSketch os(SketchKind::kCountSketch, rows, width, d, 21);
  const std::vector<float> offset = RandomNormal(d, 5, 10.0f);  // ||c||^2 ~ 100 d
  std::vector<float> k = RandomNormal(n * d, 6), v = RandomNormal(n * d, 7);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) k[i * d + j] += offset[j];
  const std::vector<uint32_t> ids = Iota(n);
  Update(os.s, 1.0f, k, v, ids);
  std::vector<float> kh, vh;
  Estimate(os.s, VaguePolicy::kEstimate, ids, {}, kh, vh);
  double centred = 0, uncentred = 0;
  for (int i = 0; i < n; ++i) {
    std::vector<float> raw(d, 0.0f);
    for (int r = 0; r < rows; ++r) {
      const uint32_t h = kernels::TokenHash(kernels::RowSeed(os.s.seed, r), ids[i]);
      const int64_t bb = static_cast<int64_t>(r) * width + kernels::Bucket(h, width);
      for (int j = 0; j < d; ++j) raw[j] += kernels::Sign(h) * os.s.key_sums[bb * d + j] / rows;
    }
    centred += SqDist(kh.data() + i * d, k.data() + i * d, d);
    uncentred += SqDist(raw.data(), k.data() + i * d, d);
  }
  // Collision terms scale with the energy around the centre: ~d with
  // centring, ~101 d without, so centring cuts the error about 100-fold.
  EXPECT_LT(centred, 0.05 * uncentred);
}

TEST_F(SketchTest, RemoveRestoresAndEmptiesExactly) {
  for (SketchKind kind : {SketchKind::kCountSketch, SketchKind::kCentroid}) {
    const int d = 64, rows = 2, width = 32;
    OwnedSketch both(kind, rows, width, d, 3), only_a(kind, rows, width, d, 3);
    const std::vector<float> ka = RandomNormal(100 * d, 8), va = RandomNormal(100 * d, 9);
    const std::vector<float> kb = RandomNormal(50 * d, 10), vb = RandomNormal(50 * d, 11);
    const std::vector<uint32_t> ida = Iota(100), idb = Iota(50, 1000);
    const std::vector<uint32_t> ba = Update(both.s, 1.0f, ka, va, ida);
    const std::vector<uint32_t> bb = Update(both.s, 1.0f, kb, vb, idb);
    Update(both.s, -1.0f, kb, vb, idb, bb);
    // Count-Sketch and centroid sums are linear: removing B leaves A's sums
    // (the centroid buckets of A were fixed at insertion).
    if (kind == SketchKind::kCountSketch) {
      Update(only_a.s, 1.0f, ka, va, ida);
      for (size_t i = 0; i < both.mem.size(); ++i) EXPECT_NEAR(both.mem[i], only_a.mem[i], 1e-4) << i;
    }
    Update(both.s, -1.0f, ka, va, ida, ba);
    for (size_t i = 0; i < both.mem.size(); ++i) ASSERT_EQ(both.mem[i], 0.0f) << SketchKindName(kind) << " " << i;
  }
}

// Builds a resident slot array and a sketch over other tokens, and the
// attention parameters for one KV head with `group` query heads.
struct MixedCase {
  MixedCase(SketchKind kind, int rows, int width, int d, int group, int resident, int vague, VaguePolicy policy)
      : sketch(kind, rows, width, d, 77), d(d), group(group) {
    k_slots = RandomNormal(int64_t{resident} * d, 20, 1.0f, 0.2f);
    v_slots = RandomNormal(int64_t{resident} * d, 21);
    kv = RandomNormal(int64_t{vague} * d, 22, 1.0f, 0.2f);
    vv = RandomNormal(int64_t{vague} * d, 23);
    ids = Iota(vague, 500);
    q = RandomNormal(int64_t{group} * d, 24, 0.6f);
    out.assign(int64_t{group} * d, 0.0f);
    probs.assign(resident, -1.0f);
    p.head_dim = d;
    p.group = group;
    p.dtype = DType::kF32;
    p.out_dtype = DType::kF32;
    p.scale = 1.0f / std::sqrt(float(d));
    p.q = q.data();
    p.out = out.data();
    p.k_slots = k_slots.data();
    p.v_slots = v_slots.data();
    // Two ranges to exercise range handling.
    ranges[0] = {0, resident / 2};
    ranges[1] = {resident / 2, resident - resident / 2};
    p.ranges = ranges;
    p.num_ranges = 2;
    p.slot_probs = probs.data();
    p.sketch = sketch.s;
    p.policy = policy;
    p.vague_ids = ids.data();
    p.num_vague = vague;
  }
  OwnedSketch sketch;
  int d, group;
  std::vector<float> k_slots, v_slots, kv, vv, q, out, probs;
  std::vector<uint32_t> ids, buckets;
  kernels::SlotRange ranges[2];
  kernels::AttendParams p;
};

// Reference: exact attention over resident tokens and reconstructed vague
// tokens (each key/value given, with an optional per-token logit bias).
std::vector<double> ReferenceMixed(const MixedCase& c, const std::vector<float>& keys, const std::vector<float>& values,
                                   const std::vector<double>& bias, std::vector<double>* slot_probs) {
  const int d = c.d;
  const int64_t resident = static_cast<int64_t>(c.k_slots.size()) / d;
  std::vector<float> all_k = c.k_slots, all_v = c.v_slots;
  all_k.insert(all_k.end(), keys.begin(), keys.end());
  all_v.insert(all_v.end(), values.begin(), values.end());
  const int64_t n = static_cast<int64_t>(all_k.size()) / d;
  std::vector<double> all_bias(resident, 0.0);
  all_bias.insert(all_bias.end(), bias.begin(), bias.end());
  std::vector<double> out(c.group * d);
  if (slot_probs) slot_probs->assign(resident, 0.0);
  for (int g = 0; g < c.group; ++g) {
    workload::ExactAttention(c.q.data() + g * d, all_k.data(), all_v.data(), n, d, d, c.p.scale, all_bias.data(),
                             out.data() + g * d);
    if (slot_probs) {
      std::vector<double> l(n);
      double m = -INFINITY, z = 0;
      for (int64_t i = 0; i < n; ++i) {
        double s = 0;
        for (int j = 0; j < d; ++j) s += double(c.q[g * d + j]) * all_k[i * d + j];
        l[i] = c.p.scale * s + all_bias[i];
        m = std::max(m, l[i]);
      }
      for (int64_t i = 0; i < n; ++i) z += std::exp(l[i] - m);
      for (int64_t i = 0; i < resident; ++i) (*slot_probs)[i] += std::exp(l[i] - m) / z;
    }
  }
  return out;
}

// The fast Count-Sketch attention (per bucket and sign with one row, per
// token with several) equals exact attention over the per-token
// reconstructions, for both policies that use the sketch.
TEST_F(SketchTest, CountSketchFastAttentionEqualsReconstructionAttention) {
  for (int rows : {1, 3}) {
    for (VaguePolicy policy : {VaguePolicy::kEstimate, VaguePolicy::kShrink}) {
      MixedCase c(SketchKind::kCountSketch, rows, 48, 64, 4, 40, 900, policy);
      Update(c.sketch.s, 1.0f, c.kv, c.vv, c.ids);
      ks->Attend({&c.p, 1});
      std::vector<float> kh, vh;
      Estimate(c.sketch.s, policy, c.ids, {}, kh, vh);
      std::vector<double> probs;
      const std::vector<double> ref = ReferenceMixed(c, kh, vh, std::vector<double>(c.ids.size(), 0.0), &probs);
      for (int g = 0; g < c.group; ++g) {
        EXPECT_LE(workload::RelativeError(c.out.data() + g * c.d, ref.data() + g * c.d, c.d), 1e-4)
            << "rows " << rows << " policy " << VaguePolicyName(policy) << " head " << g;
      }
      for (size_t i = 0; i < probs.size(); ++i) EXPECT_NEAR(c.probs[i], probs[i], 1e-5 + 1e-4 * probs[i]) << i;
    }
  }
}

TEST_F(SketchTest, DropPolicyIgnoresTheSketch) {
  MixedCase c(SketchKind::kCountSketch, 1, 32, 64, 2, 30, 400, VaguePolicy::kDrop);
  Update(c.sketch.s, 1.0f, c.kv, c.vv, c.ids);
  ks->Attend({&c.p, 1});
  const std::vector<double> ref = ReferenceMixed(c, {}, {}, {}, nullptr);
  for (int g = 0; g < c.group; ++g) {
    EXPECT_LE(workload::RelativeError(c.out.data() + g * c.d, ref.data() + g * c.d, c.d), 1e-5);
  }
}

// A centroid bucket holds exactly the sum of its tokens' keys and values and
// their count; buckets are the SimHash codes of the keys centred on the mean
// that includes the batch.
TEST_F(SketchTest, CentroidBucketsHoldExactMeansAndCounts) {
  const int d = 64, n = 600, rows = 2, width = 16;
  OwnedSketch os(SketchKind::kCentroid, rows, width, d, 5);
  const std::vector<float> k = RandomNormal(n * d, 30, 1.0f, 0.5f), v = RandomNormal(n * d, 31);
  const std::vector<uint32_t> buckets = Update(os.s, 1.0f, k, v, Iota(n));
  std::vector<float> mu(d, 0.0f);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) mu[j] += k[i * d + j];
  for (float& x : mu) x /= n;
  const int bits = 4;
  std::vector<double> sum_k(rows * width * d, 0), sum_v(rows * width * d, 0);
  std::vector<int> count(rows * width, 0);
  for (int i = 0; i < n; ++i) {
    std::vector<float> x(d);
    for (int j = 0; j < d; ++j) x[j] = k[i * d + j] - os.s.totals[j] / os.s.totals[2 * d];
    for (int r = 0; r < rows; ++r) {
      const uint32_t b = buckets[i * rows + r];
      ASSERT_EQ(b, kernels::SimHash(x.data(), os.s.planes + r * bits * d, bits, d)) << i;
      ++count[r * width + b];
      for (int j = 0; j < d; ++j) {
        sum_k[(r * width + b) * d + j] += k[i * d + j];
        sum_v[(r * width + b) * d + j] += v[i * d + j];
      }
    }
  }
  int nonempty = 0;
  for (int bb = 0; bb < rows * width; ++bb) {
    ASSERT_EQ(os.s.counts[2 * bb], static_cast<float>(count[bb]));
    EXPECT_EQ(os.s.counts[2 * bb + 1], 0.0f);
    nonempty += count[bb] > 0;
    for (int j = 0; j < d; ++j) {
      EXPECT_NEAR(os.s.key_sums[bb * d + j], sum_k[bb * d + j], 1e-4 * (1 + std::abs(sum_k[bb * d + j])));
      EXPECT_NEAR(os.s.value_sums[bb * d + j], sum_v[bb * d + j], 1e-4 * (1 + std::abs(sum_v[bb * d + j])));
    }
  }
  EXPECT_GT(nonempty, rows * width / 2);  // the data spreads over the buckets
}

// Each bucket enters attention as one pseudo-token with logit
// q.centroid + log(count / rows): exactly attention in which every vague
// token is replaced by its row-r centroid with weight 1/rows.
TEST_F(SketchTest, CentroidPseudoTokensEqualCentroidReplacedAttention) {
  for (int rows : {1, 2}) {
    MixedCase c(SketchKind::kCentroid, rows, 32, 64, 3, 25, 700, VaguePolicy::kEstimate);
    c.buckets = Update(c.sketch.s, 1.0f, c.kv, c.vv, c.ids);
    ks->Attend({&c.p, 1});
    const int d = c.d;
    std::vector<float> keys, values;
    std::vector<double> bias;
    for (size_t i = 0; i < c.ids.size(); ++i) {
      for (int r = 0; r < rows; ++r) {
        const int64_t bb = static_cast<int64_t>(r) * 32 + c.buckets[i * rows + r];
        const float cnt = c.sketch.s.counts[2 * bb];
        for (int j = 0; j < d; ++j) {
          keys.push_back(c.sketch.s.key_sums[bb * d + j] / cnt);
          values.push_back(c.sketch.s.value_sums[bb * d + j] / cnt);
        }
        bias.push_back(std::log(1.0 / rows));
      }
    }
    std::vector<double> probs;
    const std::vector<double> ref = ReferenceMixed(c, keys, values, bias, &probs);
    for (int g = 0; g < c.group; ++g) {
      EXPECT_LE(workload::RelativeError(c.out.data() + g * d, ref.data() + g * d, d), 1e-5) << "rows " << rows;
    }
    for (size_t i = 0; i < probs.size(); ++i) EXPECT_NEAR(c.probs[i], probs[i], 1e-6 + 1e-5 * probs[i]);
  }
}

// SimHash with b bits puts two vectors at angle theta in one bucket with
// probability (1 - theta/pi)^b. With 8 bits: cos 0.95 (theta 0.318) gives
// 0.899^8 = 0.43; independent vectors (theta ~ pi/2) give 0.5^8 = 0.004.
// Over 2000 pairs the binomial std is 0.011 and 0.0014.
TEST_F(SketchTest, CentroidNearKeysShareBucketsFarMoreThanRandomOnes) {
  const int d = 64, pairs = 2000, width = 256;
  OwnedSketch os(SketchKind::kCentroid, 1, width, d, 9);
  const std::vector<float> base = RandomNormal(pairs * d, 40);
  const std::vector<float> noise = RandomNormal(pairs * d, 41);
  const std::vector<float> other = RandomNormal(pairs * d, 42);
  // y = x + e * g with e chosen so cos(x, y) = 1/sqrt(1 + e^2) = 0.95.
  const float e = std::sqrt(1.0f / (0.95f * 0.95f) - 1.0f);
  std::vector<float> k;
  for (int i = 0; i < pairs; ++i) k.insert(k.end(), base.begin() + i * d, base.begin() + (i + 1) * d);
  for (int i = 0; i < pairs; ++i)
    for (int j = 0; j < d; ++j) k.push_back(base[i * d + j] + e * noise[i * d + j]);
  k.insert(k.end(), other.begin(), other.end());
  const std::vector<uint32_t> b = Update(os.s, 1.0f, k, k, Iota(3 * pairs));
  int near_same = 0, random_same = 0;
  for (int i = 0; i < pairs; ++i) {
    near_same += b[i] == b[pairs + i];
    random_same += b[i] == b[2 * pairs + i];
  }
  const double near_rate = double(near_same) / pairs, random_rate = double(random_same) / pairs;
  EXPECT_NEAR(near_rate, 0.43, 0.07);
  EXPECT_LT(random_rate, 0.02);
  EXPECT_GT(near_rate, 20 * std::max(random_rate, 1.0 / pairs));
}

// Recall scores: the largest logit over the query group of each token's
// reconstruction (Count-Sketch) or mean row centroid (centroid).
TEST_F(SketchTest, ScoresAreMaxLogitOfReconstruction) {
  for (SketchKind kind : {SketchKind::kCountSketch, SketchKind::kCentroid}) {
    const int d = 64, n = 300, rows = 2, width = 16, group = 3;
    OwnedSketch os(kind, rows, width, d, 13);
    const std::vector<float> k = RandomNormal(n * d, 50), v = RandomNormal(n * d, 51);
    const std::vector<uint32_t> ids = Iota(n);
    const std::vector<uint32_t> buckets = Update(os.s, 1.0f, k, v, ids);
    const std::vector<float> q = RandomNormal(group * d, 52);
    std::vector<float> scores(n);
    kernels::SketchScoreParams p;
    p.sketch = os.s;
    p.policy = VaguePolicy::kShrink;
    p.group = group;
    p.dtype = DType::kF32;
    p.scale = 0.5f;
    p.q = q.data();
    p.n = n;
    p.ids = ids.data();
    p.buckets = buckets.empty() ? nullptr : buckets.data();
    p.scores = scores.data();
    ks->SketchScores({&p, 1});
    std::vector<float> kh, vh;
    Estimate(os.s, VaguePolicy::kShrink, ids, buckets, kh, vh);
    for (int i = 0; i < n; ++i) {
      double best = -INFINITY;
      for (int g = 0; g < group; ++g) {
        double s = 0;
        for (int j = 0; j < d; ++j) s += double(q[g * d + j]) * kh[i * d + j];
        best = std::max(best, 0.5 * s);
      }
      EXPECT_NEAR(scores[i], best, 1e-4 * (1 + std::abs(best))) << SketchKindName(kind) << " " << i;
    }
  }
}

}  // namespace
}  // namespace kvtier
