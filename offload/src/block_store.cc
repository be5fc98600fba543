#include "kvtier/offload/block_store.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "absl/strings/str_format.h"
#include "kvtier/log.h"

namespace kvtier {

// ---------------------------------------------------------------- Transfer

Transfer::Transfer(int parts) : remaining_(parts), status_(parts) {
  if (parts == 0) done_.store(true, std::memory_order_release);
}

absl::Status Transfer::part_status(int part) const {
  std::lock_guard lock(mu_);
  return status_[part];
}

absl::Status Transfer::status() const {
  std::lock_guard lock(mu_);
  absl::Status all;
  for (const absl::Status& s : status_) all.Update(s);
  return all;
}

bool Transfer::WaitFor(absl::Duration timeout) const {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return Done(); });
}

void Transfer::Wait() const {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return Done(); });
}

void Transfer::FinishParts(std::span<std::pair<int, absl::Status>> parts) {
  if (parts.empty()) return;
  {
    std::lock_guard lock(mu_);
    for (auto& [part, status] : parts) status_[part] = std::move(status);
    remaining_ -= static_cast<int>(parts.size());
    if (remaining_ > 0) return;
    done_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------- State

namespace {

constexpr BlockId kNoBlock = 0xffffffffu;

uint64_t Checksum(const void* data, int64_t bytes) { return BlockChecksum(data, bytes); }

}  // namespace

uint64_t BlockChecksum(const void* data, int64_t bytes) { return XXH3_64bits(data, static_cast<size_t>(bytes)); }

class BlockStore::State {
 public:
  enum class Loc : uint8_t { kHost, kDisk, kLost };

  // A gather (or synchronous read) waiting for a disk read of its block.
  struct Waiter {
    std::vector<GatherRow> rows;
    bool to_host = false;
    std::shared_ptr<Transfer> transfer;
    int part = 0;
  };

  struct Block {
    bool live = false;
    Loc loc = Loc::kHost;
    bool sealed = false;
    bool demoting = false;   // disk write in flight; the host copy stays valid
    bool reading = false;    // disk read in flight
    bool retried = false;    // the current read is the retry after a checksum mismatch
    bool deleted = false;    // Delete called while busy: free when idle
    bool free_host_when_unpinned = false;
    BlockId host = kNoBlock;
    BlockId disk = kNoBlock;
    uint64_t checksum = 0;
    float heat = 0.0f;
    int pins = 0;            // gathers copying from the host copy
    std::vector<Waiter> waiting;
    // Disk-read bounce: a host-tier block (kept as the promoted copy) or heap.
    BlockId read_host = kNoBlock;
    char* read_heap = nullptr;
    float read_heat = 0.0f;  // the heat a promotion gives it, fixed when the read starts

    bool Busy() const { return pins > 0 || demoting || reading || !waiting.empty(); }
  };

  // Live, not deleted blocks by location (what Stats reports, kept current).
  int64_t at[3] = {0, 0, 0};
  void MoveTo(Block& b, Loc to) {
    --at[static_cast<int>(b.loc)];
    ++at[static_cast<int>(to)];
    b.loc = to;
  }

  std::mutex mu;
  std::condition_variable changed;  // a host block freed, a transfer finished
  std::vector<Block> blocks;
  std::vector<Ref> free_refs;
  int64_t host_copies = 0;  // blocks holding a host-tier block (bounces excluded)
  int64_t demoting = 0;
  int64_t in_flight = 0;    // demotions, gathers, disk reads
  // Transfers whose bookkeeping is done but whose parts are still being
  // finished outside the lock: Drain waits for them too, so that every
  // transfer it waited for reports Done when it returns.
  int64_t finishing = 0;
  bool disk_full = false;
  bool warned_write = false, warned_read = false, warned_lost = false, warned_full = false;
  size_t chunks_announced = 0;  // host pool chunks passed to on_new_host_chunk
  float max_heat = 0.0f;        // the hottest any block has been
  // Raises a live block's heat; under mu.
  void AddHeat(Ref ref, float heat) {
    if (ref < blocks.size() && blocks[ref].live) {
      blocks[ref].heat += heat;
      max_heat = std::max(max_heat, blocks[ref].heat);
    }
  }
  absl::Status last_demotion_error;  // of the most recent failed demotion
  BlockStoreStats stats;

  // Transfer thread: host-memory gathers, in submission order.
  std::deque<absl::AnyInvocable<void() &&>> jobs;
  std::condition_variable jobs_cv;
  bool stopping = false;
  std::thread worker;

  // Calls into the tiers happen outside `mu` (a tier may complete inline).
  std::vector<absl::AnyInvocable<void() &&>> deferred;
};

namespace {

// Runs the calls queued while holding the lock, after releasing it.
class Unlocked {
 public:
  explicit Unlocked(BlockStore::State& s) : s_(s), lock_(s.mu) {}
  ~Unlocked() { Flush(); }
  std::unique_lock<std::mutex>& lock() { return lock_; }
  void Flush() {
    while (!s_.deferred.empty()) {
      std::vector<absl::AnyInvocable<void() &&>> calls;
      calls.swap(s_.deferred);
      if (lock_.owns_lock()) lock_.unlock();
      for (auto& c : calls) std::move(c)();
      // Calls may queue more (inline completions): take the lock to look.
      lock_.lock();
    }
    if (lock_.owns_lock()) lock_.unlock();
  }

 private:
  BlockStore::State& s_;
  std::unique_lock<std::mutex> lock_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BlockStore>> BlockStore::Create(HostTier& host, Tier* disk, Backend& backend,
                                                               const Options& options) {
  if (disk != nullptr && disk->block_bytes() != host.block_bytes()) {
    return absl::InvalidArgumentError(absl::StrFormat("block store: host blocks of %d bytes, disk blocks of %d",
                                                      host.block_bytes(), disk->block_bytes()));
  }
  if (!(options.low_watermark > 0 && options.low_watermark <= options.high_watermark &&
        options.high_watermark <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "block store: need 0 < low_watermark <= high_watermark <= 1, got %g and %g", options.low_watermark,
        options.high_watermark));
  }
  // Recall gathers queue their copies on one stream and wait once per gather.
  absl::StatusOr<std::unique_ptr<Stream>> stream = backend.CreateStream();
  if (!stream.ok()) return stream.status();
  return std::unique_ptr<BlockStore>(new BlockStore(host, disk, backend, std::move(*stream), options));
}

BlockStore::BlockStore(HostTier& host, Tier* disk, Backend& backend, std::unique_ptr<Stream> gather_stream,
                       const Options& options)
    : host_(host), disk_(disk), backend_(backend), gather_stream_(std::move(gather_stream)), options_(options),
      block_bytes_(host.block_bytes()), state_(std::make_unique<State>()) {
  State& s = *state_;
  s.worker = std::thread([&s] {
    std::unique_lock lock(s.mu);
    while (true) {
      s.jobs_cv.wait(lock, [&] { return s.stopping || !s.jobs.empty(); });
      if (s.jobs.empty()) return;  // stopping, nothing left
      auto job = std::move(s.jobs.front());
      s.jobs.pop_front();
      lock.unlock();
      std::move(job)();
      lock.lock();
    }
  });
}

BlockStore::~BlockStore() {
  Drain();
  State& s = *state_;
  {
    std::lock_guard lock(s.mu);
    s.stopping = true;
  }
  s.jobs_cv.notify_all();
  s.worker.join();
  for (State::Block& b : s.blocks) {
    if (!b.live) continue;
    if (b.host != kNoBlock) host_.Free(b.host).IgnoreError();
    if (b.disk != kNoBlock && disk_ != nullptr) disk_->Free(b.disk).IgnoreError();
  }
}

namespace {

// Tells Options::on_new_host_chunk about chunks the pool added. Locked.
void AnnounceChunks(BlockStore::State& s, const HostTier& host,
                    const std::function<void(char*, int64_t)>& on_new_host_chunk) {
  if (!on_new_host_chunk) return;
  const std::vector<std::pair<char*, int64_t>> chunks = host.pool().Chunks();
  for (; s.chunks_announced < chunks.size(); ++s.chunks_announced) {
    on_new_host_chunk(chunks[s.chunks_announced].first, chunks[s.chunks_announced].second);
  }
}

// Frees what a deleted, idle block holds and recycles its ref. Locked.
void Reclaim(BlockStore::State& s, HostTier& host, Tier* disk, BlockStore::Ref ref) {
  BlockStore::State::Block& b = s.blocks[ref];
  if (b.host != kNoBlock) {
    host.Free(b.host).IgnoreError();
    --s.host_copies;
    s.changed.notify_all();
  }
  if (b.disk != kNoBlock && disk != nullptr) {
    disk->Free(b.disk).IgnoreError();
    s.disk_full = false;
  }
  b = BlockStore::State::Block{};
  s.free_refs.push_back(ref);
}

}  // namespace

absl::StatusOr<BlockStore::Ref> BlockStore::CreateBlock() {
  State& s = *state_;
  Unlocked u(s);
  const absl::Time deadline = absl::Now() + options_.host_wait;
  const int64_t write_errors_before = s.stats.disk_write_errors;
  bool waited = false;
  while (true) {
    absl::StatusOr<BlockId> hb = host_.Allocate();
    if (hb.ok()) {
      AnnounceChunks(s, host_, options_.on_new_host_chunk);
      Ref ref;
      if (!s.free_refs.empty()) {
        ref = s.free_refs.back();
        s.free_refs.pop_back();
      } else {
        ref = static_cast<Ref>(s.blocks.size());
        s.blocks.emplace_back();
      }
      State::Block& b = s.blocks[ref];
      b.live = true;
      b.loc = State::Loc::kHost;
      ++s.at[static_cast<int>(State::Loc::kHost)];
      b.host = *hb;
      ++s.host_copies;
      ++s.stats.blocks;
      if (waited) ++s.stats.host_waits;
      // Past the high watermark: demote now, not at the next seal, so the
      // host tier stays near it however many blocks one caller creates
      // before sealing any.
      DemoteColdest(/*force=*/false);
      return ref;
    }
    if (hb.status().code() != absl::StatusCode::kResourceExhausted) return hb.status();
    if (disk_ == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("%s; no disk tier is configured to take colder blocks", hb.status().message()));
    }
    // Make room: start a demotion unless one is on its way, then look again
    // (a tier that completes inline has already freed the block). A
    // demotion that failed during this call ends it: retrying would fail the
    // same way until the deadline.
    waited = true;
    if (s.stats.disk_write_errors > write_errors_before) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s, and demoting to the disk tier failed: %s", hb.status().message(), s.last_demotion_error.message()));
    }
    if (s.demoting == 0) {
      if (DemoteColdest(/*force=*/true) > 0) {
        u.Flush();
        u.lock().lock();
        continue;
      }
      // Nothing idle to demote. Blocks busy with a transfer become idle when
      // it completes: wait for that; with none in flight, give up.
      if (s.in_flight == 0 || s.disk_full) {
        return absl::ResourceExhaustedError(absl::StrFormat(
            "%s, and nothing can be demoted to the disk tier (%s)", hb.status().message(),
            s.disk_full ? "it is full" : "no sealed, idle block in the host tier"));
      }
    }
    if (s.changed.wait_until(u.lock(), absl::ToChronoTime(deadline)) == std::cv_status::timeout &&
        absl::Now() >= deadline) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s; demotion to the disk tier did not free a block within %s", hb.status().message(),
          absl::FormatDuration(options_.host_wait)));
    }
  }
}

}  // namespace kvtier

namespace kvtier {

int64_t BlockStore::DemoteColdest(bool force) {
  State& s = *state_;
  if (disk_ == nullptr || s.disk_full) return 0;
  const int64_t cap = host_.pool().GetStats().capacity_blocks;
  if (cap == 0) return 0;  // an uncapped host tier never needs room
  const int64_t high = static_cast<int64_t>(options_.high_watermark * cap);
  const int64_t low = static_cast<int64_t>(options_.low_watermark * cap);
  if (!force && s.host_copies - s.demoting <= high) return 0;  // in-flight demotions count as done
  int64_t need = (s.host_copies - s.demoting) - low;
  if (force) need = std::max<int64_t>(need, 1);
  if (need <= 0) return 0;
  std::vector<Ref> idle;
  for (Ref r = 0; r < s.blocks.size(); ++r) {
    const State::Block& b = s.blocks[r];
    if (b.live && b.loc == State::Loc::kHost && b.host != kNoBlock && b.sealed && !b.deleted && !b.Busy()) {
      idle.push_back(r);
    }
  }
  const int64_t n = std::min<int64_t>(need, static_cast<int64_t>(idle.size()));
  auto colder = [&](Ref a, Ref b) {
    return s.blocks[a].heat < s.blocks[b].heat || (s.blocks[a].heat == s.blocks[b].heat && a < b);
  };
  if (n < static_cast<int64_t>(idle.size())) std::nth_element(idle.begin(), idle.begin() + n, idle.end(), colder);
  int64_t started = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Ref ref = idle[i];
    State::Block& b = s.blocks[ref];
    absl::StatusOr<BlockId> db = disk_->Allocate();
    if (!db.ok()) {
      if (db.status().code() == absl::StatusCode::kResourceExhausted) s.disk_full = true;
      if (!s.warned_full) {
        s.warned_full = true;
        Log(LogSeverity::kWarning, absl::StrFormat("block store: the %s tier takes no more blocks (%s); colder "
                                                   "blocks stay in the host tier",
                                                   disk_->name(), db.status().message()));
      }
      break;
    }
    const char* src = host_.Data(b.host);
    b.demoting = true;
    b.disk = *db;
    b.checksum = options_.content_free ? 0 : Checksum(src, block_bytes_);
    ++s.demoting;
    ++s.in_flight;
    ++started;
    const BlockId id = *db;
    s.deferred.push_back([this, ref, id, src] {
      disk_->Write(id, src, [this, ref](absl::Status st) { OnDemoted(ref, std::move(st)); });
    });
  }
  return started;
}

void BlockStore::OnDemoted(Ref ref, absl::Status st) {
  State& s = *state_;
  Unlocked u(s);
  State::Block& b = s.blocks[ref];
  b.demoting = false;
  --s.demoting;
  --s.in_flight;
  if (!st.ok()) {
    ++s.stats.disk_write_errors;
    s.last_demotion_error = st;
    if (st.code() == absl::StatusCode::kResourceExhausted) s.disk_full = true;
    if (!s.warned_write) {
      s.warned_write = true;
      Log(LogSeverity::kWarning, absl::StrFormat("block store: demoting block %d to the %s tier failed: %s; it "
                                                 "stays in the host tier (logged once, counted in disk_write_errors)",
                                                 ref, disk_->name(), st.message()));
    }
    disk_->Free(b.disk).IgnoreError();
    b.disk = kNoBlock;
  } else {
    s.stats.bytes_host_to_disk += block_bytes_;
    ++s.stats.demotions;
    if (!b.deleted) {
      s.MoveTo(b, State::Loc::kDisk);
      if (b.pins == 0) {
        host_.Free(b.host).IgnoreError();
        b.host = kNoBlock;
        --s.host_copies;
      } else {
        b.free_host_when_unpinned = true;
      }
    }
  }
  if (b.deleted && !b.Busy()) Reclaim(s, host_, disk_, ref);
  s.changed.notify_all();
}

void BlockStore::Seal(Ref ref) {
  State& s = *state_;
  Unlocked u(s);
  if (ref >= s.blocks.size() || !s.blocks[ref].live) return;
  s.blocks[ref].sealed = true;
  DemoteColdest(/*force=*/false);
}

void BlockStore::AddHeat(Ref ref, float heat) {
  State& s = *state_;
  std::lock_guard lock(s.mu);
  s.AddHeat(ref, heat);
}

absl::Status BlockStore::Write(Ref ref, int64_t offset, const void* src, int64_t bytes) {
  State& s = *state_;
  std::lock_guard lock(s.mu);
  if (ref >= s.blocks.size() || !s.blocks[ref].live) {
    return absl::FailedPreconditionError(absl::StrFormat("block store: write to block %d, which does not exist", ref));
  }
  State::Block& b = s.blocks[ref];
  if (b.sealed || b.host == kNoBlock) {
    return absl::FailedPreconditionError(absl::StrFormat("block store: write to block %d, which is sealed", ref));
  }
  if (offset < 0 || bytes < 0 || offset > block_bytes_ || bytes > block_bytes_ - offset) {
    return absl::InvalidArgumentError(absl::StrFormat("block store: %d bytes at offset %d are outside a block of %d",
                                                      bytes, offset, block_bytes_));
  }
  if (!options_.content_free) std::memcpy(host_.Data(b.host) + offset, src, static_cast<size_t>(bytes));
  s.stats.bytes_device_to_host += bytes;
  return absl::OkStatus();
}

absl::Status BlockStore::Delete(Ref ref) {
  State& s = *state_;
  std::lock_guard lock(s.mu);
  if (ref >= s.blocks.size() || !s.blocks[ref].live || s.blocks[ref].deleted) {
    return absl::FailedPreconditionError(absl::StrFormat("block store: delete of block %d, which does not exist", ref));
  }
  State::Block& b = s.blocks[ref];
  --s.stats.blocks;
  --s.at[static_cast<int>(b.loc)];
  b.deleted = true;
  if (!b.Busy()) Reclaim(s, host_, disk_, ref);
  return absl::OkStatus();
}

void BlockStore::FinishHostParts(std::span<const std::pair<int, Ref>> parts, std::span<const int64_t> bytes,
                                  const std::shared_ptr<Transfer>& transfer,
                                  std::span<std::pair<int, absl::Status>> done) {
  State& s = *state_;
  {
    std::lock_guard lock(s.mu);
    for (size_t i = 0; i < parts.size(); ++i) {
      const Ref ref = parts[i].second;
      State::Block& b = s.blocks[ref];
      --b.pins;
      if (done[i].second.ok()) s.stats.bytes_host_to_device += bytes[i];
      if (b.pins == 0 && b.free_host_when_unpinned) {
        b.free_host_when_unpinned = false;
        host_.Free(b.host).IgnoreError();
        b.host = kNoBlock;
        --s.host_copies;
      }
      if (b.deleted && !b.Busy()) Reclaim(s, host_, disk_, ref);
    }
    --s.in_flight;
    ++s.finishing;
  }
  transfer->FinishParts(done);
  std::lock_guard lock(s.mu);
  --s.finishing;
  s.changed.notify_all();
}

std::shared_ptr<Transfer> BlockStore::Gather(std::span<const GatherPart> parts) {
  State& s = *state_;
  auto transfer = std::make_shared<Transfer>(static_cast<int>(parts.size()));
  std::vector<std::pair<int, absl::Status>> finished;  // parts that end here: failed, or content-free in the host
  finished.reserve(parts.size());
  std::vector<std::pair<int, Ref>> host_parts;  // (part, block)
  std::vector<std::pair<const char*, std::vector<GatherRow>>> host_rows;
  // Whether a row leaves the block: as unsigned, a negative offset or length
  // is above any block size.
  const uint64_t block_bytes = static_cast<uint64_t>(block_bytes_);
  auto outside = [block_bytes](const GatherRow& r) {
    const uint64_t offset = static_cast<uint64_t>(r.offset);
    return (offset > block_bytes) | (static_cast<uint64_t>(r.bytes) > block_bytes - offset);
  };
  {
    Unlocked u(s);
    for (const GatherPart& part : parts) {
      if (part.heat != 0.0f) s.AddHeat(part.block, part.heat);
    }
    for (int i = 0; i < static_cast<int>(parts.size()); ++i) {
      const Ref ref = parts[i].block;
      if (ref >= s.blocks.size() || !s.blocks[ref].live || s.blocks[ref].deleted) {
        finished.emplace_back(i, absl::FailedPreconditionError(
                                     absl::StrFormat("block store: gather from block %d, which does not exist", ref)));
        continue;
      }
      State::Block& b = s.blocks[ref];
      // One pass without branches: the rows' bytes, their furthest end, and
      // the or of their offsets and lengths, whose top bit is set where one
      // is negative (as unsigned, two non-negative int64 sum without
      // wrapping). outside() names the first bad row.
      uint64_t bits = 0, furthest = 0;
      int64_t bytes = 0;
      for (const GatherRow& r : parts[i].rows) {
        const uint64_t offset = static_cast<uint64_t>(r.offset), length = static_cast<uint64_t>(r.bytes);
        bits |= offset | length;
        furthest = std::max(furthest, offset + length);
        bytes += r.bytes;
      }
      if ((bits >> 63) != 0 || furthest > block_bytes) {
        const GatherRow& r = *std::find_if(parts[i].rows.begin(), parts[i].rows.end(), outside);
        finished.emplace_back(i, absl::InvalidArgumentError(absl::StrFormat(
                                     "block store: gather of %d bytes at offset %d is outside a block of %d", r.bytes,
                                     r.offset, block_bytes_)));
      } else if (b.loc == State::Loc::kLost) {
        finished.emplace_back(i, absl::DataLossError(absl::StrFormat(
                                     "block store: block %d is lost (its %s copy failed the checksum twice)", ref,
                                     disk_ ? disk_->name() : "?")));
      } else if (b.host != kNoBlock && options_.content_free) {
        // Nothing to copy: the part is done now, with its bytes counted.
        s.stats.bytes_host_to_device += bytes;
        finished.emplace_back(i, absl::OkStatus());
      } else if (b.host != kNoBlock) {
        ++b.pins;
        host_parts.emplace_back(i, ref);
        host_rows.emplace_back(host_.Data(b.host), parts[i].rows);
      } else {
        b.waiting.push_back(State::Waiter{parts[i].rows, /*to_host=*/false, transfer, i});
        if (!b.reading) StartDiskRead(ref);
      }
    }
    if (!host_parts.empty()) {
      ++s.in_flight;
      s.jobs.push_back([this, host_parts = std::move(host_parts), host_rows = std::move(host_rows), transfer]() mutable {
        // (part, status) of each host part, as the transfer takes them.
        std::vector<std::pair<int, absl::Status>> done(host_parts.size());
        for (size_t i = 0; i < host_parts.size(); ++i) done[i].first = host_parts[i].first;
        std::vector<int64_t> bytes(host_parts.size(), 0);
        for (size_t i = 0; i < host_parts.size(); ++i) {
          const std::vector<GatherRow>& rows = host_rows[i].second;
          // Rows adjacent in the block and at the destination go as one copy.
          for (size_t j = 0; j < rows.size();) {
            int64_t run = rows[j].bytes;
            size_t e = j + 1;
            while (e < rows.size() && rows[e].offset == rows[j].offset + run &&
                   static_cast<char*>(rows[e].dst) == static_cast<char*>(rows[j].dst) + run) {
              run += rows[e++].bytes;
            }
            done[i].second.Update(backend_.Copy(rows[j].dst, host_rows[i].first + rows[j].offset, run,
                                                CopyKind::kHostToDevice, gather_stream_.get()));
            bytes[i] += run;
            j = e;
          }
        }
        // One wait for the whole gather, on its own stream: attention keeps
        // running on the kernels' stream meanwhile.
        if (const absl::Status st = gather_stream_->Synchronize(); !st.ok()) {
          for (auto& [part, status] : done) status.Update(st);
        }
        FinishHostParts(host_parts, bytes, transfer, done);
      });
      s.jobs_cv.notify_one();
    }
  }
  transfer->FinishParts(finished);
  return transfer;
}

absl::Status BlockStore::Read(Ref ref, int64_t offset, void* dst, int64_t bytes) {
  State& s = *state_;
  auto transfer = std::make_shared<Transfer>();
  {
    Unlocked u(s);
    if (ref >= s.blocks.size() || !s.blocks[ref].live || s.blocks[ref].deleted) {
      return absl::FailedPreconditionError(absl::StrFormat("block store: read of block %d, which does not exist", ref));
    }
    if (offset < 0 || bytes < 0 || offset > block_bytes_ || bytes > block_bytes_ - offset) {
      return absl::InvalidArgumentError(absl::StrFormat("block store: %d bytes at offset %d are outside a block of %d",
                                                        bytes, offset, block_bytes_));
    }
    State::Block& b = s.blocks[ref];
    if (b.loc == State::Loc::kLost) {
      return absl::DataLossError(absl::StrFormat("block store: block %d is lost (checksum failed twice)", ref));
    }
    if (options_.content_free) {
      return absl::FailedPreconditionError("block store: blocks hold no contents (content_free)");
    }
    if (b.host != kNoBlock) {
      std::memcpy(dst, host_.Data(b.host) + offset, static_cast<size_t>(bytes));
      return absl::OkStatus();
    }
    b.waiting.push_back(State::Waiter{{GatherRow{offset, dst, bytes}}, /*to_host=*/true, transfer, 0});
    if (!b.reading) StartDiskRead(ref);
  }
  transfer->Wait();
  return transfer->status();
}

void BlockStore::StartDiskRead(Ref ref) {
  State& s = *state_;
  State::Block& b = s.blocks[ref];
  b.reading = true;
  ++s.in_flight;
  char* buf;
  absl::StatusOr<BlockId> hb = host_.Allocate();
  if (hb.ok()) {
    AnnounceChunks(s, host_, options_.on_new_host_chunk);
    b.read_host = *hb;
    buf = host_.Data(*hb);
    // Promoted when read: the hottest block, ranked when the read was asked
    // for (not when the I/O thread finishes it), so the ranking is repeatable.
    b.read_heat = s.max_heat = s.max_heat + 1.0f;
  } else if (options_.content_free) {  // host tier full: no promotion, nothing to read into
    buf = nullptr;
  } else {  // host tier full: read into heap memory, no promotion
    b.read_heap = static_cast<char*>(std::aligned_alloc(4096, static_cast<size_t>(block_bytes_)));
    buf = b.read_heap;
  }
  const BlockId id = b.disk;
  s.deferred.push_back([this, ref, id, buf] {
    disk_->Read(id, buf, [this, ref](absl::Status st) { OnRead(ref, std::move(st)); });
  });
}

void BlockStore::OnRead(Ref ref, absl::Status st) {
  State& s = *state_;
  std::vector<std::tuple<std::shared_ptr<Transfer>, int, absl::Status>> finished;
  {
    Unlocked u(s);
    State::Block& b = s.blocks[ref];
    char* buf = b.read_host != kNoBlock ? host_.Data(b.read_host) : b.read_heap;
    bool checksum_failed = false;
    if (st.ok() && !options_.content_free && Checksum(buf, block_bytes_) != b.checksum) {
      ++s.stats.checksum_failures;
      checksum_failed = true;
      st = absl::DataLossError(absl::StrFormat("block store: block %d read from the %s tier fails its checksum", ref,
                                               disk_->name()));
      if (!b.retried && !b.deleted) {  // read it once more: the error may be in transit
        b.retried = true;
        const BlockId id = b.disk;
        s.deferred.push_back([this, ref, id, buf] {
          disk_->Read(id, buf, [this, ref](absl::Status st2) { OnRead(ref, std::move(st2)); });
        });
        return;
      }
    }
    b.retried = false;
    b.reading = false;
    --s.in_flight;
    bool keep_buffer = false;
    if (!st.ok()) {
      if (checksum_failed) {
        if (!b.deleted) {
          s.MoveTo(b, State::Loc::kLost);
          ++s.stats.lost_blocks;
          disk_->Free(b.disk).IgnoreError();
          b.disk = kNoBlock;
          s.disk_full = false;
        }
        if (!s.warned_lost) {
          s.warned_lost = true;
          Log(LogSeverity::kError, absl::StrFormat("%s twice; its tokens are served from the sketch from now on "
                                                   "(logged once, counted in lost_blocks)",
                                                   st.message()));
        }
      } else {
        ++s.stats.disk_read_errors;
        if (!s.warned_read) {
          s.warned_read = true;
          Log(LogSeverity::kWarning, absl::StrFormat("block store: reading block %d from the %s tier failed: %s "
                                                     "(logged once, counted in disk_read_errors)",
                                                     ref, disk_->name(), st.message()));
        }
      }
      for (State::Waiter& w : b.waiting) finished.emplace_back(w.transfer, w.part, st);
    } else {
      s.stats.bytes_disk_to_host += block_bytes_;
      for (State::Waiter& w : b.waiting) {
        absl::Status ws;
        for (const GatherRow& r : w.rows) {
          if (options_.content_free) {
            if (!w.to_host) s.stats.bytes_host_to_device += r.bytes;
          } else if (w.to_host) {
            std::memcpy(r.dst, buf + r.offset, static_cast<size_t>(r.bytes));
          } else {
            ws.Update(backend_.Copy(r.dst, buf + r.offset, r.bytes, CopyKind::kHostToDevice));
            if (ws.ok()) s.stats.bytes_host_to_device += r.bytes;
          }
        }
        finished.emplace_back(w.transfer, w.part, ws);
      }
      // Promote: the bounce host block becomes the block's host copy.
      if (b.read_host != kNoBlock && !b.deleted) {
        b.host = b.read_host;
        b.read_host = kNoBlock;
        s.MoveTo(b, State::Loc::kHost);
        ++s.host_copies;
        b.heat = b.read_heat;
        disk_->Free(b.disk).IgnoreError();
        b.disk = kNoBlock;
        s.disk_full = false;
        ++s.stats.promotions;
        keep_buffer = true;
      }
    }
    b.waiting.clear();
    if (!keep_buffer) {
      if (b.read_host != kNoBlock) host_.Free(b.read_host).IgnoreError();
      std::free(b.read_heap);
    }
    b.read_host = kNoBlock;
    b.read_heap = nullptr;
    if (b.deleted && !b.Busy()) Reclaim(s, host_, disk_, ref);
    // No demotion from here: the next seal (or a full host tier) makes room,
    // from the runtime's thread, so what is demoted does not depend on when
    // this I/O thread ran.
    if (!finished.empty()) ++s.finishing;
    s.changed.notify_all();
  }
  if (finished.empty()) return;
  for (auto& [t, part, status] : finished) {
    std::pair<int, absl::Status> one{part, std::move(status)};
    t->FinishParts({&one, 1});
  }
  std::lock_guard lock(s.mu);
  --s.finishing;
  s.changed.notify_all();
}

void BlockStore::Drain() {
  State& s = *state_;
  {
    std::unique_lock lock(s.mu);
    s.changed.wait(lock, [&] { return s.in_flight == 0 && s.finishing == 0 && s.deferred.empty(); });
  }
  // The tiers' own bookkeeping settles after our callbacks returned.
  host_.Drain();
  if (disk_ != nullptr) disk_->Drain();
}

BlockStoreStats BlockStore::Stats() const {
  State& s = *state_;
  std::lock_guard lock(s.mu);
  BlockStoreStats out = s.stats;
  out.host_blocks = s.at[static_cast<int>(State::Loc::kHost)];
  out.disk_blocks = s.at[static_cast<int>(State::Loc::kDisk)];
  return out;
}

TierStats BlockStore::DiskStats() const { return disk_ != nullptr ? disk_->Stats() : TierStats{}; }

}  // namespace kvtier
