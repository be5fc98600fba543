// kvtier/offload/host_tier.h — the host tier: blocks in the pinned host pool
// (kvtier/allocator/host_pool.h). Transfers are memcpy, done inline; the
// runtime also writes tokens straight into a block's memory (Data). Thread-safe.
#ifndef KVTIER_OFFLOAD_HOST_TIER_H_
#define KVTIER_OFFLOAD_HOST_TIER_H_

#include <atomic>
#include <memory>

#include "kvtier/allocator/host_pool.h"
#include "kvtier/backend.h"
#include "kvtier/offload/tier.h"

namespace kvtier {

class HostTier final : public Tier {
 public:
  // The backend must outlive the tier.
  static absl::StatusOr<std::unique_ptr<HostTier>> Create(Backend& backend, const HostBlockPool::Options& options);

  std::string_view name() const override { return "host"; }
  int64_t block_bytes() const override { return pool_->block_bytes(); }
  absl::StatusOr<BlockId> Allocate() override { return pool_->Allocate(); }
  absl::Status Free(BlockId block) override { return pool_->Free(block); }
  void Write(BlockId block, const void* src, TierDone done) override;
  void Read(BlockId block, void* dst, TierDone done) override;
  void Drain() override {}
  TierStats Stats() const override;

  // The block's memory, null when it is not allocated.
  char* Data(BlockId block) const { return pool_->Data(block); }
  // The pool under the tier, for registering its memory with an I/O engine.
  const HostBlockPool& pool() const { return *pool_; }

 private:
  explicit HostTier(std::unique_ptr<HostBlockPool> pool) : pool_(std::move(pool)) {}

  std::unique_ptr<HostBlockPool> pool_;
  std::atomic<int64_t> reads_{0}, writes_{0}, read_errors_{0}, write_errors_{0};
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_HOST_TIER_H_
