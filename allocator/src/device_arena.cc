#include "kvtier/allocator/device_arena.h"

#include <algorithm>
#include <optional>

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
  // Sizes up to 2^62 round without overflow; the total must fit an int64.
  constexpr int64_t kMaxBytes = int64_t{1} << 62;
  int64_t chunks_total = 0, total = 0;
  if (options.prefix_bytes > kMaxBytes || options.chunk_bytes > kMaxBytes ||
      __builtin_mul_overflow(Round64(options.chunk_bytes), int64_t{options.chunk_count}, &chunks_total) ||
      __builtin_add_overflow(Round64(options.prefix_bytes), chunks_total, &total)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "device arena of prefix %d + %d chunks of %d bytes does not fit in 2^63 bytes", options.prefix_bytes,
        options.chunk_count, options.chunk_bytes));
  }
  Options o = options;
  o.prefix_bytes = Round64(o.prefix_bytes);
  o.chunk_bytes = Round64(o.chunk_bytes);
  absl::StatusOr<void*> mem = backend.AllocateDevice(total);
  if (!mem.ok()) return mem.status();
  return std::unique_ptr<DeviceArena>(new DeviceArena(backend, static_cast<char*>(*mem), o));
}

DeviceArena::DeviceArena(Backend& backend, char* base, const Options& o)
    : backend_(backend),
      base_(base),
      prefix_bytes_(o.prefix_bytes),
      chunk_bytes_(o.chunk_bytes),
      chunk_count_(o.chunk_count),
      chunks_(o.chunk_count) {}

DeviceArena::~DeviceArena() { backend_.FreeDevice(base_); }

absl::StatusOr<void*> DeviceArena::AllocateChunk() {
  std::lock_guard lock(mu_);
  std::optional<uint32_t> i = chunks_.Take();
  if (!i) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("device arena: all %d chunks of %d bytes are in use", chunk_count_, chunk_bytes_));
  }
  return base_ + prefix_bytes_ + chunk_bytes_ * static_cast<int64_t>(*i);
}

absl::Status DeviceArena::FreeChunk(void* chunk) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(base_) + prefix_bytes_;
  const uintptr_t p = reinterpret_cast<uintptr_t>(chunk);
  const bool inside = p >= first && (p - first) % chunk_bytes_ == 0 &&
                      (p - first) / chunk_bytes_ < static_cast<uintptr_t>(chunk_count_);
  std::lock_guard lock(mu_);
  if (!inside || !chunks_.Release(static_cast<uint32_t>((p - first) / chunk_bytes_))) {
    return absl::FailedPreconditionError(absl::StrFormat("device arena: %p is not a chunk in use", chunk));
  }
  return absl::OkStatus();
}

int64_t DeviceArena::bytes_in_use() const {
  std::lock_guard lock(mu_);
  return prefix_bytes_ + chunk_bytes_ * chunks_.used();
}

int64_t DeviceArena::peak_bytes_in_use() const {
  std::lock_guard lock(mu_);
  return prefix_bytes_ + chunk_bytes_ * chunks_.peak();
}

}  // namespace kvtier
