// kvtier/offload/tier.h — a backing tier: fixed-size blocks that hold the
// exact K/V of vague tokens (one block = block_tokens tokens of one layer and
// KV head: their keys, then their values).
//
// Transfers are asynchronous and whole-block: Write and Read return at once
// and call `done` exactly once when the transfer has completed (or failed),
// on a tier thread or inline before returning. A write counts as done only
// when the data is in the tier (for a disk tier: the write completed). The
// buffer passed to Write/Read belongs to the tier until `done` runs: the
// caller must neither touch nor free it. Buffers of every tier are host
// memory of block_bytes(), 4096-byte aligned.
//
// A Tier is thread-safe: Allocate/Free/Write/Read/Stats may be called from
// any thread. Transfers of distinct blocks may run concurrently; the caller
// must not start a transfer on a block while another on it is in flight, nor
// free a block with a transfer in flight.
#ifndef KVTIER_OFFLOAD_TIER_H_
#define KVTIER_OFFLOAD_TIER_H_

#include <cstdint>
#include <string_view>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/stats.h"

namespace kvtier {

using BlockId = uint32_t;

// Called once per transfer with OkStatus or the error.
using TierDone = absl::AnyInvocable<void(absl::Status) &&>;

class Tier {
 public:
  virtual ~Tier() = default;
  virtual std::string_view name() const = 0;
  virtual int64_t block_bytes() const = 0;

  // A new block (contents unspecified). ResourceExhausted, naming the cap,
  // when the tier is full.
  virtual absl::StatusOr<BlockId> Allocate() = 0;
  // FailedPrecondition for a block that is not allocated.
  virtual absl::Status Free(BlockId block) = 0;

  // Asynchronous whole-block transfers, see the file comment. Errors go to
  // `done`: FailedPrecondition (block not allocated), InvalidArgument
  // (misaligned buffer), Unavailable / Internal / DataLoss / ResourceExhausted
  // for I/O failures, with the block, the tier and the error in the message.
  virtual void Write(BlockId block, const void* src, TierDone done) = 0;
  virtual void Read(BlockId block, void* dst, TierDone done) = 0;

  // Blocks until every transfer submitted so far has called `done`.
  virtual void Drain() = 0;

  virtual TierStats Stats() const = 0;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_TIER_H_
