// HostBlockPool (kvtier/allocator/host_pool.h): option validation, lazy growth
// chunk by chunk, chunk rounding, the cap, exact accounting, block memory
// (alignment, distinctness, null when not allocated), size-overflow cases,
// pinning with mlock or the one warning when it is refused, NUMA binding and
// concurrent use. Ported where it still applies from the old HostTier test.
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/allocator/host_pool.h"
#include "kvtier/backend.h"
#include "kvtier/log.h"
#include "test_util.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;
using BlockId = HostBlockPool::BlockId;

constexpr int64_t kPage = 4096;

// ASan and TSan intercept mlock with a no-op that returns 0 (their runtimes
// cannot support locked memory), so there every mlock "succeeds".
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kMlockIsNoop = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kMlockIsNoop = true;
#else
constexpr bool kMlockIsNoop = false;
#endif
#else
constexpr bool kMlockIsNoop = false;
#endif

// Deterministic bytes for `seed`, 8 at a time.
void Fill(char* p, int64_t n, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  for (int64_t i = 0; i < n; i += 8) {
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 32;
    std::memcpy(p + i, &x, 8);
  }
}

bool Holds(const char* p, int64_t n, uint64_t seed) {
  std::vector<char> want(static_cast<size_t>(n));
  Fill(want.data(), n, seed);
  return std::memcmp(p, want.data(), static_cast<size_t>(n)) == 0;
}

// Captures warnings while alive.
class WarningCapture {
 public:
  WarningCapture() {
    old_ = SetLogSink([this](LogSeverity severity, std::string_view message) {
      std::lock_guard lock(mu_);
      if (severity == LogSeverity::kWarning) lines_.emplace_back(message);
    });
  }
  ~WarningCapture() { SetLogSink(std::move(old_)); }
  std::vector<std::string> lines() {
    std::lock_guard lock(mu_);
    return lines_;
  }

 private:
  LogSink old_;
  std::mutex mu_;
  std::vector<std::string> lines_;
};

// Whether the calling thread may lock memory beyond RLIMIT_MEMLOCK.
bool HasIpcLock() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  return (data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective & CAP_TO_MASK(CAP_IPC_LOCK)) != 0;
}

// Bytes this process has locked now (VmLck).
int64_t LockedBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::strtoll(line.c_str() + 6, nullptr, 10) * 1024;
  }
  return 0;
}

class HostPoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kCpu);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
  }
  std::unique_ptr<HostBlockPool> Make(const HostBlockPool::Options& o) {
    absl::StatusOr<std::unique_ptr<HostBlockPool>> p = HostBlockPool::Create(*backend_, o);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? std::move(*p) : nullptr;
  }
  // Small pools that do not pin, so these tests do not depend on the limits.
  static HostBlockPool::Options Unpinned(int64_t block, int64_t capacity, int64_t chunk) {
    return {.block_bytes = block, .capacity_bytes = capacity, .chunk_bytes = chunk, .lock_memory = false};
  }

  std::unique_ptr<Backend> backend_;
};

TEST_F(HostPoolTest, CreateValidatesOptionsNamingTheValue) {
  struct Case {
    int64_t block, capacity, chunk;
    std::string names;  // the offending value as the message prints it
  };
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  const Case bad[] = {
      {0, 0, 1 << 20, "got 0"},
      {-4096, 0, 1 << 20, "got -4096"},
      {1000, 0, 1 << 20, "got 1000"},           // not a multiple of 4096
      {4097, 0, 1 << 20, "got 4097"},
      {512, 0, 1 << 20, "got 512"},             // a divisor of 4096 is not enough
      {kPage, -1, 1 << 20, "got -1"},
      {kPage, -kMax, 1 << 20, absl::StrCat("got ", -kMax)},
      {2 * kPage, kPage, 1 << 20, "got 4096"},  // a cap below one block
      {2 * kPage, 2 * kPage - 1, 1 << 20, "got 8191"},
      {kPage, 0, 0, "got 0"},
      {kPage, 0, -1, "got -1"},
  };
  for (const Case& c : bad) {
    absl::StatusOr<std::unique_ptr<HostBlockPool>> p =
        HostBlockPool::Create(*backend_, Unpinned(c.block, c.capacity, c.chunk));
    ASSERT_FALSE(p.ok()) << c.block << " " << c.capacity << " " << c.chunk;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
    EXPECT_THAT(p.status().message(), HasSubstr(c.names));
  }
  // Valid edges: a cap of exactly one block; a chunk smaller than a block.
  std::unique_ptr<HostBlockPool> one = Make(Unpinned(2 * kPage, 2 * kPage, 1));
  ASSERT_NE(one, nullptr);
  EXPECT_EQ(one->block_bytes(), 2 * kPage);
  const HostBlockPool::Stats s = one->GetStats();
  EXPECT_EQ(s.capacity_blocks, 1);
  EXPECT_EQ(s.reserved_bytes, 0);
  ASSERT_TRUE(one->Allocate().ok());
  EXPECT_EQ(one->GetStats().reserved_bytes, 2 * kPage);
  EXPECT_EQ(one->Allocate().status().code(), absl::StatusCode::kResourceExhausted);
}

// Ported from the old HostTier overflow tests: sizes near the int64 range are
// refused at Create, a huge cap is only a cap (growth stays one chunk at a
// time) and block ids far out of range are not wrapped into valid ones.
TEST_F(HostPoolTest, SizeOverflowCasesAreRejected) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  struct Case {
    int64_t block, chunk;
    std::string names;
  };
  const Case bad[] = {
      // 3 x 2^62 > int64: a block a chunk must hold at least once.
      {kMax - kMax % kPage, 1 << 20, absl::StrCat("got ", kMax - kMax % kPage)},
      {(int64_t{1} << 40) + kPage, 1 << 20, absl::StrCat("got ", (int64_t{1} << 40) + kPage)},
      {kPage, kMax, absl::StrCat("got ", kMax)},
      {kPage, (int64_t{1} << 40) + 1, absl::StrCat("got ", (int64_t{1} << 40) + 1)},
  };
  for (const Case& c : bad) {
    absl::StatusOr<std::unique_ptr<HostBlockPool>> p = HostBlockPool::Create(*backend_, Unpinned(c.block, 0, c.chunk));
    ASSERT_FALSE(p.ok()) << c.names;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
    EXPECT_THAT(p.status().message(), HasSubstr(c.names));
  }
  // The largest block and chunk it takes: their product per chunk is one
  // block (2^40), which does not overflow. Only checked at Create: growing it
  // would ask the backend for a TiB.
  EXPECT_TRUE(HostBlockPool::Create(*backend_, Unpinned(int64_t{1} << 40, 0, int64_t{1} << 40)).ok());
  // A cap of INT64_MAX bytes is a cap of INT64_MAX / 4096 blocks; growth
  // is by chunk, never towards the cap at once.
  std::unique_ptr<HostBlockPool> pool = Make(Unpinned(kPage, kMax, 4 * kPage));
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(pool->GetStats().capacity_blocks, kMax / kPage);
  ASSERT_TRUE(pool->Allocate().ok());
  EXPECT_EQ(pool->GetStats().reserved_bytes, 4 * kPage);
  // Ids past everything the pool holds.
  for (BlockId id : {BlockId{4}, BlockId{0x7fffffffu}, BlockId{0xffffffffu}}) {
    EXPECT_EQ(pool->Data(id), nullptr) << id;
    const absl::Status st = pool->Free(id);
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << id << ": " << st;
    EXPECT_THAT(st.message(), HasSubstr(absl::StrCat("block ", id)));
  }
}

TEST_F(HostPoolTest, GrowsLazilyOneChunkAtATime) {
  std::unique_ptr<HostBlockPool> pool = Make(Unpinned(kPage, 0, 4 * kPage));
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(pool->GetStats().reserved_bytes, 0) << "nothing before the first Allocate";
  EXPECT_TRUE(pool->Chunks().empty());
  for (int i = 1; i <= 9; ++i) {
    ASSERT_TRUE(pool->Allocate().ok()) << i;
    const int64_t chunks = (i + 3) / 4;
    EXPECT_EQ(pool->GetStats().reserved_bytes, chunks * 4 * kPage) << "after " << i << " blocks";
    EXPECT_EQ(static_cast<int64_t>(pool->Chunks().size()), chunks);
  }
  for (const auto& [base, bytes] : pool->Chunks()) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(base) % kPage, 0u);
    EXPECT_EQ(bytes, 4 * kPage);
  }
}

TEST_F(HostPoolTest, ChunkBytesRoundDownToWholeBlocksAndTheCapTrimsTheLastChunk) {
  // 3.5 blocks per chunk: 3.
  std::unique_ptr<HostBlockPool> pool = Make(Unpinned(2 * kPage, 0, 7 * kPage));
  ASSERT_NE(pool, nullptr);
  ASSERT_TRUE(pool->Allocate().ok());
  EXPECT_EQ(pool->GetStats().reserved_bytes, 3 * 2 * kPage);
  // Less than a block: one block per chunk.
  pool = Make(Unpinned(2 * kPage, 0, kPage));
  ASSERT_NE(pool, nullptr);
  for (int i = 1; i <= 3; ++i) {
    ASSERT_TRUE(pool->Allocate().ok());
    EXPECT_EQ(pool->GetStats().reserved_bytes, i * 2 * kPage);
  }
  // A cap of 5 blocks in chunks of 3: the second chunk holds 2.
  pool = Make(Unpinned(kPage, 5 * kPage, 3 * kPage));
  ASSERT_NE(pool, nullptr);
  std::vector<BlockId> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(*pool->Allocate());
  const std::vector<std::pair<char*, int64_t>> chunks = pool->Chunks();
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].second, 3 * kPage);
  EXPECT_EQ(chunks[1].second, 2 * kPage);
  EXPECT_EQ(pool->GetStats().reserved_bytes, 5 * kPage) << "growth stops at the cap";
  // Blocks 3 and 4 live in the second chunk.
  EXPECT_EQ(pool->Data(3), chunks[1].first);
  EXPECT_EQ(pool->Data(4), chunks[1].first + kPage);
}

TEST_F(HostPoolTest, CapIsResourceExhaustedNamingItAndFreeMakesRoom) {
  // A cap of 5.5 blocks holds 5.
  const int64_t cap = 5 * kPage + kPage / 2;
  std::unique_ptr<HostBlockPool> pool = Make(Unpinned(kPage, cap, 2 * kPage));
  ASSERT_NE(pool, nullptr);
  std::vector<BlockId> ids;
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<BlockId> b = pool->Allocate();
    ASSERT_TRUE(b.ok()) << i << ": " << b.status();
    ids.push_back(*b);
  }
  absl::StatusOr<BlockId> over = pool->Allocate();
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr(absl::StrCat(cap)));
  EXPECT_THAT(over.status().message(), HasSubstr("5 blocks"));
  HostBlockPool::Stats s = pool->GetStats();
  EXPECT_EQ(s.blocks_in_use, 5);
  EXPECT_EQ(s.capacity_blocks, 5);
  EXPECT_EQ(s.reserved_bytes, 5 * kPage);
  KVTIER_ASSERT_OK(pool->Free(ids[1]));
  absl::StatusOr<BlockId> again = pool->Allocate();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, ids[1]) << "the freed block is the one reused";
  EXPECT_EQ(pool->Allocate().status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(HostPoolTest, AccountingIsExact) {
  std::unique_ptr<HostBlockPool> pool = Make(Unpinned(kPage, 0, 4 * kPage));
  ASSERT_NE(pool, nullptr);
  HostBlockPool::Stats s = pool->GetStats();
  EXPECT_EQ(s.block_bytes, kPage);
  EXPECT_EQ(s.blocks_in_use, 0);
  EXPECT_EQ(s.peak_blocks_in_use, 0);
  EXPECT_EQ(s.capacity_blocks, 0);
  EXPECT_EQ(s.pinned_bytes, 0);
  std::vector<BlockId> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(*pool->Allocate());
  EXPECT_EQ(ids, (std::vector<BlockId>{0, 1, 2, 3, 4, 5})) << "low ids first";
  for (int i = 0; i < 4; ++i) KVTIER_ASSERT_OK(pool->Free(ids[i]));
  s = pool->GetStats();
  EXPECT_EQ(s.blocks_in_use, 2);
  EXPECT_EQ(s.peak_blocks_in_use, 6);
  EXPECT_EQ(s.reserved_bytes, 8 * kPage) << "freed blocks stay reserved";
  const absl::Status twice = pool->Free(ids[0]);
  EXPECT_EQ(twice.code(), absl::StatusCode::kFailedPrecondition) << twice;
  EXPECT_EQ(pool->GetStats().blocks_in_use, 2) << "a double free changes nothing";
  // Re-allocating within the reserve does not grow it; a new peak is tracked.
  std::set<BlockId> again;
  for (int i = 0; i < 6; ++i) again.insert(*pool->Allocate());
  EXPECT_EQ(again.size(), 6u) << "no block handed out twice";
  s = pool->GetStats();
  EXPECT_EQ(s.blocks_in_use, 8);
  EXPECT_EQ(s.peak_blocks_in_use, 8);
  EXPECT_EQ(s.reserved_bytes, 8 * kPage);
  ASSERT_TRUE(pool->Allocate().ok());
  s = pool->GetStats();
  EXPECT_EQ(s.reserved_bytes, 12 * kPage) << "a third chunk";
  EXPECT_EQ(s.peak_blocks_in_use, 9);
}

TEST_F(HostPoolTest, DataIsAlignedDistinctAndNullWhenNotAllocated) {
  constexpr int64_t kBlock = 3 * kPage;
  std::unique_ptr<HostBlockPool> pool = Make(Unpinned(kBlock, 0, 4 * kBlock));
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(pool->Data(0), nullptr) << "nothing allocated yet";
  std::vector<BlockId> ids;
  for (int i = 0; i < 10; ++i) ids.push_back(*pool->Allocate());
  EXPECT_EQ(pool->Data(10), nullptr) << "in the third chunk, not handed out";
  std::vector<char*> ptrs;
  for (BlockId id : ids) {
    char* p = pool->Data(id);
    ASSERT_NE(p, nullptr) << id;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % kPage, 0u) << id;
    // Inside one chunk, wholly.
    bool inside = false;
    for (const auto& [base, bytes] : pool->Chunks()) inside |= p >= base && p + kBlock <= base + bytes;
    EXPECT_TRUE(inside) << id;
    ptrs.push_back(p);
  }
  std::vector<char*> sorted = ptrs;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i) EXPECT_GE(sorted[i] - sorted[i - 1], kBlock) << "blocks overlap";
  for (size_t i = 0; i < ids.size(); ++i) Fill(ptrs[i], kBlock, 100 + i);
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_TRUE(Holds(pool->Data(ids[i]), kBlock, 100 + i)) << ids[i];
  KVTIER_ASSERT_OK(pool->Free(ids[4]));
  EXPECT_EQ(pool->Data(ids[4]), nullptr) << "freed";
  EXPECT_TRUE(Holds(pool->Data(ids[5]), kBlock, 105)) << "a neighbour keeps its bytes";
  EXPECT_EQ(pool->Allocate().value(), ids[4]);
  EXPECT_EQ(pool->Data(ids[4]), ptrs[4]) << "a block id keeps its memory";
}

// With lock_memory on the CPU backend (which does not pin) the pool mlocks
// its chunks. Chunks of 16 MiB are each larger than the 8 MiB RLIMIT_MEMLOCK
// of this sandbox, so which path runs depends only on the limit and on
// CAP_IPC_LOCK (root here has it: mlock then ignores the limit).
TEST_F(HostPoolTest, PinsWithMlockOrWarnsOnceAsTheLimitsSay) {
  ASSERT_FALSE(backend_->caps().pinned_host_memory) << "the CPU backend leaves pinning to mlock";
  constexpr int64_t kChunk = 16 << 20, kBlock = 64 << 10;
  WarningCapture warnings;
  std::unique_ptr<HostBlockPool> pool =
      Make({.block_bytes = kBlock, .capacity_bytes = 2 * kChunk, .chunk_bytes = kChunk, .lock_memory = true});
  ASSERT_NE(pool, nullptr);
  rlimit limit{};
  ASSERT_EQ(getrlimit(RLIMIT_MEMLOCK, &limit), 0);
  const int64_t locked_before = LockedBytes();
  const bool unlimited = kMlockIsNoop || HasIpcLock() || limit.rlim_cur == RLIM_INFINITY;
  const auto fits = [&](int64_t bytes) {
    return unlimited || static_cast<int64_t>(limit.rlim_cur) >= locked_before + bytes;
  };
  for (int64_t i = 0; i < 2 * kChunk / kBlock; ++i) ASSERT_TRUE(pool->Allocate().ok()) << i;
  const HostBlockPool::Stats s = pool->GetStats();
  ASSERT_EQ(s.reserved_bytes, 2 * kChunk);
  const std::vector<std::string> lines = warnings.lines();
  if (fits(2 * kChunk)) {
    EXPECT_EQ(s.pinned_bytes, s.reserved_bytes) << "mlock is allowed (CAP_IPC_LOCK " << HasIpcLock()
                                                 << ", RLIMIT_MEMLOCK " << limit.rlim_cur << ")";
    EXPECT_TRUE(lines.empty()) << lines[0];
  } else if (!fits(kChunk)) {
    EXPECT_EQ(s.pinned_bytes, 0) << "RLIMIT_MEMLOCK " << limit.rlim_cur << " is below one chunk";
    ASSERT_EQ(lines.size(), 1u) << "one warning per pool, not per chunk";
    EXPECT_THAT(lines[0], HasSubstr("mlock"));
  } else {
    EXPECT_EQ(s.pinned_bytes, kChunk) << "the first chunk fits the limit, the second does not";
    EXPECT_EQ(lines.size(), 1u);
  }
}

// The warning path, forced in a child process: without CAP_IPC_LOCK and with
// RLIMIT_MEMLOCK at 8 MiB, 16 MiB chunks cannot be locked.
TEST_F(HostPoolTest, WithoutTheRightToLockItWarnsOnceAndStaysPageable) {
  if (kMlockIsNoop) GTEST_SKIP() << "under ASan/TSan mlock is a no-op that succeeds: no warning path to test";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto child = [this] {
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2] = {};
    if (syscall(SYS_capget, &header, data) != 0) std::_Exit(10);
    data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective &= ~CAP_TO_MASK(CAP_IPC_LOCK);
    if (syscall(SYS_capset, &header, data) != 0) std::_Exit(11);
    rlimit limit{};
    getrlimit(RLIMIT_MEMLOCK, &limit);
    limit.rlim_cur = std::min<rlim_t>(limit.rlim_cur, 8 << 20);
    if (setrlimit(RLIMIT_MEMLOCK, &limit) != 0) std::_Exit(12);
    WarningCapture warnings;
    constexpr int64_t kChunk = 16 << 20, kBlock = 64 << 10;
    absl::StatusOr<std::unique_ptr<HostBlockPool>> pool = HostBlockPool::Create(
        *backend_, {.block_bytes = kBlock, .capacity_bytes = 2 * kChunk, .chunk_bytes = kChunk, .lock_memory = true});
    if (!pool.ok()) std::_Exit(13);
    for (int64_t i = 0; i < 2 * kChunk / kBlock; ++i) {
      if (!(*pool)->Allocate().ok()) std::_Exit(14);
    }
    const HostBlockPool::Stats s = (*pool)->GetStats();
    if (s.reserved_bytes != 2 * kChunk) std::_Exit(15);
    if (s.pinned_bytes != 0) std::_Exit(16);
    const std::vector<std::string> lines = warnings.lines();
    if (lines.size() != 1) std::_Exit(17);
    if (lines[0].find("mlock") == std::string::npos || lines[0].find("RLIMIT_MEMLOCK") == std::string::npos) {
      std::_Exit(18);
    }
    std::_Exit(0);
  };
  EXPECT_EXIT(child(), ::testing::ExitedWithCode(0), "")
      << "10-12: dropping the right failed; 13-15: the pool failed; 16: pinned anyway; 17-18: not one mlock warning";
}

TEST_F(HostPoolTest, BindsToALocalNumaNodeAtTheFirstAllocation) {
  std::unique_ptr<HostBlockPool> pool = Make(
      {.block_bytes = kPage, .capacity_bytes = 0, .chunk_bytes = 4 * kPage, .lock_memory = false, .bind_numa = true});
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(pool->GetStats().numa_node, -1) << "nothing bound before the first chunk";
  ASSERT_TRUE(pool->Allocate().ok());
  // One NUMA node here (node0): hwloc binds the chunk to it.
  EXPECT_GE(pool->GetStats().numa_node, 0) << "hwloc could not bind the chunk";
  std::unique_ptr<HostBlockPool> unbound = Make(
      {.block_bytes = kPage, .capacity_bytes = 0, .chunk_bytes = 4 * kPage, .lock_memory = false, .bind_numa = false});
  ASSERT_NE(unbound, nullptr);
  ASSERT_TRUE(unbound->Allocate().ok());
  EXPECT_EQ(unbound->GetStats().numa_node, -1);
}

TEST_F(HostPoolTest, ConcurrentAllocateWriteFreeKeepsContents) {
  // 4 workers allocate, fill, verify and free their own blocks (up to 3
  // each) under a cap smaller than their combined holdings, while a fifth
  // thread checks that every Stats snapshot is consistent.
  constexpr int64_t kBlock = kPage;
  constexpr int kThreads = 4, kIters = 1000, kCapBlocks = 10;
  std::unique_ptr<HostBlockPool> pool = Make(Unpinned(kBlock, kCapBlocks * kBlock, 4 * kBlock));
  ASSERT_NE(pool, nullptr);
  std::atomic<int> failures{0}, exhausted{0};
  std::atomic<int64_t> allocated{0};
  std::atomic<bool> done{false};
  std::thread stats_thread([&] {
    int rounds = 0;
    while (!done.load() || rounds < 10) {
      const HostBlockPool::Stats s = pool->GetStats();
      if (s.blocks_in_use < 0 || s.blocks_in_use > kCapBlocks || s.peak_blocks_in_use < s.blocks_in_use ||
          s.reserved_bytes > kCapBlocks * kBlock || s.reserved_bytes < s.blocks_in_use * kBlock) {
        failures++;
      }
      ++rounds;
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      struct Held {
        BlockId id;
        uint64_t seed;
      };
      std::vector<Held> held;
      auto release = [&](const Held& h) {
        const char* p = pool->Data(h.id);
        if (p == nullptr || !Holds(p, kBlock, h.seed)) failures++;
        if (!pool->Free(h.id).ok()) failures++;
      };
      for (int i = 0; i < kIters; ++i) {
        if (held.size() < 3 && i % 4 != 3) {
          absl::StatusOr<BlockId> b = pool->Allocate();
          if (!b.ok()) {
            if (b.status().code() == absl::StatusCode::kResourceExhausted) {
              exhausted++;
            } else {
              failures++;
            }
            continue;
          }
          allocated++;
          const uint64_t seed = static_cast<uint64_t>(t) * 100000 + i;
          char* p = pool->Data(*b);
          if (p == nullptr) {
            failures++;
            continue;
          }
          Fill(p, kBlock, seed);
          held.push_back({*b, seed});
        } else if (!held.empty()) {
          release(held.front());
          held.erase(held.begin());
        }
      }
      for (const Held& h : held) release(h);
    });
  }
  for (std::thread& w : workers) w.join();
  done = true;
  stats_thread.join();
  EXPECT_EQ(failures.load(), 0);
  // Each worker allocates on 3 of every 4 iterations while it holds < 3.
  EXPECT_GT(allocated.load(), kThreads * kIters / 4);
  const HostBlockPool::Stats s = pool->GetStats();
  EXPECT_EQ(s.blocks_in_use, 0);
  EXPECT_LE(s.peak_blocks_in_use, kCapBlocks);
  EXPECT_GE(s.peak_blocks_in_use, 3);
  EXPECT_LE(s.reserved_bytes, kCapBlocks * kBlock) << "growth stops at the cap";
}

}  // namespace
}  // namespace kvtier
