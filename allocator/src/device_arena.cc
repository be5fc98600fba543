#include "kvtier/allocator/device_arena.h"

#include <algorithm>
#include <cassert>

#include "absl/strings/str_format.h"

namespace kvtier {
namespace {
int64_t Round64(int64_t n) { return (n + 63) / 64 * 64; }
}  // namespace

absl::StatusOr<std::unique_ptr<DeviceArena>> DeviceArena::Create(Backend& backend, const Options& options) {
  if (options.prefix_bytes < 0 || options.chunk_bytes <= 0 || options.chunk_count <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat("device arena needs prefix >= 0, chunk > 0 bytes and count > 0;"
                                                      " got prefix %d, chunk %d, count %d",
                                                      options.prefix_bytes, options.chunk_bytes, options.chunk_count));
  }
  Options o = options;
  o.prefix_bytes = Round64(o.prefix_bytes);
  o.chunk_bytes = Round64(o.chunk_bytes);
  absl::StatusOr<void*> mem = backend.AllocateDevice(o.prefix_bytes + o.chunk_bytes * o.chunk_count);
  if (!mem.ok()) return mem.status();
  return std::unique_ptr<DeviceArena>(new DeviceArena(backend, static_cast<char*>(*mem), o));
}

DeviceArena::DeviceArena(Backend& backend, char* base, const Options& o)
    : backend_(backend),
      base_(base),
      prefix_bytes_(o.prefix_bytes),
      chunk_bytes_(o.chunk_bytes),
      chunk_count_(o.chunk_count) {
  free_.reserve(chunk_count_);
  for (int32_t i = chunk_count_ - 1; i >= 0; --i) free_.push_back(i);
}

DeviceArena::~DeviceArena() { backend_.FreeDevice(base_); }

absl::StatusOr<void*> DeviceArena::AllocateChunk() {
  absl::MutexLock lock(&mu_);
  if (free_.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("device arena: all %d chunks of %d bytes are in use", chunk_count_, chunk_bytes_));
  }
  const int32_t i = free_.back();
  free_.pop_back();
  peak_in_use_ = std::max<int32_t>(peak_in_use_, chunk_count_ - static_cast<int32_t>(free_.size()));
  return base_ + prefix_bytes_ + chunk_bytes_ * i;
}

void DeviceArena::FreeChunk(void* chunk) {
  const int64_t off = static_cast<char*>(chunk) - base_ - prefix_bytes_;
  assert(off >= 0 && off % chunk_bytes_ == 0 && off / chunk_bytes_ < chunk_count_);
  absl::MutexLock lock(&mu_);
  free_.push_back(static_cast<int32_t>(off / chunk_bytes_));
}

int64_t DeviceArena::bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return prefix_bytes_ + chunk_bytes_ * (chunk_count_ - static_cast<int64_t>(free_.size()));
}

int64_t DeviceArena::peak_bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return prefix_bytes_ + chunk_bytes_ * peak_in_use_;
}

}  // namespace kvtier
