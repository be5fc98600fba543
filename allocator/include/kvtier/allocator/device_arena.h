// kvtier/allocator/device_arena.h — device memory from one allocation.
//
// The arena takes one allocation of prefix_bytes + chunk_bytes * chunk_count
// from the backend at creation and never allocates again: the prefix holds
// runtime-wide state, the chunks (one per sequence) are handed out and taken
// back through a free list. Nothing is allocated on the decode path.
// Thread-safe.
#ifndef KVTIER_ALLOCATOR_DEVICE_ARENA_H_
#define KVTIER_ALLOCATOR_DEVICE_ARENA_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "kvtier/allocator/block_ids.h"
#include "kvtier/backend.h"

namespace kvtier {

class DeviceArena {
 public:
  struct Options {
    int64_t prefix_bytes = 0;  // >= 0, rounded up to 64
    int64_t chunk_bytes = 0;   // > 0, rounded up to 64
    int32_t chunk_count = 0;   // > 0
  };

  // The backend must outlive the arena.
  static absl::StatusOr<std::unique_ptr<DeviceArena>> Create(Backend& backend, const Options& options);
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  void* prefix() const { return base_; }
  int64_t chunk_bytes() const { return chunk_bytes_; }

  // ResourceExhausted naming the count when every chunk is in use.
  absl::StatusOr<void*> AllocateChunk();
  // FailedPrecondition for a pointer that is not a chunk in use.
  absl::Status FreeChunk(void* chunk);

  int64_t capacity_bytes() const { return prefix_bytes_ + chunk_bytes_ * chunk_count_; }
  // The prefix plus the chunks in use.
  int64_t bytes_in_use() const;
  int64_t peak_bytes_in_use() const;

 private:
  DeviceArena(Backend& backend, char* base, const Options& options);

  Backend& backend_;
  char* const base_;
  const int64_t prefix_bytes_;
  const int64_t chunk_bytes_;
  const int32_t chunk_count_;
  mutable std::mutex mu_;
  BlockIds chunks_;  // guarded by mu_; cap: chunk_count
};

}  // namespace kvtier

#endif  // KVTIER_ALLOCATOR_DEVICE_ARENA_H_
