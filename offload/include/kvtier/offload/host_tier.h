// kvtier/offload/host_tier.h — the host-memory tier: blocks carved from large
// allocations of the backend's host memory, a free list, an optional cap.
//
// Thread-safe: Allocate/Free take a lock; Read/Write take it shared only to
// find the block.
#ifndef KVTIER_OFFLOAD_HOST_TIER_H_
#define KVTIER_OFFLOAD_HOST_TIER_H_

#include <atomic>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "kvtier/backend.h"
#include "kvtier/offload/tier.h"

namespace kvtier {

class HostTier final : public Tier {
 public:
  struct Options {
    int64_t block_bytes = 4096;   // > 0
    int64_t capacity_bytes = 0;   // 0 = no cap; else at least one block
    int32_t blocks_per_chunk = 256;  // blocks per allocation from the backend, > 0
  };

  // The backend must outlive the tier.
  static absl::StatusOr<std::unique_ptr<HostTier>> Create(Backend& backend, const Options& options);
  ~HostTier() override;

  std::string_view name() const override { return "host"; }
  int64_t block_bytes() const override { return block_bytes_; }
  absl::StatusOr<BlockId> Allocate() override;
  absl::Status Write(BlockId block, int64_t offset, const void* src, int64_t bytes) override;
  absl::Status Read(BlockId block, int64_t offset, void* dst, int64_t bytes) override;
  absl::Status Free(BlockId block) override;
  TierStats Stats() const override;

 private:
  HostTier(Backend& backend, const Options& options);
  // The block's memory, or an error status for a bad block or range.
  absl::StatusOr<char*> Locate(BlockId block, int64_t offset, int64_t bytes) const;

  Backend& backend_;
  const int64_t block_bytes_;
  const int64_t capacity_bytes_;   // as configured; 0 = no cap
  const int64_t capacity_blocks_;  // whole blocks within the cap
  const int32_t blocks_per_chunk_;
  mutable std::shared_mutex mu_;
  // Guarded by mu_:
  std::vector<char*> chunks_;
  std::vector<uint8_t> in_use_;  // per block
  std::vector<BlockId> free_;
  int64_t blocks_in_use_ = 0;
  int64_t peak_blocks_ = 0;
  std::atomic<int64_t> bytes_written_{0};
  std::atomic<int64_t> bytes_read_{0};
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_HOST_TIER_H_
