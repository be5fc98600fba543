#include "kvtier/offload/counting_tier.h"

#include "absl/strings/str_format.h"

namespace kvtier {

absl::StatusOr<std::unique_ptr<CountingTier>> CountingTier::Create(int64_t block_bytes, int64_t capacity_bytes) {
  if (block_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat("counting tier: block_bytes must be > 0, got %d", block_bytes));
  }
  if (capacity_bytes < 0 || (capacity_bytes > 0 && capacity_bytes < block_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "counting tier: capacity_bytes must be 0 (no cap) or at least one block of %d bytes, got %d", block_bytes,
        capacity_bytes));
  }
  return std::unique_ptr<CountingTier>(new CountingTier(block_bytes, capacity_bytes));
}

absl::StatusOr<BlockId> CountingTier::Allocate() {
  std::lock_guard lock(mu_);
  if (ids_.cap() > 0 && ids_.used() >= ids_.cap()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "counting tier is full: %d blocks of %d bytes in use, the cap of %d bytes", ids_.used(), block_bytes_,
        capacity_bytes_));
  }
  std::optional<uint32_t> id = ids_.Take();
  if (!id) return absl::ResourceExhaustedError("counting tier: no more block ids");
  return *id;
}

absl::Status CountingTier::Free(BlockId block) {
  std::lock_guard lock(mu_);
  if (!ids_.Release(block)) {
    return absl::FailedPreconditionError(absl::StrFormat("counting tier: free of block %d, which is not allocated", block));
  }
  return absl::OkStatus();
}

void CountingTier::Write(BlockId block, const void*, TierDone done) {
  absl::Status st;
  {
    std::lock_guard lock(mu_);
    if (!ids_.InUse(block)) {
      ++stats_.write_errors;
      st = absl::FailedPreconditionError(absl::StrFormat("counting tier: write to block %d, which is not allocated", block));
    } else {
      ++stats_.writes;
      stats_.bytes_written += block_bytes_;
    }
  }
  std::move(done)(std::move(st));
}

void CountingTier::Read(BlockId block, void*, TierDone done) {
  absl::Status st;
  {
    std::lock_guard lock(mu_);
    if (!ids_.InUse(block)) {
      ++stats_.read_errors;
      st = absl::FailedPreconditionError(absl::StrFormat("counting tier: read of block %d, which is not allocated", block));
    } else {
      ++stats_.reads;
      stats_.bytes_read += block_bytes_;
    }
  }
  std::move(done)(std::move(st));
}

TierStats CountingTier::Stats() const {
  std::lock_guard lock(mu_);
  TierStats s = stats_;
  s.block_bytes = block_bytes_;
  s.blocks_in_use = ids_.used();
  s.bytes_in_use = ids_.used() * block_bytes_;
  s.peak_bytes_in_use = ids_.peak() * block_bytes_;
  s.capacity_bytes = ids_.cap() * block_bytes_;
  return s;
}

}  // namespace kvtier
