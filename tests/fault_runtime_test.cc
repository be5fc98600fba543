// The runtime under every fault of its lower tier: it keeps serving, the
// affected tokens fall back to the sketch, the fault is counted and logged
// once, nothing else changes, and a corrupted block is never used as exact
// data.
#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <mutex>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/log.h"
#include "kvtier/offload/fault_tier.h"
#include "kvtier/offload/host_tier.h"
#include "kvtier/offload/nvme_tier.h"
#include "test_util.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;
using testing::MaxHeadError;
using testing::RandomNormal;
using testing::RoundedQuery;
using testing::Shadow;

constexpr int kDim = 64, kTokens = 240;

// Captures kvtier's log lines for the life of the object.
class LogCapture {
 public:
  LogCapture() {
    old_ = SetLogSink([this](LogSeverity, std::string_view m) {
      std::lock_guard lock(mu_);
      lines_.emplace_back(m);
    });
  }
  ~LogCapture() { SetLogSink(std::move(old_)); }
  int Count(std::string_view needle) const {
    std::lock_guard lock(mu_);
    int n = 0;
    for (const std::string& l : lines_) n += l.find(needle) != std::string::npos;
    return n;
  }

 private:
  LogSink old_;
  mutable std::mutex mu_;
  std::vector<std::string> lines_;
};

// A runtime whose lower tier is a FaultInjectingTier over a host-memory tier,
// with a host tier of 8 blocks: most vague tokens end up below.
class FaultRuntimeTest : public ::testing::Test {
 protected:
  // Users before what they use: the runtime, then its tiers, then the backend.
  void Reset() {
    rt_.reset();
    options_.disk_tier.reset();
    fault_.reset();
    base_.reset();
    backend_.reset();
  }
  void TearDown() override { Reset(); }

  void SetUp() override {
    Reset();
    backend_ = *CreateBackend(BackendKind::kCpu);
    Options o;
    o.shape = {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = kDim, .dtype = DType::kF32};
    o.max_context = 1000;
    o.device_budget_fraction = 0.5;
    o.recent_tokens = 16;
    o.candidate_tokens = 8;
    o.staging_tokens = 256;
    o.sketch_width = 16;
    o.vague_policy = VaguePolicy::kShrink;
    o.recall_proxy = RecallProxy::kNone;  // explicit recalls only
    const int64_t block = PlanBudget(o)->block_tokens * o.shape.HeadTokenBytes();
    base_ = std::shared_ptr<HostTier>(*HostTier::Create(*backend_, {.block_bytes = block}));
    fault_ = std::make_shared<FaultInjectingTier>(*base_, /*seed=*/7);
    o.disk_tier = fault_;
    o.host_tier_bytes = 8 * block;
    o.demote_high = 0.5;
    o.demote_low = 0.25;
    options_ = o;
    auto rt = Runtime::Create(o);
    ASSERT_TRUE(rt.ok()) << rt.status();
    rt_ = std::move(*rt);
    shadow_ = std::make_unique<Shadow>(o.shape);
    KVTIER_ASSERT_OK(rt_->AddSequence(1));
    for (int c = 0; c < kTokens / 20; ++c) {
      KVTIER_ASSERT_OK(shadow_->Append(*rt_, 1, 0, RandomNormal(20 * kDim, 100 + c, 1.0f, 0.3f),
                                       RandomNormal(20 * kDim, 200 + c), 20));
    }
    ASSERT_GT(rt_->Stats().store.disk_blocks, 0);
    q_ = RoundedQuery(DType::kF32, RandomNormal(2 * kDim, 9)).second;
  }

  std::vector<int64_t> Vague() {
    std::vector<int64_t> v;
    for (int64_t p = 0; p < kTokens; ++p) {
      if (*rt_->TokenRegion(1, 0, 0, p) == Region::kVague) v.push_back(p);
    }
    return v;
  }

  std::vector<float> AttendNow() {
    std::vector<float> out(2 * kDim);
    AttendOptions f32;
    f32.out_dtype = DType::kF32;
    EXPECT_TRUE(rt_->Attend(1, 0, q_.data(), out.data(), f32).ok());
    return out;
  }

  // Tokens whose exact K/V now live only in the lower tier.
  int64_t TokensBelow() { return rt_->Stats().store.disk_blocks * rt_->plan().block_tokens; }

  Options options_;
  std::unique_ptr<Backend> backend_;
  std::shared_ptr<HostTier> base_;
  std::shared_ptr<FaultInjectingTier> fault_;
  std::unique_ptr<Runtime> rt_;
  std::unique_ptr<Shadow> shadow_;
  std::vector<float> q_;
};

// Read errors (and short reads, which the tier reports as errors): the
// recall of the blocks below fails, their tokens stay vague and attention
// goes on from the sketch exactly as before; the data is not lost, and once
// the fault clears the same recall makes attention exact.
TEST_F(FaultRuntimeTest, ReadErrorsAndShortReadsFallBackAndRecoverAfterwards) {
  for (FaultKind kind : {FaultKind::kReadError, FaultKind::kShortRead}) {
    SCOPED_TRACE(kind == FaultKind::kReadError ? "read error" : "short read");
    LogCapture log;
    const std::vector<float> before = AttendNow();
    const int64_t below = TokensBelow();
    const RuntimeStats s0 = rt_->Stats();
    fault_->Inject({.kind = kind});
    const std::vector<int64_t> vague = Vague();
    absl::StatusOr<int> got = rt_->Recall(1, 0, 0, vague);
    EXPECT_FALSE(got.ok());
    EXPECT_EQ(got.status().code(),
              kind == FaultKind::kReadError ? absl::StatusCode::kUnavailable : absl::StatusCode::kDataLoss);
    const RuntimeStats s1 = rt_->Stats();
    EXPECT_EQ(s1.recall.failed - s0.recall.failed, below);
    EXPECT_EQ(s1.regions.recalled - s0.regions.recalled, static_cast<int64_t>(vague.size()) - below);
    EXPECT_GT(s1.store.disk_read_errors, s0.store.disk_read_errors);
    EXPECT_EQ(s1.store.lost_blocks, 0);
    EXPECT_LE(log.Count("reading block"), 1) << "logged once";
    KVTIER_EXPECT_OK(rt_->CheckInvariants());
    // The tokens recalled from the host tier are exact now; the failed ones
    // still come from the sketch: the output moved towards the exact one.
    const std::vector<double> exact = shadow_->Attention(0, q_);
    EXPECT_LT(MaxHeadError(AttendNow(), exact, 2, kDim), MaxHeadError(before, exact, 2, kDim));
    fault_->Clear();
    absl::StatusOr<int> again = rt_->Recall(1, 0, 0, Vague());
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(*again, below);
    EXPECT_LE(MaxHeadError(AttendNow(), exact, 2, kDim), 1e-5);
    // Back to the starting point for the next kind: everything vague again.
    SetUp();
  }
}

// A bit flipped on every read: the checksum catches it, the read is retried
// once, then the block is lost: its tokens are served from the sketch from
// then on and never read as exact data; the other blocks are untouched.
TEST_F(FaultRuntimeTest, PersistentCorruptionLosesOnlyThatBlockAndIsNeverUsed) {
  LogCapture log;
  const int64_t below = TokensBelow();
  const std::vector<float> before = AttendNow();
  fault_->Inject({.kind = FaultKind::kBitFlip});
  absl::StatusOr<int> got = rt_->Recall(1, 0, 0, Vague());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss);
  const RuntimeStats s = rt_->Stats();
  const int64_t blocks_below = below / rt_->plan().block_tokens;
  EXPECT_EQ(s.store.lost_blocks, blocks_below);
  EXPECT_EQ(s.store.checksum_failures, 2 * blocks_below) << "each read once and retried once";
  EXPECT_EQ(s.recall.failed, below);
  EXPECT_EQ(log.Count("fails its checksum"), 1) << "logged once";
  fault_->Clear();
  // Lost tokens: reading them is DataLoss, recalling them fails at once
  // without touching the tier, and attention keeps using the sketch.
  const std::vector<int64_t> lost = Vague();
  ASSERT_EQ(static_cast<int64_t>(lost.size()), below);
  std::vector<float> k(kDim), v(kDim);
  EXPECT_EQ(rt_->ReadToken(1, 0, 0, lost[0], k.data(), v.data()).code(), absl::StatusCode::kDataLoss);
  const int64_t reads = base_->Stats().reads;
  EXPECT_EQ(rt_->Recall(1, 0, 0, lost).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(base_->Stats().reads, reads);
  const std::vector<float> after = AttendNow();
  for (float x : after) ASSERT_TRUE(std::isfinite(x));
  EXPECT_NE(after, before) << "the blocks read from the host tier are exact now";
  // Every other token still reads back exactly.
  for (int64_t p = 0; p < kTokens; ++p) {
    if (std::find(lost.begin(), lost.end(), p) != lost.end()) continue;
    KVTIER_ASSERT_OK(rt_->ReadToken(1, 0, 0, p, k.data(), v.data()));
    ASSERT_TRUE(std::equal(k.begin(), k.end(), shadow_->Key(0, p, 0))) << p;
  }
  KVTIER_EXPECT_OK(rt_->CheckInvariants());
}

// One flipped bit in transit: the retry reads the block intact.
TEST_F(FaultRuntimeTest, TransientCorruptionIsReadAgainAndDelivered) {
  const int64_t below = TokensBelow();
  fault_->Inject({.kind = FaultKind::kBitFlip, .max_count = 1});
  absl::StatusOr<int> got = rt_->Recall(1, 0, 0, Vague());
  ASSERT_TRUE(got.ok()) << got.status();
  const RuntimeStats s = rt_->Stats();
  EXPECT_EQ(s.store.checksum_failures, 1);
  EXPECT_EQ(s.store.lost_blocks, 0);
  EXPECT_EQ(s.recall.failed, 0);
  EXPECT_EQ(s.regions.recalled, static_cast<int64_t>(kTokens - 28));
  EXPECT_GT(below, 0);
  EXPECT_LE(MaxHeadError(AttendNow(), shadow_->Attention(0, q_), 2, kDim), 1e-5);
}

// Write errors and a full lower tier: demotion fails, the blocks stay in the
// host tier (counted, logged once); when the host tier fills, Append fails
// cleanly with ResourceExhausted and the sequence is unchanged; every token
// stays readable.
TEST_F(FaultRuntimeTest, FailedDemotionKeepsBlocksAboveAndAppendsFailCleanly) {
  for (FaultKind kind : {FaultKind::kWriteError, FaultKind::kNoSpace}) {
    SCOPED_TRACE(kind == FaultKind::kWriteError ? "write error" : "no space");
    LogCapture log;
    fault_->Inject({.kind = kind});
    absl::Status st;
    int appended = 0;
    for (int c = 0; c < 20 && st.ok(); ++c) {
      st = shadow_->Append(*rt_, 1, 0, RandomNormal(20 * kDim, 500 + c), RandomNormal(20 * kDim, 600 + c), 20);
      if (st.ok()) appended += 20;
    }
    EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr("host pool is full"));
    const RuntimeStats s = rt_->Stats();
    if (kind == FaultKind::kWriteError) {
      EXPECT_GT(s.store.disk_write_errors, 0);
      EXPECT_EQ(log.Count("demoting block"), 1) << "logged once";
    } else {
      EXPECT_EQ(log.Count("takes no more blocks"), 1) << "logged once";
    }
    EXPECT_EQ(*rt_->Length(1, 0), kTokens + appended) << "the failed append changed nothing";
    KVTIER_EXPECT_OK(rt_->CheckInvariants());
    std::vector<float> k(kDim), v(kDim);
    for (int64_t p = 0; p < kTokens + appended; ++p) {
      KVTIER_ASSERT_OK(rt_->ReadToken(1, 0, 0, p, k.data(), v.data()));
      ASSERT_TRUE(std::equal(v.begin(), v.end(), shadow_->Value(0, p, 0))) << p;
    }
    fault_->Clear();
    SetUp();
  }
}

// Slow reads: a recall that has not arrived by the next attend falls back
// to the sketch (counted), arrives later (late), and is exact from then on;
// with a wait budget longer than the delay, attend waits and nothing falls back.
TEST_F(FaultRuntimeTest, SlowReadsFallBackThenArriveLate) {
  options_.recall_proxy = RecallProxy::kSketch;
  options_.recall_tokens = 256;
  for (int64_t wait_us : {int64_t{0}, int64_t{2'000'000}}) {
    SCOPED_TRACE(wait_us);
    options_.recall_wait_us = wait_us;
    const int64_t block = base_->block_bytes();
    rt_.reset();
    options_.disk_tier.reset();
    fault_.reset();
    base_ = std::shared_ptr<HostTier>(*HostTier::Create(*backend_, {.block_bytes = block}));
    fault_ = std::make_shared<FaultInjectingTier>(*base_, 7);
    options_.disk_tier = fault_;
    rt_ = std::move(*Runtime::Create(options_));
    shadow_ = std::make_unique<Shadow>(options_.shape);
    KVTIER_ASSERT_OK(rt_->AddSequence(1));
    for (int c = 0; c < kTokens / 20; ++c) {
      KVTIER_ASSERT_OK(shadow_->Append(*rt_, 1, 0, RandomNormal(20 * kDim, 100 + c, 1.0f, 0.3f),
                                       RandomNormal(20 * kDim, 200 + c), 20));
    }
    fault_->Inject({.kind = FaultKind::kSlowIo, .delay = absl::Milliseconds(300)});
    AttendNow();  // asks for every vague token
    AttendNow();  // host blocks arrived; blocks below are 300 ms away
    RuntimeStats s = rt_->Stats();
    if (wait_us == 0) {
      EXPECT_GT(s.recall.sketch_fallbacks, 0);
      EXPECT_EQ(s.recall.late_arrivals, 0);
      rt_->Recall(1, 0, 0, {}).IgnoreError();  // waits for what is in flight, installs it
      s = rt_->Stats();
      EXPECT_EQ(s.recall.late_arrivals, s.recall.sketch_fallbacks);
    } else {
      EXPECT_EQ(s.recall.sketch_fallbacks, 0);
      EXPECT_GT(s.recall.waits, 0);
    }
    EXPECT_EQ(s.recall.failed, 0);
    EXPECT_LE(MaxHeadError(AttendNow(), shadow_->Attention(0, q_), 2, kDim), 1e-5);
  }
}

// O_DIRECT refused by the filesystem: the NVMe tier falls back to buffered
// I/O with one warning, counts it, and the runtime works as before.
TEST(NvmeFallback, ODirectRefusedRunsBufferedWithOneWarning) {
  LogCapture log;
  Options o;
  o.shape = {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = kDim, .dtype = DType::kF32};
  o.max_context = 1000;
  o.device_budget_fraction = 0.5;
  o.recent_tokens = 16;
  o.candidate_tokens = 8;
  o.staging_tokens = 256;
  o.recall_proxy = RecallProxy::kNone;
  const absl::StatusOr<BudgetPlan> plan = PlanBudget(o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const int64_t block = plan->block_tokens * o.shape.HeadTokenBytes();
  const std::string dir = ::testing::TempDir() + "kvtier_nvme_fallback";
  auto nvme = NvmeTier::Create({.directory = dir,
                                .capacity_bytes = 64 * block,
                                .block_bytes = block,
                                .queue_depth = 4,
                                .io_mode = NvmeTier::IoMode::kAuto,
                                .open_hook = [](const char* path, int flags, mode_t mode) {
                                  if (flags & O_DIRECT) {
                                    errno = EINVAL;
                                    return -1;
                                  }
                                  return ::open(path, flags, mode);
                                }});
  ASSERT_TRUE(nvme.ok()) << nvme.status();
  EXPECT_FALSE((*nvme)->direct_io());
  o.disk_tier = std::shared_ptr<Tier>(std::move(*nvme));
  o.host_tier_bytes = 8 * block;
  o.demote_high = 0.5;
  o.demote_low = 0.25;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  Shadow shadow(o.shape);
  for (int c = 0; c < kTokens / 20; ++c) {
    KVTIER_ASSERT_OK(shadow.Append(**rt, 1, 0, RandomNormal(20 * kDim, c), RandomNormal(20 * kDim, 50 + c), 20));
  }
  std::vector<int64_t> vague;
  for (int64_t p = 0; p < kTokens; ++p) {
    if (*(*rt)->TokenRegion(1, 0, 0, p) == Region::kVague) vague.push_back(p);
  }
  ASSERT_TRUE((*rt)->Recall(1, 0, 0, vague).ok());
  const RuntimeStats s = (*rt)->Stats();
  EXPECT_GT(s.store.demotions, 0);
  EXPECT_GT(s.disk_tier.buffered_fallbacks, 0);
  EXPECT_EQ(log.Count("O_DIRECT"), 1) << "one warning";
  const std::vector<float> q = RandomNormal(2 * kDim, 3);
  std::vector<float> out(2 * kDim);
  AttendOptions f32;
  f32.out_dtype = DType::kF32;
  ASSERT_TRUE((*rt)->Attend(1, 0, q.data(), out.data(), f32).ok());
  EXPECT_LE(MaxHeadError(out, shadow.Attention(0, q), 2, kDim), 1e-5);
}

}  // namespace
}  // namespace kvtier
