// MemoryTier (kvtier/offload/memory_tier.h): blocks in 4096-byte aligned heap
// memory; every transfer, failed or not, is queued FIFO and completed on the
// tier's own worker thread.
//
// One mutex guards everything but the byte copies: the allocator, the queue
// and the count of transfers not yet done. Block memory is allocated the
// first time a block id is handed out and kept until the tier is destroyed,
// so a pointer taken under the lock stays valid for the copy outside it.
#include "kvtier/offload/memory_tier.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "kvtier/allocator/block_ids.h"
#include "kvtier/log.h"

namespace kvtier {
namespace {

constexpr int64_t kAlign = 4096;

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using BlockMemory = std::unique_ptr<char, FreeDeleter>;

const char* Verb(bool write) { return write ? "write" : "read"; }

}  // namespace

class MemoryTier::Impl {
 public:
  explicit Impl(const Options& o)
      : options_(o),
        block_bytes_(o.block_bytes),
        ids_(o.capacity_bytes == 0 ? 0 : std::min<int64_t>(o.capacity_bytes / o.block_bytes, 0xffffffff)) {
    worker_ = std::thread([this] { WorkerLoop(); });
  }

  ~Impl() {
    Drain();
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    worker_.join();
  }

  int64_t block_bytes() const { return block_bytes_; }

  absl::StatusOr<BlockId> Allocate() {
    std::lock_guard lock(mu_);
    if (ids_.cap() > 0 && ids_.used() >= ids_.cap()) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("memory tier is full: %d blocks of %d bytes in use, the cap of %d bytes holds %d blocks",
                          ids_.used(), block_bytes_, options_.capacity_bytes, ids_.cap()));
    }
    if (ids_.NeedsNew()) {  // back the next new id with memory first
      void* p = std::aligned_alloc(kAlign, static_cast<size_t>(block_bytes_));
      if (p == nullptr) {
        return absl::ResourceExhaustedError(absl::StrFormat(
            "memory tier: cannot allocate a block of %d bytes (%d blocks held)", block_bytes_, blocks_.size()));
      }
      std::memset(p, 0, static_cast<size_t>(block_bytes_));  // never-written blocks read as zeros
      blocks_.emplace_back(static_cast<char*>(p));
    }
    std::optional<uint32_t> id = ids_.Take();
    if (!id) return absl::ResourceExhaustedError("memory tier: no more block ids");
    return *id;
  }

  absl::Status Free(BlockId block) {
    std::lock_guard lock(mu_);
    if (!ids_.Release(block)) {
      return absl::FailedPreconditionError(
          absl::StrFormat("memory tier: free of block %d, which is not allocated", block));
    }
    return absl::OkStatus();
  }

  void Transfer(bool write, BlockId block, char* buf, TierDone done) {
    {
      std::lock_guard lock(mu_);
      queue_.push_back(Op{write, block, buf, std::move(done)});
      ++outstanding_;
    }
    wake_.notify_one();
  }

  void Drain() {
    if (std::this_thread::get_id() == worker_.get_id()) {
      Log(LogSeverity::kError, "memory tier: Drain called from a completion callback would wait for itself; ignored");
      return;
    }
    std::unique_lock lock(mu_);
    drained_.wait(lock, [this] { return outstanding_ == 0; });
  }

  TierStats Stats() const {
    std::lock_guard lock(mu_);
    TierStats s;
    s.block_bytes = block_bytes_;
    s.blocks_in_use = ids_.used();
    s.bytes_in_use = ids_.used() * block_bytes_;
    s.bytes_reserved = static_cast<int64_t>(blocks_.size()) * block_bytes_;
    s.peak_bytes_in_use = ids_.peak() * block_bytes_;
    s.capacity_bytes = ids_.cap() * block_bytes_;
    s.writes = writes_;
    s.reads = reads_;
    s.bytes_written = writes_ * block_bytes_;
    s.bytes_read = reads_ * block_bytes_;
    s.write_errors = write_errors_;
    s.read_errors = read_errors_;
    s.in_flight = outstanding_;
    return s;
  }

 private:
  struct Op {
    bool write;
    BlockId block;
    char* buf;
    TierDone done;
  };

  // Runs one transfer: the copy outside the lock, the accounting under it.
  absl::Status Run(const Op& op) {
    if (op.buf == nullptr || reinterpret_cast<uintptr_t>(op.buf) % kAlign != 0) {
      return absl::InvalidArgumentError(absl::StrFormat("memory tier: %s of block %d: buffer %p is not %d-byte aligned",
                                                        Verb(op.write), op.block, static_cast<const void*>(op.buf),
                                                        kAlign));
    }
    char* mem = nullptr;
    {
      std::lock_guard lock(mu_);
      if (ids_.InUse(op.block)) mem = blocks_[op.block].get();
    }
    if (mem == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrFormat("memory tier: %s of block %d, which is not allocated", Verb(op.write), op.block));
    }
    if (op.write) {
      std::memcpy(mem, op.buf, static_cast<size_t>(block_bytes_));
    } else {
      std::memcpy(op.buf, mem, static_cast<size_t>(block_bytes_));
    }
    return absl::OkStatus();
  }

  void WorkerLoop() {
    for (;;) {
      Op op;
      {
        std::unique_lock lock(mu_);
        wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_ and nothing left
        op = std::move(queue_.front());
        queue_.pop_front();
      }
      absl::Status st = Run(op);
      {
        std::lock_guard lock(mu_);
        if (st.ok()) {
          ++(op.write ? writes_ : reads_);
        } else {
          ++(op.write ? write_errors_ : read_errors_);
        }
      }
      std::move(op.done)(std::move(st));
      {
        std::lock_guard lock(mu_);
        if (--outstanding_ == 0) drained_.notify_all();
      }
    }
  }

  const Options options_;
  const int64_t block_bytes_;


  mutable std::mutex mu_;
  std::condition_variable wake_;     // work queued or stop
  std::condition_variable drained_;  // outstanding_ reached 0
  // Guarded by mu_:
  std::vector<BlockMemory> blocks_;  // per block id ever handed out
  BlockIds ids_;
  std::deque<Op> queue_;
  int64_t outstanding_ = 0;  // accepted, `done` not yet returned
  int64_t writes_ = 0, reads_ = 0, write_errors_ = 0, read_errors_ = 0;
  bool stop_ = false;

  std::thread worker_;  // last: starts after every member above exists
};

absl::StatusOr<std::unique_ptr<MemoryTier>> MemoryTier::Create(const Options& o) {
  if (o.block_bytes <= 0 || o.block_bytes % kAlign != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("memory tier: block_bytes must be a positive multiple of %d, got %d", kAlign, o.block_bytes));
  }
  if (o.capacity_bytes < 0 || (o.capacity_bytes > 0 && o.capacity_bytes < o.block_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "memory tier: capacity_bytes must be 0 (no cap) or at least one block of %d bytes, got %d", o.block_bytes,
        o.capacity_bytes));
  }
  return std::unique_ptr<MemoryTier>(new MemoryTier(std::make_unique<Impl>(o)));
}

MemoryTier::MemoryTier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MemoryTier::~MemoryTier() = default;

int64_t MemoryTier::block_bytes() const { return impl_->block_bytes(); }
absl::StatusOr<BlockId> MemoryTier::Allocate() { return impl_->Allocate(); }
absl::Status MemoryTier::Free(BlockId block) { return impl_->Free(block); }
void MemoryTier::Write(BlockId block, const void* src, TierDone done) {
  impl_->Transfer(true, block, static_cast<char*>(const_cast<void*>(src)), std::move(done));
}
void MemoryTier::Read(BlockId block, void* dst, TierDone done) {
  impl_->Transfer(false, block, static_cast<char*>(dst), std::move(done));
}
void MemoryTier::Drain() { impl_->Drain(); }
TierStats MemoryTier::Stats() const { return impl_->Stats(); }

}  // namespace kvtier
