// kvtier/offload/counting_tier.h — a disk tier that holds no data: block ids
// under a cap, transfers that complete inline and count their bytes. The disk
// tier of a plan-only runtime (Options::plan_only), where the tiers account
// for K/V they never receive. Thread-safe.
#ifndef KVTIER_OFFLOAD_COUNTING_TIER_H_
#define KVTIER_OFFLOAD_COUNTING_TIER_H_

#include <memory>
#include <mutex>

#include "kvtier/allocator/block_ids.h"
#include "kvtier/offload/tier.h"

namespace kvtier {

class CountingTier final : public Tier {
 public:
  // block_bytes > 0; capacity_bytes 0 = no cap, else at least one block.
  static absl::StatusOr<std::unique_ptr<CountingTier>> Create(int64_t block_bytes, int64_t capacity_bytes);

  std::string_view name() const override { return "counting"; }
  int64_t block_bytes() const override { return block_bytes_; }
  absl::StatusOr<BlockId> Allocate() override;
  absl::Status Free(BlockId block) override;
  // src and dst are not touched (they may be null).
  void Write(BlockId block, const void* src, TierDone done) override;
  void Read(BlockId block, void* dst, TierDone done) override;
  void Drain() override {}
  TierStats Stats() const override;

 private:
  CountingTier(int64_t block_bytes, int64_t capacity_bytes)
      : block_bytes_(block_bytes), capacity_bytes_(capacity_bytes), ids_(capacity_bytes / block_bytes) {}

  const int64_t block_bytes_;
  const int64_t capacity_bytes_;
  mutable std::mutex mu_;
  BlockIds ids_;
  TierStats stats_;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_COUNTING_TIER_H_
