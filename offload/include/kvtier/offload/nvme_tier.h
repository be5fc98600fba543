// kvtier/offload/nvme_tier.h — the disk tier: blocks in one file under a
// configured directory, read and written through io_uring (liburing).
//
// The file is opened with O_DIRECT; where the filesystem refuses it (tmpfs,
// overlayfs), IoMode::kAuto falls back to buffered I/O with one warning and
// counts every buffered transfer (TierStats::buffered_fallbacks). The file is
// unlinked as soon as it is open, so it disappears with the process. Block i
// lives at offset i * block_bytes. Transfers whose buffer lies inside a
// registered region use io_uring fixed buffers (READ_FIXED / WRITE_FIXED).
// At most queue_depth transfers are in flight; more wait in a queue. One
// thread reaps completions and calls `done`. A short transfer is an error
// (DataLoss). Checksums are the caller's (the block store verifies every
// block it reads back). Thread-safe.
#ifndef KVTIER_OFFLOAD_NVME_TIER_H_
#define KVTIER_OFFLOAD_NVME_TIER_H_

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>

#include "kvtier/offload/tier.h"

namespace kvtier {

class NvmeTier final : public Tier {
 public:
  enum class IoMode {
    kAuto,      // O_DIRECT; buffered with a warning where O_DIRECT is refused
    kDirect,    // O_DIRECT or fail
    kBuffered,  // page-cache I/O
  };

  struct Options {
    std::string directory;         // required; created if missing
    int64_t capacity_bytes = 0;    // required, > 0: the file never grows past it
    int64_t block_bytes = 4096;    // > 0, a multiple of 4096, at most 2^30
    int queue_depth = 32;          // io_uring entries and transfers in flight, in [1, 4096]
    IoMode io_mode = IoMode::kAuto;
    // Replaces open(2) for the tier's file (tests: refuse O_DIRECT). Same
    // contract as open: a descriptor or -1 with errno set.
    std::function<int(const char* path, int flags, mode_t mode)> open_hook;
  };

  // InvalidArgument for bad options; the error of open/io_uring setup.
  static absl::StatusOr<std::unique_ptr<NvmeTier>> Create(const Options& options);
  // Drains, then closes. Not to be called from a `done` callback (nor is Drain).
  ~NvmeTier() override;

  std::string_view name() const override { return "nvme"; }
  int64_t block_bytes() const override;
  absl::StatusOr<BlockId> Allocate() override;
  absl::Status Free(BlockId block) override;
  void Write(BlockId block, const void* src, TierDone done) override;
  void Read(BlockId block, void* dst, TierDone done) override;
  void Drain() override;
  TierStats Stats() const override;

  // Registers [base, base + bytes) as an io_uring fixed buffer (base and
  // bytes 4096-aligned). Up to 1024 regions (a region over 1 GiB takes one
  // per GiB); ResourceExhausted beyond. There is no unregistering: the region
  // must stay mapped, and hold the same memory, for the tier's lifetime.
  // Where the kernel has no sparse fixed buffers the call succeeds and the
  // region is moved with plain READ/WRITE (logged once at Create).
  absl::Status RegisterBuffer(void* base, int64_t bytes);
  // True when the file is open with O_DIRECT.
  bool direct_io() const;

  class Impl;

 private:
  explicit NvmeTier(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_NVME_TIER_H_
