// DeviceArena (kvtier/allocator/device_arena.h): validation, chunk placement
// and alignment, exhaustion, reuse, byte accounting and concurrent use.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/allocator/device_arena.h"
#include "kvtier/backend.h"
#include "test_util.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;

class DeviceArenaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kCpu);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
  }
  std::unique_ptr<DeviceArena> Make(int64_t prefix, int64_t chunk, int32_t count) {
    absl::StatusOr<std::unique_ptr<DeviceArena>> a =
        DeviceArena::Create(*backend_, {.prefix_bytes = prefix, .chunk_bytes = chunk, .chunk_count = count});
    EXPECT_TRUE(a.ok()) << a.status();
    return a.ok() ? std::move(*a) : nullptr;
  }
  std::unique_ptr<Backend> backend_;
};

TEST_F(DeviceArenaTest, CreateRejectsInvalidOptions) {
  struct Case {
    int64_t prefix, chunk;
    int32_t count;
    const char* bad;  // the number the message must name
  };
  const Case cases[] = {
      {-1, 64, 1, "prefix -1"},
      {0, 0, 1, "chunk 0"},
      {0, -64, 1, "chunk -64"},
      {0, 64, 0, "count 0"},
      {128, 64, -3, "count -3"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<DeviceArena>> a =
        DeviceArena::Create(*backend_, {.prefix_bytes = c.prefix, .chunk_bytes = c.chunk, .chunk_count = c.count});
    ASSERT_FALSE(a.ok()) << c.bad;
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
    EXPECT_THAT(a.status().message(), HasSubstr(c.bad));
  }
  // The smallest valid arena: no prefix, one chunk of one byte (rounded to 64).
  std::unique_ptr<DeviceArena> a = Make(0, 1, 1);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->chunk_bytes(), 64);
  EXPECT_EQ(a->capacity_bytes(), 64);
  EXPECT_EQ(a->bytes_in_use(), 0);
}

// prefix + chunk_bytes * chunk_count (after rounding) must not overflow
// int64: a product that wraps to a small size would give chunks that lie
// outside the allocation. Each probe runs in a child process, so signed
// overflow trapped by UBSan fails only this test.
TEST_F(DeviceArenaTest, SizeOverflowIsRejected) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto probe = [this](int64_t prefix, int64_t chunk, int32_t count) {
    absl::StatusOr<std::unique_ptr<DeviceArena>> a =
        DeviceArena::Create(*backend_, {.prefix_bytes = prefix, .chunk_bytes = chunk, .chunk_count = count});
    const bool rejected = !a.ok() && (a.status().code() == absl::StatusCode::kInvalidArgument ||
                                      a.status().code() == absl::StatusCode::kResourceExhausted);
    std::_Exit(rejected ? 0 : 1);
  };
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EXIT(probe(0, int64_t{1} << 62, 4), ::testing::ExitedWithCode(0), "") << "4 x 2^62 wraps to 0 bytes";
  EXPECT_EXIT(probe(0, int64_t{1} << 62, 3), ::testing::ExitedWithCode(0), "") << "3 x 2^62 wraps negative";
  EXPECT_EXIT(probe(kMax - 10, 64, 1), ::testing::ExitedWithCode(0), "") << "rounding the prefix up overflows";
  EXPECT_EXIT(probe(64, kMax - 10, 1), ::testing::ExitedWithCode(0), "") << "rounding the chunk up overflows";
}

TEST_F(DeviceArenaTest, ChunksAreDistinctAlignedAndInsideTheAllocation) {
  // Sizes that are not multiples of 64 are rounded up to 64.
  constexpr int64_t kPrefix = 100, kChunk = 1000;
  constexpr int32_t kCount = 7;
  std::unique_ptr<DeviceArena> a = Make(kPrefix, kChunk, kCount);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->chunk_bytes(), 1024);
  EXPECT_EQ(a->capacity_bytes(), 128 + 1024 * kCount);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->prefix()) % 256, 0u) << "the prefix is the backend's allocation";

  const char* base = static_cast<const char*>(a->prefix());
  std::vector<char*> chunks;
  for (int i = 0; i < kCount; ++i) {
    absl::StatusOr<void*> c = a->AllocateChunk();
    ASSERT_TRUE(c.ok()) << i << ": " << c.status();
    char* p = static_cast<char*>(*c);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << i;
    // After the (rounded) prefix, inside the allocation, on a chunk boundary.
    const int64_t off = p - base;
    EXPECT_GE(off, 128) << i;
    EXPECT_LE(off + a->chunk_bytes(), a->capacity_bytes()) << i;
    EXPECT_EQ((off - 128) % a->chunk_bytes(), 0) << i;
    chunks.push_back(p);
  }
  std::vector<char*> sorted = chunks;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i) {
    EXPECT_GE(sorted[i] - sorted[i - 1], a->chunk_bytes()) << "chunks overlap";
  }
  // Every chunk and the prefix can be written in full without touching the others.
  std::memset(a->prefix(), 0x5a, 128);
  for (int i = 0; i < kCount; ++i) std::memset(chunks[i], i + 1, static_cast<size_t>(a->chunk_bytes()));
  for (int64_t j = 0; j < 128; ++j) ASSERT_EQ(static_cast<unsigned char>(base[j]), 0x5a) << j;
  for (int i = 0; i < kCount; ++i) {
    for (int64_t j = 0; j < a->chunk_bytes(); ++j) ASSERT_EQ(chunks[i][j], i + 1) << "chunk " << i << " byte " << j;
  }

  // Exhausted: ResourceExhausted naming the count, and nothing changes.
  EXPECT_EQ(a->bytes_in_use(), a->capacity_bytes());
  absl::StatusOr<void*> extra = a->AllocateChunk();
  ASSERT_FALSE(extra.ok());
  EXPECT_EQ(extra.status().code(), absl::StatusCode::kResourceExhausted) << extra.status();
  EXPECT_THAT(extra.status().message(), HasSubstr("7 chunks"));
  EXPECT_EQ(a->bytes_in_use(), a->capacity_bytes());

  for (char* c : chunks) KVTIER_EXPECT_OK(a->FreeChunk(c));
  EXPECT_EQ(a->bytes_in_use(), 128);
}

TEST_F(DeviceArenaTest, DoubleOrForeignFreeIsFailedPreconditionAndChangesNothing) {
  std::unique_ptr<DeviceArena> a = Make(128, 256, 2);
  ASSERT_NE(a, nullptr);
  absl::StatusOr<void*> c0 = a->AllocateChunk();
  ASSERT_TRUE(c0.ok());
  KVTIER_EXPECT_OK(a->FreeChunk(*c0));
  EXPECT_EQ(a->FreeChunk(*c0).code(), absl::StatusCode::kFailedPrecondition) << "double free";
  EXPECT_EQ(a->FreeChunk(a->prefix()).code(), absl::StatusCode::kFailedPrecondition) << "the prefix";
  EXPECT_EQ(a->FreeChunk(static_cast<char*>(*c0) + 64).code(), absl::StatusCode::kFailedPrecondition)
      << "inside a chunk";
  int outside = 0;
  EXPECT_EQ(a->FreeChunk(&outside).code(), absl::StatusCode::kFailedPrecondition) << "not from the arena";
  // Still exactly two distinct chunks to hand out.
  absl::StatusOr<void*> x = a->AllocateChunk(), y = a->AllocateChunk();
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_NE(*x, *y);
  EXPECT_FALSE(a->AllocateChunk().ok());
  EXPECT_EQ(a->bytes_in_use(), 128 + 2 * 256);
}

TEST_F(DeviceArenaTest, FreeChunkMakesItReusable) {
  std::unique_ptr<DeviceArena> a = Make(0, 256, 3);
  ASSERT_NE(a, nullptr);
  absl::StatusOr<void*> c0 = a->AllocateChunk(), c1 = a->AllocateChunk(), c2 = a->AllocateChunk();
  ASSERT_TRUE(c0.ok() && c1.ok() && c2.ok());
  ASSERT_FALSE(a->AllocateChunk().ok());
  KVTIER_EXPECT_OK(a->FreeChunk(*c1));
  absl::StatusOr<void*> again = a->AllocateChunk();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *c1) << "the only free chunk is the one just freed";
  EXPECT_FALSE(a->AllocateChunk().ok());
  // Free all, allocate all again: the same set of chunks.
  KVTIER_EXPECT_OK(a->FreeChunk(*c0));
  KVTIER_EXPECT_OK(a->FreeChunk(*again));
  KVTIER_EXPECT_OK(a->FreeChunk(*c2));
  std::set<void*> first{*c0, *c1, *c2}, second;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<void*> c = a->AllocateChunk();
    ASSERT_TRUE(c.ok());
    second.insert(*c);
  }
  EXPECT_EQ(first, second);
}

TEST_F(DeviceArenaTest, BytesInUseAndPeak) {
  std::unique_ptr<DeviceArena> a = Make(64, 128, 4);
  ASSERT_NE(a, nullptr);
  // The prefix is always in use.
  EXPECT_EQ(a->bytes_in_use(), 64);
  EXPECT_EQ(a->peak_bytes_in_use(), 64);
  absl::StatusOr<void*> c0 = a->AllocateChunk();
  absl::StatusOr<void*> c1 = a->AllocateChunk();
  absl::StatusOr<void*> c2 = a->AllocateChunk();
  ASSERT_TRUE(c0.ok() && c1.ok() && c2.ok());
  EXPECT_EQ(a->bytes_in_use(), 64 + 3 * 128);
  EXPECT_EQ(a->peak_bytes_in_use(), 64 + 3 * 128);
  KVTIER_EXPECT_OK(a->FreeChunk(*c0));
  KVTIER_EXPECT_OK(a->FreeChunk(*c1));
  EXPECT_EQ(a->bytes_in_use(), 64 + 128);
  EXPECT_EQ(a->peak_bytes_in_use(), 64 + 3 * 128) << "the peak stays";
  absl::StatusOr<void*> c3 = a->AllocateChunk();
  ASSERT_TRUE(c3.ok());
  EXPECT_EQ(a->bytes_in_use(), 64 + 2 * 128);
  EXPECT_EQ(a->peak_bytes_in_use(), 64 + 3 * 128);
  // A failed allocation does not move the peak.
  absl::StatusOr<void*> c4 = a->AllocateChunk(), c5 = a->AllocateChunk();
  ASSERT_TRUE(c4.ok() && c5.ok());
  EXPECT_FALSE(a->AllocateChunk().ok());
  EXPECT_EQ(a->bytes_in_use(), 64 + 4 * 128);
  EXPECT_EQ(a->peak_bytes_in_use(), 64 + 4 * 128);
  EXPECT_EQ(a->peak_bytes_in_use(), a->capacity_bytes());
}

TEST_F(DeviceArenaTest, PrefixIsTheAllocationStartAndMayBeEmpty) {
  // With a prefix: the first chunk handed out starts after it, never at prefix().
  std::unique_ptr<DeviceArena> with = Make(300, 64, 2);
  ASSERT_NE(with, nullptr);
  EXPECT_EQ(with->capacity_bytes(), 320 + 2 * 64);
  absl::StatusOr<void*> c = with->AllocateChunk();
  ASSERT_TRUE(c.ok());
  EXPECT_GE(static_cast<char*>(*c) - static_cast<char*>(with->prefix()), 320);

  // Without one: prefix() is still the base and a chunk may start there.
  std::unique_ptr<DeviceArena> without = Make(0, 64, 2);
  ASSERT_NE(without, nullptr);
  EXPECT_EQ(without->bytes_in_use(), 0);
  std::set<const char*> got;
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<void*> x = without->AllocateChunk();
    ASSERT_TRUE(x.ok());
    got.insert(static_cast<const char*>(*x));
  }
  const char* base = static_cast<const char*>(without->prefix());
  EXPECT_EQ(got, (std::set<const char*>{base, base + 64}));
}

TEST_F(DeviceArenaTest, ConcurrentAllocateAndFree) {
  // 4 threads share 6 chunks; each holds at most 2 at a time, writes its tag
  // into every byte it holds and checks nobody else wrote there.
  constexpr int kThreads = 4, kIters = 300;
  constexpr int32_t kCount = 6;
  std::unique_ptr<DeviceArena> a = Make(64, 192, kCount);
  ASSERT_NE(a, nullptr);
  std::atomic<int> failures{0}, exhausted{0};
  std::atomic<int64_t> allocations{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<char*> held;
      for (int i = 0; i < kIters; ++i) {
        const bool allocate = held.size() < 2 && (held.empty() || (i + t) % 3 != 0);
        if (allocate) {
          absl::StatusOr<void*> c = a->AllocateChunk();
          if (!c.ok()) {
            // Possible only while others hold chunks; 4 x 2 > 6.
            if (c.status().code() != absl::StatusCode::kResourceExhausted) failures++;
            exhausted++;
            continue;
          }
          allocations++;
          char* p = static_cast<char*>(*c);
          std::memset(p, t + 1, 192);
          held.push_back(p);
        } else {
          char* p = held.back();
          held.pop_back();
          for (int j = 0; j < 192; ++j) {
            if (p[j] != t + 1) {
              failures++;
              break;
            }
          }
          KVTIER_EXPECT_OK(a->FreeChunk(p));
        }
      }
      for (char* p : held) {
        for (int j = 0; j < 192; ++j) {
          if (p[j] != t + 1) {
            failures++;
            break;
          }
        }
        KVTIER_EXPECT_OK(a->FreeChunk(p));
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(allocations.load(), kThreads * 10);
  EXPECT_EQ(a->bytes_in_use(), 64) << "every chunk came back";
  EXPECT_LE(a->peak_bytes_in_use(), a->capacity_bytes());
  EXPECT_GE(a->peak_bytes_in_use(), 64 + 2 * 192);
  // All chunks are free and distinct again.
  std::set<void*> all;
  for (int i = 0; i < kCount; ++i) {
    absl::StatusOr<void*> c = a->AllocateChunk();
    ASSERT_TRUE(c.ok()) << c.status();
    all.insert(*c);
  }
  EXPECT_EQ(all.size(), static_cast<size_t>(kCount));
  EXPECT_FALSE(a->AllocateChunk().ok());
}

}  // namespace
}  // namespace kvtier
