// kvtier/offload/block_store.h — the exact K/V of vague tokens, in logical
// blocks that move between the host tier and an optional disk tier.
//
// A block is created open in the host tier; tokens are written into it until
// it is sealed. Sealed blocks may be demoted: when the host tier holds more
// than the high watermark of its cap (demotions in flight counted as done),
// the coldest sealed blocks (lowest heat, which the runtime raises when it
// ranks or recalls a block's tokens) are written to the disk tier, coldest
// first, until it holds the low watermark; a block's host memory is freed
// only when its write completed. Demotions are decided on the caller's
// thread only (at Seal, or when CreateBlock finds the host tier full), never
// when an I/O completes. Each block
// written to disk carries an xxh3 checksum, verified when it is read back; a
// mismatch is read again once, then the block is lost: DataLoss for every
// read of it, counted, logged once, and nothing else touched. Reading a disk
// block for a gather promotes it back to the host tier when there is room,
// as the hottest block at the time the read was asked for.
//
// Gathers are asynchronous: rows of a block are copied to destinations (the
// device staging slots) on the store's transfer thread or, for disk blocks,
// when the disk read completes; each returns a Transfer that the caller polls.
// Thread-safe. Destruction waits for every transfer.
#ifndef KVTIER_OFFLOAD_BLOCK_STORE_H_
#define KVTIER_OFFLOAD_BLOCK_STORE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvtier/backend.h"
#include "kvtier/offload/host_tier.h"
#include "kvtier/offload/tier.h"

namespace kvtier {

// The checksum every block written to a lower tier carries: xxh3, 64 bits.
uint64_t BlockChecksum(const void* data, int64_t bytes);

// The completion of one asynchronous operation made of `parts` independent
// parts (one per block of a gather). Thread-safe.
class Transfer {
 public:
  explicit Transfer(int parts = 1);
  bool Done() const { return done_.load(std::memory_order_acquire); }
  // The outcome of one part / of all (the first error); meaningful once Done().
  absl::Status part_status(int part) const;
  absl::Status status() const;
  // Waits until done or until `timeout` passed; returns Done().
  bool WaitFor(absl::Duration timeout) const;
  void Wait() const;
  // Marks parts done (once each), under one lock; the transfer is done with
  // the last. The statuses are moved from.
  void FinishParts(std::span<std::pair<int, absl::Status>> parts);

 private:
  std::atomic<bool> done_{false};
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  int remaining_;
  std::vector<absl::Status> status_;
};

// One row to copy out of a block: [offset, offset + bytes) to dst (device
// memory of the store's backend).
struct GatherRow {
  int64_t offset = 0;
  void* dst = nullptr;
  int64_t bytes = 0;
};

// The rows to copy out of one block, and what the gather adds to the block's
// heat (as AddHeat would, under the gather's lock, before any part is read).
struct GatherPart {
  uint32_t block = 0;  // BlockStore::Ref
  std::vector<GatherRow> rows;
  float heat = 0.0f;
};

using BlockStoreStats = StoreStats;

class BlockStore {
 public:
  using Ref = uint32_t;

  struct Options {
    // Demote when host blocks in use exceed high_watermark of the host cap,
    // down to low_watermark. Only with a disk tier and a capped host tier.
    double high_watermark = 0.9;
    double low_watermark = 0.8;
    // How long Create waits for demotions to free a host block before
    // failing with ResourceExhausted.
    absl::Duration host_wait = absl::Seconds(10);
    // Called (with the store's lock held: it must not call back into the
    // store) for every chunk the host pool adds, e.g. to register it with the
    // disk tier's I/O engine.
    std::function<void(char* base, int64_t bytes)> on_new_host_chunk;
    // Blocks without contents (a plan-only runtime, Options::plan_only): the
    // host tier holds no memory (HostBlockPool accounting_only), Write and
    // Gather copy nothing but count their bytes, host gathers complete
    // inline, demotions and disk reads carry no data and no checksum, and
    // Read is FailedPrecondition. Placement, demotion, promotion, heat and
    // every counter work as with contents.
    bool content_free = false;
  };

  // `disk` may be null (no disk tier). host, disk and backend must outlive
  // the store. Blocks of both tiers must have the same size.
  static absl::StatusOr<std::unique_ptr<BlockStore>> Create(HostTier& host, Tier* disk, Backend& backend,
                                                            const Options& options);
  ~BlockStore();
  BlockStore(const BlockStore&) = delete;
  BlockStore& operator=(const BlockStore&) = delete;

  int64_t block_bytes() const { return block_bytes_; }

  // A new open block in the host tier; when the host tier is at its cap,
  // demotes and waits up to host_wait. ResourceExhausted naming both tiers.
  absl::StatusOr<Ref> CreateBlock();
  // Copies bytes into an open block (host memory); complete on return.
  // With content_free, src is not read (it may be null).
  absl::Status Write(Ref block, int64_t offset, const void* src, int64_t bytes);
  // Closes the block to writes; it may be demoted from now on.
  void Seal(Ref block);
  // Raises the block's heat (blocks with the lowest heat are demoted first).
  void AddHeat(Ref block, float heat);
  // Frees the block in every tier, after its transfers completed.
  absl::Status Delete(Ref block);

  // Synchronous read of [offset, offset + bytes) into host memory, from
  // wherever the block is (a disk read is verified). DataLoss for a lost block.
  absl::Status Read(Ref block, int64_t offset, void* dst, int64_t bytes);
  // Asynchronous copy of rows of several blocks to device memory; part i of
  // the transfer is parts[i]. Host-resident parts are copied together in one
  // job on the transfer thread; the others when their disk reads complete.
  // The store keeps copies of the rows it still needs, so a caller may reuse
  // `parts` at once.
  std::shared_ptr<Transfer> Gather(std::span<const GatherPart> parts);

  // Blocks until every demotion and gather submitted so far completed.
  void Drain();

  BlockStoreStats Stats() const;
  TierStats HostStats() const { return host_.Stats(); }
  TierStats DiskStats() const;

  class State;  // internal

 private:
  BlockStore(HostTier& host, Tier* disk, Backend& backend, std::unique_ptr<Stream> gather_stream,
             const Options& options);
  // All with state_->mu held; tier calls are queued to run after it is released.
  int64_t DemoteColdest(bool force);
  void StartDiskRead(Ref ref);
  // Completions, called without the lock.
  void OnDemoted(Ref ref, absl::Status status);
  void OnRead(Ref ref, absl::Status status);
  // Unpins the host-copied parts of a gather ((part, block), with the bytes
  // each copied) and completes them with `done` ((part, status); moved from).
  void FinishHostParts(std::span<const std::pair<int, Ref>> parts, std::span<const int64_t> bytes,
                       const std::shared_ptr<Transfer>& transfer, std::span<std::pair<int, absl::Status>> done);

  HostTier& host_;
  Tier* const disk_;
  Backend& backend_;
  const std::unique_ptr<Stream> gather_stream_;  // the worker's host-to-device copies
  const Options options_;
  const int64_t block_bytes_;
  std::unique_ptr<State> state_;
};

}  // namespace kvtier

#endif  // KVTIER_OFFLOAD_BLOCK_STORE_H_
