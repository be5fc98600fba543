// kvtier/allocator/block_ids.h — ids of fixed-size blocks: the bookkeeping
// every block allocator in kvtier shares (the device arena, the host pool,
// the memory and NVMe tiers).
//
// Ids are dense from 0. Take hands out a freed id (the most recently freed
// first) or else the next new one, up to an optional cap on ids in use;
// Release takes one back. Counts are exact. Not thread-safe: the owner
// serialises calls (it holds its own lock around them).
#ifndef KVTIER_ALLOCATOR_BLOCK_IDS_H_
#define KVTIER_ALLOCATOR_BLOCK_IDS_H_

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace kvtier {

class BlockIds {
 public:
  // cap: most ids in use at once; 0 = no cap (ids stay below 2^32).
  explicit BlockIds(int64_t cap = 0) : cap_(cap) {}

  // True when Take would hand out a new id (no freed id is waiting).
  bool NeedsNew() const { return free_.empty(); }
  // The id Take hands out next when NeedsNew().
  uint32_t next_new() const { return static_cast<uint32_t>(in_use_.size()); }

  // A freed id, else a new one; nullopt at the cap or beyond 2^32 - 1 ids.
  std::optional<uint32_t> Take() {
    if (cap_ > 0 && used_ >= cap_) return std::nullopt;
    uint32_t id;
    if (!free_.empty()) {
      id = free_.back();
      free_.pop_back();
    } else {
      if (in_use_.size() >= 0xffffffffu) return std::nullopt;
      id = next_new();
      in_use_.push_back(0);
    }
    in_use_[id] = 1;
    peak_ = std::max(peak_, ++used_);
    return id;
  }

  // False (and no change) for an id that is not in use.
  bool Release(uint32_t id) {
    if (!InUse(id)) return false;
    in_use_[id] = 0;
    free_.push_back(id);
    --used_;
    return true;
  }

  bool InUse(uint32_t id) const { return id < in_use_.size() && in_use_[id] != 0; }
  int64_t used() const { return used_; }
  int64_t peak() const { return peak_; }
  int64_t cap() const { return cap_; }
  // Ids ever handed out (the high-water mark): the blocks backed so far.
  int64_t created() const { return static_cast<int64_t>(in_use_.size()); }

 private:
  const int64_t cap_;
  std::vector<uint8_t> in_use_;  // per id ever created
  std::vector<uint32_t> free_;   // released ids, a stack
  int64_t used_ = 0;
  int64_t peak_ = 0;
};

}  // namespace kvtier

#endif  // KVTIER_ALLOCATOR_BLOCK_IDS_H_
