// Asynchronous recall through the tiers: attention becomes exact once the
// recalled blocks have arrived, demoted tokens stay readable and recallable,
// the key-bounds proxy finds the groups attention needs, and the counters
// say what happened to every request.
#include <algorithm>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "kvtier/offload/host_tier.h"
#include "runtime/src/radix_sort.h"
#include "test_util.h"

namespace kvtier {
namespace {

using testing::MaxHeadError;
using testing::RandomNormal;
using testing::RoundedQuery;
using testing::Shadow;

Options RecallOptions() {
  Options o;
  o.shape = {.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF32};
  o.max_context = 2000;
  o.device_budget_fraction = 0.5;
  o.recent_tokens = 16;
  o.candidate_tokens = 8;
  o.staging_tokens = 256;
  o.sketch_width = 16;
  o.vague_policy = VaguePolicy::kShrink;
  o.recall_wait_us = 10'000'000;  // every recall lands before the next attend
  return o;
}

// One attend asks for every vague token (recall_tokens covers them); the
// next attend installs them all and is exact attention over every token.
TEST(AsyncRecall, AttendIsExactOnceTheRecalledTokensArrived) {
  Options o = RecallOptions();
  o.recall_tokens = 256;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  Shadow shadow(o.shape);
  const int n = 200, H = 2, d = 64, vague = n - 4 - 16 - 8;
  KVTIER_ASSERT_OK(shadow.Append(**rt, 1, 0, RandomNormal(n * H * d, 1, 1.0f, 0.3f), RandomNormal(n * H * d, 2), n));
  auto [q, qr] = RoundedQuery(DType::kF32, RandomNormal(4 * d, 3));
  const std::vector<double> ref = shadow.Attention(0, qr);
  std::vector<float> out(4 * d);
  AttendOptions f32;
  f32.out_dtype = DType::kF32;
  auto first = (*rt)->Attend(1, 0, q.data(), out.data(), f32);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->from_sketch, H * vague);
  EXPECT_GT(MaxHeadError(out, ref, 4, d), 1e-3);

  auto second = (*rt)->Attend(1, 0, q.data(), out.data(), f32);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->exact, H * n);
  EXPECT_EQ(second->from_sketch, 0);
  EXPECT_LE(MaxHeadError(out, ref, 4, d), 1e-5);
  const RuntimeStats st = (*rt)->Stats();
  EXPECT_EQ(st.recall.requested, H * vague);
  EXPECT_EQ(st.recall.exact_hits, H * vague);
  EXPECT_EQ(st.recall.sketch_fallbacks, 0);
  EXPECT_EQ(st.recall.late_arrivals, 0);
  EXPECT_EQ(st.recall.failed, 0);
  EXPECT_EQ(st.store.bytes_host_to_device, H * vague * 2 * d * 4);
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
}

// Automatic recall ranked by key bounds with a fixed query and
// RecallReplace::kOutranked: once staging
// holds tokens of the best groups, the vague tokens left rank no higher
// (the same groups or lower ones) and no step trades them; tokens appended
// with zero keys (their groups' bounds score 0, below any group of random
// keys) never displace them either.
TEST(AsyncRecall, PrefetchDoesNotTradeTokensTheProxyRanksAlike) {
  Options o = RecallOptions();
  o.candidate_tokens = 0;  // tokens leaving the ring go straight to the vague set
  o.staging_tokens = 8;
  o.recall_tokens = 8;
  o.recall_proxy = RecallProxy::kBlockBounds;
  o.recall_replace = RecallReplace::kOutranked;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  const int n = 200, H = 2, d = 64;
  KVTIER_ASSERT_OK((*rt)->Append(1, 0, RandomNormal(n * H * d, 1).data(), RandomNormal(n * H * d, 2).data(), n));
  const std::vector<float> q = RandomNormal(4 * d, 3);
  std::vector<float> out(4 * d);
  const std::vector<float> zero_key(H * d, 0.0f);
  auto step = [&](int i) {
    KVTIER_ASSERT_OK((*rt)->Append(1, 0, zero_key.data(), RandomNormal(H * d, 100 + i).data(), 1));
    ASSERT_TRUE((*rt)->Attend(1, 0, q.data(), out.data()).ok());
  };
  step(0);
  EXPECT_EQ((*rt)->Stats().recall.requested, H * 8);  // the free staging slots
  // The ring's random tokens leave it in the first 16 steps, into groups
  // that may rank higher; then only zero keys leave.
  for (int i = 1; i < 60; ++i) step(i);
  const int64_t settled = (*rt)->Stats().recall.requested;
  for (int i = 60; i < 120; ++i) step(i);
  const RuntimeStats st = (*rt)->Stats();
  EXPECT_EQ(st.recall.requested, settled) << "tokens the proxy ranks alike traded places";
  EXPECT_EQ(st.regions.recalled, H * 8);
  EXPECT_EQ(st.recall.failed, 0);
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
}

// Requests evicted before any attend used them are wasted prefetches.
TEST(AsyncRecall, TokensEvictedBeforeUseCountAsWasted) {
  Options o = RecallOptions();
  o.staging_tokens = 8;
  o.recall_proxy = RecallProxy::kNone;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  const int n = 200, H = 2, d = 64;
  KVTIER_ASSERT_OK((*rt)->Append(1, 0, RandomNormal(n * H * d, 1).data(), RandomNormal(n * H * d, 2).data(), n));
  std::vector<int64_t> a = {30, 31, 32, 33, 34, 35, 36, 37}, b = {40, 41, 42, 43};
  ASSERT_EQ(*(*rt)->Recall(1, 0, 0, a), 8);
  ASSERT_EQ(*(*rt)->Recall(1, 0, 0, b), 4);  // evicts 4 of `a`, never attended
  EXPECT_EQ((*rt)->Stats().recall.wasted_prefetches, 4);
  std::vector<float> q = RandomNormal(4 * d, 3), out(4 * d);
  ASSERT_TRUE((*rt)->Attend(1, 0, q.data(), out.data()).ok());
  std::vector<int64_t> c = {50, 51};
  ASSERT_EQ(*(*rt)->Recall(1, 0, 0, c), 2);  // evicts 2 that were attended once
  EXPECT_EQ((*rt)->Stats().recall.wasted_prefetches, 4);
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
}

// With a small host tier over a lower tier, blocks move down as tokens go
// vague; every token still reads back exactly, and recalled from below it
// makes attention exact.
TEST(AsyncRecall, DemotedTokensStayReadableAndRecallable) {
  auto backend = CreateBackend(BackendKind::kCpu);
  ASSERT_TRUE(backend.ok());
  Options o = RecallOptions();
  o.recall_proxy = RecallProxy::kNone;
  const BudgetPlan plan = *PlanBudget(o);
  const int64_t block_bytes = plan.block_tokens * o.shape.HeadTokenBytes();
  auto lower = HostTier::Create(**backend, {.block_bytes = block_bytes});
  ASSERT_TRUE(lower.ok());
  o.disk_tier = std::shared_ptr<Tier>(std::move(*lower));
  o.host_tier_bytes = 6 * block_bytes;
  o.demote_high = 0.5;
  o.demote_low = 0.34;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  Shadow shadow(o.shape);
  const int n = 260, H = 2, d = 64;
  // Chunks of 20 tokens: the new blocks of one append fit the host tier at
  // once; older sealed blocks move down to make room.
  for (int chunk = 0; chunk < n / 20; ++chunk) {
    KVTIER_ASSERT_OK(shadow.Append(**rt, 1, 0, RandomNormal(20 * H * d, 10 + chunk, 1.0f, 0.3f),
                                   RandomNormal(20 * H * d, 1000 + chunk), 20));
    EXPECT_LE((*rt)->Stats().host_tier.blocks_in_use, 6);
  }
  const RuntimeStats st = (*rt)->Stats();
  EXPECT_GT(st.store.demotions, 0);
  EXPECT_GT(st.store.disk_blocks, 0);
  EXPECT_EQ(st.disk_tier.blocks_in_use, st.store.disk_blocks);
  std::vector<float> k(d), v(d);
  for (int h = 0; h < H; ++h) {
    for (int64_t p = 0; p < n; ++p) {
      KVTIER_ASSERT_OK((*rt)->ReadToken(1, 0, h, p, k.data(), v.data()));
      ASSERT_TRUE(std::equal(k.begin(), k.end(), shadow.Key(0, p, h))) << h << " " << p;
      ASSERT_TRUE(std::equal(v.begin(), v.end(), shadow.Value(0, p, h))) << h << " " << p;
    }
  }
  // Recall every vague token of both heads (at most 256 per call).
  for (int h = 0; h < H; ++h) {
    std::vector<int64_t> vague;
    for (int64_t p = 0; p < n; ++p) {
      if (*(*rt)->TokenRegion(1, 0, h, p) == Region::kVague) vague.push_back(p);
    }
    ASSERT_LE(vague.size(), 256u);
    auto got = (*rt)->Recall(1, 0, h, vague);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, static_cast<int>(vague.size()));
  }
  EXPECT_GT((*rt)->Stats().store.bytes_disk_to_host, 0);
  auto [q, qr] = RoundedQuery(DType::kF32, RandomNormal(4 * d, 5));
  std::vector<float> out(4 * d);
  auto served = (*rt)->Attend(1, 0, q.data(), out.data());
  ASSERT_TRUE(served.ok());
  EXPECT_EQ(served->exact, H * n);
  EXPECT_LE(MaxHeadError(out, shadow.Attention(0, qr), 4, d), 1e-5);
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
  KVTIER_ASSERT_OK((*rt)->RemoveSequence(1));
  const RuntimeStats end = (*rt)->Stats();
  EXPECT_EQ(end.host_tier.blocks_in_use, 0);
  EXPECT_EQ(end.disk_tier.blocks_in_use, 0);
  EXPECT_EQ(end.store.blocks, 0);
}

// Key bounds per group of vague tokens: a group holding the keys the query
// looks for has the highest bound, so its tokens are recalled first.
TEST(AsyncRecall, BlockBoundsProxyRecallsTheGroupAttentionNeeds) {
  Options o = RecallOptions();
  o.shape.kv_heads = 1;
  o.shape.q_heads = 1;
  o.recall_proxy = RecallProxy::kBlockBounds;
  o.staging_tokens = 32;
  o.recall_tokens = 32;
  o.summary_tokens = 16;  // one block: the planted tokens share a group
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  const BudgetPlan& plan = (*rt)->plan();
  ASSERT_GT(plan.summary_groups, 0);
  ASSERT_EQ(plan.summary_tokens % plan.block_tokens, 0);
  EXPECT_GT(plan.per_head.summary, 0);
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  const int n = 600, d = 64;
  const std::vector<float> w = RandomNormal(d, 7);
  std::vector<float> k = RandomNormal(n * d, 8, 0.3f);
  // Vague tokens are written in position order: tokens 300..303 share a group.
  const std::set<int64_t> planted = {300, 301, 302, 303};
  for (int64_t p : planted)
    for (int j = 0; j < d; ++j) k[p * d + j] = 2.0f * w[j];
  KVTIER_ASSERT_OK((*rt)->Append(1, 0, k.data(), RandomNormal(n * d, 9).data(), n));
  auto top = (*rt)->RankVague(1, 0, 0, w.data(), plan.summary_tokens);
  ASSERT_TRUE(top.ok()) << top.status();
  for (int64_t p : planted) {
    EXPECT_NE(std::find(top->begin(), top->end(), p), top->end()) << "planted token " << p << " not ranked first";
  }
  std::vector<float> out(d);
  ASSERT_TRUE((*rt)->Attend(1, 0, w.data(), out.data()).ok());  // requests the best group
  ASSERT_TRUE((*rt)->Attend(1, 0, w.data(), out.data()).ok());  // installs it
  for (int64_t p : planted) EXPECT_EQ(*(*rt)->TokenRegion(1, 0, 0, p), Region::kRecalled) << p;
  EXPECT_GE((*rt)->Stats().recall.exact_hits, 4) << (*rt)->plan().Explain() << " requested " << (*rt)->Stats().recall.requested;
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
}

// Key-bounds ranking with each kind of within-group order (centroid classes,
// a two-row Count-Sketch's per-token scores, none), with tokens in flight
// and recalled, over 40 decode steps: a fingerprint of every RankVague
// answer and of what automatic recall left. Recorded when RankFinish
// gathered and sorted every vague token per call; a faster path must choose
// the same tokens in the same order.
TEST(AsyncRecall, KeyBoundsRankingIsUnchanged) {
  struct Case {
    const char* name;
    SketchKind sketch;
    int rows;
    VaguePolicy policy;
    uint64_t fingerprint;
  };
  for (const Case& c : {Case{"centroid", SketchKind::kCentroid, 1, VaguePolicy::kShrink, 8681223230149820199ull},
                        Case{"count-sketch x2", SketchKind::kCountSketch, 2, VaguePolicy::kShrink, 7020812536153054540ull},
                        Case{"no sketch", SketchKind::kNone, 0, VaguePolicy::kDrop, 14041635531005986388ull}}) {
    SCOPED_TRACE(c.name);
    Options o = RecallOptions();
    o.recall_proxy = RecallProxy::kBlockBounds;
    o.sketch_kind = c.sketch;
    o.sketch_rows = c.rows;
    o.vague_policy = c.policy;
    if (c.sketch == SketchKind::kNone) o.sketch_width = 0;
    o.staging_tokens = 48;
    o.recall_tokens = 12;
    o.summary_tokens = 32;
    auto rt = Runtime::Create(o);
    ASSERT_TRUE(rt.ok()) << rt.status();
    KVTIER_ASSERT_OK((*rt)->AddSequence(1));
    const int n = 900, H = 2, d = 64;
    // Keys of varied scale, so that groups' bounds differ.
    std::vector<float> k = RandomNormal(n * H * d, 21);
    for (int64_t i = 0; i < n * H; ++i)
      for (int j = 0; j < d; ++j) k[i * d + j] *= 0.25f + static_cast<float>((i / 7) % 5) * 0.3f;
    KVTIER_ASSERT_OK((*rt)->Append(1, 0, k.data(), RandomNormal(n * H * d, 22).data(), n));
    uint64_t h = 1469598103934665603ull;
    auto fold = [&](int64_t x) {
      h ^= static_cast<uint64_t>(x);
      h *= 1099511628211ull;
    };
    std::vector<float> out(4 * d);
    for (int step = 0; step < 40; ++step) {
      const std::vector<float> q = RandomNormal(4 * d, 100 + step);
      KVTIER_ASSERT_OK((*rt)->Append(1, 0, RandomNormal(H * d, 200 + step).data(),
                                     RandomNormal(H * d, 300 + step).data(), 1));
      ASSERT_TRUE((*rt)->Attend(1, 0, q.data(), out.data()).ok());  // installs, then requests the next
      for (int kh = 0; kh < H; ++kh) {
        for (int count : {5, 70, 5000}) {  // within a group, across groups, every vague token
          absl::StatusOr<std::vector<int64_t>> top = (*rt)->RankVague(1, 0, kh, q.data(), count);
          ASSERT_TRUE(top.ok()) << top.status();
          fold(static_cast<int64_t>(top->size()));
          for (int64_t pos : *top) fold(pos);
        }
      }
    }
    const RuntimeStats st = (*rt)->Stats();
    EXPECT_GT(st.recall.requested, 40 * H * 6) << "automatic recall should have run every step";
    fold(st.recall.requested);
    fold(st.regions.recalled);
    for (int64_t p = 0; p < n + 40; ++p) fold(static_cast<int64_t>(*(*rt)->TokenRegion(1, 0, 1, p)));
    EXPECT_EQ(h, c.fingerprint) << "fingerprint " << h;
    KVTIER_EXPECT_OK((*rt)->CheckInvariants());
  }
}

// SortByUpper32 orders a recall's targets by ordinal, so that each block is
// one gather part. On (value, index) keys it gives std::sort's order, at
// sizes on both sides of its comparison-sort cutoff and with one to four
// 8-bit digits; among equal upper halves it keeps the input order whatever
// the lower bits.
TEST(RadixSort, SortsByTheUpperHalfAsStdSortDoesAndStably) {
  std::mt19937_64 rng(11);
  std::vector<uint64_t> scratch;
  for (const uint32_t max_upper : {1u, 200u, 300u, 70000u, 0xffffffffu}) {
    for (const size_t n : {0, 1, 127, 128, 129, 1000, 5000}) {
      std::vector<uint64_t> keys(n);
      for (size_t i = 0; i < n; ++i) keys[i] = (rng() % max_upper) << 32 | i;
      std::vector<uint64_t> want = keys;
      std::sort(want.begin(), want.end());
      SortByUpper32(keys, scratch, max_upper);
      EXPECT_EQ(keys, want) << "max_upper " << max_upper << ", " << n << " keys";
    }
  }
  std::vector<uint64_t> keys(1000);  // lower halves falling: a full-key sort would reverse each run
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = uint64_t{i % 7} << 32 | (keys.size() - i);
  SortByUpper32(keys, scratch, 7);
  for (size_t i = 1; i < keys.size(); ++i) {
    ASSERT_LE(keys[i - 1] >> 32, keys[i] >> 32) << i;
    if (keys[i - 1] >> 32 == keys[i] >> 32) {
      ASSERT_GT(keys[i - 1] & 0xffffffffu, keys[i] & 0xffffffffu) << i;
    }
  }
}

// Keys in a few runs (a recall's usual targets: each weight class most
// recent first) take the merging path, more runs the radix or comparison
// sort: each gives std::stable_sort's order by the upper half, with runs
// rising, falling or flat, of any length, and equal upper halves within and
// across runs.
TEST(RadixSort, MergesFewRunsAsStableSortOrders) {
  std::mt19937_64 rng(12);
  std::vector<uint64_t> scratch;
  auto by_upper = [](uint64_t a, uint64_t b) { return a >> 32 < b >> 32; };
  for (int trial = 0; trial < 400; ++trial) {
    const int runs = 1 + trial % 7;                  // 1-4 merge, 5-7 do not
    const uint32_t max_upper = trial % 3 == 0 ? 50 : 300000;  // many ties, or few
    std::vector<uint64_t> keys;
    for (int r = 0; r < runs; ++r) {
      std::vector<uint32_t> run(1 + rng() % (trial % 2 == 0 ? 40 : 300));
      for (uint32_t& u : run) u = static_cast<uint32_t>(rng() % max_upper);
      std::sort(run.begin(), run.end());
      if (rng() % 2 == 0) {  // falling, strictly (a falling run has no ties)
        run.erase(std::unique(run.begin(), run.end()), run.end());
        std::reverse(run.begin(), run.end());
      }
      // Past the merging path's runs, below 128 keys, the comparison sort
      // asks for lower halves rising in input order; else any.
      for (uint32_t u : run) keys.push_back(uint64_t{u} << 32 | (runs > 4 ? keys.size() : rng() & 0xffffffffu));
    }
    std::vector<uint64_t> want = keys;
    std::stable_sort(want.begin(), want.end(), by_upper);
    SortByUpper32(keys, scratch, max_upper);
    ASSERT_EQ(keys, want) << "trial " << trial << ": " << runs << " runs, " << want.size() << " keys";
  }
}

}  // namespace
}  // namespace kvtier
