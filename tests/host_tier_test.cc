// HostTier (kvtier/offload/host_tier.h): validation, exact round trips,
// range and state errors, the capacity cap, byte accounting and concurrent use
// of distinct blocks.
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
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kvtier/backend.h"
#include "kvtier/offload/host_tier.h"
#include "test_util.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;

// Deterministic bytes for (seed, i).
std::vector<unsigned char> Pattern(size_t n, uint64_t seed) {
  std::vector<unsigned char> v(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  for (size_t i = 0; i < n; ++i) {
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 32;
    v[i] = static_cast<unsigned char>(x);
  }
  return v;
}

class HostTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kCpu);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
  }
  std::unique_ptr<HostTier> Make(int64_t block_bytes, int64_t capacity_bytes, int32_t blocks_per_chunk) {
    absl::StatusOr<std::unique_ptr<HostTier>> t = HostTier::Create(
        *backend_,
        {.block_bytes = block_bytes, .capacity_bytes = capacity_bytes, .blocks_per_chunk = blocks_per_chunk});
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::move(*t) : nullptr;
  }
  std::unique_ptr<Backend> backend_;
};

TEST_F(HostTierTest, CreateValidatesOptions) {
  struct Case {
    int64_t block, capacity;
    int32_t per_chunk;
    const char* names;  // the offending value as the message prints it
  };
  const Case bad[] = {
      {0, 0, 16, "block_bytes 0"},
      {-512, 0, 16, "block_bytes -512"},
      {512, 0, 0, "blocks_per_chunk 0"},
      {512, 0, -1, "blocks_per_chunk -1"},
      {512, -1, 16, "capacity_bytes -1"},
      {512, 511, 16, "capacity_bytes 511"},  // a cap below one block
  };
  for (const Case& c : bad) {
    absl::StatusOr<std::unique_ptr<HostTier>> t = HostTier::Create(
        *backend_, {.block_bytes = c.block, .capacity_bytes = c.capacity, .blocks_per_chunk = c.per_chunk});
    ASSERT_FALSE(t.ok()) << c.names;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_THAT(t.status().message(), HasSubstr(c.names));
  }
  // Valid edge cases: a cap of exactly one block, one block per chunk.
  std::unique_ptr<HostTier> one = Make(512, 512, 1);
  ASSERT_NE(one, nullptr);
  EXPECT_EQ(one->name(), "host");
  EXPECT_EQ(one->block_bytes(), 512);
  const TierStats s = one->Stats();
  EXPECT_EQ(s.block_bytes, 512);
  EXPECT_EQ(s.capacity_bytes, 512);
  EXPECT_EQ(s.blocks_in_use, 0);
  EXPECT_EQ(s.bytes_reserved, 0) << "nothing is allocated before the first block";
}

TEST_F(HostTierTest, WriteReadRoundTripsExactBytes) {
  constexpr int64_t kBlock = 1000;  // not a power of two
  std::unique_ptr<HostTier> tier = Make(kBlock, 0, 3);
  ASSERT_NE(tier, nullptr);
  std::vector<BlockId> ids;
  for (int i = 0; i < 7; ++i) {  // spans three backend chunks
    absl::StatusOr<BlockId> b = tier->Allocate();
    ASSERT_TRUE(b.ok()) << b.status();
    ids.push_back(*b);
  }
  EXPECT_EQ(std::set<BlockId>(ids.begin(), ids.end()).size(), ids.size()) << "ids are distinct";
  // Whole blocks.
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::vector<unsigned char> p = Pattern(kBlock, i);
    KVTIER_ASSERT_OK(tier->Write(ids[i], 0, p.data(), kBlock));
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    std::vector<unsigned char> got(kBlock, 0);
    KVTIER_ASSERT_OK(tier->Read(ids[i], 0, got.data(), kBlock));
    EXPECT_EQ(got, Pattern(kBlock, i)) << "block " << ids[i] << " was overwritten by a neighbour";
  }
  // A partial write changes exactly its range.
  const std::vector<unsigned char> patch = Pattern(37, 99);
  KVTIER_ASSERT_OK(tier->Write(ids[3], 500, patch.data(), 37));
  std::vector<unsigned char> got(kBlock);
  KVTIER_ASSERT_OK(tier->Read(ids[3], 0, got.data(), kBlock));
  std::vector<unsigned char> want = Pattern(kBlock, 3);
  std::copy(patch.begin(), patch.end(), want.begin() + 500);
  EXPECT_EQ(got, want);
  // A partial read at the very end of the block.
  std::vector<unsigned char> tail(10);
  KVTIER_ASSERT_OK(tier->Read(ids[6], kBlock - 10, tail.data(), 10));
  EXPECT_TRUE(std::equal(tail.begin(), tail.end(), Pattern(kBlock, 6).end() - 10));
  // Zero bytes at the end is in range and moves nothing.
  KVTIER_EXPECT_OK(tier->Write(ids[0], kBlock, patch.data(), 0));
  KVTIER_EXPECT_OK(tier->Read(ids[0], kBlock, tail.data(), 0));
  for (BlockId b : ids) KVTIER_ASSERT_OK(tier->Free(b));
  EXPECT_EQ(tier->Stats().blocks_in_use, 0);
}

TEST_F(HostTierTest, OutOfRangeIsInvalidArgumentAndMovesNothing) {
  std::unique_ptr<HostTier> tier = Make(256, 0, 4);
  ASSERT_NE(tier, nullptr);
  absl::StatusOr<BlockId> b = tier->Allocate();
  ASSERT_TRUE(b.ok());
  const std::vector<unsigned char> p = Pattern(256, 1);
  KVTIER_ASSERT_OK(tier->Write(*b, 0, p.data(), 256));
  const TierStats before = tier->Stats();

  std::vector<unsigned char> junk(512, 0xee);
  struct Range {
    int64_t offset, bytes;
  };
  for (const Range r : {Range{0, 257}, Range{1, 256}, Range{255, 2}, Range{256, 1}, Range{-1, 4}, Range{4, -1},
                        Range{300, 0}}) {
    absl::Status w = tier->Write(*b, r.offset, junk.data(), r.bytes);
    EXPECT_EQ(w.code(), absl::StatusCode::kInvalidArgument) << r.offset << "+" << r.bytes << ": " << w;
    EXPECT_THAT(w.message(), HasSubstr("256 bytes")) << "names the block size";
    std::vector<unsigned char> dst(512, 0x11);
    absl::Status rd = tier->Read(*b, r.offset, dst.data(), r.bytes);
    EXPECT_EQ(rd.code(), absl::StatusCode::kInvalidArgument) << r.offset << "+" << r.bytes << ": " << rd;
    EXPECT_EQ(dst, std::vector<unsigned char>(512, 0x11)) << "a rejected read wrote";
  }
  std::vector<unsigned char> got(256);
  KVTIER_ASSERT_OK(tier->Read(*b, 0, got.data(), 256));
  EXPECT_EQ(got, p) << "a rejected write changed the block";
  const TierStats after = tier->Stats();
  EXPECT_EQ(after.bytes_written, before.bytes_written) << "rejected writes are not counted";
  EXPECT_EQ(after.bytes_read, before.bytes_read + 256) << "only the one good read is counted";
}

// offset + bytes overflows int64 for these; the range check must still reject
// them rather than wrap to a negative end and copy outside the block. Run in
// a child process so that a wild copy fails this test only.
TEST_F(HostTierTest, OverflowingRangeIsInvalidArgument) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto probe = [this](int64_t offset, int64_t bytes) {
    std::unique_ptr<HostTier> tier = Make(256, 0, 1);
    absl::StatusOr<BlockId> b = tier->Allocate();
    if (!b.ok()) std::_Exit(2);
    unsigned char buf[16] = {0};
    const absl::Status w = tier->Write(*b, offset, buf, bytes);
    const absl::Status r = tier->Read(*b, offset, buf, bytes);
    std::_Exit(w.code() == absl::StatusCode::kInvalidArgument && r.code() == absl::StatusCode::kInvalidArgument
                   ? 0
                   : 1);
  };
  // Small byte counts, so that a wrapped check fails fast (a wild copy of a
  // few bytes) rather than by copying exabytes under a sanitizer.
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EXIT(probe(kMax, 1), ::testing::ExitedWithCode(0), "") << "offset INT64_MAX, 1 byte";
  EXPECT_EXIT(probe(kMax - 3, 8), ::testing::ExitedWithCode(0), "") << "offset INT64_MAX - 3, 8 bytes";
}

// The bytes of one backend chunk, blocks_per_chunk * block_bytes, must not
// overflow int64 into a small allocation that the blocks then overrun: either
// Create refuses the options or Allocate fails. Run in a child process.
TEST_F(HostTierTest, ChunkSizeOverflowIsRejected) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto probe = [this](int64_t block_bytes, int32_t per_chunk) {
    absl::StatusOr<std::unique_ptr<HostTier>> t = HostTier::Create(
        *backend_, {.block_bytes = block_bytes, .capacity_bytes = 0, .blocks_per_chunk = per_chunk});
    if (!t.ok()) std::_Exit(t.status().code() == absl::StatusCode::kInvalidArgument ? 0 : 1);
    absl::StatusOr<BlockId> b = (*t)->Allocate();
    std::_Exit(!b.ok() && (b.status().code() == absl::StatusCode::kResourceExhausted ||
                           b.status().code() == absl::StatusCode::kInvalidArgument)
                   ? 0
                   : 1);
  };
  EXPECT_EXIT(probe(int64_t{1} << 40, 1 << 24), ::testing::ExitedWithCode(0), "") << "2^40 x 2^24 wraps to 0";
  EXPECT_EXIT(probe(int64_t{3} << 40, 1 << 23), ::testing::ExitedWithCode(0), "") << "3 x 2^63 wraps negative";
}

TEST_F(HostTierTest, UnallocatedOrFreedBlockIsFailedPrecondition) {
  std::unique_ptr<HostTier> tier = Make(128, 0, 4);
  ASSERT_NE(tier, nullptr);
  unsigned char buf[128] = {0};
  // Never allocated: beyond every chunk, and inside a chunk but not handed out.
  for (BlockId id : {BlockId{0}, BlockId{5}, BlockId{0xffffffffu}}) {
    absl::Status w = tier->Write(id, 0, buf, 16);
    EXPECT_EQ(w.code(), absl::StatusCode::kFailedPrecondition) << id << ": " << w;
    EXPECT_THAT(w.message(), HasSubstr(absl::StrCat("block ", id)));
    EXPECT_EQ(tier->Read(id, 0, buf, 16).code(), absl::StatusCode::kFailedPrecondition) << id;
    EXPECT_EQ(tier->Free(id).code(), absl::StatusCode::kFailedPrecondition) << id;
  }
  absl::StatusOr<BlockId> a = tier->Allocate();
  absl::StatusOr<BlockId> b = tier->Allocate();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, 0u) << "low ids first";
  EXPECT_EQ(*b, 1u);
  // Block 2 sits in the same backend chunk but is not allocated.
  EXPECT_EQ(tier->Write(2, 0, buf, 16).code(), absl::StatusCode::kFailedPrecondition);
  KVTIER_ASSERT_OK(tier->Free(*a));
  absl::Status w = tier->Write(*a, 0, buf, 16);
  EXPECT_EQ(w.code(), absl::StatusCode::kFailedPrecondition) << w;
  EXPECT_THAT(w.message(), HasSubstr("not allocated"));
  EXPECT_EQ(tier->Read(*a, 0, buf, 16).code(), absl::StatusCode::kFailedPrecondition);
  absl::Status twice = tier->Free(*a);
  EXPECT_EQ(twice.code(), absl::StatusCode::kFailedPrecondition) << twice;
  // The double free did not corrupt the accounting or the free list.
  EXPECT_EQ(tier->Stats().blocks_in_use, 1);
  absl::StatusOr<BlockId> c = tier->Allocate();
  absl::StatusOr<BlockId> d = tier->Allocate();
  ASSERT_TRUE(c.ok() && d.ok());
  EXPECT_EQ(*c, *a) << "the freed block is reused";
  EXPECT_NE(*d, *a) << "a double free must not hand the same block out twice";
  EXPECT_NE(*d, *b);
  // The range is checked before the block: a bad range on a bad block is InvalidArgument.
  EXPECT_EQ(tier->Write(77, 0, buf, 129).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(HostTierTest, CapacityCapIsResourceExhaustedAndFreeingMakesRoom) {
  constexpr int64_t kBlock = 512;
  // Cap of 5 blocks, chunks of 3: the second chunk is capped at 2 blocks.
  std::unique_ptr<HostTier> tier = Make(kBlock, 5 * kBlock, 3);
  ASSERT_NE(tier, nullptr);
  std::vector<BlockId> ids;
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<BlockId> b = tier->Allocate();
    ASSERT_TRUE(b.ok()) << i << ": " << b.status();
    ids.push_back(*b);
    const std::vector<unsigned char> p = Pattern(kBlock, 10 + i);
    KVTIER_ASSERT_OK(tier->Write(*b, 0, p.data(), kBlock));
  }
  TierStats s = tier->Stats();
  EXPECT_EQ(s.blocks_in_use, 5);
  EXPECT_EQ(s.bytes_reserved, 5 * kBlock) << "growth stops at the cap";
  EXPECT_EQ(s.capacity_bytes, 5 * kBlock);

  absl::StatusOr<BlockId> over = tier->Allocate();
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr("2560"));  // the cap in bytes
  EXPECT_EQ(tier->Stats().blocks_in_use, 5) << "a refused allocation changes nothing";

  // Freeing one makes room for exactly one.
  KVTIER_ASSERT_OK(tier->Free(ids[3]));
  absl::StatusOr<BlockId> again = tier->Allocate();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, ids[3]);
  EXPECT_EQ(tier->Allocate().status().code(), absl::StatusCode::kResourceExhausted);
  // The other blocks, including the two in the capped last chunk, kept their bytes.
  for (int i : {0, 1, 2, 4}) {
    std::vector<unsigned char> got(kBlock);
    KVTIER_ASSERT_OK(tier->Read(ids[i], 0, got.data(), kBlock));
    EXPECT_EQ(got, Pattern(kBlock, 10 + i)) << "block " << ids[i];
  }
  const std::vector<unsigned char> p = Pattern(kBlock, 77);
  KVTIER_ASSERT_OK(tier->Write(*again, 0, p.data(), kBlock));
  std::vector<unsigned char> got(kBlock);
  KVTIER_ASSERT_OK(tier->Read(*again, 0, got.data(), kBlock));
  EXPECT_EQ(got, p);
}

TEST_F(HostTierTest, CapNotAMultipleOfTheBlockNeverExceeded) {
  // 1300 bytes hold two 512-byte blocks; a third would exceed the cap.
  std::unique_ptr<HostTier> tier = Make(512, 1300, 8);
  ASSERT_NE(tier, nullptr);
  ASSERT_TRUE(tier->Allocate().ok());
  ASSERT_TRUE(tier->Allocate().ok());
  absl::StatusOr<BlockId> third = tier->Allocate();
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  const TierStats s = tier->Stats();
  EXPECT_LE(s.bytes_in_use, 1300);
  EXPECT_LE(s.bytes_reserved, 1300);
  EXPECT_EQ(s.bytes_in_use, 1024);
}

TEST_F(HostTierTest, StatsAccountingIsExact) {
  constexpr int64_t kBlock = 64;
  std::unique_ptr<HostTier> tier = Make(kBlock, 0, 4);
  ASSERT_NE(tier, nullptr);
  std::vector<BlockId> ids;
  for (int i = 0; i < 6; ++i) {
    absl::StatusOr<BlockId> b = tier->Allocate();
    ASSERT_TRUE(b.ok());
    ids.push_back(*b);
  }
  TierStats s = tier->Stats();
  EXPECT_EQ(s.block_bytes, kBlock);
  EXPECT_EQ(s.blocks_in_use, 6);
  EXPECT_EQ(s.bytes_in_use, 6 * kBlock);
  EXPECT_EQ(s.bytes_reserved, 8 * kBlock) << "two chunks of 4 blocks";
  EXPECT_EQ(s.peak_bytes_in_use, 6 * kBlock);
  EXPECT_EQ(s.capacity_bytes, 0);
  EXPECT_EQ(s.bytes_written, 0);
  EXPECT_EQ(s.bytes_read, 0);

  const std::vector<unsigned char> p = Pattern(kBlock, 5);
  std::vector<unsigned char> buf(kBlock);
  KVTIER_ASSERT_OK(tier->Write(ids[0], 0, p.data(), 64));
  KVTIER_ASSERT_OK(tier->Write(ids[1], 10, p.data(), 20));
  KVTIER_ASSERT_OK(tier->Read(ids[0], 3, buf.data(), 7));
  KVTIER_ASSERT_OK(tier->Read(ids[1], 0, buf.data(), 64));
  KVTIER_ASSERT_OK(tier->Read(ids[1], 0, buf.data(), 0));
  EXPECT_EQ(tier->Read(ids[1], 60, buf.data(), 5).code(), absl::StatusCode::kInvalidArgument);
  s = tier->Stats();
  EXPECT_EQ(s.bytes_written, 84);
  EXPECT_EQ(s.bytes_read, 71);

  for (int i = 0; i < 4; ++i) KVTIER_ASSERT_OK(tier->Free(ids[i]));
  s = tier->Stats();
  EXPECT_EQ(s.blocks_in_use, 2);
  EXPECT_EQ(s.bytes_in_use, 2 * kBlock);
  EXPECT_EQ(s.peak_bytes_in_use, 6 * kBlock) << "the peak stays";
  EXPECT_EQ(s.bytes_reserved, 8 * kBlock) << "freed blocks stay reserved";
  // Re-allocating within the reserve does not grow it; a new peak is tracked.
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(tier->Allocate().ok());
  s = tier->Stats();
  EXPECT_EQ(s.blocks_in_use, 8);
  EXPECT_EQ(s.bytes_reserved, 8 * kBlock);
  EXPECT_EQ(s.peak_bytes_in_use, 8 * kBlock);
  ASSERT_TRUE(tier->Allocate().ok());
  s = tier->Stats();
  EXPECT_EQ(s.bytes_reserved, 12 * kBlock) << "a third chunk";
  EXPECT_EQ(s.peak_bytes_in_use, 9 * kBlock);
}

TEST_F(HostTierTest, ConcurrentDistinctBlocks) {
  // 4 workers allocate, fill, verify and free their own blocks (keeping up to
  // 3 each) under a cap smaller than their combined holdings, while a fifth
  // thread reads Stats and checks its internal consistency.
  constexpr int64_t kBlock = 192;
  constexpr int kThreads = 4, kIters = 2000, kCapBlocks = 10;
  std::unique_ptr<HostTier> tier = Make(kBlock, kCapBlocks * kBlock, 4);
  ASSERT_NE(tier, nullptr);
  std::atomic<int> failures{0};
  std::atomic<bool> done{false};
  std::atomic<int64_t> written{0}, read{0}, allocated{0};

  std::thread stats_thread([&] {
    int rounds = 0;
    while (!done.load() || rounds < 10) {
      const TierStats s = tier->Stats();
      if (s.bytes_in_use != s.blocks_in_use * kBlock || s.blocks_in_use < 0 || s.blocks_in_use > kCapBlocks ||
          s.peak_bytes_in_use < s.bytes_in_use || s.bytes_reserved > kCapBlocks * kBlock ||
          s.bytes_reserved < s.bytes_in_use) {
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
      std::vector<unsigned char> buf(kBlock);
      for (int i = 0; i < kIters; ++i) {
        const uint64_t seed = static_cast<uint64_t>(t) * 100000 + i;
        if (held.size() < 3 && (i % 4) != 3) {
          absl::StatusOr<BlockId> b = tier->Allocate();
          if (!b.ok()) {
            if (b.status().code() != absl::StatusCode::kResourceExhausted) failures++;
            continue;
          }
          allocated++;
          const std::vector<unsigned char> p = Pattern(kBlock, seed);
          // Two halves, to exercise offsets.
          if (!tier->Write(*b, 0, p.data(), kBlock / 2).ok()) failures++;
          if (!tier->Write(*b, kBlock / 2, p.data() + kBlock / 2, kBlock / 2).ok()) failures++;
          written += kBlock;
          held.push_back({*b, seed});
        } else if (!held.empty()) {
          const Held h = held.front();
          held.erase(held.begin());
          if (!tier->Read(h.id, 0, buf.data(), kBlock).ok()) failures++;
          read += kBlock;
          if (buf != Pattern(kBlock, h.seed)) failures++;
          if (!tier->Free(h.id).ok()) failures++;
        }
      }
      for (const Held& h : held) {
        if (!tier->Read(h.id, 0, buf.data(), kBlock).ok()) failures++;
        read += kBlock;
        if (buf != Pattern(kBlock, h.seed)) failures++;
        if (!tier->Free(h.id).ok()) failures++;
      }
    });
  }
  for (std::thread& w : workers) w.join();
  done = true;
  stats_thread.join();

  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(allocated.load(), kThreads * 50);
  const TierStats s = tier->Stats();
  EXPECT_EQ(s.blocks_in_use, 0);
  EXPECT_EQ(s.bytes_in_use, 0);
  EXPECT_EQ(s.bytes_written, written.load());
  EXPECT_EQ(s.bytes_read, read.load());
  EXPECT_LE(s.peak_bytes_in_use, kCapBlocks * kBlock);
  EXPECT_GE(s.peak_bytes_in_use, 3 * kBlock);
  EXPECT_LE(s.bytes_reserved, kCapBlocks * kBlock) << "growth stops at the cap";
}

}  // namespace
}  // namespace kvtier
