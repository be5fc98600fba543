// The block store: demotion to the lower tier coldest first without losing a
// byte, promotion on gather, exact accounting of bytes by direction, the
// checksum, and deletes racing transfers.
#include <algorithm>
#include <atomic>
#include <random>
#include <thread>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kvtier/offload/block_store.h"
#include "test_util.h"

namespace kvtier {
namespace {

constexpr int64_t kBlock = 4096;

class BlockStoreTest : public ::testing::Test {
 protected:
  void Make(int64_t host_blocks, double high = 0.75, double low = 0.5) {
    backend_ = *CreateBackend(BackendKind::kCpu);
    host_ = *HostTier::Create(*backend_, {.block_bytes = kBlock, .capacity_bytes = host_blocks * kBlock});
    // A second host tier stands in for the disk: same contract, inline completions.
    disk_ = *HostTier::Create(*backend_, {.block_bytes = kBlock});
    auto store = BlockStore::Create(*host_, disk_.get(), *backend_, {.high_watermark = high, .low_watermark = low});
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }

  // A sealed block filled with bytes derived from `seed`.
  BlockStore::Ref Fill(uint64_t seed, std::vector<char>* content = nullptr, float heat = 0.0f) {
    absl::StatusOr<BlockStore::Ref> ref = store_->CreateBlock();
    EXPECT_TRUE(ref.ok()) << ref.status();
    std::vector<char> data(kBlock);
    std::mt19937_64 rng(seed);
    for (char& c : data) c = static_cast<char>(rng());
    // Two writes, as the runtime writes K rows then V rows.
    EXPECT_TRUE(store_->Write(*ref, 0, data.data(), kBlock / 2).ok());
    EXPECT_TRUE(store_->Write(*ref, kBlock / 2, data.data() + kBlock / 2, kBlock / 2).ok());
    store_->AddHeat(*ref, heat);
    store_->Seal(*ref);
    if (content) *content = data;
    return *ref;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<HostTier> host_, disk_;
  std::unique_ptr<BlockStore> store_;
};

TEST_F(BlockStoreTest, DemotionKeepsEveryBlockReadableAndTheHostUnderItsCap) {
  Make(/*host_blocks=*/8);
  std::vector<std::vector<char>> want(20);
  std::vector<BlockStore::Ref> refs;
  for (int i = 0; i < 20; ++i) {
    refs.push_back(Fill(100 + i, &want[i]));
    store_->Drain();
    EXPECT_LE(host_->Stats().blocks_in_use, 8);
  }
  const StoreStats s = store_->Stats();
  EXPECT_EQ(s.blocks, 20);
  EXPECT_EQ(s.host_blocks + s.disk_blocks, 20);
  EXPECT_GT(s.demotions, 0);
  EXPECT_EQ(s.bytes_host_to_disk, s.demotions * kBlock);
  EXPECT_EQ(s.bytes_device_to_host, 20 * kBlock);
  EXPECT_EQ(disk_->Stats().blocks_in_use, s.disk_blocks);
  for (int i = 0; i < 20; ++i) {
    std::vector<char> got(kBlock);
    KVTIER_ASSERT_OK(store_->Read(refs[i], 0, got.data(), kBlock));
    EXPECT_EQ(got, want[i]) << "block " << i;
  }
}

TEST_F(BlockStoreTest, ColdestBlocksAreDemotedFirst) {
  Make(/*host_blocks=*/8, /*high=*/0.75, /*low=*/0.5);
  std::vector<BlockStore::Ref> refs;
  for (int i = 0; i < 6; ++i) refs.push_back(Fill(i));
  // Blocks 0..5: raise the heat of 0, 1 and 2.
  for (int i = 0; i < 3; ++i) store_->AddHeat(refs[i], 10.0f + i);
  refs.push_back(Fill(6));  // 7 > 0.75 * 8 host blocks: demote down to 4
  store_->Drain();
  const StoreStats s = store_->Stats();
  EXPECT_EQ(s.demotions, 3);
  // The three cold ones of the original six went down; the hot ones stayed.
  std::vector<char> probe(16);
  for (int i = 0; i < 3; ++i) KVTIER_EXPECT_OK(store_->Read(refs[i], 0, probe.data(), 16));
  EXPECT_EQ(disk_->Stats().reads, 0) << "hot blocks are read from the host tier";
  for (int i = 3; i < 6; ++i) KVTIER_EXPECT_OK(store_->Read(refs[i], 0, probe.data(), 16));
  EXPECT_EQ(disk_->Stats().reads, 3) << "cold blocks come from the lower tier";
}

// A gather's heat counts as AddHeat's: the blocks gathered from with heat
// stay in the host tier when the others are demoted; a gather without heat
// leaves a block as cold as before.
TEST_F(BlockStoreTest, GatherHeatKeepsBlocksFromDemotion) {
  Make(/*host_blocks=*/8, /*high=*/0.75, /*low=*/0.5);
  std::vector<BlockStore::Ref> refs;
  for (int i = 0; i < 6; ++i) refs.push_back(Fill(i));
  std::vector<char> dst(64);
  std::vector<GatherPart> parts;
  for (int i = 0; i < 6; ++i) parts.push_back({refs[i], {{0, dst.data(), 16}}, i % 2 == 0 ? 5.0f : 0.0f});
  std::shared_ptr<Transfer> t = store_->Gather(parts);
  t->Wait();
  KVTIER_ASSERT_OK(t->status());
  refs.push_back(Fill(6));  // 7 > 0.75 * 8 host blocks: demote down to 4
  store_->Drain();
  EXPECT_EQ(store_->Stats().demotions, 3);
  std::vector<char> probe(16);
  for (int i = 0; i < 6; i += 2) KVTIER_EXPECT_OK(store_->Read(refs[i], 0, probe.data(), 16));
  EXPECT_EQ(disk_->Stats().reads, 0) << "blocks 0, 2 and 4 were gathered with heat: still in the host tier";
  for (int i = 1; i < 6; i += 2) KVTIER_EXPECT_OK(store_->Read(refs[i], 0, probe.data(), 16));
  EXPECT_EQ(disk_->Stats().reads, 3) << "blocks 1, 3 and 5 were gathered without heat: demoted";
}

// A caller that creates several blocks before sealing any (an append
// reserves all it needs first) still keeps the host tier at its high
// watermark: creation past it demotes the coldest sealed blocks.
TEST_F(BlockStoreTest, CreatingPastTheHighWatermarkDemotesBeforeAnySeal) {
  Make(/*host_blocks=*/8, /*high=*/0.75, /*low=*/0.5);  // high: 6 blocks, low: 4
  for (int i = 0; i < 6; ++i) Fill(i);
  store_->Drain();
  EXPECT_EQ(store_->Stats().demotions, 0) << "6 blocks are not above the high watermark";
  std::vector<BlockStore::Ref> open;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<BlockStore::Ref> ref = store_->CreateBlock();
    ASSERT_TRUE(ref.ok()) << ref.status();
    open.push_back(*ref);
    store_->Drain();
  }
  // The 7th block demoted 3 sealed ones (7 -> 4); the 10th 3 more (7 -> 4).
  const StoreStats s = store_->Stats();
  EXPECT_EQ(s.demotions, 6);
  EXPECT_EQ(s.host_blocks, 4);
  EXPECT_EQ(host_->Stats().peak_bytes_in_use, 7 * kBlock) << "never above high + 1, never at the cap of 8";
  for (BlockStore::Ref ref : open) KVTIER_EXPECT_OK(store_->Delete(ref));
}

TEST_F(BlockStoreTest, GatherFromDiskPromotesAndCopiesExactRows) {
  // Host cap 4, demote above 2 down to 2: the third sealed block pushes the
  // coldest one (the only one without heat) down.
  Make(/*host_blocks=*/4, /*high=*/0.5, /*low=*/0.5);
  std::vector<char> want;
  const BlockStore::Ref cold = Fill(7, &want);
  Fill(20, nullptr, 5.0f);
  Fill(21, nullptr, 5.0f);
  store_->Drain();
  ASSERT_EQ(store_->Stats().disk_blocks, 1);
  std::vector<char> dst(3 * 256, 0);
  std::vector<GatherRow> rows = {{0, dst.data(), 256}, {1024, dst.data() + 256, 256}, {kBlock - 256, dst.data() + 512, 256}};
  std::shared_ptr<Transfer> t = store_->Gather(std::vector<GatherPart>{{cold, rows}});
  t->Wait();
  KVTIER_ASSERT_OK(t->status());
  EXPECT_TRUE(std::equal(dst.begin(), dst.begin() + 256, want.begin()));
  EXPECT_TRUE(std::equal(dst.begin() + 256, dst.begin() + 512, want.begin() + 1024));
  EXPECT_TRUE(std::equal(dst.begin() + 512, dst.end(), want.begin() + kBlock - 256));
  store_->Drain();
  const StoreStats s = store_->Stats();
  EXPECT_EQ(s.promotions, 1);
  EXPECT_EQ(s.bytes_disk_to_host, kBlock);
  EXPECT_EQ(s.bytes_host_to_device, 3 * 256);
  // Promoted: a second gather reads the host copy, not the disk.
  const int64_t disk_reads = disk_->Stats().reads;
  std::shared_ptr<Transfer> again = store_->Gather(std::vector<GatherPart>{{cold, {{0, dst.data(), 256}}}});
  again->Wait();
  KVTIER_EXPECT_OK(again->status());
  EXPECT_EQ(disk_->Stats().reads, disk_reads);
}

// A row outside its block fails its part with the numbers in the message and
// copies nothing; the other parts of the same gather complete and are
// counted. Rows past the end, at a negative offset, and of negative length.
TEST_F(BlockStoreTest, GatherRowOutsideTheBlockFailsOnlyItsPart) {
  Make(/*host_blocks=*/8);
  std::vector<char> want;
  const BlockStore::Ref a = Fill(3, &want), b = Fill(4);
  for (const GatherRow bad : {GatherRow{kBlock - 128, nullptr, 256}, GatherRow{-8, nullptr, 16},
                              GatherRow{0, nullptr, -1}}) {
    std::vector<char> dst(512, 0), untouched(256, 0);
    GatherRow outside = bad;
    outside.dst = untouched.data();
    const int64_t before = store_->Stats().bytes_host_to_device;
    std::shared_ptr<Transfer> t = store_->Gather(std::vector<GatherPart>{
        {a, {{0, dst.data(), 256}, {256, dst.data() + 256, 256}}}, {b, {{0, dst.data(), 8}, outside}}});
    t->Wait();
    KVTIER_EXPECT_OK(t->part_status(0));
    const absl::Status st = t->part_status(1);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_NE(st.message().find(absl::StrFormat("%d bytes at offset %d", bad.bytes, bad.offset)), std::string::npos)
        << st;
    EXPECT_EQ(t->status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(std::equal(dst.begin(), dst.end(), want.begin()));
    EXPECT_TRUE(std::all_of(untouched.begin(), untouched.end(), [](char c) { return c == 0; }));
    store_->Drain();
    EXPECT_EQ(store_->Stats().bytes_host_to_device - before, 512) << "only the good part's rows";
  }
}

// xxh3-64 of a 4 KiB block changes under every one of its 32768 single-bit
// flips (a flip that kept it would be a collision of probability 2^-64).
TEST(BlockChecksum, EverySingleBitFlipChangesTheChecksum) {
  std::vector<unsigned char> block(kBlock);
  std::mt19937_64 rng(3);
  for (unsigned char& c : block) c = static_cast<unsigned char>(rng());
  const uint64_t base = BlockChecksum(block.data(), kBlock);
  int unchanged = 0;
  for (int bit = 0; bit < kBlock * 8; ++bit) {
    block[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
    unchanged += BlockChecksum(block.data(), kBlock) == base;
    block[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
  }
  EXPECT_EQ(unchanged, 0);
  EXPECT_EQ(BlockChecksum(block.data(), kBlock), base);
}

TEST_F(BlockStoreTest, WritesOutsideOpenBlocksAreRefused) {
  Make(4);
  std::vector<char> data(kBlock);
  const BlockStore::Ref r = Fill(1);
  EXPECT_EQ(store_->Write(r, 0, data.data(), 16).code(), absl::StatusCode::kFailedPrecondition) << "sealed";
  absl::StatusOr<BlockStore::Ref> open = store_->CreateBlock();
  ASSERT_TRUE(open.ok());
  EXPECT_EQ(store_->Write(*open, kBlock - 8, data.data(), 16).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Write(*open, -1, data.data(), 16).code(), absl::StatusCode::kInvalidArgument);
  KVTIER_EXPECT_OK(store_->Delete(*open));
  EXPECT_EQ(store_->Delete(*open).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->Write(*open, 0, data.data(), 16).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(BlockStoreTest, FullHostWithoutRoomToDemoteIsResourceExhausted) {
  Make(/*host_blocks=*/2);
  absl::StatusOr<BlockStore::Ref> a = store_->CreateBlock(), b = store_->CreateBlock();
  ASSERT_TRUE(a.ok() && b.ok());
  // Both open (unsealed): nothing can move down.
  absl::StatusOr<BlockStore::Ref> c = store_->CreateBlock();
  ASSERT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(c.status().message().find("nothing can be demoted"), std::string::npos) << c.status();
  store_->Seal(*a);
  absl::StatusOr<BlockStore::Ref> d = store_->CreateBlock();
  KVTIER_EXPECT_OK(d.status());
}

// Threads create, write, seal, gather and delete blocks while demotions run;
// every gather delivers the bytes written, and at the end both tiers are empty.
TEST_F(BlockStoreTest, ConcurrentUseKeepsDataAndAccounting) {
  Make(/*host_blocks=*/16);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::pair<BlockStore::Ref, std::vector<char>>> mine;
      for (int i = 0; i < 25; ++i) {
        std::vector<char> want;
        mine.emplace_back(Fill(1000 * t + i, &want), want);
        if (mine.size() > 3) {  // read back an older one, then delete it
          auto& [ref, data] = mine.front();
          std::vector<char> got(512);
          std::shared_ptr<Transfer> g = store_->Gather(std::vector<GatherPart>{{ref, {{512, got.data(), 512}}}});
          g->Wait();
          if (!g->status().ok() || !std::equal(got.begin(), got.end(), data.begin() + 512)) ++bad;
          if (!store_->Delete(ref).ok()) ++bad;
          mine.erase(mine.begin());
        }
      }
      for (auto& [ref, data] : mine) {
        if (!store_->Delete(ref).ok()) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  store_->Drain();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(store_->Stats().blocks, 0);
  EXPECT_EQ(host_->Stats().blocks_in_use, 0);
  EXPECT_EQ(disk_->Stats().blocks_in_use, 0);
}

}  // namespace
}  // namespace kvtier
