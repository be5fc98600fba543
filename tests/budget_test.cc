// The budget planner: sizes that follow the shares, explicit sizes honoured,
// no plan over its budget, impossible budgets refused with the numbers, and
// the runtime reserving exactly the plan.
#include <cmath>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/budget.h"
#include "runtime/src/head_layout.h"
#include "test_util.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;

Options Smol(double fraction, int64_t context = 8192) {
  Options o;
  o.shape = ModelShape::SmolLM2_135M();
  o.max_context = context;
  o.device_budget_fraction = fraction;
  return o;
}

TEST(Budget, TenPercentFollowsTheShares) {
  // Count-Sketch buckets (the bucket size below is the Count-Sketch's).
  Options o = Smol(0.10);
  o.sketch_kind = SketchKind::kCountSketch;
  auto p = PlanBudget(o);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->compressed);
  EXPECT_LE(p->total_bytes, p->budget_bytes);
  EXPECT_EQ(p->budget_bytes, static_cast<int64_t>(std::floor(0.10 * p->full_cache_bytes)));
  EXPECT_EQ(p->sink_tokens, 4);
  // Derived parts split what is left after sink and metadata in proportion
  // to their shares (defaults recent 0.25, candidates 0.35, staging 0.15,
  // sketch 0.10).
  const int64_t slot = o.shape.HeadTokenBytes() + 4;
  const int64_t bucket = (2 * 64 + 2) * 4;
  const double rest = p->recent_tokens * slot + p->candidate_tokens * slot + p->staging_tokens * slot +
                      p->sketch_width * bucket;
  const double shares = o.recent_share + o.candidate_share + o.staging_share + o.sketch_share;
  EXPECT_NEAR(p->recent_tokens * slot / rest, o.recent_share / shares, 0.01);
  EXPECT_NEAR(p->candidate_tokens * slot / rest, o.candidate_share / shares, 0.01);
  EXPECT_NEAR(p->staging_tokens * slot / rest, o.staging_share / shares, 0.01);
  EXPECT_NEAR(p->sketch_width * bucket / rest, o.sketch_share / shares, 0.01);
  // The plan uses what the budget allows: less than one of each unit is left.
  EXPECT_GT(p->total_bytes, p->budget_bytes - o.shape.layers * o.shape.kv_heads * (3 * slot + bucket + 5 * 64));
  EXPECT_EQ(p->per_sequence_bytes, p->per_head.total() * o.shape.layers * o.shape.kv_heads);
  EXPECT_THAT(p->Explain(), HasSubstr("recent"));
}

TEST(Budget, FullFractionHoldsEveryTokenWithoutSketch) {
  auto p = PlanBudget(Smol(1.0, 1000));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_FALSE(p->compressed);
  EXPECT_EQ(p->sink_tokens + p->recent_tokens, 1000);
  EXPECT_EQ(p->candidate_tokens + p->staging_tokens + p->sketch_width, 0);
  EXPECT_EQ(p->total_bytes, p->full_cache_bytes);
  // K/V of every token plus at most 2 x 63 bytes of alignment per head.
  const int64_t kv = 1000 * ModelShape::SmolLM2_135M().TokenBytes();
  EXPECT_GE(p->full_cache_bytes, kv);
  EXPECT_LE(p->full_cache_bytes, kv + 30 * 3 * 126);
}

TEST(Budget, ExplicitSizesAreHonoured) {
  Options o = Smol(0.2);
  o.recent_tokens = 100;
  o.candidate_tokens = 0;
  o.staging_tokens = 7;
  o.sketch_kind = SketchKind::kCentroid;
  auto p = PlanBudget(o);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->recent_tokens, 100);
  EXPECT_EQ(p->candidate_tokens, 0);
  EXPECT_EQ(p->staging_tokens, 7);
  EXPECT_EQ(p->sketch_rows, 1);
  EXPECT_GE(p->sketch_width, kMinSketchBuckets);
  EXPECT_EQ(p->sketch_width & (p->sketch_width - 1), 0) << "centroid width must be a power of two";
  EXPECT_LE(p->total_bytes, p->budget_bytes);
  EXPECT_GT(p->shared_bytes, 0);  // SimHash planes
}

TEST(Budget, ImpossibleBudgetNamesTheNumbers) {
  Options o = Smol(0.10);
  o.device_budget_bytes = 100000;
  auto p = PlanBudget(o);
  ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(p.status().message(), HasSubstr("100000"));
  EXPECT_THAT(p.status().message(), HasSubstr("sink 4"));
  EXPECT_THAT(p.status().message(), HasSubstr("recent 16"));
  EXPECT_THAT(p.status().message(), HasSubstr("30 layers x 3 KV heads"));
  EXPECT_THAT(p.status().message(), HasSubstr("at least"));
  // The smallest budget the message names is accepted.
  Options tiny = Smol(0.10);
  tiny.device_budget_bytes = 1;
  const std::string msg(PlanBudget(tiny).status().message());
  const size_t at = msg.find("at least ");
  ASSERT_NE(at, std::string::npos);
  tiny.device_budget_bytes = std::stoll(msg.substr(at + 9));
  auto ok = PlanBudget(tiny);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->recent_tokens, kMinRecentTokens);
  EXPECT_EQ(ok->sketch_width, kMinSketchBuckets);
  tiny.device_budget_bytes -= 1;
  EXPECT_FALSE(PlanBudget(tiny).ok());
}

// Random options: every plan fits its budget with at least the minimal
// sizes, and the runtime reserves exactly the plan, within the budget, with
// every sequence slot taken.
TEST(Budget, RandomOptionsNeverExceedTheBudget) {
  std::mt19937_64 rng(42);
  int planned = 0, refused = 0;
  for (int i = 0; i < 400; ++i) {
    Options o;
    const int kv = 1 + rng() % 4;
    o.shape = {.layers = 1 + static_cast<int>(rng() % 4), .q_heads = kv * (1 + static_cast<int>(rng() % 4)),
               .kv_heads = kv, .head_dim = 8 * (1 + static_cast<int>(rng() % 16)),
               .dtype = static_cast<DType>(rng() % 3)};
    o.max_context = 1 + rng() % 5000;
    o.max_sequences = 1 + rng() % 3;
    o.device_budget_fraction = std::ldexp(1.0, -static_cast<int>(rng() % 8));
    if (rng() % 3 == 0) o.device_budget_bytes = 1 + rng() % (8 << 20);
    o.sketch_kind = static_cast<SketchKind>(rng() % 3);
    o.vague_policy = o.sketch_kind == SketchKind::kNone ? VaguePolicy::kDrop : static_cast<VaguePolicy>(rng() % 3);
    o.sketch_rows = static_cast<int>(rng() % 4);
    o.sink_tokens = static_cast<int>(rng() % 8);
    if (rng() % 4 == 0) o.candidate_tokens = static_cast<int>(rng() % 50);
    o.recent_share = (rng() % 100) / 100.0;
    o.sketch_share = (rng() % 100) / 100.0;
    auto p = PlanBudget(o);
    if (!p.ok()) {
      ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
      ++refused;
      continue;
    }
    ++planned;
    ASSERT_LE(p->total_bytes, p->budget_bytes);
    if (p->compressed) {
      ASSERT_GE(p->recent_tokens, kMinRecentTokens);
      if (o.sketch_kind != SketchKind::kNone) {
        ASSERT_GE(p->sketch_width, kMinSketchBuckets);
      }
    }
    const HeadLayout l = ComputeHeadLayout(o.shape, o.max_context, *p);
    ASSERT_EQ(l.bytes, p->per_head.total());
    auto rt = Runtime::Create(o);
    ASSERT_TRUE(rt.ok()) << rt.status();
    for (int s = 0; s < o.max_sequences; ++s) KVTIER_ASSERT_OK((*rt)->AddSequence(s));
    EXPECT_EQ((*rt)->AddSequence(99).code(), absl::StatusCode::kResourceExhausted);
    const RuntimeStats st = (*rt)->Stats();
    ASSERT_EQ(st.device_reserved.total(), p->total_bytes);
    ASSERT_LE(st.peak_device_bytes, p->budget_bytes);
  }
  // Both branches were exercised.
  EXPECT_GT(planned, 100);
  EXPECT_GT(refused, 10);
}

}  // namespace
}  // namespace kvtier
