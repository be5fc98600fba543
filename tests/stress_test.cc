// Many sequences appending, attending and recalling from several threads
// while recalls and demotions are in flight through a slow lower tier (run
// under ThreadSanitizer in CI); after every sequence is removed, every tier's
// accounting is back to zero.
#include <atomic>
#include <random>
#include <thread>

#include "gtest/gtest.h"
#include "kvtier/offload/fault_tier.h"
#include "kvtier/offload/memory_tier.h"
#include "test_util.h"
#include "workload/tensor.h"

namespace kvtier {
namespace {

using testing::RandomNormal;

TEST(Stress, SequencesRecallsAndDemotionsFromManyThreads) {
  Options o;
  o.shape = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF16};
  o.max_context = 400;
  o.max_sequences = 6;
  o.device_budget_fraction = 0.3;
  o.score_decay = 0.95;
  o.recall_proxy = RecallProxy::kSketch;  // asynchronous recall after every attend, no waiting
  const BudgetPlan plan = *PlanBudget(o);
  const int64_t block = plan.block_tokens * o.shape.HeadTokenBytes();
  // An asynchronous lower tier, slowed down now and then so transfers overlap.
  auto memory = MemoryTier::Create({.block_bytes = block});
  ASSERT_TRUE(memory.ok()) << memory.status();
  std::shared_ptr<MemoryTier> base(std::move(*memory));
  auto slow = std::make_shared<FaultInjectingTier>(*base, /*seed=*/11);
  slow->Inject({.kind = FaultKind::kSlowIo, .probability = 0.3, .delay = absl::Milliseconds(2)});
  o.disk_tier = slow;
  // 24 heads keep an open block each; 64 blocks leave room for a working
  // set, and the rest moves down.
  o.host_tier_bytes = 64 * block;
  auto created = Runtime::Create(o);
  ASSERT_TRUE(created.ok()) << created.status();
  Runtime& rt = **created;

  const int kThreads = 3, kSteps = 40;
  std::atomic<int> errors{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t + 1);
      const int H = 2, d = 64;
      for (int round = 0; round < 2; ++round) {
        const SequenceId ids[2] = {SequenceId(10 * t + 2 * round), SequenceId(10 * t + 2 * round + 1)};
        for (SequenceId id : ids) errors += !rt.AddSequence(id).ok();
        for (int step = 0; step < kSteps; ++step) {
          for (SequenceId id : ids) {
            for (int layer = 0; layer < 2; ++layer) {
              const int n = step == 0 ? 60 : 1 + static_cast<int>(rng() % 3);
              workload::Tensor k(DType::kF16, 0), v(DType::kF16, 0);
              k.Assign(RandomNormal(n * H * d, rng(), 1.0f, 0.2f).data(), n * H * d);
              v.Assign(RandomNormal(n * H * d, rng()).data(), n * H * d);
              if (absl::Status st = rt.Append(id, layer, k.data(), v.data(), n); !st.ok()) {
                ++errors;
                ADD_FAILURE() << st;
              }
              workload::Tensor q(DType::kF16, 0), out(DType::kF16, 4 * d);
              q.Assign(RandomNormal(4 * d, rng()).data(), 4 * d);
              if (!rt.Attend(id, layer, q.data(), out.data()).ok()) ++errors;
              if (step % 7 == 3 && !rt.RecallTop(id, layer, q.data(), 4).ok()) ++errors;
            }
          }
        }
        for (SequenceId id : ids) errors += !rt.RemoveSequence(id).ok();
      }
    });
  }
  std::thread observer([&] {
    while (!done.load()) {
      const RuntimeStats s = rt.Stats();
      if (s.host_tier.blocks_in_use > 64) ++errors;  // never over the cap
      std::this_thread::yield();
    }
  });
  for (auto& th : threads) th.join();
  done = true;
  observer.join();
  EXPECT_EQ(errors.load(), 0);

  rt.Drain();
  const RuntimeStats s = rt.Stats();
  EXPECT_EQ(s.sequences, 0);
  EXPECT_GT(s.store.demotions, 0) << "the lower tier was used";
  EXPECT_GT(s.recall.requested, 0);
  EXPECT_EQ(s.recall.failed, 0);
  EXPECT_EQ(s.store.blocks, 0);
  EXPECT_EQ(s.host_tier.blocks_in_use, 0);
  EXPECT_EQ(s.disk_tier.blocks_in_use, 0);
  EXPECT_EQ(s.disk_tier.in_flight, 0);
  EXPECT_EQ(s.device_reserved.total(), plan.shared_bytes);
  EXPECT_EQ(s.regions.total(), 0);
  KVTIER_EXPECT_OK(rt.CheckInvariants());
}

}  // namespace
}  // namespace kvtier
