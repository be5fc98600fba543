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

  // Adds a fault; several may be active. Clear removes them all.
  void Inject(const FaultSpec& spec);
  void Clear();
  // Faults injected so far, by kind.
  int64_t injected(FaultKind kind) const;

  std::string_view name() const override;
  int64_t block_bytes() const override;
  absl::StatusOr<BlockId> Allocate() override;
  absl::Status Free(BlockId block) override;
  void Write(BlockId block, const void* src, TierDone done) override;
  void Read(BlockId block, void* dst, TierDone done) override;
  void Drain() override;
  TierStats Stats() const override;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_FAULT_TIER_H_
