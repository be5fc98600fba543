// kvtier/offload/tier.h — a backing tier: fixed-size blocks that hold the
// exact K/V of vague tokens (one block = block_tokens tokens of one layer and
// KV head: the keys, then the values).
//
// A Tier is thread-safe. Block contents are owned by the tier; callers copy in
// and out. Reads and writes of distinct blocks may run concurrently.
#ifndef KVTIER_OFFLOAD_TIER_H_
#define KVTIER_OFFLOAD_TIER_H_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/stats.h"

namespace kvtier {

using BlockId = uint32_t;

class Tier {
 public:
  virtual ~Tier() = default;
  virtual std::string_view name() const = 0;
  virtual int64_t block_bytes() const = 0;

  // A new block (contents unspecified). ResourceExhausted, naming the cap,
  // when the tier is full.
  virtual absl::StatusOr<BlockId> Allocate() = 0;
  // Copies bytes into [offset, offset + bytes) of the block; complete on return.
  // InvalidArgument for a range outside the block, FailedPrecondition for a
  // block that is not allocated.
  virtual absl::Status Write(BlockId block, int64_t offset, const void* src, int64_t bytes) = 0;
  virtual absl::Status Read(BlockId block, int64_t offset, void* dst, int64_t bytes) = 0;
  virtual absl::Status Free(BlockId block) = 0;

  virtual TierStats Stats() const = 0;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_TIER_H_
