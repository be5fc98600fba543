#include "kvtier/allocator/host_pool.h"

#include <hwloc.h>
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>

#include "absl/strings/str_format.h"
#include "kvtier/log.h"

namespace kvtier {
namespace {

// Binds [p, p + bytes) to the NUMA node of the calling thread's current CPU.
// Returns the node, or -1 when the topology or binding is unavailable.
int BindToLocalNode(void* p, int64_t bytes) {
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) != 0) return -1;
  int node = -1;
  if (hwloc_topology_load(topo) == 0) {
    hwloc_cpuset_t cpu = hwloc_bitmap_alloc();
    hwloc_nodeset_t nodes = hwloc_bitmap_alloc();
    if (hwloc_get_last_cpu_location(topo, cpu, HWLOC_CPUBIND_THREAD) == 0) {
      hwloc_cpuset_to_nodeset(topo, cpu, nodes);
      const int first = hwloc_bitmap_first(nodes);
      if (first >= 0) {
        hwloc_bitmap_only(nodes, static_cast<unsigned>(first));
        // Chunks are fresh allocations: binding before first touch places
        // every page; MIGRATE moves any page already touched.
        if (hwloc_set_area_membind(topo, p, static_cast<size_t>(bytes), nodes, HWLOC_MEMBIND_BIND,
                                   HWLOC_MEMBIND_BYNODESET | HWLOC_MEMBIND_MIGRATE) == 0 ||
            hwloc_set_area_membind(topo, p, static_cast<size_t>(bytes), nodes, HWLOC_MEMBIND_BIND,
                                   HWLOC_MEMBIND_BYNODESET) == 0) {
          node = first;
        }
      }
    }
    hwloc_bitmap_free(cpu);
    hwloc_bitmap_free(nodes);
  }
  hwloc_topology_destroy(topo);
  return node;
}

}  // namespace

absl::StatusOr<std::unique_ptr<HostBlockPool>> HostBlockPool::Create(Backend& backend, const Options& o) {
  if (o.block_bytes <= 0 || o.block_bytes % 4096 != 0 || o.block_bytes > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host pool: block_bytes must be a positive multiple of 4096 up to 2^40, got %d", o.block_bytes));
  }
  if (o.capacity_bytes < 0 || (o.capacity_bytes > 0 && o.capacity_bytes < o.block_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host pool: capacity_bytes must be 0 (no cap) or at least one block of %d bytes, got %d", o.block_bytes,
        o.capacity_bytes));
  }
  if (o.chunk_bytes <= 0 || o.chunk_bytes > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host pool: chunk_bytes must be in (0, 2^40], got %d", o.chunk_bytes));
  }
  const int64_t per_chunk = std::max<int64_t>(1, o.chunk_bytes / o.block_bytes);
  return std::unique_ptr<HostBlockPool>(new HostBlockPool(backend, o, per_chunk));
}

HostBlockPool::HostBlockPool(Backend& backend, const Options& o, int64_t blocks_per_chunk)
    : backend_(backend),
      options_(o),
      block_bytes_(o.block_bytes),
      blocks_per_chunk_(blocks_per_chunk),
      ids_(o.capacity_bytes / o.block_bytes) {}

HostBlockPool::~HostBlockPool() {
  for (size_t i = 0; i < chunks_.size(); ++i) {
    if (chunks_[i] == nullptr) continue;  // accounting_only
    if (pinned_by_[i] == 2) munlock(chunks_[i], static_cast<size_t>(chunk_blocks_[i] * block_bytes_));
    backend_.FreeHost(chunks_[i]);
  }
}

absl::Status HostBlockPool::Grow() {
  const int64_t have = reserved_blocks_;
  int64_t n = blocks_per_chunk_;
  if (ids_.cap() > 0) n = std::min(n, ids_.cap() - have);
  if (have + n > int64_t{0xffffffff}) {
    return absl::ResourceExhaustedError(absl::StrFormat("host pool: %d blocks is the most it can index", have));
  }
  const int64_t bytes = n * block_bytes_;
  if (options_.accounting_only) {
    chunks_.push_back(nullptr);
    chunk_blocks_.push_back(n);
    pinned_by_.push_back(0);
    reserved_blocks_ += n;
    return absl::OkStatus();
  }
  absl::StatusOr<void*> mem = backend_.AllocateHost(bytes);
  if (!mem.ok()) {
    return absl::ResourceExhaustedError(absl::StrFormat("host pool: cannot grow by %d bytes (%d in use): %s", bytes,
                                                        have * block_bytes_, mem.status().message()));
  }
  char* base = static_cast<char*>(*mem);
  if (options_.bind_numa) {
    const int node = BindToLocalNode(base, bytes);
    if (node >= 0) numa_node_ = node;
  }
  int8_t pinned = 0;
  if (backend_.caps().pinned_host_memory) {
    pinned = 1;
  } else if (options_.lock_memory) {
    if (mlock(base, static_cast<size_t>(bytes)) == 0) {
      pinned = 2;
    } else if (!warned_unpinned_) {
      warned_unpinned_ = true;
      Log(LogSeverity::kWarning,
          absl::StrFormat("host pool: mlock of %d bytes failed (%s); the host tier stays in pageable memory "
                          "(raise RLIMIT_MEMLOCK to pin it)",
                          bytes, std::strerror(errno)));
    }
  }
  if (pinned != 0) pinned_bytes_ += bytes;
  chunks_.push_back(base);
  chunk_blocks_.push_back(n);
  pinned_by_.push_back(pinned);
  reserved_blocks_ += n;
  return absl::OkStatus();
}

absl::StatusOr<HostBlockPool::BlockId> HostBlockPool::Allocate() {
  std::unique_lock lock(mu_);
  if (ids_.cap() > 0 && ids_.used() >= ids_.cap()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host pool is full: %d blocks of %d bytes in use, the cap of %d bytes holds %d blocks", ids_.used(),
        block_bytes_, options_.capacity_bytes, ids_.cap()));
  }
  if (ids_.NeedsNew() && ids_.next_new() >= reserved_blocks_) {  // new ids need a new chunk
    if (absl::Status st = Grow(); !st.ok()) return st;
  }
  std::optional<uint32_t> id = ids_.Take();
  if (!id) return absl::ResourceExhaustedError("host pool: no more block ids");
  return *id;
}

absl::Status HostBlockPool::Free(BlockId block) {
  std::unique_lock lock(mu_);
  if (!ids_.Release(block)) {
    return absl::FailedPreconditionError(absl::StrFormat("host pool: free of block %d, which is not allocated", block));
  }
  return absl::OkStatus();
}

char* HostBlockPool::Data(BlockId block) const {
  std::shared_lock lock(mu_);
  if (!ids_.InUse(block) || options_.accounting_only) return nullptr;
  // Every chunk but a capped last one holds blocks_per_chunk_ blocks.
  return chunks_[block / blocks_per_chunk_] + static_cast<int64_t>(block % blocks_per_chunk_) * block_bytes_;
}

HostBlockPool::Stats HostBlockPool::GetStats() const {
  std::shared_lock lock(mu_);
  Stats s;
  s.block_bytes = block_bytes_;
  s.blocks_in_use = ids_.used();
  s.peak_blocks_in_use = ids_.peak();
  s.capacity_blocks = ids_.cap();
  s.reserved_bytes = options_.accounting_only ? 0 : reserved_blocks_ * block_bytes_;
  s.pinned_bytes = pinned_bytes_;
  s.numa_node = numa_node_;
  return s;
}

std::vector<std::pair<char*, int64_t>> HostBlockPool::Chunks() const {
  std::shared_lock lock(mu_);
  std::vector<std::pair<char*, int64_t>> out;
  for (size_t i = 0; i < chunks_.size(); ++i) {
    if (chunks_[i] != nullptr) out.emplace_back(chunks_[i], chunk_blocks_[i] * block_bytes_);
  }
  return out;
}

}  // namespace kvtier
