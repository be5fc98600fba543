#include "kvtier/offload/host_tier.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"

namespace kvtier {

absl::StatusOr<std::unique_ptr<HostTier>> HostTier::Create(Backend& backend, const Options& o) {
  if (o.block_bytes <= 0 || o.blocks_per_chunk <= 0 || o.capacity_bytes < 0 ||
      (o.capacity_bytes > 0 && o.capacity_bytes < o.block_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host tier needs block_bytes > 0, blocks_per_chunk > 0 and a capacity of 0 or at least one "
                        "block; got block_bytes %d, blocks_per_chunk %d, capacity_bytes %d",
                        o.block_bytes, o.blocks_per_chunk, o.capacity_bytes));
  }
  int64_t chunk_bytes = 0;
  if (__builtin_mul_overflow(o.block_bytes, int64_t{o.blocks_per_chunk}, &chunk_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host tier: chunks of %d blocks of %d bytes do not fit in 2^63 bytes", o.blocks_per_chunk, o.block_bytes));
  }
  return std::unique_ptr<HostTier>(new HostTier(backend, o));
}

HostTier::HostTier(Backend& backend, const Options& o)
    : backend_(backend),
      block_bytes_(o.block_bytes),
      capacity_bytes_(o.capacity_bytes),
      capacity_blocks_(o.capacity_bytes / o.block_bytes),
      blocks_per_chunk_(o.blocks_per_chunk) {}

HostTier::~HostTier() {
  for (char* c : chunks_) backend_.FreeHost(c);
}

absl::StatusOr<BlockId> HostTier::Allocate() {
  std::unique_lock lock(mu_);
  if (capacity_blocks_ > 0 && blocks_in_use_ >= capacity_blocks_) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host tier is full: %d blocks of %d bytes in use, the cap of %d bytes holds %d blocks", blocks_in_use_,
        block_bytes_, capacity_bytes_, capacity_blocks_));
  }
  if (free_.empty()) {
    // Grow by one chunk, no further than the cap.
    int64_t n = blocks_per_chunk_;
    const int64_t have = static_cast<int64_t>(in_use_.size());
    if (capacity_blocks_ > 0) n = std::min(n, capacity_blocks_ - have);
    if (have + n > (int64_t{1} << 32) - 1) {
      return absl::ResourceExhaustedError(absl::StrFormat("host tier: %d blocks is the most it can index", have));
    }
    absl::StatusOr<void*> mem = backend_.AllocateHost(n * block_bytes_);
    if (!mem.ok()) return mem.status();
    chunks_.push_back(static_cast<char*>(*mem));
    in_use_.resize(have + n, 0);
    // Hand out low ids first.
    for (int64_t i = have + n - 1; i >= have; --i) free_.push_back(static_cast<BlockId>(i));
  }
  const BlockId id = free_.back();
  free_.pop_back();
  in_use_[id] = 1;
  ++blocks_in_use_;
  peak_blocks_ = std::max(peak_blocks_, blocks_in_use_);
  return id;
}

absl::StatusOr<char*> HostTier::Locate(BlockId block, int64_t offset, int64_t bytes) const {
  if (offset < 0 || bytes < 0 || offset > block_bytes_ || bytes > block_bytes_ - offset) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host tier: %d bytes at offset %d are outside a block of %d bytes", bytes, offset, block_bytes_));
  }
  std::shared_lock lock(mu_);
  if (block >= in_use_.size() || !in_use_[block]) {
    return absl::FailedPreconditionError(absl::StrFormat("host tier: block %d is not allocated", block));
  }
  // Chunks hold blocks_per_chunk_ blocks except a capped last one, which is last.
  return chunks_[block / blocks_per_chunk_] + static_cast<int64_t>(block % blocks_per_chunk_) * block_bytes_ + offset;
}

absl::Status HostTier::Write(BlockId block, int64_t offset, const void* src, int64_t bytes) {
  absl::StatusOr<char*> dst = Locate(block, offset, bytes);
  if (!dst.ok()) return dst.status();
  std::memcpy(*dst, src, static_cast<size_t>(bytes));
  bytes_written_.fetch_add(bytes, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status HostTier::Read(BlockId block, int64_t offset, void* dst, int64_t bytes) {
  absl::StatusOr<char*> src = Locate(block, offset, bytes);
  if (!src.ok()) return src.status();
  std::memcpy(dst, *src, static_cast<size_t>(bytes));
  bytes_read_.fetch_add(bytes, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status HostTier::Free(BlockId block) {
  std::unique_lock lock(mu_);
  if (block >= in_use_.size() || !in_use_[block]) {
    return absl::FailedPreconditionError(absl::StrFormat("host tier: free of block %d, which is not allocated", block));
  }
  in_use_[block] = 0;
  free_.push_back(block);
  --blocks_in_use_;
  return absl::OkStatus();
}

TierStats HostTier::Stats() const {
  std::unique_lock lock(mu_);
  TierStats s;
  s.block_bytes = block_bytes_;
  s.blocks_in_use = blocks_in_use_;
  s.bytes_in_use = blocks_in_use_ * block_bytes_;
  s.bytes_reserved = static_cast<int64_t>(in_use_.size()) * block_bytes_;
  s.peak_bytes_in_use = peak_blocks_ * block_bytes_;
  s.capacity_bytes = capacity_blocks_ * block_bytes_;
  s.bytes_written = bytes_written_.load(std::memory_order_relaxed);
  s.bytes_read = bytes_read_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace kvtier
