// Tier conformance (kvtier/offload/tier.h): one parameterized suite run over
// every Tier — the host tier, the NVMe tier with O_DIRECT, with O_DIRECT
// refused (kAuto falling back to buffered I/O), in kBuffered mode, and the
// memory tier — plus the NVMe tier's own options, fixed buffers and errno
// mapping (TierConformanceNvmeTest).
//
// Where the tiers legitimately differ, Traits says so per tier: whether `done`
// runs on a tier thread or inline, what a never-written block reads as, and
// how much space is reserved.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/backend.h"
#include "kvtier/log.h"
#include "kvtier/offload/host_tier.h"
#include "kvtier/offload/memory_tier.h"
#include "kvtier/offload/nvme_tier.h"
#include "test_util.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kBlock = 8192;  // two pages: a block is more than one page of the file
constexpr int kQueueDepth = 4;    // NVMe cases: small, so that the tests put far more than this in flight

enum class Kind { kHost, kNvmeDirect, kNvmeFallback, kNvmeBuffered, kMemory };

std::string KindName(const ::testing::TestParamInfo<Kind>& info) {
  switch (info.param) {
    case Kind::kHost: return "Host";
    case Kind::kNvmeDirect: return "NvmeDirect";
    case Kind::kNvmeFallback: return "NvmeFallback";
    case Kind::kNvmeBuffered: return "NvmeBuffered";
    case Kind::kMemory: return "Memory";
  }
  return "?";
}

void PrintTo(Kind k, std::ostream* os) { *os << KindName(::testing::TestParamInfo<Kind>(k, 0)); }

bool IsNvme(Kind k) { return k == Kind::kNvmeDirect || k == Kind::kNvmeFallback || k == Kind::kNvmeBuffered; }
// `done` runs on a tier thread (false: inline, before Write/Read return).
bool IsAsync(Kind k) { return k != Kind::kHost; }

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, FreeDeleter>;

// `n` bytes, 4096-aligned, filled with `fill`.
Buffer AlignedBuffer(int64_t n, unsigned char fill = 0xAA) {
  char* p = static_cast<char*>(std::aligned_alloc(4096, static_cast<size_t>(n)));
  std::memset(p, fill, static_cast<size_t>(n));
  return Buffer(p);
}

void FillRandom(char* p, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < n; i += 8) {
    const uint64_t x = rng();
    std::memcpy(p + i, &x, static_cast<size_t>(std::min<int64_t>(8, n - i)));
  }
}

bool SameBytes(const char* a, const char* b, int64_t n) { return std::memcmp(a, b, static_cast<size_t>(n)) == 0; }

bool AllZero(const char* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

// Records every `done` call of a set of transfers: how often each was called
// and with what status. Wait blocks until `n` calls arrived.
class Tracker {
 public:
  explicit Tracker(size_t n) : calls_(n, 0), status_(n) {}

  TierDone Done(size_t i) {
    return [this, i](absl::Status st) {
      std::lock_guard lock(mu_);
      ++calls_[i];
      status_[i] = std::move(st);
      ++finished_;
      cv_.notify_all();
    };
  }
  void Wait(size_t n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return finished_ >= n; });
  }
  size_t finished() {
    std::lock_guard lock(mu_);
    return finished_;
  }
  int calls(size_t i) {
    std::lock_guard lock(mu_);
    return calls_[i];
  }
  absl::Status status(size_t i) {
    std::lock_guard lock(mu_);
    return status_[i];
  }
  // Every transfer called `done` exactly once, with OK.
  void ExpectAllOkOnce() {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < calls_.size(); ++i) {
      EXPECT_EQ(calls_[i], 1) << "transfer " << i;
      EXPECT_TRUE(status_[i].ok()) << "transfer " << i << ": " << status_[i];
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> calls_;
  std::vector<absl::Status> status_;
  size_t finished_ = 0;
};

absl::Status WriteSync(Tier& tier, BlockId block, const void* src) {
  Tracker t(1);
  tier.Write(block, src, t.Done(0));
  t.Wait(1);
  EXPECT_EQ(t.calls(0), 1);
  return t.status(0);
}

absl::Status ReadSync(Tier& tier, BlockId block, void* dst) {
  Tracker t(1);
  tier.Read(block, dst, t.Done(0));
  t.Wait(1);
  EXPECT_EQ(t.calls(0), 1);
  return t.status(0);
}

// Captures kvtier's log lines while alive.
class LogCapture {
 public:
  LogCapture() {
    old_ = SetLogSink([this](LogSeverity severity, std::string_view message) {
      std::lock_guard lock(mu_);
      lines_.push_back({severity, std::string(message)});
    });
  }
  ~LogCapture() { SetLogSink(std::move(old_)); }

  // Lines of `severity` that contain `needle`.
  std::vector<std::string> Lines(LogSeverity want, std::string_view needle) {
    std::lock_guard lock(mu_);
    std::vector<std::string> out;
    for (const auto& [severity, line] : lines_) {
      if (severity == want && line.find(needle) != std::string::npos) out.push_back(line);
    }
    return out;
  }
  std::vector<std::string> Warnings(std::string_view needle) { return Lines(LogSeverity::kWarning, needle); }

 private:
  LogSink old_;
  std::mutex mu_;
  std::vector<std::pair<LogSeverity, std::string>> lines_;
};

// A fresh directory under /tmp (ext4 here, so O_DIRECT works), removed after.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvtier-tier-test-XXXXXX";
    const char* p = mkdtemp(tmpl);
    EXPECT_NE(p, nullptr) << std::strerror(errno);
    path_ = p != nullptr ? p : "/tmp";
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// open(2) that refuses O_DIRECT as tmpfs did before Linux 6.6.
int RefuseODirect(const char* path, int flags, mode_t mode) {
  if (flags & O_DIRECT) {
    errno = EINVAL;
    return -1;
  }
  return open(path, flags, mode);
}

class TierConformanceTest : public ::testing::TestWithParam<Kind> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kCpu);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
  }

  void TearDown() override {
    if (tier_ != nullptr && GetParam() == Kind::kNvmeFallback) {
      EXPECT_EQ(log_.Warnings("O_DIRECT").size(), 1u) << "one warning per tier, not per transfer";
    }
    tier_.reset();
  }

  std::string NvmeDir() const { return dir_.path() + "/nvme/tier"; }  // missing: Create makes it

  // Creates the tier under test with a cap of `capacity_bytes` and checks
  // the I/O mode the NVMe variants run in.
  void Make(int64_t capacity_bytes) {
    const Kind kind = GetParam();
    switch (kind) {
      case Kind::kHost: {
        // Chunks of 4 blocks, so a few blocks already span chunks.
        absl::StatusOr<std::unique_ptr<HostTier>> t = HostTier::Create(
            *backend_, {.block_bytes = kBlock, .capacity_bytes = capacity_bytes, .chunk_bytes = 4 * kBlock});
        ASSERT_TRUE(t.ok()) << t.status();
        tier_ = std::move(*t);
        break;
      }
      case Kind::kMemory: {
        absl::StatusOr<std::unique_ptr<MemoryTier>> t =
            MemoryTier::Create({.block_bytes = kBlock, .capacity_bytes = capacity_bytes});
        ASSERT_TRUE(t.ok()) << t.status();
        tier_ = std::move(*t);
        break;
      }
      case Kind::kNvmeDirect:
      case Kind::kNvmeFallback:
      case Kind::kNvmeBuffered: {
        NvmeTier::Options o;
        o.directory = NvmeDir();
        o.capacity_bytes = capacity_bytes;
        o.block_bytes = kBlock;
        o.queue_depth = kQueueDepth;
        o.io_mode = kind == Kind::kNvmeDirect     ? NvmeTier::IoMode::kDirect
                    : kind == Kind::kNvmeFallback ? NvmeTier::IoMode::kAuto
                                                  : NvmeTier::IoMode::kBuffered;
        // Every NVMe variant opens through a hook that keeps the descriptor,
        // so a test can look at the file behind the tier's back.
        o.open_hook = [this, refuse = kind == Kind::kNvmeFallback](const char* path, int flags, mode_t mode) {
          const int fd = refuse ? RefuseODirect(path, flags, mode) : open(path, flags, mode);
          if (fd >= 0) nvme_fd_ = fd;
          return fd;
        };
        absl::StatusOr<std::unique_ptr<NvmeTier>> t = NvmeTier::Create(o);
        ASSERT_TRUE(t.ok()) << t.status();
        EXPECT_EQ((*t)->direct_io(), kind == Kind::kNvmeDirect);
        const std::vector<std::string> warnings = log_.Warnings("O_DIRECT");
        if (kind == Kind::kNvmeFallback) {
          ASSERT_EQ(warnings.size(), 1u);
          EXPECT_THAT(warnings[0], HasSubstr(NvmeDir()));
          EXPECT_THAT(warnings[0], HasSubstr(std::strerror(EINVAL)));
        } else {
          EXPECT_TRUE(warnings.empty()) << warnings[0];
        }
        tier_ = std::move(*t);
        break;
      }
    }
    ASSERT_EQ(tier_->block_bytes(), kBlock);
  }

  std::vector<BlockId> AllocateN(int n) {
    std::vector<BlockId> ids;
    for (int i = 0; i < n; ++i) {
      absl::StatusOr<BlockId> b = tier_->Allocate();
      EXPECT_TRUE(b.ok()) << i << ": " << b.status();
      if (b.ok()) ids.push_back(*b);
    }
    return ids;
  }

  Tier& tier() { return *tier_; }

  // The blocks ids[i], i in [from, ids.size()), whose bytes in the NVMe
  // tier's file equal want[i].
  std::set<BlockId> BlocksInFile(const std::vector<BlockId>& ids, const std::vector<Buffer>& want, size_t from) {
    std::set<BlockId> out;
    Buffer got = AlignedBuffer(kBlock);
    for (size_t i = from; i < ids.size(); ++i) {
      const ssize_t n = pread(nvme_fd_, got.get(), kBlock, static_cast<off_t>(ids[i]) * kBlock);
      if (n == kBlock && SameBytes(got.get(), want[i].get(), kBlock)) out.insert(ids[i]);
    }
    return out;
  }

  LogCapture log_;  // first: outlives the tier, which may log while it is destroyed
  TempDir dir_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Tier> tier_;
  int nvme_fd_ = -1;  // the NVMe tier's file, as its open hook returned it
};

TEST_P(TierConformanceTest, RoundTripsRandomFullBlocksExactly) {
  ASSERT_NO_FATAL_FAILURE(Make(64 * kBlock));
  constexpr int kN = 12;  // three times the NVMe queue depth
  const std::vector<BlockId> ids = AllocateN(kN);
  ASSERT_EQ(ids.size(), size_t{kN});
  EXPECT_EQ(std::set<BlockId>(ids.begin(), ids.end()).size(), ids.size()) << "ids are distinct";

  std::vector<Buffer> src, dst;
  for (int i = 0; i < kN; ++i) {
    src.push_back(AlignedBuffer(kBlock));
    FillRandom(src.back().get(), kBlock, 1000 + i);
    dst.push_back(AlignedBuffer(kBlock));
  }
  Tracker writes(kN);
  for (int i = 0; i < kN; ++i) tier().Write(ids[i], src[i].get(), writes.Done(i));
  writes.Wait(kN);
  writes.ExpectAllOkOnce();
  Tracker reads(kN);
  for (int i = 0; i < kN; ++i) tier().Read(ids[i], dst[i].get(), reads.Done(i));
  reads.Wait(kN);
  reads.ExpectAllOkOnce();
  for (int i = 0; i < kN; ++i) EXPECT_TRUE(SameBytes(src[i].get(), dst[i].get(), kBlock)) << "block " << ids[i];

  // Overwriting every other block leaves its neighbours' bytes alone.
  for (int i = 0; i < kN; i += 2) {
    FillRandom(src[i].get(), kBlock, 5000 + i);
    KVTIER_ASSERT_OK(WriteSync(tier(), ids[i], src[i].get()));
  }
  for (int i = 0; i < kN; ++i) {
    std::memset(dst[i].get(), 0x55, kBlock);
    KVTIER_ASSERT_OK(ReadSync(tier(), ids[i], dst[i].get()));
    EXPECT_TRUE(SameBytes(src[i].get(), dst[i].get(), kBlock)) << "block " << ids[i] << " after the overwrite";
  }
}

TEST_P(TierConformanceTest, ConcurrentTransfersFromSeveralThreads) {
  ASSERT_NO_FATAL_FAILURE(Make(64 * kBlock));
  // 4 threads x 8 blocks each: up to 32 transfers in flight, 8x the NVMe
  // queue depth. Each thread owns its blocks (the contract forbids two
  // transfers on one block at once) and checks every byte it reads back.
  constexpr int kThreads = 4, kPerThread = 8, kRounds = 3;
  std::vector<std::vector<BlockId>> owned;
  for (int t = 0; t < kThreads; ++t) owned.push_back(AllocateN(kPerThread));
  std::atomic<int> mismatches{0}, bad_calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<Buffer> src, dst;
      for (int i = 0; i < kPerThread; ++i) {
        src.push_back(AlignedBuffer(kBlock));
        dst.push_back(AlignedBuffer(kBlock));
      }
      for (int round = 0; round < kRounds; ++round) {
        Tracker w(kPerThread), r(kPerThread);
        for (int i = 0; i < kPerThread; ++i) {
          FillRandom(src[i].get(), kBlock, (t * 100 + round) * 100 + i);
          tier().Write(owned[t][i], src[i].get(), w.Done(i));
        }
        w.Wait(kPerThread);
        for (int i = 0; i < kPerThread; ++i) tier().Read(owned[t][i], dst[i].get(), r.Done(i));
        r.Wait(kPerThread);
        for (int i = 0; i < kPerThread; ++i) {
          if (w.calls(i) != 1 || r.calls(i) != 1 || !w.status(i).ok() || !r.status(i).ok()) bad_calls++;
          if (!SameBytes(src[i].get(), dst[i].get(), kBlock)) mismatches++;
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  tier().Drain();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(bad_calls.load(), 0);
  const TierStats s = tier().Stats();
  constexpr int64_t kEach = int64_t{kThreads} * kPerThread * kRounds;
  EXPECT_EQ(s.writes, kEach);
  EXPECT_EQ(s.reads, kEach);
  EXPECT_EQ(s.bytes_written, kEach * kBlock);
  EXPECT_EQ(s.bytes_read, kEach * kBlock);
  EXPECT_EQ(s.write_errors, 0);
  EXPECT_EQ(s.read_errors, 0);
  EXPECT_EQ(s.in_flight, 0);
}

// With the completion thread held inside one `done`, every later transfer
// stays in flight: 1 + 3 x queue depth of them, so the NVMe tier must queue
// most; all of them complete, in full, once it is let go.
TEST_P(TierConformanceTest, TransfersBeyondTheQueueDepthWaitAndComplete) {
  if (!IsAsync(GetParam())) GTEST_SKIP() << "the host tier completes inline: nothing waits";
  ASSERT_NO_FATAL_FAILURE(Make(64 * kBlock));
  constexpr int kN = 1 + 3 * kQueueDepth;
  const std::vector<BlockId> ids = AllocateN(kN);
  ASSERT_EQ(ids.size(), size_t{kN});
  std::vector<Buffer> src;
  for (int i = 0; i < kN; ++i) {
    src.push_back(AlignedBuffer(kBlock));
    FillRandom(src.back().get(), kBlock, 77 + i);
  }
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false, released = false;
  Tracker tracker(kN);
  TierDone first = tracker.Done(0);
  tier().Write(ids[0], src[0].get(), [&, first = std::move(first)](absl::Status st) mutable {
    std::move(first)(std::move(st));
    std::unique_lock lock(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return released; });
  });
  {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return entered; });
  }
  for (int i = 1; i < kN; ++i) tier().Write(ids[i], src[i].get(), tracker.Done(i));
  EXPECT_EQ(tier().Stats().in_flight, kN) << "the held one and every one after it";
  EXPECT_EQ(tracker.finished(), 1u);
  if (IsNvme(GetParam())) {
    // While completions are held, only the first queue_depth of the later
    // writes may reach the file (FIFO); the rest wait. Poll the file until
    // those have landed; a deadline only bounds a failing run.
    const std::set<BlockId> first(ids.begin() + 1, ids.begin() + 1 + kQueueDepth);
    std::set<BlockId> landed;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while ((landed = BlocksInFile(ids, src, 1)).size() < first.size() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    EXPECT_EQ(landed, first) << "the first " << kQueueDepth << " queued writes, and no more, are on the ring";
  }
  {
    std::lock_guard lock(mu);
    released = true;
  }
  cv.notify_all();
  tier().Drain();
  EXPECT_EQ(tracker.finished(), size_t{kN});
  tracker.ExpectAllOkOnce();
  TierStats s = tier().Stats();
  EXPECT_EQ(s.in_flight, 0);
  EXPECT_EQ(s.writes, kN);
  for (int i = 0; i < kN; ++i) {
    Buffer got = AlignedBuffer(kBlock);
    KVTIER_ASSERT_OK(ReadSync(tier(), ids[i], got.get()));
    EXPECT_TRUE(SameBytes(src[i].get(), got.get(), kBlock)) << "block " << ids[i];
  }
}

TEST_P(TierConformanceTest, CapIsResourceExhaustedNamingItAndFreeMakesRoom) {
  // 6.5 blocks: the cap holds 6 whole blocks.
  const int64_t cap = 6 * kBlock + kBlock / 2;
  ASSERT_NO_FATAL_FAILURE(Make(cap));
  EXPECT_EQ(tier().Stats().capacity_bytes, 6 * kBlock);
  std::vector<BlockId> ids = AllocateN(6);
  ASSERT_EQ(ids.size(), 6u);
  EXPECT_EQ(std::set<BlockId>(ids.begin(), ids.end()).size(), 6u);
  absl::StatusOr<BlockId> over = tier().Allocate();
  ASSERT_FALSE(over.ok()) << "a 7th block of " << kBlock << " bytes in a cap of " << cap;
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr(absl::StrCat(cap))) << "names the cap in bytes";
  EXPECT_THAT(over.status().message(), HasSubstr("6 blocks")) << "and in blocks";
  EXPECT_EQ(tier().Stats().blocks_in_use, 6) << "a refused allocation changes nothing";

  KVTIER_ASSERT_OK(tier().Free(ids[2]));
  absl::StatusOr<BlockId> again = tier().Allocate();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(tier().Allocate().status().code(), absl::StatusCode::kResourceExhausted) << "room for exactly one";
  // The re-allocated block works.
  Buffer src = AlignedBuffer(kBlock), dst = AlignedBuffer(kBlock);
  FillRandom(src.get(), kBlock, 6);
  KVTIER_ASSERT_OK(WriteSync(tier(), *again, src.get()));
  KVTIER_ASSERT_OK(ReadSync(tier(), *again, dst.get()));
  EXPECT_TRUE(SameBytes(src.get(), dst.get(), kBlock));
  const TierStats s = tier().Stats();
  EXPECT_EQ(s.blocks_in_use, 6);
  EXPECT_EQ(s.peak_bytes_in_use, 6 * kBlock);
}

TEST_P(TierConformanceTest, UnallocatedBlockIsFailedPrecondition) {
  ASSERT_NO_FATAL_FAILURE(Make(16 * kBlock));
  for (BlockId id : {BlockId{0}, BlockId{12345}, BlockId{0xffffffffu}}) {
    const absl::Status st = tier().Free(id);
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << id << ": " << st;
    EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("block ", id)));
  }
  absl::StatusOr<BlockId> a = tier().Allocate();
  absl::StatusOr<BlockId> b = tier().Allocate();
  ASSERT_TRUE(a.ok() && b.ok());
  KVTIER_ASSERT_OK(tier().Free(*a));
  const absl::Status twice = tier().Free(*a);
  EXPECT_EQ(twice.code(), absl::StatusCode::kFailedPrecondition) << twice;
  EXPECT_EQ(tier().Stats().blocks_in_use, 1) << "the double free changed nothing";
  absl::StatusOr<BlockId> c = tier().Allocate();
  absl::StatusOr<BlockId> d = tier().Allocate();
  ASSERT_TRUE(c.ok() && d.ok());
  EXPECT_NE(*c, *d) << "a double free must not hand one block out twice";
  EXPECT_NE(*c, *b);
  EXPECT_NE(*d, *b);

  // Transfers on a block that is not allocated fail through `done`, once.
  const BlockId freed = *c;
  KVTIER_ASSERT_OK(tier().Free(freed));
  Buffer buf = AlignedBuffer(kBlock);
  Tracker t(2);
  tier().Write(freed, buf.get(), t.Done(0));
  tier().Read(freed, buf.get(), t.Done(1));
  t.Wait(2);
  tier().Drain();
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(t.calls(i), 1);
    EXPECT_EQ(t.status(i).code(), absl::StatusCode::kFailedPrecondition) << t.status(i);
    EXPECT_THAT(t.status(i).message(), HasSubstr(absl::StrCat("block ", freed)));
  }
  const TierStats s = tier().Stats();
  EXPECT_EQ(s.write_errors, 1);
  EXPECT_EQ(s.read_errors, 1);
  EXPECT_EQ(s.writes, 0);
  EXPECT_EQ(s.reads, 0);
}

TEST_P(TierConformanceTest, MisalignedBufferIsInvalidArgumentThroughDone) {
  ASSERT_NO_FATAL_FAILURE(Make(16 * kBlock));
  absl::StatusOr<BlockId> b = tier().Allocate();
  ASSERT_TRUE(b.ok());
  Buffer original = AlignedBuffer(kBlock);
  FillRandom(original.get(), kBlock, 3);
  KVTIER_ASSERT_OK(WriteSync(tier(), *b, original.get()));

  Buffer big = AlignedBuffer(2 * kBlock, 0x11);
  Tracker t(4);
  tier().Write(*b, big.get() + 64, t.Done(0));
  tier().Write(*b, big.get() + 512, t.Done(1));  // sector-aligned is not enough
  tier().Read(*b, big.get() + 64, t.Done(2));
  tier().Read(*b, big.get() + 2048, t.Done(3));
  t.Wait(4);
  tier().Drain();
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(t.calls(i), 1);
    EXPECT_EQ(t.status(i).code(), absl::StatusCode::kInvalidArgument) << t.status(i);
    EXPECT_THAT(t.status(i).message(), HasSubstr(absl::StrCat("block ", *b)));
    EXPECT_THAT(t.status(i).message(), HasSubstr("aligned"));
  }
  for (int64_t i = 0; i < 2 * kBlock; ++i) {
    ASSERT_EQ(static_cast<unsigned char>(big.get()[i]), 0x11) << "a refused read wrote byte " << i;
  }
  Buffer got = AlignedBuffer(kBlock);
  KVTIER_ASSERT_OK(ReadSync(tier(), *b, got.get()));
  EXPECT_TRUE(SameBytes(original.get(), got.get(), kBlock)) << "a refused write changed the block";
  const TierStats s = tier().Stats();
  EXPECT_EQ(s.write_errors, 2);
  EXPECT_EQ(s.read_errors, 2);
  EXPECT_EQ(s.writes, 1);
  EXPECT_EQ(s.reads, 1);
}

TEST_P(TierConformanceTest, NeverWrittenBlockReadsPerTier) {
  ASSERT_NO_FATAL_FAILURE(Make(16 * kBlock));
  const std::vector<BlockId> ids = AllocateN(4);
  ASSERT_EQ(ids.size(), 4u);
  Buffer dst = AlignedBuffer(kBlock, 0x77);
  const absl::Status st = ReadSync(tier(), ids[0], dst.get());
  switch (GetParam()) {
    case Kind::kNvmeDirect:
    case Kind::kNvmeFallback:
    case Kind::kNvmeBuffered: {
      // Nothing written: the file is empty, the read ends at EOF (0 bytes).
      EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
      EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("block ", ids[0])));
      EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("expected ", kBlock, " bytes, got 0")));
      EXPECT_THAT(st.message(), HasSubstr(NvmeDir()));
      EXPECT_EQ(tier().Stats().read_errors, 1);
      // Below EOF a never-written block is a hole of the sparse file: zeros.
      BlockId top = std::max({ids[0], ids[1], ids[2], ids[3]});
      BlockId low = top == ids[0] ? ids[1] : ids[0];
      Buffer src = AlignedBuffer(kBlock);
      FillRandom(src.get(), kBlock, 9);
      KVTIER_ASSERT_OK(WriteSync(tier(), top, src.get()));
      std::memset(dst.get(), 0x77, kBlock);
      KVTIER_ASSERT_OK(ReadSync(tier(), low, dst.get()));
      EXPECT_TRUE(AllZero(dst.get(), kBlock));
      break;
    }
    case Kind::kMemory:
      KVTIER_EXPECT_OK(st);  // blocks are zeroed when first allocated
      EXPECT_TRUE(AllZero(dst.get(), kBlock));
      break;
    case Kind::kHost:
      KVTIER_EXPECT_OK(st);  // the pool's memory as the backend gave it: contents unspecified
      break;
  }
}

TEST_P(TierConformanceTest, DrainWaitsForEverything) {
  ASSERT_NO_FATAL_FAILURE(Make(64 * kBlock));
  constexpr int kN = 40;
  const std::vector<BlockId> ids = AllocateN(kN);
  ASSERT_EQ(ids.size(), size_t{kN});
  std::vector<Buffer> src;
  for (int i = 0; i < kN; ++i) {
    src.push_back(AlignedBuffer(kBlock));
    FillRandom(src.back().get(), kBlock, 300 + i);
  }
  tier().Drain();  // nothing in flight: returns at once
  // Each `done` does some work before it counts itself, so a Drain that
  // returned before the callbacks finished would see a short count.
  std::atomic<int> finished{0};
  std::atomic<uint64_t> checksum{0};
  for (int i = 0; i < kN; ++i) {
    tier().Write(ids[i], src[i].get(), [&, p = src[i].get()](absl::Status st) {
      EXPECT_TRUE(st.ok()) << st;
      uint64_t h = 1469598103934665603ull;
      for (int64_t k = 0; k < kBlock; ++k) h = (h ^ static_cast<unsigned char>(p[k])) * 1099511628211ull;
      checksum.fetch_xor(h);
      finished.fetch_add(1);
    });
  }
  // Two threads drain at once; both return only when all is done.
  std::atomic<int> seen_by_other{-1};
  std::thread other([&] {
    tier().Drain();
    seen_by_other = finished.load();
  });
  tier().Drain();
  EXPECT_EQ(finished.load(), kN);
  other.join();
  EXPECT_EQ(seen_by_other.load(), kN);
  const TierStats s = tier().Stats();
  EXPECT_EQ(s.in_flight, 0);
  EXPECT_EQ(s.writes, kN);
}

TEST_P(TierConformanceTest, StatsAccountingIsExact) {
  const Kind kind = GetParam();
  ASSERT_NO_FATAL_FAILURE(Make(16 * kBlock));
  TierStats s = tier().Stats();
  EXPECT_EQ(s.block_bytes, kBlock);
  EXPECT_EQ(s.capacity_bytes, 16 * kBlock);
  EXPECT_EQ(s.blocks_in_use, 0);
  EXPECT_EQ(s.bytes_reserved, 0) << "nothing is reserved before the first block";
  EXPECT_EQ(s.peak_bytes_in_use, 0);

  const std::vector<BlockId> ids = AllocateN(5);
  ASSERT_EQ(ids.size(), 5u);
  s = tier().Stats();
  EXPECT_EQ(s.blocks_in_use, 5);
  EXPECT_EQ(s.bytes_in_use, 5 * kBlock);
  EXPECT_EQ(s.peak_bytes_in_use, 5 * kBlock);
  // Host: whole chunks of 4 blocks; memory: the blocks handed out; NVMe: the
  // file, which only writes grow.
  const int64_t reserved_after_alloc = kind == Kind::kHost ? 8 * kBlock : kind == Kind::kMemory ? 5 * kBlock : 0;
  EXPECT_EQ(s.bytes_reserved, reserved_after_alloc);

  std::vector<Buffer> bufs;
  for (int i = 0; i < 5; ++i) {
    bufs.push_back(AlignedBuffer(kBlock));
    FillRandom(bufs.back().get(), kBlock, 40 + i);
  }
  Tracker t(9);
  for (int i = 0; i < 5; ++i) tier().Write(ids[i], bufs[i].get(), t.Done(i));
  t.Wait(5);
  for (int i = 0; i < 3; ++i) tier().Read(ids[i], bufs[i].get(), t.Done(5 + i));
  tier().Read(1000, bufs[4].get(), t.Done(8));  // never allocated
  t.Wait(9);
  tier().Drain();
  EXPECT_EQ(t.status(8).code(), absl::StatusCode::kFailedPrecondition);
  s = tier().Stats();
  EXPECT_EQ(s.writes, 5);
  EXPECT_EQ(s.reads, 3);
  EXPECT_EQ(s.bytes_written, 5 * kBlock);
  EXPECT_EQ(s.bytes_read, 3 * kBlock);
  EXPECT_EQ(s.write_errors, 0);
  EXPECT_EQ(s.read_errors, 1);
  EXPECT_EQ(s.in_flight, 0);
  // Only the 8 transfers that reached the file ran buffered; the refused read never did.
  EXPECT_EQ(s.buffered_fallbacks, kind == Kind::kNvmeFallback ? 8 : 0);
  const int64_t top = *std::max_element(ids.begin(), ids.end());
  EXPECT_EQ(s.bytes_reserved, IsNvme(kind) ? (top + 1) * kBlock : reserved_after_alloc);
  if (kind != Kind::kHost) {
    EXPECT_EQ(s.pinned_bytes, 0);
    EXPECT_EQ(s.numa_node, -1);
  }

  KVTIER_ASSERT_OK(tier().Free(ids[0]));
  KVTIER_ASSERT_OK(tier().Free(ids[1]));
  s = tier().Stats();
  EXPECT_EQ(s.blocks_in_use, 3);
  EXPECT_EQ(s.bytes_in_use, 3 * kBlock);
  EXPECT_EQ(s.peak_bytes_in_use, 5 * kBlock) << "the peak stays";
  EXPECT_EQ(s.bytes_reserved, IsNvme(kind) ? (top + 1) * kBlock : reserved_after_alloc) << "freeing keeps the space";
}

// The destructor drains: every transfer still in flight calls `done` once,
// with OK, before it returns; nothing leaks (ASan) or races (TSan).
TEST_P(TierConformanceTest, DestructionWithTransfersInFlight) {
  constexpr int kN = 32;
  std::vector<Buffer> src, dst;  // declared before the tier is made: they outlive it
  for (int i = 0; i < kN; ++i) {
    src.push_back(AlignedBuffer(kBlock));
    FillRandom(src.back().get(), kBlock, 700 + i);
    dst.push_back(AlignedBuffer(kBlock));
  }
  Tracker t(2 * kN);
  ASSERT_NO_FATAL_FAILURE(Make(64 * kBlock));
  const std::vector<BlockId> ids = AllocateN(2 * kN);
  ASSERT_EQ(ids.size(), size_t{2 * kN});
  // Half the blocks written beforehand, so their reads succeed.
  for (int i = 0; i < kN; ++i) KVTIER_ASSERT_OK(WriteSync(tier(), ids[kN + i], src[i].get()));
  for (int i = 0; i < kN; ++i) {
    tier().Write(ids[i], src[i].get(), t.Done(i));
    tier().Read(ids[kN + i], dst[i].get(), t.Done(kN + i));
  }
  tier_.reset();
  EXPECT_EQ(t.finished(), size_t{2 * kN}) << "done before the destructor returned";
  t.ExpectAllOkOnce();
  for (int i = 0; i < kN; ++i) EXPECT_TRUE(SameBytes(src[i].get(), dst[i].get(), kBlock)) << i;
}

INSTANTIATE_TEST_SUITE_P(TierConformance, TierConformanceTest,
                         ::testing::Values(Kind::kHost, Kind::kNvmeDirect, Kind::kNvmeFallback, Kind::kNvmeBuffered,
                                           Kind::kMemory),
                         KindName);

// ---- NVMe tier: options, files, fixed buffers, errors ----

class TierConformanceNvmeTest : public ::testing::Test {
 protected:
  NvmeTier::Options Options() const {
    NvmeTier::Options o;
    o.directory = dir_.path() + "/nvme";
    o.capacity_bytes = 64 * kBlock;
    o.block_bytes = kBlock;
    o.queue_depth = kQueueDepth;
    o.io_mode = NvmeTier::IoMode::kDirect;
    return o;
  }
  std::unique_ptr<NvmeTier> Make(const NvmeTier::Options& o) {
    absl::StatusOr<std::unique_ptr<NvmeTier>> t = NvmeTier::Create(o);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::move(*t) : nullptr;
  }
  static int FilesIn(const std::string& dir) {
    int n = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++n;
    return n;
  }

  LogCapture log_;
  TempDir dir_;
};

TEST_F(TierConformanceNvmeTest, CreateValidatesOptions) {
  struct Case {
    void (*change)(NvmeTier::Options&);
    const char* names;  // the offending value as the message prints it
  };
  const Case bad[] = {
      {[](NvmeTier::Options& o) { o.directory = ""; }, "directory"},
      {[](NvmeTier::Options& o) { o.capacity_bytes = 0; }, "got 0"},
      {[](NvmeTier::Options& o) { o.capacity_bytes = kBlock - 4096; }, "got 4096"},
      {[](NvmeTier::Options& o) { o.block_bytes = 1000; }, "got 1000"},
      {[](NvmeTier::Options& o) { o.block_bytes = -4096; }, "got -4096"},
      {[](NvmeTier::Options& o) { o.block_bytes = int64_t{2} << 30; }, "got 2147483648"},
      {[](NvmeTier::Options& o) { o.queue_depth = 0; }, "got 0"},
      {[](NvmeTier::Options& o) { o.queue_depth = 4097; }, "got 4097"},
      {[](NvmeTier::Options& o) {
         o.block_bytes = 4096;
         o.capacity_bytes = int64_t{4096} << 32;  // 2^32 blocks: one more than a BlockId names
       },
       "4294967296 blocks"},
  };
  for (const Case& c : bad) {
    NvmeTier::Options o = Options();
    c.change(o);
    absl::StatusOr<std::unique_ptr<NvmeTier>> t = NvmeTier::Create(o);
    ASSERT_FALSE(t.ok()) << c.names;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_THAT(t.status().message(), HasSubstr(c.names));
  }
  EXPECT_FALSE(std::filesystem::exists(Options().directory)) << "a refused Create touches no disk";
}

TEST_F(TierConformanceNvmeTest, CreatesTheDirectoryAndUnlinksItsFile) {
  NvmeTier::Options o = Options();
  o.directory = dir_.path() + "/a/b/c";
  std::unique_ptr<NvmeTier> tier = Make(o);
  ASSERT_NE(tier, nullptr);
  ASSERT_TRUE(std::filesystem::is_directory(o.directory));
  EXPECT_EQ(FilesIn(o.directory), 0) << "the file is unlinked once open";
  EXPECT_EQ(tier->name(), "nvme");
  EXPECT_TRUE(tier->direct_io());
  absl::StatusOr<BlockId> b = tier->Allocate();
  ASSERT_TRUE(b.ok());
  Buffer src = AlignedBuffer(kBlock), dst = AlignedBuffer(kBlock);
  FillRandom(src.get(), kBlock, 1);
  KVTIER_ASSERT_OK(WriteSync(*tier, *b, src.get()));
  KVTIER_ASSERT_OK(ReadSync(*tier, *b, dst.get()));
  EXPECT_TRUE(SameBytes(src.get(), dst.get(), kBlock));
  EXPECT_EQ(FilesIn(o.directory), 0);
  // Two tiers in one directory get files of their own.
  std::unique_ptr<NvmeTier> second = Make(o);
  ASSERT_NE(second, nullptr);
  absl::StatusOr<BlockId> b2 = second->Allocate();
  ASSERT_TRUE(b2.ok());
  Buffer other = AlignedBuffer(kBlock);
  FillRandom(other.get(), kBlock, 2);
  KVTIER_ASSERT_OK(WriteSync(*second, *b2, other.get()));
  KVTIER_ASSERT_OK(ReadSync(*tier, *b, dst.get()));
  EXPECT_TRUE(SameBytes(src.get(), dst.get(), kBlock)) << "the second tier wrote into the first one's file";
}

TEST_F(TierConformanceNvmeTest, DirectModeFailsWhereODirectIsRefused) {
  NvmeTier::Options o = Options();
  o.io_mode = NvmeTier::IoMode::kDirect;
  o.open_hook = RefuseODirect;
  absl::StatusOr<std::unique_ptr<NvmeTier>> t = NvmeTier::Create(o);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr("O_DIRECT"));
  EXPECT_THAT(t.status().message(), HasSubstr(o.directory));
  EXPECT_EQ(FilesIn(o.directory), 0);
  EXPECT_TRUE(log_.Warnings("O_DIRECT").empty()) << "an error, not a warning";
}

TEST_F(TierConformanceNvmeTest, FallbackWarnsOncePerTierAndBufferedModeNeverAsksForODirect) {
  NvmeTier::Options o = Options();
  o.io_mode = NvmeTier::IoMode::kAuto;
  o.open_hook = RefuseODirect;
  std::unique_ptr<NvmeTier> a = Make(o);
  std::unique_ptr<NvmeTier> b = Make(o);
  ASSERT_TRUE(a != nullptr && b != nullptr);
  EXPECT_FALSE(a->direct_io());
  EXPECT_EQ(log_.Warnings("O_DIRECT refused").size(), 2u) << "one per tier";

  std::mutex mu;
  std::vector<int> flags_seen;
  o.io_mode = NvmeTier::IoMode::kBuffered;
  o.open_hook = [&](const char* path, int flags, mode_t mode) {
    std::lock_guard lock(mu);
    flags_seen.push_back(flags);
    return open(path, flags, mode);
  };
  std::unique_ptr<NvmeTier> buffered = Make(o);
  ASSERT_NE(buffered, nullptr);
  EXPECT_FALSE(buffered->direct_io());
  ASSERT_EQ(flags_seen.size(), 1u);
  EXPECT_EQ(flags_seen[0] & O_DIRECT, 0);
  EXPECT_EQ(log_.Warnings("O_DIRECT refused").size(), 2u) << "kBuffered does not warn";
  absl::StatusOr<BlockId> blk = buffered->Allocate();
  ASSERT_TRUE(blk.ok());
  Buffer src = AlignedBuffer(kBlock);
  KVTIER_ASSERT_OK(WriteSync(*buffered, *blk, src.get()));
  EXPECT_EQ(buffered->Stats().buffered_fallbacks, 0) << "chosen, not a fallback";
}

TEST_F(TierConformanceNvmeTest, FixedBuffersInsideAndOutsideARegisteredRegion) {
  constexpr int kRegionBlocks = 8;
  // Registered memory outlives the tier: io_uring keeps it registered until then.
  Buffer region = AlignedBuffer(kRegionBlocks * kBlock);
  Buffer straddle_mem = AlignedBuffer((kRegionBlocks + 1) * kBlock);
  std::unique_ptr<NvmeTier> tier = Make(Options());
  ASSERT_NE(tier, nullptr);
  KVTIER_ASSERT_OK(tier->RegisterBuffer(region.get(), kRegionBlocks * kBlock));
  const std::vector<BlockId> ids = [&] {
    std::vector<BlockId> v;
    for (int i = 0; i < 12; ++i) v.push_back(*tier->Allocate());
    return v;
  }();
  // Blocks 0..7 written from inside the region (WRITE_FIXED), 8..10 from
  // ordinary buffers (WRITE), and 11 from a buffer that straddles the end of
  // a second region: it starts inside, so it must not go as a fixed buffer.
  std::vector<Buffer> outside;
  for (int i = 0; i < 3; ++i) outside.push_back(AlignedBuffer(kBlock));
  std::vector<char*> src;
  for (int i = 0; i < kRegionBlocks; ++i) src.push_back(region.get() + i * kBlock);
  for (int i = 0; i < 3; ++i) src.push_back(outside[i].get());
  src.push_back(nullptr);  // filled below
  std::vector<std::vector<char>> want(12, std::vector<char>(kBlock));
  for (int i = 0; i < 11; ++i) FillRandom(src[i], kBlock, 900 + i);
  // The straddling buffer: its first half (one page) in the second region's
  // last block, the other half past the region's end.
  {
    KVTIER_ASSERT_OK(tier->RegisterBuffer(straddle_mem.get(), kRegionBlocks * kBlock));
    src[11] = straddle_mem.get() + (kRegionBlocks - 1) * kBlock + kBlock / 2;
    FillRandom(src[11], kBlock, 911);
  }
  for (int i = 0; i < 12; ++i) std::memcpy(want[i].data(), src[i], kBlock);
  Tracker w(12);
  for (int i = 0; i < 12; ++i) tier->Write(ids[i], src[i], w.Done(i));
  w.Wait(12);
  w.ExpectAllOkOnce();
  // Read back crosswise: region blocks into ordinary buffers, ordinary
  // blocks into the region.
  std::memset(region.get(), 0, kRegionBlocks * kBlock);
  std::vector<Buffer> plain;
  Tracker r(12);
  for (int i = 0; i < kRegionBlocks; ++i) {
    plain.push_back(AlignedBuffer(kBlock));
    tier->Read(ids[i], plain.back().get(), r.Done(i));
  }
  for (int i = kRegionBlocks; i < 12; ++i) tier->Read(ids[i], region.get() + (i - kRegionBlocks) * kBlock, r.Done(i));
  r.Wait(12);
  r.ExpectAllOkOnce();
  for (int i = 0; i < kRegionBlocks; ++i) {
    EXPECT_TRUE(SameBytes(plain[i].get(), want[i].data(), kBlock)) << "region block " << i;
  }
  for (int i = kRegionBlocks; i < 12; ++i) {
    EXPECT_TRUE(SameBytes(region.get() + (i - kRegionBlocks) * kBlock, want[i].data(), kBlock)) << "block " << i;
  }
  tier->Drain();
  EXPECT_EQ(tier->Stats().reads, 12);
  EXPECT_EQ(tier->Stats().writes, 12);
}

// A fixed buffer is the pages pinned when it was registered. Mapping new
// pages at the region's address afterwards shows which path a read took: a
// READ_FIXED fills the old pages (the new mapping stays zero), a plain READ
// the new ones. Inside the region must be the former, unless the kernel has
// no sparse fixed buffers (logged at Create), then the latter.
TEST_F(TierConformanceNvmeTest, ReadsInsideARegionUseTheFixedBuffer) {
  const size_t bytes = 2 * kBlock;
  void* region = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(region, MAP_FAILED);
  {
    std::unique_ptr<NvmeTier> tier = Make(Options());
    ASSERT_NE(tier, nullptr);
    const bool fixed = log_.Lines(LogSeverity::kInfo, "fixed buffers").empty();
    std::memset(region, 0x5A, bytes);  // touch the pages before they are pinned
    KVTIER_ASSERT_OK(tier->RegisterBuffer(region, static_cast<int64_t>(bytes)));
    absl::StatusOr<BlockId> b = tier->Allocate();
    ASSERT_TRUE(b.ok());
    Buffer src = AlignedBuffer(kBlock);
    FillRandom(src.get(), kBlock, 31);
    KVTIER_ASSERT_OK(WriteSync(*tier, *b, src.get()));
    ASSERT_EQ(mmap(region, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0), region);
    char* inside = static_cast<char*>(region) + kBlock;
    KVTIER_ASSERT_OK(ReadSync(*tier, *b, inside));
    if (fixed) {
      EXPECT_TRUE(AllZero(inside, kBlock)) << "the read went to the new pages: not a READ_FIXED";
    } else {
      EXPECT_TRUE(SameBytes(inside, src.get(), kBlock)) << "no fixed buffers: a plain READ";
    }
    Buffer plain = AlignedBuffer(kBlock);
    KVTIER_ASSERT_OK(ReadSync(*tier, *b, plain.get()));
    EXPECT_TRUE(SameBytes(plain.get(), src.get(), kBlock));
  }
  munmap(region, bytes);
}

TEST_F(TierConformanceNvmeTest, RegisterBufferValidatesAndHolds1024Regions) {
  Buffer mem = AlignedBuffer(1025 * 4096);  // registered: outlives the tiers
  std::unique_ptr<NvmeTier> tier = Make(Options());
  ASSERT_NE(tier, nullptr);
  for (auto [base, bytes] : {std::pair<char*, int64_t>{nullptr, 4096}, {mem.get() + 512, 4096}, {mem.get(), 0},
                             {mem.get(), -4096}, {mem.get(), 1000}}) {
    const absl::Status st = tier->RegisterBuffer(base, bytes);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(st.message(), HasSubstr(absl::StrCat(bytes)));
  }
  for (int i = 0; i < 1024; ++i) KVTIER_ASSERT_OK(tier->RegisterBuffer(mem.get() + int64_t{i} * 4096, 4096));
  const absl::Status full = tier->RegisterBuffer(mem.get() + int64_t{1024} * 4096, 4096);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_THAT(full.message(), HasSubstr("1024"));
  // Transfers through a registered page still work (4096-byte blocks here).
  NvmeTier::Options o = Options();
  o.block_bytes = 4096;
  o.directory += "-small";
  std::unique_ptr<NvmeTier> small = Make(o);
  ASSERT_NE(small, nullptr);
  KVTIER_ASSERT_OK(small->RegisterBuffer(mem.get(), 4096));
  absl::StatusOr<BlockId> b = small->Allocate();
  ASSERT_TRUE(b.ok());
  FillRandom(mem.get(), 4096, 5);
  const std::vector<char> want(mem.get(), mem.get() + 4096);
  KVTIER_ASSERT_OK(WriteSync(*small, *b, mem.get()));
  std::memset(mem.get(), 0, 4096);
  KVTIER_ASSERT_OK(ReadSync(*small, *b, mem.get()));
  EXPECT_TRUE(SameBytes(mem.get(), want.data(), 4096));
}

TEST_F(TierConformanceNvmeTest, IoErrorsMapErrnoAndNameBlockAndFile) {
  // A full disk: /dev/full takes no write (ENOSPC) and reads as zeros.
  NvmeTier::Options o = Options();
  o.io_mode = NvmeTier::IoMode::kBuffered;
  o.open_hook = [](const char*, int, mode_t) { return open("/dev/full", O_RDWR | O_CLOEXEC); };
  std::unique_ptr<NvmeTier> full = Make(o);
  ASSERT_NE(full, nullptr);
  absl::StatusOr<BlockId> b = full->Allocate();
  ASSERT_TRUE(b.ok());
  Buffer buf = AlignedBuffer(kBlock);
  absl::Status st = WriteSync(*full, *b, buf.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("no space left on ", o.directory)));
  EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("block ", *b)));
  EXPECT_EQ(full->Stats().write_errors, 1);
  EXPECT_EQ(full->Stats().writes, 0);
  EXPECT_EQ(full->Stats().bytes_reserved, 0) << "a failed write does not grow the file";

  // A file open read-only: writes fail with EBADF, an internal error.
  o.io_mode = NvmeTier::IoMode::kDirect;
  o.open_hook = [](const char* path, int flags, mode_t mode) {
    return open(path, (flags & ~O_ACCMODE) | O_RDONLY, mode);
  };
  std::unique_ptr<NvmeTier> ro = Make(o);
  ASSERT_NE(ro, nullptr);
  b = ro->Allocate();
  ASSERT_TRUE(b.ok());
  st = WriteSync(*ro, *b, buf.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
  EXPECT_THAT(st.message(), HasSubstr(std::strerror(EBADF)));
  EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("block ", *b)));
  EXPECT_THAT(st.message(), HasSubstr(o.directory + "/kvtier-"));
}

}  // namespace
}  // namespace kvtier
