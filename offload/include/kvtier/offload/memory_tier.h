// kvtier/offload/memory_tier.h — an in-memory Tier for tests and fault
// injection: blocks in ordinary heap memory, completions delivered on the
// tier's own thread (so callers see real asynchrony), optional cap.
// Thread-safe.
#ifndef KVTIER_OFFLOAD_MEMORY_TIER_H_
#define KVTIER_OFFLOAD_MEMORY_TIER_H_

#include <memory>

#include "kvtier/offload/tier.h"

namespace kvtier {

class MemoryTier final : public Tier {
 public:
  struct Options {
    int64_t block_bytes = 4096;   // > 0, a multiple of 4096
    int64_t capacity_bytes = 0;   // 0 = no cap; else at least one block
  };

  static absl::StatusOr<std::unique_ptr<MemoryTier>> Create(const Options& options);
  ~MemoryTier() override;  // drains

  std::string_view name() const override { return "memory"; }
  int64_t block_bytes() const override;
  absl::StatusOr<BlockId> Allocate() override;
  absl::Status Free(BlockId block) override;
  void Write(BlockId block, const void* src, TierDone done) override;
  void Read(BlockId block, void* dst, TierDone done) override;
  void Drain() override;
  TierStats Stats() const override;

  class Impl;

 private:
  explicit MemoryTier(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_MEMORY_TIER_H_
