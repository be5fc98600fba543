// Regions under random operations (property tests with fixed seeds), heavy
// hitters becoming candidates, recall making attention exact, staging
// replacement by score, and the device budget never exceeded.
#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "test_util.h"

namespace kvtier {
namespace {

using testing::MaxHeadError;
using testing::RandomNormal;
using testing::RoundedQuery;
using testing::Shadow;

struct PropertyCase {
  SketchKind kind;
  int rows;
  VaguePolicy policy;
  uint64_t seed;
};

class RegionsProperty : public ::testing::TestWithParam<PropertyCase> {};

// After every random append / attend / recall: CheckInvariants holds, the
// region counts follow from the length and the plan, served tokens add up,
// and device bytes stay within the budget. At the end every token reads back
// exactly, and removing the sequence returns every host block.
TEST_P(RegionsProperty, InvariantsHoldUnderRandomOperations) {
  const PropertyCase c = GetParam();
  Options o;
  o.shape = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 32, .dtype = DType::kF16};
  o.max_context = 1500;
  o.device_budget_fraction = 0.5;
  o.sink_tokens = 4;
  o.recent_tokens = 32;
  o.candidate_tokens = 24;
  o.staging_tokens = 16;
  o.sketch_kind = c.kind;
  o.sketch_rows = c.rows;
  o.sketch_width = c.kind == SketchKind::kNone ? 0 : 16;
  o.vague_policy = c.policy;
  o.score_decay = 0.95;
  auto created = Runtime::Create(o);
  ASSERT_TRUE(created.ok()) << created.status();
  Runtime& rt = **created;
  const BudgetPlan& plan = rt.plan();
  ASSERT_TRUE(plan.compressed);
  KVTIER_ASSERT_OK(rt.AddSequence(9));
  Shadow shadow(o.shape);
  std::mt19937_64 rng(c.seed);
  const int H = 2, d = 32;
  uint64_t data_seed = c.seed * 1000;
  std::vector<float> out(4 * d);

  for (int op = 0; op < 160; ++op) {
    const int layer = static_cast<int>(rng() % 2);
    const int64_t len = shadow.length(layer);
    const int kind = static_cast<int>(rng() % 10);
    if (kind < 5 || len == 0) {
      int64_t n = kind < 3 ? 1 : 1 + static_cast<int64_t>(rng() % 200);
      n = std::min<int64_t>(n, o.max_context - len);
      if (n == 0) continue;
      std::vector<float> scores(n * H);
      for (float& s : scores) s = static_cast<float>(rng() % 100) / 50.0f;
      AppendOptions ao;
      ao.scores = (rng() % 2) ? scores.data() : nullptr;
      data_seed += 2;
      KVTIER_ASSERT_OK(shadow.Append(rt, 9, layer, RandomNormal(n * H * d, data_seed, 1.0f, 0.2f),
                                     RandomNormal(n * H * d, data_seed + 1), n, ao));
    } else if (kind < 8) {
      auto [q, qr] = RoundedQuery(DType::kF16, RandomNormal(4 * d, ++data_seed));
      auto served = rt.Attend(9, layer, q.data(), out.data());
      ASSERT_TRUE(served.ok()) << served.status();
      EXPECT_EQ(served->exact + served->from_sketch + served->dropped, len * H);
      const bool sketch_used = c.kind != SketchKind::kNone && c.policy != VaguePolicy::kDrop;
      EXPECT_EQ(served->dropped == 0 || !sketch_used, true);
      EXPECT_EQ(served->from_sketch == 0 || sketch_used, true);
    } else if (kind == 8) {
      std::vector<int64_t> pos;
      for (int i = 0; i < 12; ++i) pos.push_back(static_cast<int64_t>(rng() % len));
      auto n = rt.Recall(9, layer, static_cast<int>(rng() % H), pos);
      ASSERT_TRUE(n.ok()) << n.status();
      EXPECT_LE(*n, plan.staging_tokens);
    } else if (c.kind != SketchKind::kNone) {
      auto [q, qr] = RoundedQuery(DType::kF16, RandomNormal(4 * d, ++data_seed));
      auto n = rt.RecallTop(9, layer, q.data(), 5);
      ASSERT_TRUE(n.ok()) << n.status();
      EXPECT_LE(*n, 2 * 5);
    }
    ASSERT_TRUE(rt.CheckInvariants().ok()) << "op " << op << ": " << rt.CheckInvariants();
    for (int l = 0; l < 2; ++l) {
      const int64_t ll = shadow.length(l);
      ASSERT_EQ(*rt.Length(9, l), ll);
    }
    const RegionCounts r = *rt.Regions(9);
    int64_t sink = 0, recent = 0;
    for (int l = 0; l < 2; ++l) {
      const int64_t ll = shadow.length(l);
      sink += H * std::min<int64_t>(ll, plan.sink_tokens);
      recent += H * std::min<int64_t>(plan.recent_tokens, std::max<int64_t>(0, ll - plan.sink_tokens));
    }
    ASSERT_EQ(r.sink, sink);
    ASSERT_EQ(r.recent, recent);
    ASSERT_LE(r.candidate, 2 * H * plan.candidate_tokens);
    ASSERT_LE(r.recalled, 2 * H * plan.staging_tokens);
    ASSERT_EQ(r.total(), H * (shadow.length(0) + shadow.length(1)));
    const RuntimeStats st = rt.Stats();
    ASSERT_LE(st.device_reserved.total(), plan.budget_bytes);
    ASSERT_LE(st.peak_device_bytes, plan.budget_bytes);
  }

  // Every token reads back exactly, wherever it is.
  workload::Tensor k(DType::kF16, d), v(DType::kF16, d);
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < H; ++h) {
      for (int64_t p = 0; p < shadow.length(l); ++p) {
        KVTIER_ASSERT_OK(rt.ReadToken(9, l, h, p, k.data(), v.data()));
        for (int j = 0; j < d; ++j) {
          ASSERT_EQ(k.Get(j), shadow.Key(l, p, h)[j]) << l << " " << h << " " << p;
          ASSERT_EQ(v.Get(j), shadow.Value(l, p, h)[j]) << l << " " << h << " " << p;
        }
      }
    }
  }
  EXPECT_GT(rt.Stats().host_tier.bytes_in_use, 0);
  KVTIER_ASSERT_OK(rt.RemoveSequence(9));
  EXPECT_EQ(rt.Stats().host_tier.bytes_in_use, 0);
  EXPECT_EQ(rt.Stats().regions.total(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Seeds, RegionsProperty,
    ::testing::Values(PropertyCase{SketchKind::kCountSketch, 1, VaguePolicy::kShrink, 1},
                      PropertyCase{SketchKind::kCountSketch, 3, VaguePolicy::kEstimate, 2},
                      PropertyCase{SketchKind::kCentroid, 1, VaguePolicy::kEstimate, 3},
                      PropertyCase{SketchKind::kCentroid, 2, VaguePolicy::kShrink, 4},
                      PropertyCase{SketchKind::kNone, 0, VaguePolicy::kDrop, 5},
                      PropertyCase{SketchKind::kCountSketch, 2, VaguePolicy::kDrop, 6}),
    [](const ::testing::TestParamInfo<PropertyCase>& info) {
      std::string name = std::string(SketchKindName(info.param.kind)) + "_r" + std::to_string(info.param.rows) + "_" +
                         std::string(VaguePolicyName(info.param.policy));
      std::replace(name.begin(), name.end(), '-', '_');
      return name;
    });

// Keys of planted tokens point along the direction the queries look for, so
// each step gives them most of the attention; with decayed scores they
// outscore every other token and stay candidates after leaving the ring.
// (Plain sums, score_decay 1, favour tokens that were resident longer: a
// planted token leaving the ring after 16 steps loses to ordinary candidates
// that accumulated for 80.)
TEST(HeavyHitters, PlantedTokensBecomeCandidatesDuringDecode) {
  Options o;
  o.score_decay = 0.9;
  o.shape = {.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF32};
  o.max_context = 4096;
  o.device_budget_fraction = 0.5;
  o.recent_tokens = 16;
  o.candidate_tokens = 8;
  o.staging_tokens = 0;
  o.sketch_width = 16;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  const int H = 2, d = 64;
  const std::set<int64_t> planted = {10, 37, 80, 123, 150};
  const std::vector<float> w = RandomNormal(H * d, 7);  // per KV head
  std::vector<float> q(4 * d);
  for (int qh = 0; qh < 4; ++qh)
    for (int j = 0; j < d; ++j) q[qh * d + j] = w[(qh / 2) * d + j] * 0.3f;
  std::vector<float> out(4 * d);
  for (int64_t p = 0; p < 300; ++p) {
    std::vector<float> k = RandomNormal(H * d, 1000 + p, 0.3f);
    if (planted.count(p)) {
      for (int i = 0; i < H * d; ++i) k[i] = w[i];
    }
    KVTIER_ASSERT_OK((*rt)->Append(1, 0, k.data(), RandomNormal(H * d, 5000 + p).data(), 1));
    ASSERT_TRUE((*rt)->Attend(1, 0, q.data(), out.data()).ok());
  }
  for (int h = 0; h < H; ++h) {
    for (int64_t p : planted) EXPECT_EQ(*(*rt)->TokenRegion(1, 0, h, p), Region::kCandidate) << h << " " << p;
  }
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
}

// A prefill chunk larger than the ring picks its candidates by the scores
// passed with it.
TEST(HeavyHitters, PrefillScoresPickCandidates) {
  Options o;
  o.shape = {.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 32, .dtype = DType::kBF16};
  o.max_context = 2048;
  o.device_budget_fraction = 0.5;
  o.recent_tokens = 16;
  o.candidate_tokens = 6;
  o.sketch_kind = SketchKind::kCentroid;
  o.sketch_width = 16;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  const int n = 1000, H = 2;
  std::vector<float> scores(n * H, 0.01f);
  const std::vector<int64_t> top0 = {5, 99, 500, 501, 760, 900};
  const std::vector<int64_t> top1 = {7, 8, 9, 300, 640, 950};
  for (int64_t p : top0) scores[p * H + 0] = 3.0f;
  for (int64_t p : top1) scores[p * H + 1] = 2.0f;
  Shadow shadow(o.shape);
  AppendOptions ao;
  ao.scores = scores.data();
  KVTIER_ASSERT_OK(shadow.Append(**rt, 1, 0, RandomNormal(n * H * 32, 1), RandomNormal(n * H * 32, 2), n, ao));
  for (int64_t p : top0) EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 0, p), Region::kCandidate) << p;
  for (int64_t p : top1) EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 1, p), Region::kCandidate) << p;
  const RegionCounts r = *(*rt)->Regions(1);
  EXPECT_EQ(r.candidate, 12);
  EXPECT_EQ(r.vague, H * (n - 4 - 16 - 6));
}

Options RecallOptions(SketchKind kind) {
  Options o;
  o.shape = {.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF32};
  o.max_context = 2000;
  o.device_budget_fraction = 0.5;
  o.recent_tokens = 16;
  o.candidate_tokens = 8;
  o.staging_tokens = 256;
  o.sketch_kind = kind;
  o.sketch_width = 16;
  o.vague_policy = VaguePolicy::kEstimate;
  o.recall_proxy = RecallProxy::kNone;  // only the explicit recalls of each test
  return o;
}

// With every vague token recalled, attention is exact again.
TEST(Recall, RecallingEveryVagueTokenMakesAttentionExact) {
  for (SketchKind kind : {SketchKind::kCountSketch, SketchKind::kCentroid}) {
    const Options o = RecallOptions(kind);
    auto rt = Runtime::Create(o);
    ASSERT_TRUE(rt.ok()) << rt.status();
    KVTIER_ASSERT_OK((*rt)->AddSequence(1));
    Shadow shadow(o.shape);
    const int n = 200, H = 2, d = 64;
    KVTIER_ASSERT_OK(shadow.Append(**rt, 1, 0, RandomNormal(n * H * d, 3, 1.0f, 0.5f), RandomNormal(n * H * d, 4), n));
    auto [q, qr] = RoundedQuery(DType::kF32, RandomNormal(4 * d, 5));
    const std::vector<double> ref = shadow.Attention(0, qr);
    std::vector<float> out(4 * d);
    auto before = (*rt)->Attend(1, 0, q.data(), out.data());
    ASSERT_TRUE(before.ok());
    EXPECT_EQ(before->from_sketch, H * (n - 4 - 16 - 8));
    EXPECT_GT(MaxHeadError(out, ref, 4, d), 1e-3);  // the sketch is not exact

    for (int h = 0; h < H; ++h) {
      std::vector<int64_t> vague;
      for (int64_t p = 0; p < n; ++p) {
        if (*(*rt)->TokenRegion(1, 0, h, p) == Region::kVague) vague.push_back(p);
      }
      ASSERT_EQ(vague.size(), size_t(n - 28));
      auto got = (*rt)->Recall(1, 0, h, vague);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(*got, n - 28);
    }
    auto after = (*rt)->Attend(1, 0, q.data(), out.data());
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->exact, H * n);
    EXPECT_EQ(after->from_sketch, 0);
    EXPECT_LE(MaxHeadError(out, ref, 4, d), 1e-5) << SketchKindName(kind);
    KVTIER_EXPECT_OK((*rt)->CheckInvariants());
    EXPECT_EQ((*rt)->Stats().recalled_tokens, H * (n - 28));
  }
}

// When staging is full, the staged tokens with the lowest accumulated
// attention go back to the sketch.
TEST(Recall, FullStagingEvictsLowestScores) {
  Options o = RecallOptions(SketchKind::kCountSketch);
  o.shape.kv_heads = 1;
  o.shape.q_heads = 1;
  o.staging_tokens = 4;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  const int d = 64, n = 100;
  const std::vector<float> w = RandomNormal(d, 11);
  std::vector<float> k = RandomNormal(n * d, 12, 0.1f);
  for (int64_t p : {40, 41}) std::copy(w.begin(), w.end(), k.begin() + p * d);
  KVTIER_ASSERT_OK((*rt)->Append(1, 0, k.data(), RandomNormal(n * d, 13).data(), n));
  ASSERT_EQ(*(*rt)->Recall(1, 0, 0, std::vector<int64_t>{40, 41, 42, 43}), 4);
  // Queries along w: tokens 40 and 41 gather the attention.
  std::vector<float> q(w), out(d);
  for (float& x : q) x *= 0.5f;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*rt)->Attend(1, 0, q.data(), out.data()).ok());
  ASSERT_EQ(*(*rt)->Recall(1, 0, 0, std::vector<int64_t>{50, 51}), 2);
  EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 0, 40), Region::kRecalled);
  EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 0, 41), Region::kRecalled);
  EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 0, 42), Region::kVague);
  EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 0, 43), Region::kVague);
  EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 0, 50), Region::kRecalled);
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
}

// RankVague puts tokens whose keys match the query first. Count-Sketch with
// three rows ranks single tokens: a token sharing one row's bucket with a
// planted one inherits a third of its score. The centroid sketch ranks whole
// buckets (every token of a bucket scores the same), so the planted tokens
// are in the top bucket: expected 3 + 372/64 ~ 9 tokens, within the top 16.
TEST(Recall, RankVaguePrefersMatchingKeys) {
  for (SketchKind kind : {SketchKind::kCountSketch, SketchKind::kCentroid}) {
    Options o = RecallOptions(kind);
    o.shape.kv_heads = 1;
    o.shape.q_heads = 1;
    o.sketch_rows = kind == SketchKind::kCentroid ? 1 : 3;
    o.sketch_width = kind == SketchKind::kCentroid ? 64 : 128;
    auto rt = Runtime::Create(o);
    ASSERT_TRUE(rt.ok()) << rt.status();
    KVTIER_ASSERT_OK((*rt)->AddSequence(1));
    const int d = 64, n = 400;
    const std::vector<float> w = RandomNormal(d, 21);
    std::vector<float> k = RandomNormal(n * d, 22, 0.5f);
    const std::vector<int64_t> planted = {60, 120, 180};
    for (int64_t p : planted)
      for (int j = 0; j < d; ++j) k[p * d + j] = 2.0f * w[j];
    KVTIER_ASSERT_OK((*rt)->Append(1, 0, k.data(), RandomNormal(n * d, 23).data(), n));
    const int count = kind == SketchKind::kCentroid ? 16 : 3;
    auto top = (*rt)->RankVague(1, 0, 0, w.data(), count);
    ASSERT_TRUE(top.ok()) << top.status();
    ASSERT_EQ(top->size(), size_t(count));
    const std::set<int64_t> got(top->begin(), top->end());
    for (int64_t p : planted) EXPECT_TRUE(got.count(p)) << SketchKindName(kind) << " misses " << p;
  }
}

// A sketch holding one token reconstructs it exactly (its mean is the token).
TEST(Estimate, SingleVagueTokenIsReconstructedExactly) {
  for (SketchKind kind : {SketchKind::kCountSketch, SketchKind::kCentroid}) {
    Options o;
    o.shape = {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64, .dtype = DType::kF32};
    o.max_context = 1000;
    o.recent_tokens = 16;
    o.candidate_tokens = 0;
    o.sketch_kind = kind;
    o.vague_policy = VaguePolicy::kShrink;
    auto rt = Runtime::Create(o);
    ASSERT_TRUE(rt.ok()) << rt.status();
    KVTIER_ASSERT_OK((*rt)->AddSequence(1));
    const std::vector<float> k = RandomNormal(21 * 64, 31), v = RandomNormal(21 * 64, 32);
    KVTIER_ASSERT_OK((*rt)->Append(1, 0, k.data(), v.data(), 21));
    ASSERT_EQ(*(*rt)->TokenRegion(1, 0, 0, 4), Region::kVague);
    std::vector<float> ke(64), ve(64);
    KVTIER_ASSERT_OK((*rt)->EstimateToken(1, 0, 0, 4, ke.data(), ve.data()));
    for (int j = 0; j < 64; ++j) {
      EXPECT_NEAR(ke[j], k[4 * 64 + j], 1e-6);
      EXPECT_NEAR(ve[j], v[4 * 64 + j], 1e-6);
    }
    EXPECT_EQ((*rt)->EstimateToken(1, 0, 0, 5, ke.data(), ve.data()).code(), absl::StatusCode::kFailedPrecondition);
  }
}

}  // namespace
}  // namespace kvtier
