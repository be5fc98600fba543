// NvmeTier (kvtier/offload/nvme_tier.h): blocks in one unlinked file, moved
// by io_uring.
//
// Threads and locks:
//   * alloc_mu_ guards the block allocator (free list, high-water mark).
//   * regions_mu_ guards the registered fixed-buffer regions.
//   * mu_ guards the submission side of the ring (get_sqe/prep/submit), the
//     FIFO of transfers waiting for a slot, and the counts of transfers
//     submitted to the ring and not yet done. drained_ signals Drain.
//   * One reaper thread waits for completions, hands freed slots to queued
//     transfers (under mu_) and calls `done` with no lock held.
// A transfer's Op is written by the submitting thread before it takes mu_ and
// read by the reaper only after it has taken mu_ for that completion, so the
// hand-off through the kernel is ordered for ThreadSanitizer too.
#include "kvtier/offload/nvme_tier.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "kvtier/allocator/block_ids.h"
#include "kvtier/log.h"

namespace kvtier {
namespace {

constexpr int64_t kAlign = 4096;
// Fixed-buffer slots registered (sparse) when the ring is set up.
constexpr int kMaxRegions = 1024;
// The kernel refuses a fixed buffer over 1 GiB; larger regions take several slots.
constexpr int64_t kMaxFixedBufferBytes = int64_t{1} << 30;
// One read or write moves at most MAX_RW_COUNT (just under 2 GiB) bytes; blocks
// stay well below, and within what a fixed buffer may hold.
constexpr int64_t kMaxBlockBytes = int64_t{1} << 30;
// A wake-up for the reaper even if the shutdown NOP cannot be submitted.
constexpr long long kReaperTimeoutNs = 200'000'000;
// Retries of a submission the kernel refuses for the moment (EAGAIN/EBUSY).
constexpr int kSubmitRetries = 1000;

std::atomic<uint64_t> g_file_counter{0};

// A transfer between the caller's buffer and the file.
struct Op {
  bool write = false;
  BlockId block = 0;
  char* buf = nullptr;
  int buf_index = -1;      // fixed-buffer slot, -1 for a plain READ/WRITE
  bool reached_kernel = false;
  int submit_error = 0;    // errno of a submission that failed
  TierDone done;
};

const char* Verb(bool write) { return write ? "write" : "read"; }

}  // namespace

class NvmeTier::Impl {
 public:
  explicit Impl(const Options& options)
      : options_(options),
        block_bytes_(options.block_bytes),
        queue_depth_(options.queue_depth),
        ids_(std::min<int64_t>(options.capacity_bytes / options.block_bytes, 0xffffffff)) {}

  ~Impl() {
    if (reaper_.joinable()) {
      Drain();
      {
        std::lock_guard lock(mu_);
        stop_ = true;
        // Wakes the reaper at once; if no SQE can be had, its wait times out.
        if (io_uring_sqe* sqe = io_uring_get_sqe(&ring_); sqe != nullptr) {
          io_uring_prep_nop(sqe);
          io_uring_sqe_set_data(sqe, nullptr);
          SubmitWithRetries();
        }
      }
      reaper_.join();
    }
    if (ring_ready_) io_uring_queue_exit(&ring_);
    if (fd_ >= 0) close(fd_);
  }

  absl::Status Init() {
    const std::string& dir = options_.directory;
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      return absl::Status(absl::ErrnoToStatusCode(ec.value()),
                          absl::StrFormat("nvme tier: cannot create directory %s: %s", dir, ec.message()));
    }
    if (absl::Status st = OpenFile(); !st.ok()) return st;

    const int r = io_uring_queue_init(static_cast<unsigned>(queue_depth_), &ring_, 0);
    if (r < 0) {
      return absl::UnavailableError(absl::StrFormat("nvme tier: io_uring_queue_init with %d entries failed: %s",
                                                    queue_depth_, std::strerror(-r)));
    }
    ring_ready_ = true;
    wait_has_timeout_ = (ring_.features & IORING_FEAT_EXT_ARG) != 0;
    const int sparse = io_uring_register_buffers_sparse(&ring_, kMaxRegions);
    fixed_buffers_ = sparse == 0;
    if (!fixed_buffers_) {
      Log(LogSeverity::kInfo,
          absl::StrFormat("nvme tier on %s: io_uring cannot register fixed buffers (%s); registered regions are "
                          "moved with plain READ/WRITE",
                          dir, std::strerror(-sparse)));
    }
    reaper_ = std::thread([this] { ReaperLoop(); });
    return absl::OkStatus();
  }

  int64_t block_bytes() const { return block_bytes_; }
  bool direct_io() const { return direct_; }

  absl::StatusOr<BlockId> Allocate() {
    std::lock_guard lock(alloc_mu_);
    std::optional<uint32_t> id = ids_.Take();
    if (!id) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "nvme tier on %s is full: %d blocks of %d bytes in use, the cap of %d bytes holds %d blocks",
          options_.directory, ids_.used(), block_bytes_, options_.capacity_bytes, ids_.cap()));
    }
    return *id;
  }

  absl::Status Free(BlockId block) {
    std::lock_guard lock(alloc_mu_);
    if (!ids_.Release(block)) {
      return absl::FailedPreconditionError(
          absl::StrFormat("nvme tier on %s: free of block %d, which is not allocated", options_.directory, block));
    }
    return absl::OkStatus();
  }

  void Transfer(bool write, BlockId block, char* buf, TierDone done) {
    if (buf == nullptr || reinterpret_cast<uintptr_t>(buf) % kAlign != 0) {
      FailInline(write, std::move(done),
                 absl::InvalidArgumentError(absl::StrFormat(
                     "nvme tier on %s: %s of block %d: buffer %p is not %d-byte aligned", options_.directory,
                     Verb(write), block, static_cast<const void*>(buf), kAlign)));
      return;
    }
    if (!IsAllocated(block)) {
      FailInline(write, std::move(done),
                 absl::FailedPreconditionError(absl::StrFormat("nvme tier on %s: %s of block %d, which is not allocated",
                                                               options_.directory, Verb(write), block)));
      return;
    }
    Op* op = new Op;
    op->write = write;
    op->block = block;
    op->buf = buf;
    op->buf_index = FixedBufferIndex(buf);
    op->done = std::move(done);
    bool failed = false;
    {
      std::lock_guard lock(mu_);
      ++outstanding_;
      if (submitted_ < queue_depth_ && pending_.empty()) {
        failed = !SubmitLocked(op);
      } else {
        pending_.push_back(op);
      }
    }
    if (failed) {
      Complete(op, -op->submit_error);
      FinishOne(1);
    }
  }

  void Drain() {
    if (std::this_thread::get_id() == reaper_id_) {
      Log(LogSeverity::kError, "nvme tier: Drain called from a completion callback would wait for itself; ignored");
      return;
    }
    std::unique_lock lock(mu_);
    drained_.wait(lock, [this] { return outstanding_ == 0; });
  }

  TierStats Stats() const {
    TierStats s;
    s.block_bytes = block_bytes_;
    {
      std::lock_guard lock(alloc_mu_);
      s.blocks_in_use = ids_.used();
      s.peak_bytes_in_use = ids_.peak() * block_bytes_;
    }
    s.bytes_in_use = s.blocks_in_use * block_bytes_;
    s.bytes_reserved = file_bytes_.load(std::memory_order_relaxed);
    s.capacity_bytes = ids_.cap() * block_bytes_;
    s.writes = writes_.load(std::memory_order_relaxed);
    s.reads = reads_.load(std::memory_order_relaxed);
    s.bytes_written = s.writes * block_bytes_;
    s.bytes_read = s.reads * block_bytes_;
    s.write_errors = write_errors_.load(std::memory_order_relaxed);
    s.read_errors = read_errors_.load(std::memory_order_relaxed);
    s.buffered_fallbacks = buffered_fallbacks_.load(std::memory_order_relaxed);
    {
      std::lock_guard lock(mu_);
      s.in_flight = outstanding_;
    }
    return s;
  }

  absl::Status RegisterBuffer(void* base, int64_t bytes) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(base);
    if (base == nullptr || begin % kAlign != 0 || bytes <= 0 || bytes % kAlign != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "nvme tier: RegisterBuffer needs a non-null %d-byte aligned base and a positive multiple of %d bytes, "
          "got %p and %d",
          kAlign, kAlign, base, bytes));
    }
    const int64_t slots = (bytes + kMaxFixedBufferBytes - 1) / kMaxFixedBufferBytes;
    std::unique_lock lock(regions_mu_);
    if (static_cast<int64_t>(regions_.size()) + slots > kMaxRegions) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "nvme tier: %d fixed-buffer slots are in use and %d bytes need %d more; it has %d", regions_.size(), bytes,
          slots, kMaxRegions));
    }
    for (int64_t done = 0; done < bytes; done += kMaxFixedBufferBytes) {
      const int64_t piece = std::min(kMaxFixedBufferBytes, bytes - done);
      const int index = static_cast<int>(regions_.size());
      if (fixed_buffers_) {
        iovec iov{reinterpret_cast<void*>(begin + done), static_cast<size_t>(piece)};
        __u64 tag = 0;
        const int r = io_uring_register_buffers_update_tag(&ring_, static_cast<unsigned>(index), &iov, &tag, 1);
        if (r < 0) {
          // Pieces registered before stay registered and usable.
          const std::string msg = absl::StrFormat("nvme tier: registering %d bytes at %p as fixed buffer %d failed: %s",
                                                  piece, iov.iov_base, index, std::strerror(-r));
          return r == -ENOMEM ? absl::ResourceExhaustedError(msg + " (pinned memory counts against RLIMIT_MEMLOCK)")
                              : absl::InternalError(msg);
        }
      }
      regions_.push_back(Region{begin + done, begin + done + piece, fixed_buffers_ ? index : -1});
    }
    return absl::OkStatus();
  }

 private:
  struct Region {
    uintptr_t begin, end;
    int index;  // -1 when the ring has no fixed buffers
  };

  int OpenWithHook(const char* path, int flags) {
    if (options_.open_hook) return options_.open_hook(path, flags, 0600);
    return open(path, flags, 0600);
  }

  absl::Status OpenFile() {
    const std::string& dir = options_.directory;
    const bool want_direct = options_.io_mode != IoMode::kBuffered;
    int err = 0;
    for (int attempt = 0; attempt < 100; ++attempt) {
      path_ = absl::StrFormat("%s/kvtier-%d-%d.blocks", dir, static_cast<int>(getpid()),
                              g_file_counter.fetch_add(1, std::memory_order_relaxed));
      const int flags = O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC;
      fd_ = OpenWithHook(path_.c_str(), flags | (want_direct ? O_DIRECT : 0));
      err = fd_ < 0 ? errno : 0;
      if (fd_ < 0 && err == EEXIST) continue;  // a stale file of an earlier process with this pid
      direct_ = fd_ >= 0 && want_direct;
      if (fd_ < 0 && err == EINVAL && want_direct && options_.io_mode == IoMode::kAuto) {
        // The refused O_DIRECT open may have created the file already.
        unlink(path_.c_str());
        fd_ = OpenWithHook(path_.c_str(), flags);
        if (fd_ >= 0) {
          buffered_fallback_ = true;
          Log(LogSeverity::kWarning,
              absl::StrFormat("nvme tier: O_DIRECT refused on %s (%s); using buffered I/O through the page cache, "
                              "every transfer counted in buffered_fallbacks",
                              dir, std::strerror(err)));
        } else {
          err = errno;
        }
      }
      break;
    }
    if (fd_ < 0) {
      if (err == EINVAL && options_.io_mode == IoMode::kDirect) {
        return absl::FailedPreconditionError(
            absl::StrFormat("nvme tier: O_DIRECT refused on %s (%s) and io_mode is kDirect", dir, std::strerror(err)));
      }
      return absl::Status(absl::ErrnoToStatusCode(err),
                          absl::StrFormat("nvme tier: cannot open %s: %s", path_, std::strerror(err)));
    }
    // The file lives only as long as the descriptor.
    if (unlink(path_.c_str()) != 0 && errno != ENOENT) {
      Log(LogSeverity::kWarning, absl::StrFormat("nvme tier: cannot unlink %s (%s); remove it after the process exits",
                                                 path_, std::strerror(errno)));
    }
    return absl::OkStatus();
  }

  bool IsAllocated(BlockId block) const {
    std::lock_guard lock(alloc_mu_);
    return ids_.InUse(block);
  }

  int FixedBufferIndex(const char* buf) const {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(buf);
    const uintptr_t end = begin + static_cast<uintptr_t>(block_bytes_);
    std::shared_lock lock(regions_mu_);
    for (const Region& r : regions_) {
      if (r.begin <= begin && end <= r.end) return r.index;
    }
    return -1;
  }

  // io_uring_submit, retried while the kernel is briefly out of resources.
  // Requires mu_. Returns 0 or -errno.
  int SubmitWithRetries() {
    int r = 0;
    for (int tries = 0; tries < kSubmitRetries; ++tries) {
      r = io_uring_submit(&ring_);
      if (r >= 0) return 0;
      if (r != -EINTR && r != -EAGAIN && r != -EBUSY) break;
      std::this_thread::yield();
    }
    return r;
  }

  // Puts `op` on the ring. Requires mu_. False (op->submit_error set) when
  // the kernel refused it; the caller completes the op.
  bool SubmitLocked(Op* op) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {
      // Unreachable while at most queue_depth transfers use the ring; kept
      // as a guard: the SQ is full only of entries a failed submit left.
      op->submit_error = EBUSY;
      return false;
    }
    const off_t offset = static_cast<off_t>(op->block) * block_bytes_;
    const unsigned n = static_cast<unsigned>(block_bytes_);
    if (op->write) {
      if (op->buf_index >= 0) {
        io_uring_prep_write_fixed(sqe, fd_, op->buf, n, offset, op->buf_index);
      } else {
        io_uring_prep_write(sqe, fd_, op->buf, n, offset);
      }
    } else {
      if (op->buf_index >= 0) {
        io_uring_prep_read_fixed(sqe, fd_, op->buf, n, offset, op->buf_index);
      } else {
        io_uring_prep_read(sqe, fd_, op->buf, n, offset);
      }
    }
    io_uring_sqe_set_data(sqe, op);
    const int r = SubmitWithRetries();
    if (r < 0) {
      // The kernel did not take the entry; it stays in the SQ ring and goes
      // with the next submit, so turn it into a NOP nobody waits for.
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data(sqe, nullptr);
      op->submit_error = -r;
      return false;
    }
    op->reached_kernel = true;
    ++submitted_;
    return true;
  }

  void FailInline(bool write, TierDone done, absl::Status status) {
    (write ? write_errors_ : read_errors_).fetch_add(1, std::memory_order_relaxed);
    std::move(done)(std::move(status));
  }

  absl::Status ErrnoStatus(const Op& op, int err) const {
    const std::string what =
        absl::StrFormat("nvme tier: %s of block %d (%d bytes at offset %d) %s %s failed: %s", Verb(op.write),
                        op.block, block_bytes_, static_cast<int64_t>(op.block) * block_bytes_,
                        op.write ? "to" : "from", path_, std::strerror(err));
    switch (err) {
      case ENOSPC:
      case EDQUOT:
        return absl::ResourceExhaustedError(absl::StrFormat("%s (no space left on %s)", what, options_.directory));
      case EIO:
      case EAGAIN:
      case EBUSY:
      case EINTR:
      case ETIMEDOUT:
      case ENODEV:
      case ENXIO:
      case ENOMEM:
        return absl::UnavailableError(what);
      default:
        return absl::InternalError(what);
    }
  }

  // Accounts for a finished transfer and calls its `done`. No lock held.
  void Complete(Op* op, int res) {
    absl::Status st;
    if (res < 0) {
      st = ErrnoStatus(*op, -res);
    } else if (res != block_bytes_) {
      st = absl::DataLossError(absl::StrFormat("nvme tier: short %s of block %d %s %s: expected %d bytes, got %d",
                                               Verb(op->write), op->block, op->write ? "to" : "from", path_,
                                               block_bytes_, res));
    }
    if (op->reached_kernel && buffered_fallback_) buffered_fallbacks_.fetch_add(1, std::memory_order_relaxed);
    if (st.ok()) {
      if (op->write) {
        writes_.fetch_add(1, std::memory_order_relaxed);
        const int64_t end = (static_cast<int64_t>(op->block) + 1) * block_bytes_;
        int64_t seen = file_bytes_.load(std::memory_order_relaxed);
        while (seen < end && !file_bytes_.compare_exchange_weak(seen, end, std::memory_order_relaxed)) {
        }
      } else {
        reads_.fetch_add(1, std::memory_order_relaxed);
      }
    } else {
      (op->write ? write_errors_ : read_errors_).fetch_add(1, std::memory_order_relaxed);
    }
    TierDone done = std::move(op->done);
    delete op;
    std::move(done)(std::move(st));
  }

  void FinishOne(int64_t n) {
    std::lock_guard lock(mu_);
    outstanding_ -= n;
    if (outstanding_ == 0) drained_.notify_all();
  }

  void ReaperLoop() {
    reaper_id_ = std::this_thread::get_id();
    std::vector<std::pair<Op*, int>> batch;
    bool warned = false;
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      int r;
      if (wait_has_timeout_) {
        __kernel_timespec ts{0, kReaperTimeoutNs};
        r = io_uring_wait_cqe_timeout(&ring_, &cqe, &ts);
      } else {
        r = io_uring_wait_cqe(&ring_, &cqe);
      }
      if (r < 0 && r != -ETIME && r != -EINTR && !warned) {
        warned = true;
        Log(LogSeverity::kError,
            absl::StrFormat("nvme tier on %s: waiting for io_uring completions failed: %s", path_, std::strerror(-r)));
      }
      batch.clear();
      if (r == 0) {
        unsigned head;
        unsigned seen = 0;
        io_uring_for_each_cqe(&ring_, head, cqe) {
          ++seen;
          // Null: the shutdown NOP or a refused submission turned into a NOP.
          if (Op* op = static_cast<Op*>(io_uring_cqe_get_data(cqe)); op != nullptr) batch.emplace_back(op, cqe->res);
        }
        io_uring_cq_advance(&ring_, seen);
      }
      bool stop;
      {
        std::lock_guard lock(mu_);
        submitted_ -= static_cast<int64_t>(batch.size());
        while (!pending_.empty() && submitted_ < queue_depth_) {
          Op* op = pending_.front();
          pending_.pop_front();
          if (!SubmitLocked(op)) batch.emplace_back(op, -op->submit_error);
        }
        stop = stop_;
      }
      for (const auto& [op, res] : batch) Complete(op, res);
      if (!batch.empty()) FinishOne(static_cast<int64_t>(batch.size()));
      // The destructor sets stop_ only once nothing is outstanding.
      if (stop) return;
    }
  }

  const Options options_;
  const int64_t block_bytes_;
  const int64_t queue_depth_;
  // Set by Init, then read only.
  std::string path_;
  int fd_ = -1;
  bool direct_ = false;
  bool buffered_fallback_ = false;
  io_uring ring_{};
  bool ring_ready_ = false;
  bool wait_has_timeout_ = false;
  bool fixed_buffers_ = false;
  std::thread reaper_;
  std::atomic<std::thread::id> reaper_id_{};

  mutable std::mutex alloc_mu_;
  BlockIds ids_;  // guarded by alloc_mu_

  mutable std::shared_mutex regions_mu_;
  std::vector<Region> regions_;  // guarded by regions_mu_

  mutable std::mutex mu_;
  std::condition_variable drained_;
  std::deque<Op*> pending_;   // guarded by mu_: waiting for a ring slot, FIFO
  int64_t submitted_ = 0;     // guarded by mu_: on the ring, not yet reaped
  int64_t outstanding_ = 0;   // guarded by mu_: accepted, `done` not yet returned
  bool stop_ = false;         // guarded by mu_

  std::atomic<int64_t> writes_{0}, reads_{0}, write_errors_{0}, read_errors_{0}, buffered_fallbacks_{0};
  std::atomic<int64_t> file_bytes_{0};  // high-water end of the file by completed writes
};

absl::StatusOr<std::unique_ptr<NvmeTier>> NvmeTier::Create(const Options& o) {
  if (o.directory.empty()) return absl::InvalidArgumentError("nvme tier: directory is required");
  if (o.block_bytes <= 0 || o.block_bytes % kAlign != 0 || o.block_bytes > kMaxBlockBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "nvme tier: block_bytes must be a positive multiple of %d up to 2^30, got %d", kAlign, o.block_bytes));
  }
  if (o.capacity_bytes < o.block_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "nvme tier: capacity_bytes must hold at least one block of %d bytes, got %d", o.block_bytes, o.capacity_bytes));
  }
  if (o.capacity_bytes / o.block_bytes > int64_t{0xffffffff}) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "nvme tier: capacity_bytes %d holds %d blocks of %d bytes, more than the 2^32 - 1 a BlockId can name",
        o.capacity_bytes, o.capacity_bytes / o.block_bytes, o.block_bytes));
  }
  if (o.queue_depth < 1 || o.queue_depth > 4096) {
    return absl::InvalidArgumentError(
        absl::StrFormat("nvme tier: queue_depth must be in [1, 4096], got %d", o.queue_depth));
  }
  auto impl = std::make_unique<Impl>(o);
  if (absl::Status st = impl->Init(); !st.ok()) return st;
  return std::unique_ptr<NvmeTier>(new NvmeTier(std::move(impl)));
}

NvmeTier::NvmeTier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
NvmeTier::~NvmeTier() = default;

int64_t NvmeTier::block_bytes() const { return impl_->block_bytes(); }
absl::StatusOr<BlockId> NvmeTier::Allocate() { return impl_->Allocate(); }
absl::Status NvmeTier::Free(BlockId block) { return impl_->Free(block); }
void NvmeTier::Write(BlockId block, const void* src, TierDone done) {
  impl_->Transfer(true, block, static_cast<char*>(const_cast<void*>(src)), std::move(done));
}
void NvmeTier::Read(BlockId block, void* dst, TierDone done) {
  impl_->Transfer(false, block, static_cast<char*>(dst), std::move(done));
}
void NvmeTier::Drain() { impl_->Drain(); }
TierStats NvmeTier::Stats() const { return impl_->Stats(); }
absl::Status NvmeTier::RegisterBuffer(void* base, int64_t bytes) { return impl_->RegisterBuffer(base, bytes); }
bool NvmeTier::direct_io() const { return impl_->direct_io(); }

}  // namespace kvtier
