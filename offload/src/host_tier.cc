#include "kvtier/offload/host_tier.h"

#include <cstring>

#include "absl/strings/str_format.h"

namespace kvtier {

absl::StatusOr<std::unique_ptr<HostTier>> HostTier::Create(Backend& backend, const HostBlockPool::Options& options) {
  absl::StatusOr<std::unique_ptr<HostBlockPool>> pool = HostBlockPool::Create(backend, options);
  if (!pool.ok()) return pool.status();
  return std::unique_ptr<HostTier>(new HostTier(std::move(*pool)));
}

void HostTier::Write(BlockId block, const void* src, TierDone done) {
  if (reinterpret_cast<uintptr_t>(src) % 4096 != 0) {
    write_errors_.fetch_add(1, std::memory_order_relaxed);
    std::move(done)(absl::InvalidArgumentError(
        absl::StrFormat("host tier: write to block %d from %p, which is not 4096-byte aligned", block, src)));
    return;
  }
  char* dst = pool_->Data(block);
  if (dst == nullptr) {
    write_errors_.fetch_add(1, std::memory_order_relaxed);
    std::move(done)(absl::FailedPreconditionError(absl::StrFormat("host tier: write to block %d, which is not allocated", block)));
    return;
  }
  std::memcpy(dst, src, static_cast<size_t>(pool_->block_bytes()));
  writes_.fetch_add(1, std::memory_order_relaxed);
  std::move(done)(absl::OkStatus());
}

void HostTier::Read(BlockId block, void* dst, TierDone done) {
  if (reinterpret_cast<uintptr_t>(dst) % 4096 != 0) {
    read_errors_.fetch_add(1, std::memory_order_relaxed);
    std::move(done)(absl::InvalidArgumentError(
        absl::StrFormat("host tier: read of block %d into %p, which is not 4096-byte aligned", block, dst)));
    return;
  }
  const char* src = pool_->Data(block);
  if (src == nullptr) {
    read_errors_.fetch_add(1, std::memory_order_relaxed);
    std::move(done)(absl::FailedPreconditionError(absl::StrFormat("host tier: read of block %d, which is not allocated", block)));
    return;
  }
  std::memcpy(dst, src, static_cast<size_t>(pool_->block_bytes()));
  reads_.fetch_add(1, std::memory_order_relaxed);
  std::move(done)(absl::OkStatus());
}

TierStats HostTier::Stats() const {
  const HostBlockPool::Stats p = pool_->GetStats();
  TierStats s;
  s.block_bytes = p.block_bytes;
  s.blocks_in_use = p.blocks_in_use;
  s.bytes_in_use = p.blocks_in_use * p.block_bytes;
  s.bytes_reserved = p.reserved_bytes;
  s.peak_bytes_in_use = p.peak_blocks_in_use * p.block_bytes;
  s.capacity_bytes = p.capacity_blocks * p.block_bytes;
  s.writes = writes_.load(std::memory_order_relaxed);
  s.reads = reads_.load(std::memory_order_relaxed);
  s.bytes_written = s.writes * p.block_bytes;
  s.bytes_read = s.reads * p.block_bytes;
  s.write_errors = write_errors_.load(std::memory_order_relaxed);
  s.read_errors = read_errors_.load(std::memory_order_relaxed);
  s.pinned_bytes = p.pinned_bytes;
  s.numa_node = p.numa_node;
  return s;
}

}  // namespace kvtier
