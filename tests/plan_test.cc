// kvtier-plan's capacity model against kvtier-replay on the same workload.
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "replay/driver.h"
#include "replay/plan.h"
#include "replay/trace.h"

namespace kvtier::replay {
namespace {

using ::testing::HasSubstr;

// SmolLM2's shape with small tiers, so that both the device and the tiers bind.
PlanOptions SmallPlan() {
  PlanOptions o;
  o.shape = ModelShape{.layers = 30, .q_heads = 9, .kv_heads = 3, .head_dim = 64, .dtype = DType::kF16};
  o.model_name = "smollm2-135m";
  o.profile.device_kv_bytes = 16 << 20;
  o.profile.host_bytes = 32 << 20;
  o.profile.nvme_bytes = 96 << 20;
  o.device_budget_fraction = 0.10;
  o.contexts = {600, 1000, 2000, 3000};
  o.decode_tokens = 8;  // as Uniform's requests
  return o;
}

// `count` requests of `context` tokens (8 of them generated), all at time 0.
Trace Uniform(int64_t context, int64_t count) {
  std::string text;
  for (int64_t i = 0; i < count; ++i) absl::StrAppend(&text, "0,", context - 8, ",8\n");
  absl::StatusOr<Trace> t = ParseTrace(text, {}, "uniform.csv");
  EXPECT_TRUE(t.ok()) << t.status();
  return *t;
}

void ExpectWithin5(double measured, double predicted, const std::string& what) {
  EXPECT_LE(std::abs(measured - predicted), 0.05 * std::abs(predicted)) << what << ": replay " << measured
                                                                         << ", plan " << predicted;
}

// For each RecallReplace (their recall traffic differs).
TEST(Plan, AgreesWithReplay) {
  for (const RecallReplace replace : {RecallReplace::kUnused, RecallReplace::kOutranked}) {
    SCOPED_TRACE(RecallReplaceName(replace));
    PlanOptions p = SmallPlan();
    p.recall_replace = replace;
    absl::StatusOr<PlanResult> plan = RunPlan(p);
    ASSERT_TRUE(plan.ok()) << plan.status();
    bool device_bound = false, tier_bound = false, spilled = false;
    for (const PlanRow& row : plan->rows) {
      SCOPED_TRACE(absl::StrCat("context ", row.context, ", binding ", row.binding));
      ASSERT_GT(row.sequences, 0);
      device_bound |= row.binding == "device";
      tier_bound |= row.binding == "tiers";
      spilled |= row.nvme_bytes > 0;
      ReplayOptions o;
      o.shape = p.shape;
      o.content = ContentLevel::kNone;
      o.time_scale = 0;
      o.max_sequences = static_cast<int>(row.device_limit);
      o.max_context = row.context;
      o.device_budget_fraction = p.device_budget_fraction;
      o.host_bytes = static_cast<int64_t>(p.profile.host_bytes);
      o.nvme_dir = "unused";  // plan-only: a counting tier
      o.nvme_bytes = static_cast<int64_t>(p.profile.nvme_bytes);
      o.sketch = p.sketch;
      o.recall_replace = p.recall_replace;
      o.profile = p.profile;
      absl::StatusOr<ReplayResult> r = RunReplay(Uniform(row.context, 2 * row.sequences + 1), o);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->rejected, 0);
      EXPECT_LE(r->budget_bytes, static_cast<int64_t>(p.profile.device_kv_bytes));
      ExpectWithin5(r->max_live, row.sequences, "concurrent sequences");
      ExpectWithin5(r->per_sequence_bytes, row.device_bytes_per_sequence, "device bytes per sequence");
      if (row.nvme_bytes == 0) {
        ExpectWithin5(r->peak_host_bytes, row.host_bytes, "host bytes");
        EXPECT_EQ(r->peak_nvme_bytes, 0);
      } else {
        ExpectWithin5(r->peak_nvme_bytes, row.nvme_bytes, "NVMe bytes");
        ExpectWithin5(r->peak_host_bytes + r->peak_nvme_bytes, row.host_bytes + row.nvme_bytes, "tier bytes");
      }
      // Recall traffic per sequence and decode step.
      ASSERT_GT(r->decode_tokens, 0);
      ExpectWithin5(static_cast<double>(r->bytes_h2d) / r->decode_tokens,
                    static_cast<double>(row.h2d_bytes_per_step) / row.sequences, "host->device bytes per step");
    }
    // The workload exercises both capacity limits and the NVMe tier.
    EXPECT_TRUE(device_bound);
    EXPECT_TRUE(tier_bound);
    EXPECT_TRUE(spilled);
  }
}

TEST(Plan, BaselineAndLimits) {
  PlanOptions p = SmallPlan();
  p.profile.host_bytes = 0;  // no cap: only the device binds
  absl::StatusOr<PlanResult> r = RunPlan(p);
  ASSERT_TRUE(r.ok()) << r.status();
  for (const PlanRow& row : r->rows) {
    EXPECT_EQ(row.tier_limit, -1);
    EXPECT_EQ(row.sequences, row.device_limit);
    // The full cache is context x layers x KV heads x K/V bytes, plus alignment.
    EXPECT_GE(row.baseline_bytes_per_sequence, row.context * p.shape.TokenBytes());
    EXPECT_EQ(row.baseline_sequences, static_cast<int64_t>(p.profile.device_kv_bytes) / row.baseline_bytes_per_sequence);
    EXPECT_GE(row.sequences, row.baseline_sequences);
  }
  p.max_sequences = 2;
  r = RunPlan(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->rows[0].sequences, 2);
  EXPECT_EQ(r->rows[0].binding, "slots");
  p.profile.device_kv_bytes = 1000;  // not even one sequence
  r = RunPlan(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->rows[0].sequences, 0);
  EXPECT_EQ(r->rows[0].binding, "device");
}

TEST(Plan, OutputsAndErrors) {
  const PlanOptions p = SmallPlan();
  absl::StatusOr<PlanResult> r = RunPlan(p);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string json = PlanJson(*r, p);
  for (const char* key : {"context", "sequences", "baseline_sequences", "device_limit", "tier_limit",
                          "bandwidth_limit", "binding", "host_bytes", "nvme_bytes", "h2d_bytes_per_step",
                          "d2h_bytes_per_step", "nvme_write_bytes_per_step", "nvme_read_bytes_per_step_max"}) {
    EXPECT_THAT(json, HasSubstr(std::string("\"") + key + "\": ")) << key;
  }
  EXPECT_THAT(PlanTable(*r, p), HasSubstr("binding"));
  const std::string svg = PlanSvg(*r, p);
  EXPECT_THAT(svg, HasSubstr("<svg"));
  EXPECT_EQ(std::count(svg.begin(), svg.end(), '\n') > 10, true);
  PlanOptions bad = p;
  bad.device_budget_fraction = 0;
  EXPECT_THAT(RunPlan(bad).status().message(), HasSubstr("fraction 0"));
  bad = p;
  bad.contexts = {0};
  EXPECT_THAT(RunPlan(bad).status().message(), HasSubstr("context 0"));
  // A trace's contexts: p50, p90, p99 and the longest, distinct.
  absl::StatusOr<Trace> t = ParseTrace("0,100,0\n0,200,0\n0,300,0\n0,4000,96\n", {}, "t.csv");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(TraceContexts(*t, 1), (std::vector<int64_t>{200, 4096}));
  EXPECT_EQ(TraceContexts(*t, 4), (std::vector<int64_t>{50, 1024}));
}

}  // namespace
}  // namespace kvtier::replay
