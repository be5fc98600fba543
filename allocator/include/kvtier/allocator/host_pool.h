// kvtier/allocator/host_pool.h — the host memory of the host tier: fixed-size
// blocks carved from a few large allocations.
//
// Chunks come from Backend::AllocateHost lazily, one at a time, up to the cap
// (no huge allocation at start-up); each is bound to the NUMA node of the
// thread that grows the pool (hwloc) and pinned: by the backend where it pins
// host memory (CUDA), else with mlock where the limits allow, else left
// pageable with one warning. Blocks are handed out from a free list with
// exact accounting. Thread-safe.
#ifndef KVTIER_ALLOCATOR_HOST_POOL_H_
#define KVTIER_ALLOCATOR_HOST_POOL_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/allocator/block_ids.h"
#include "kvtier/backend.h"

namespace kvtier {

class HostBlockPool {
 public:
  using BlockId = uint32_t;

  struct Options {
    int64_t block_bytes = 4096;     // > 0, a multiple of 4096 (O_DIRECT transfers)
    int64_t capacity_bytes = 0;     // hard cap; 0 = none, else at least one block
    int64_t chunk_bytes = 16 << 20; // bytes per allocation, rounded down to whole blocks (at least one)
    bool lock_memory = true;        // mlock chunks the backend does not pin
    bool bind_numa = true;          // bind chunks to the calling thread's NUMA node
    // Block ids and the cap only, no memory (Data returns null): the host
    // tier of a plan-only runtime (Options::plan_only), which counts blocks
    // and bytes without holding K/V.
    bool accounting_only = false;
  };

  struct Stats {
    int64_t block_bytes = 0;
    int64_t blocks_in_use = 0;
    int64_t peak_blocks_in_use = 0;
    int64_t capacity_blocks = 0;  // 0 = no cap
    int64_t reserved_bytes = 0;   // held from the backend
    int64_t pinned_bytes = 0;     // pinned by the backend or mlock'ed
    int numa_node = -1;           // node the chunks are bound to; -1 = not bound
  };

  // The backend must outlive the pool.
  static absl::StatusOr<std::unique_ptr<HostBlockPool>> Create(Backend& backend, const Options& options);
  ~HostBlockPool();
  HostBlockPool(const HostBlockPool&) = delete;
  HostBlockPool& operator=(const HostBlockPool&) = delete;

  int64_t block_bytes() const { return block_bytes_; }

  // ResourceExhausted naming the cap when full, or the backend's error when
  // it cannot grow.
  absl::StatusOr<BlockId> Allocate();
  // FailedPrecondition for a block that is not allocated.
  absl::Status Free(BlockId block);
  // The block's memory (4096-byte aligned); null for a block that is not
  // allocated. Valid until the block is freed.
  char* Data(BlockId block) const;

  Stats GetStats() const;

  // Every chunk so far (base, bytes), in BlockId order; for registering the
  // pool's memory with an I/O engine.
  std::vector<std::pair<char*, int64_t>> Chunks() const;

 private:
  HostBlockPool(Backend& backend, const Options& options, int64_t blocks_per_chunk);
  absl::Status Grow();  // requires mu_ held exclusively

  Backend& backend_;
  const Options options_;
  const int64_t block_bytes_;
  const int64_t blocks_per_chunk_;
  mutable std::shared_mutex mu_;
  // Guarded by mu_:
  std::vector<char*> chunks_;
  std::vector<int64_t> chunk_blocks_;  // blocks in each chunk
  std::vector<int8_t> pinned_by_;      // per chunk: 0 none, 1 backend, 2 mlock
  int64_t reserved_blocks_ = 0;        // blocks the chunks hold
  BlockIds ids_;                       // cap: the capacity in blocks (0 = none)
  int64_t pinned_bytes_ = 0;
  int numa_node_ = -1;
  bool warned_unpinned_ = false;
};

}  // namespace kvtier

#endif  // KVTIER_ALLOCATOR_HOST_POOL_H_
