// kvtier/offload/fault_tier.h — a Tier wrapper that injects faults into the
// tier below it, to test that the runtime keeps serving through them.
//
// Faults, each with a probability per operation (seeded, deterministic for a
// given sequence of calls), an optional limit on how many fire, and an
// optional block filter:
//   kReadError   Read completes with Unavailable; the buffer is untouched.
//   kShortRead   Read delivers only the first half of the block (the rest of
//                the buffer zeroed) and completes with DataLoss, as a disk
//                tier reports a short transfer.
//   kBitFlip     Read completes OK with one bit of the buffer flipped: silent
//                corruption that only a checksum above the tier can catch.
//   kWriteError  Write completes with Unavailable; nothing is written.
//   kNoSpace     Allocate fails with ResourceExhausted, and Write completes
//                with ResourceExhausted ("no space left"), nothing written.
//   kSlowIo      the transfer runs, and `done` is delayed by `delay`.
// (O_DIRECT refusal is a property of opening a file: NvmeTier::Options::open_hook.)
//
// Which faults fire: each operation (Allocate, Read, Write) checks the specs
// that apply to it in the order they were injected. An eligible spec (max_count
// not reached, block filter matching) draws once from a std::mt19937_64 seeded
// with `seed` and fires with its probability; so a given seed and sequence of
// calls always injects the same faults (concurrent callers: in the order they
// take the wrapper's lock). At most one fault fires per operation, the first
// that does, except that one kSlowIo may combine with it (an injected error is
// then delivered late); once an operation has its fault (or its delay), the
// remaining non-kSlowIo (or kSlowIo) specs are skipped without a draw and do
// not count toward their max_count. kBitFlip also draws the bit to flip, at
// submission. A block filter never matches Allocate (the block is not known
// yet): a filtered kNoSpace only fails Writes of that block.
// Probabilities are clamped into [0, 1] (NaN is 0), delays into [0, 24 h];
// max_count < 0 means no limit.
//
// Injected errors carry the fault ("injected read error", "injected short
// read", "injected write error", "no space left (injected fault)"), the block
// and the base tier's name. A base error takes precedence: a kShortRead or
// kBitFlip whose base read fails completes with the base's error as is (the
// fault still counts in injected()).
//
// Completions run inline or on the base's thread, as the base delivers them;
// delayed ones run on a timer thread the wrapper owns (one thread; `done`
// never runs before `delay` has passed since the base completed, or since
// submission for an injected error that never reaches the base). A `done`
// must not call Drain or destroy the wrapper.
// Thread-safe.
#ifndef KVTIER_OFFLOAD_FAULT_TIER_H_
#define KVTIER_OFFLOAD_FAULT_TIER_H_

#include <cstdint>
#include <memory>
#include <optional>

#include "absl/time/time.h"
#include "kvtier/offload/tier.h"

namespace kvtier {

enum class FaultKind : uint8_t { kReadError, kShortRead, kBitFlip, kWriteError, kNoSpace, kSlowIo };
inline constexpr int kNumFaultKinds = 6;

struct FaultSpec {
  FaultKind kind = FaultKind::kReadError;
  double probability = 1.0;             // per eligible operation, in [0, 1]
  int64_t max_count = -1;               // faults to inject at most; -1 = no limit
  std::optional<BlockId> block;         // only this block; nullopt = any
  absl::Duration delay = absl::ZeroDuration();  // kSlowIo
};

class FaultInjectingTier final : public Tier {
 public:
  // `base` must outlive the wrapper.
  FaultInjectingTier(Tier& base, uint64_t seed);
  ~FaultInjectingTier() override;  // drains

  // Adds a fault; several may be active. Clear removes them all (transfers in
  // flight keep the faults already decided; injected() counts are kept).
  void Inject(const FaultSpec& spec);
  void Clear();
  // Faults injected so far, by kind: counted when the fault fires (a kNoSpace
  // counts failed Allocates and Writes alike).
  int64_t injected(FaultKind kind) const;

  // The base's name and block size.
  std::string_view name() const override;
  int64_t block_bytes() const override;
  absl::StatusOr<BlockId> Allocate() override;
  absl::Status Free(BlockId block) override;
  void Write(BlockId block, const void* src, TierDone done) override;
  void Read(BlockId block, void* dst, TierDone done) override;
  // Waits until every transfer submitted to the wrapper, delayed completions
  // included, has called `done` and `done` has returned.
  void Drain() override;
  // The base's stats (reads, writes and bytes are the transfers the base
  // performed, kShortRead and kBitFlip reads included), with read_errors and
  // write_errors adding the injected errors delivered (kReadError, kShortRead,
  // kWriteError, kNoSpace on Write; a failed Allocate is not a transfer), and
  // in_flight the wrapper's own: transfers submitted to it whose `done` has
  // not returned, delayed completions included (transfers submitted to the
  // base directly are not counted).
  TierStats Stats() const override;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_FAULT_TIER_H_
