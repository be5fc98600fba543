// FaultInjectingTier: every fault kind against its contract (status, message,
// buffer contents, whether the base was touched), probability, max_count and
// block filters, determinism by seed, delayed completions (kSlowIo, Drain,
// destruction), and concurrent transfers with faults active.
//
// Every behavioural test runs over two bases: the host tier, which completes
// inline (done runs before Write/Read return), and ThreadedTier below, which
// completes on its own thread.
#include "kvtier/offload/fault_tier.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/backend.h"
#include "kvtier/offload/host_tier.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using Clock = std::chrono::steady_clock;

constexpr int64_t kBlockBytes = 4096;

// ---- Buffers ----

struct AlignedFree {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t{4096}); }
};
using Buffer = std::unique_ptr<char[], AlignedFree>;

Buffer NewBuffer(int64_t bytes = kBlockBytes) {
  return Buffer(static_cast<char*>(::operator new[](static_cast<size_t>(bytes), std::align_val_t{4096})));
}

Buffer Pattern(uint64_t seed, int64_t bytes = kBlockBytes) {
  Buffer b = NewBuffer(bytes);
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < bytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(b.get() + i, &v, 8);
  }
  return b;
}

Buffer Filled(unsigned char byte, int64_t bytes = kBlockBytes) {
  Buffer b = NewBuffer(bytes);
  std::memset(b.get(), byte, static_cast<size_t>(bytes));
  return b;
}

bool Equal(const char* a, const char* b, int64_t bytes = kBlockBytes) {
  return std::memcmp(a, b, static_cast<size_t>(bytes)) == 0;
}

bool AllBytes(const char* p, unsigned char byte, int64_t bytes) {
  for (int64_t i = 0; i < bytes; ++i) {
    if (static_cast<unsigned char>(p[i]) != byte) return false;
  }
  return true;
}

int DifferingBits(const char* a, const char* b, int64_t bytes = kBlockBytes) {
  int n = 0;
  for (int64_t i = 0; i < bytes; ++i) n += std::popcount(static_cast<unsigned char>(a[i] ^ b[i]));
  return n;
}

// Index of the first differing bit, -1 when equal.
int64_t FirstDifferingBit(const char* a, const char* b, int64_t bytes = kBlockBytes) {
  for (int64_t i = 0; i < bytes; ++i) {
    const unsigned char x = static_cast<unsigned char>(a[i] ^ b[i]);
    if (x != 0) return i * 8 + std::countr_zero(x);
  }
  return -1;
}

// ---- Fault specs ----

// FaultSpec with named setters: Spec(kind, p).Max(n).On(block).Delay(d).
struct Spec {
  explicit Spec(FaultKind kind, double probability = 1.0) {
    spec.kind = kind;
    spec.probability = probability;
  }
  Spec& Max(int64_t n) {
    spec.max_count = n;
    return *this;
  }
  Spec& On(BlockId block) {
    spec.block = block;
    return *this;
  }
  Spec& Delay(absl::Duration d) {
    spec.delay = d;
    return *this;
  }
  operator FaultSpec() const { return spec; }  // NOLINT: implicit on purpose
  FaultSpec spec;
};

std::string Msg(const absl::Status& st) { return std::string(st.message()); }

// ---- Completions ----

// One transfer's completion: counts the calls to done, keeps the status and
// the time done ran.
class Completion {
 public:
  TierDone Done() {
    return [this](absl::Status st) {
      std::lock_guard<std::mutex> lock(mu_);
      ++calls_;
      status_ = std::move(st);
      at_ = Clock::now();
      cv_.notify_all();  // under the lock: the waiter may destroy *this once it is released
    };
  }
  absl::Status Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return calls_ > 0; });
    return status_;
  }
  int calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  absl::Status status() const {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }
  Clock::time_point at() const {
    std::lock_guard<std::mutex> lock(mu_);
    return at_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int calls_ = 0;
  absl::Status status_;
  Clock::time_point at_;
};

// Synchronous transfers; the caller checks that done ran exactly once.
absl::Status ReadSync(Tier& t, BlockId block, char* dst) {
  Completion c;
  t.Read(block, dst, c.Done());
  absl::Status st = c.Wait();
  t.Drain();
  EXPECT_EQ(c.calls(), 1);
  return st;
}

absl::Status WriteSync(Tier& t, BlockId block, const char* src) {
  Completion c;
  t.Write(block, src, c.Done());
  absl::Status st = c.Wait();
  t.Drain();
  EXPECT_EQ(c.calls(), 1);
  return st;
}

// ---- A base that completes on its own thread ----

// Blocks in heap memory; every transfer is queued and runs, done included, on
// the tier's worker thread. Optional cap on blocks.
class ThreadedTier final : public Tier {
 public:
  explicit ThreadedTier(int64_t capacity_blocks = 256) : capacity_blocks_(capacity_blocks) {
    worker_ = std::thread([this] { Loop(); });
  }
  ~ThreadedTier() override {
    Drain();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    worker_.join();
  }

  std::string_view name() const override { return "threaded"; }
  int64_t block_bytes() const override { return kBlockBytes; }

  absl::StatusOr<BlockId> Allocate() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (!blocks_[i]) {
        blocks_[i] = NewBuffer();
        ++in_use_;
        return static_cast<BlockId>(i);
      }
    }
    if (static_cast<int64_t>(blocks_.size()) >= capacity_blocks_) {
      return absl::ResourceExhaustedError(absl::StrFormat("threaded tier: full at %d blocks", capacity_blocks_));
    }
    blocks_.push_back(NewBuffer());
    ++in_use_;
    return static_cast<BlockId>(blocks_.size() - 1);
  }

  absl::Status Free(BlockId block) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (block >= blocks_.size() || !blocks_[block]) {
      return absl::FailedPreconditionError(absl::StrFormat("threaded tier: block %d is not allocated", block));
    }
    blocks_[block].reset();
    --in_use_;
    return absl::OkStatus();
  }

  void Write(BlockId block, const void* src, TierDone done) override {
    Submit(Job{.write = true, .block = block, .src = static_cast<const char*>(src), .dst = nullptr,
               .done = std::move(done)});
  }
  void Read(BlockId block, void* dst, TierDone done) override {
    Submit(Job{.write = false, .block = block, .src = nullptr, .dst = static_cast<char*>(dst),
               .done = std::move(done)});
  }

  void Drain() override {
    std::unique_lock<std::mutex> lock(mu_);
    idle_cv_.wait(lock, [this] { return in_flight_ == 0; });
  }

  TierStats Stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    TierStats s;
    s.block_bytes = kBlockBytes;
    s.blocks_in_use = in_use_;
    s.bytes_in_use = in_use_ * kBlockBytes;
    s.reads = reads_;
    s.writes = writes_;
    s.bytes_read = reads_ * kBlockBytes;
    s.bytes_written = writes_ * kBlockBytes;
    s.read_errors = read_errors_;
    s.write_errors = write_errors_;
    s.in_flight = in_flight_;
    return s;
  }

 private:
  struct Job {
    bool write;
    BlockId block;
    const char* src;
    char* dst;
    TierDone done;
  };

  void Submit(Job job) {
    std::lock_guard<std::mutex> lock(mu_);
    ++in_flight_;
    queue_.push_back(std::move(job));
    cv_.notify_all();
  }

  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      Job job = std::move(queue_.front());
      queue_.pop_front();
      absl::Status st;
      char* data = job.block < blocks_.size() ? blocks_[job.block].get() : nullptr;
      if (data == nullptr) {
        ++(job.write ? write_errors_ : read_errors_);
        st = absl::FailedPreconditionError(absl::StrFormat("threaded tier: block %d is not allocated", job.block));
      } else if (job.write) {
        std::memcpy(data, job.src, kBlockBytes);
        ++writes_;
      } else {
        std::memcpy(job.dst, data, kBlockBytes);
        ++reads_;
      }
      lock.unlock();
      std::move(job.done)(std::move(st));
      job.done = nullptr;
      lock.lock();
      if (--in_flight_ == 0) idle_cv_.notify_all();
    }
  }

  const int64_t capacity_blocks_;
  mutable std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::vector<Buffer> blocks_;
  std::deque<Job> queue_;
  int64_t in_use_ = 0, reads_ = 0, writes_ = 0, read_errors_ = 0, write_errors_ = 0, in_flight_ = 0;
  bool stop_ = false;
  std::thread worker_;
};

// ---- Fixture over both bases ----

enum class BaseKind { kHost, kThreaded };

class FaultTierTest : public ::testing::TestWithParam<BaseKind> {
 protected:
  void SetUp() override {
    if (GetParam() == BaseKind::kHost) {
      absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(BackendKind::kCpu);
      ASSERT_TRUE(backend.ok()) << backend.status();
      backend_ = std::move(*backend);
      absl::StatusOr<std::unique_ptr<HostTier>> host = HostTier::Create(*backend_, {.block_bytes = kBlockBytes});
      ASSERT_TRUE(host.ok()) << host.status();
      base_ = std::move(*host);
    } else {
      base_ = std::make_unique<ThreadedTier>();
    }
  }

  Tier& base() { return *base_; }
  std::string BaseName() const { return std::string(base_->name()); }

  // A block of the base holding Pattern(seed), written through the base.
  BlockId NewBlock(uint64_t seed) {
    absl::StatusOr<BlockId> b = base_->Allocate();
    EXPECT_TRUE(b.ok()) << b.status();
    Buffer p = Pattern(seed);
    EXPECT_TRUE(WriteSync(*base_, *b, p.get()).ok());
    return *b;
  }

  static void ExpectNoFaults(const FaultInjectingTier& t) {
    for (int k = 0; k < kNumFaultKinds; ++k) EXPECT_EQ(t.injected(static_cast<FaultKind>(k)), 0) << "kind " << k;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Tier> base_;
};

INSTANTIATE_TEST_SUITE_P(FaultTier, FaultTierTest, ::testing::Values(BaseKind::kHost, BaseKind::kThreaded),
                         [](const ::testing::TestParamInfo<BaseKind>& info) {
                           return info.param == BaseKind::kHost ? "Host" : "Threaded";
                         });

TEST_P(FaultTierTest, NoFaultsPassThrough) {
  FaultInjectingTier t(base(), 1);
  EXPECT_EQ(t.name(), base().name());
  EXPECT_EQ(t.block_bytes(), kBlockBytes);
  absl::StatusOr<BlockId> b = t.Allocate();
  ASSERT_TRUE(b.ok()) << b.status();
  const Buffer p = Pattern(11);
  ASSERT_TRUE(WriteSync(t, *b, p.get()).ok());
  Buffer got = Filled(0xAB);
  ASSERT_TRUE(ReadSync(t, *b, got.get()).ok());
  EXPECT_TRUE(Equal(got.get(), p.get()));
  const TierStats bs = base().Stats(), ws = t.Stats();
  EXPECT_EQ(bs.writes, 1);
  EXPECT_EQ(bs.reads, 1);
  EXPECT_EQ(ws.writes, 1);
  EXPECT_EQ(ws.reads, 1);
  EXPECT_EQ(ws.read_errors, 0);
  EXPECT_EQ(ws.write_errors, 0);
  EXPECT_EQ(ws.in_flight, 0);
  EXPECT_EQ(ws.blocks_in_use, 1);
  ExpectNoFaults(t);
  EXPECT_TRUE(t.Free(*b).ok());
  EXPECT_EQ(base().Stats().blocks_in_use, 0);
  // The base's errors come through unchanged.
  Buffer dst = Filled(0);
  EXPECT_EQ(ReadSync(t, *b, dst.get()).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_P(FaultTierTest, ReadErrorLeavesBufferUntouchedAndBaseUnread) {
  const BlockId b = NewBlock(21);
  FaultInjectingTier t(base(), 2);
  t.Inject(Spec(FaultKind::kReadError));
  const int64_t base_reads = base().Stats().reads;
  Buffer dst = Filled(0xAB);
  const absl::Status st = ReadSync(t, b, dst.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(Msg(st), HasSubstr("injected read error"));
  EXPECT_THAT(Msg(st), HasSubstr(absl::StrFormat("block %d", b)));
  EXPECT_THAT(Msg(st), HasSubstr(BaseName()));
  EXPECT_TRUE(AllBytes(dst.get(), 0xAB, kBlockBytes));
  EXPECT_EQ(base().Stats().reads, base_reads);
  EXPECT_EQ(base().Stats().read_errors, 0);
  EXPECT_EQ(t.Stats().read_errors, 1);
  EXPECT_EQ(t.Stats().write_errors, 0);
  EXPECT_EQ(t.injected(FaultKind::kReadError), 1);
  // Writes are not read faults.
  const Buffer p = Pattern(22);
  EXPECT_TRUE(WriteSync(t, b, p.get()).ok());
  EXPECT_EQ(t.injected(FaultKind::kReadError), 1);
  for (FaultKind k : {FaultKind::kShortRead, FaultKind::kBitFlip, FaultKind::kWriteError, FaultKind::kNoSpace,
                      FaultKind::kSlowIo}) {
    EXPECT_EQ(t.injected(k), 0);
  }
}

TEST_P(FaultTierTest, ShortReadDeliversFirstHalfThenZeros) {
  const BlockId b = NewBlock(31);
  const Buffer p = Pattern(31);
  FaultInjectingTier t(base(), 3);
  t.Inject(Spec(FaultKind::kShortRead));
  const int64_t base_reads = base().Stats().reads;
  Buffer dst = Filled(0xAB);
  const absl::Status st = ReadSync(t, b, dst.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_THAT(Msg(st), HasSubstr("injected short read"));
  EXPECT_THAT(Msg(st), HasSubstr(absl::StrFormat("block %d", b)));
  EXPECT_THAT(Msg(st), HasSubstr(BaseName()));
  EXPECT_THAT(Msg(st), HasSubstr(absl::StrFormat("expected %d bytes", kBlockBytes)));
  EXPECT_THAT(Msg(st), HasSubstr(absl::StrFormat("got %d", kBlockBytes / 2)));
  EXPECT_TRUE(Equal(dst.get(), p.get(), kBlockBytes / 2));
  EXPECT_TRUE(AllBytes(dst.get() + kBlockBytes / 2, 0, kBlockBytes / 2));
  EXPECT_EQ(base().Stats().reads, base_reads + 1);  // the base was read (into the bounce buffer)
  EXPECT_EQ(t.Stats().read_errors, 1);
  EXPECT_EQ(t.injected(FaultKind::kShortRead), 1);
  EXPECT_EQ(t.injected(FaultKind::kReadError), 0);
}

TEST_P(FaultTierTest, BitFlipFlipsExactlyOneBit) {
  const BlockId b = NewBlock(41);
  const Buffer p = Pattern(41);
  FaultInjectingTier t(base(), 4);
  t.Inject(Spec(FaultKind::kBitFlip));
  const int64_t base_reads = base().Stats().reads;
  std::vector<int64_t> positions;
  constexpr int kReads = 20;
  for (int i = 0; i < kReads; ++i) {
    Buffer dst = Filled(0xAB);
    const absl::Status st = ReadSync(t, b, dst.get());
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_EQ(DifferingBits(dst.get(), p.get()), 1);
    positions.push_back(FirstDifferingBit(dst.get(), p.get()));
  }
  EXPECT_EQ(base().Stats().reads, base_reads + kReads);
  EXPECT_EQ(t.Stats().read_errors, 0);
  EXPECT_EQ(t.injected(FaultKind::kBitFlip), kReads);
  // The PRNG picks the bit: 20 reads do not all flip the same one.
  std::sort(positions.begin(), positions.end());
  EXPECT_GT(std::unique(positions.begin(), positions.end()) - positions.begin(), 1);
}

TEST_P(FaultTierTest, WriteErrorWritesNothing) {
  const BlockId b = NewBlock(51);
  const Buffer old = Pattern(51);
  FaultInjectingTier t(base(), 5);
  t.Inject(Spec(FaultKind::kWriteError));
  const int64_t base_writes = base().Stats().writes;
  const Buffer fresh = Pattern(52);
  const absl::Status st = WriteSync(t, b, fresh.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(Msg(st), HasSubstr("injected write error"));
  EXPECT_THAT(Msg(st), HasSubstr(absl::StrFormat("block %d", b)));
  EXPECT_THAT(Msg(st), HasSubstr(BaseName()));
  EXPECT_EQ(base().Stats().writes, base_writes);
  EXPECT_EQ(base().Stats().write_errors, 0);
  EXPECT_EQ(t.Stats().write_errors, 1);
  EXPECT_EQ(t.Stats().read_errors, 0);
  EXPECT_EQ(t.injected(FaultKind::kWriteError), 1);
  // Reads are not write faults, and the block still holds the old data.
  Buffer got = Filled(0);
  ASSERT_TRUE(ReadSync(t, b, got.get()).ok());
  EXPECT_TRUE(Equal(got.get(), old.get()));
  Buffer direct = Filled(0);
  ASSERT_TRUE(ReadSync(base(), b, direct.get()).ok());
  EXPECT_TRUE(Equal(direct.get(), old.get()));
  EXPECT_EQ(t.injected(FaultKind::kWriteError), 1);
}

TEST_P(FaultTierTest, NoSpaceFailsAllocateAndWrite) {
  const BlockId b = NewBlock(61);
  const Buffer old = Pattern(61);
  FaultInjectingTier t(base(), 6);
  t.Inject(Spec(FaultKind::kNoSpace));
  const TierStats before = base().Stats();

  absl::StatusOr<BlockId> a = t.Allocate();
  EXPECT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted) << a.status();
  EXPECT_THAT(Msg(a.status()), StartsWith("no space left"));
  EXPECT_THAT(Msg(a.status()), HasSubstr("injected"));
  EXPECT_THAT(Msg(a.status()), HasSubstr(BaseName()));
  EXPECT_EQ(base().Stats().blocks_in_use, before.blocks_in_use);

  const Buffer fresh = Pattern(62);
  const absl::Status st = WriteSync(t, b, fresh.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_THAT(Msg(st), StartsWith("no space left"));
  EXPECT_THAT(Msg(st), HasSubstr("injected"));
  EXPECT_THAT(Msg(st), HasSubstr(absl::StrFormat("block %d", b)));
  EXPECT_THAT(Msg(st), HasSubstr(BaseName()));
  EXPECT_EQ(base().Stats().writes, before.writes);
  EXPECT_EQ(t.Stats().write_errors, 1);  // the write; a failed Allocate is not a transfer
  EXPECT_EQ(t.injected(FaultKind::kNoSpace), 2);

  // Reads are unaffected, and the block still holds the old data.
  Buffer got = Filled(0);
  ASSERT_TRUE(ReadSync(t, b, got.get()).ok());
  EXPECT_TRUE(Equal(got.get(), old.get()));
  EXPECT_EQ(t.injected(FaultKind::kNoSpace), 2);

  // Clear removes the fault; the counts stay.
  t.Clear();
  absl::StatusOr<BlockId> c = t.Allocate();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(base().Stats().blocks_in_use, before.blocks_in_use + 1);
  EXPECT_TRUE(WriteSync(t, *c, fresh.get()).ok());
  EXPECT_EQ(t.injected(FaultKind::kNoSpace), 2);
}

TEST_P(FaultTierTest, SlowIoDelaysDoneWithoutBlockingTheCaller) {
  const BlockId b = NewBlock(71);
  const Buffer p = Pattern(71);
  FaultInjectingTier t(base(), 7);
  const absl::Duration delay = absl::Milliseconds(150);
  const auto delay_c = absl::ToChronoNanoseconds(delay);
  t.Inject(Spec(FaultKind::kSlowIo).Delay(delay));

  Buffer dst = Filled(0xAB);
  Completion rc;
  const Clock::time_point r0 = Clock::now();
  t.Read(b, dst.get(), rc.Done());
  const Clock::duration read_call = Clock::now() - r0;
  const absl::Status rst = rc.Wait();
  EXPECT_TRUE(rst.ok()) << rst;
  EXPECT_GE(rc.at() - r0, delay_c);
  EXPECT_LT(rc.at() - r0, delay_c + std::chrono::seconds(2));
  EXPECT_LT(read_call, delay_c);  // the caller was not made to wait
  EXPECT_TRUE(Equal(dst.get(), p.get()));

  const Buffer fresh = Pattern(72);
  Completion wc;
  const Clock::time_point w0 = Clock::now();
  t.Write(b, fresh.get(), wc.Done());
  const Clock::duration write_call = Clock::now() - w0;
  const absl::Status wst = wc.Wait();
  EXPECT_TRUE(wst.ok()) << wst;
  EXPECT_GE(wc.at() - w0, delay_c);
  EXPECT_LT(wc.at() - w0, delay_c + std::chrono::seconds(2));
  EXPECT_LT(write_call, delay_c);

  t.Drain();
  EXPECT_EQ(rc.calls(), 1);
  EXPECT_EQ(wc.calls(), 1);
  EXPECT_EQ(t.injected(FaultKind::kSlowIo), 2);
  EXPECT_EQ(t.Stats().in_flight, 0);
  Buffer got = Filled(0);
  ASSERT_TRUE(ReadSync(base(), b, got.get()).ok());
  EXPECT_TRUE(Equal(got.get(), fresh.get()));
}

TEST_P(FaultTierTest, SlowIoCombinesWithAnotherFault) {
  const BlockId b = NewBlock(81);
  FaultInjectingTier t(base(), 8);
  const absl::Duration delay = absl::Milliseconds(100);
  t.Inject(Spec(FaultKind::kSlowIo).Delay(delay));
  t.Inject(Spec(FaultKind::kReadError));
  Buffer dst = Filled(0xAB);
  Completion c;
  const Clock::time_point t0 = Clock::now();
  t.Read(b, dst.get(), c.Done());
  const absl::Status st = c.Wait();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_GE(c.at() - t0, absl::ToChronoNanoseconds(delay));
  EXPECT_TRUE(AllBytes(dst.get(), 0xAB, kBlockBytes));
  t.Drain();
  EXPECT_EQ(c.calls(), 1);
  EXPECT_EQ(t.injected(FaultKind::kSlowIo), 1);
  EXPECT_EQ(t.injected(FaultKind::kReadError), 1);
}

TEST_P(FaultTierTest, AtMostOneNonSlowFaultPerOperationFirstWins) {
  const BlockId b = NewBlock(91);
  FaultInjectingTier t(base(), 9);
  t.Inject(Spec(FaultKind::kShortRead));
  t.Inject(Spec(FaultKind::kReadError));
  t.Inject(Spec(FaultKind::kBitFlip));
  for (int i = 0; i < 5; ++i) {
    Buffer dst = Filled(0xAB);
    EXPECT_EQ(ReadSync(t, b, dst.get()).code(), absl::StatusCode::kDataLoss);
  }
  EXPECT_EQ(t.injected(FaultKind::kShortRead), 5);
  EXPECT_EQ(t.injected(FaultKind::kReadError), 0);
  EXPECT_EQ(t.injected(FaultKind::kBitFlip), 0);
  // Once the first is exhausted the next in line fires.
  t.Clear();
  t.Inject(Spec(FaultKind::kReadError).Max(1));
  t.Inject(Spec(FaultKind::kBitFlip));
  Buffer dst = Filled(0xAB);
  EXPECT_EQ(ReadSync(t, b, dst.get()).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(ReadSync(t, b, dst.get()).ok());
  EXPECT_EQ(t.injected(FaultKind::kReadError), 1);
  EXPECT_EQ(t.injected(FaultKind::kBitFlip), 1);
}

TEST_P(FaultTierTest, ProbabilityZeroNeverFires) {
  const BlockId b = NewBlock(101);
  const Buffer p = Pattern(101);
  FaultInjectingTier t(base(), 10);
  for (int k = 0; k < kNumFaultKinds; ++k) {
    t.Inject(Spec(static_cast<FaultKind>(k), 0.0).Delay(absl::Seconds(10)));
  }
  for (int i = 0; i < 200; ++i) {
    Buffer dst = Filled(0xAB);
    ASSERT_TRUE(ReadSync(t, b, dst.get()).ok());
    ASSERT_TRUE(Equal(dst.get(), p.get()));
    ASSERT_TRUE(WriteSync(t, b, p.get()).ok());
  }
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<BlockId> a = t.Allocate();
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(t.Free(*a).ok());
  }
  ExpectNoFaults(t);
  EXPECT_EQ(t.Stats().read_errors, 0);
  EXPECT_EQ(t.Stats().write_errors, 0);
}

TEST_P(FaultTierTest, ProbabilityOneAlwaysFires) {
  const BlockId b = NewBlock(111);
  FaultInjectingTier t(base(), 11);
  t.Inject(Spec(FaultKind::kReadError, 1.0));
  t.Inject(Spec(FaultKind::kWriteError, 1.0));
  const Buffer p = Pattern(112);
  constexpr int kOps = 100;
  for (int i = 0; i < kOps; ++i) {
    Buffer dst = Filled(0xAB);
    ASSERT_EQ(ReadSync(t, b, dst.get()).code(), absl::StatusCode::kUnavailable);
    ASSERT_EQ(WriteSync(t, b, p.get()).code(), absl::StatusCode::kUnavailable);
  }
  EXPECT_EQ(t.injected(FaultKind::kReadError), kOps);
  EXPECT_EQ(t.injected(FaultKind::kWriteError), kOps);
  EXPECT_EQ(t.Stats().read_errors, kOps);
  EXPECT_EQ(t.Stats().write_errors, kOps);
}

TEST_P(FaultTierTest, MaxCountLimitsFaults) {
  const BlockId b = NewBlock(121);
  const Buffer p = Pattern(121);
  FaultInjectingTier t(base(), 12);
  t.Inject(Spec(FaultKind::kReadError, 1.0).Max(3));
  t.Inject(Spec(FaultKind::kNoSpace, 1.0).Max(2));
  std::vector<absl::StatusCode> codes;
  for (int i = 0; i < 10; ++i) {
    Buffer dst = Filled(0xAB);
    codes.push_back(ReadSync(t, b, dst.get()).code());
  }
  const std::vector<absl::StatusCode> want = {
      absl::StatusCode::kUnavailable, absl::StatusCode::kUnavailable, absl::StatusCode::kUnavailable,
      absl::StatusCode::kOk,          absl::StatusCode::kOk,          absl::StatusCode::kOk,
      absl::StatusCode::kOk,          absl::StatusCode::kOk,          absl::StatusCode::kOk,
      absl::StatusCode::kOk};
  EXPECT_EQ(codes, want);
  EXPECT_EQ(t.injected(FaultKind::kReadError), 3);
  // kNoSpace counts Allocate and Write together.
  EXPECT_EQ(t.Allocate().status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(WriteSync(t, b, p.get()).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(WriteSync(t, b, p.get()).ok());
  absl::StatusOr<BlockId> a = t.Allocate();
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(t.Free(*a).ok());
  EXPECT_EQ(t.injected(FaultKind::kNoSpace), 2);
  // max_count = 0 never fires.
  t.Inject(Spec(FaultKind::kWriteError).Max(0));
  EXPECT_TRUE(WriteSync(t, b, p.get()).ok());
  EXPECT_EQ(t.injected(FaultKind::kWriteError), 0);
}

TEST_P(FaultTierTest, BlockFilterOnlyHitsThatBlock) {
  std::vector<BlockId> blocks;
  for (int i = 0; i < 4; ++i) blocks.push_back(NewBlock(130 + i));
  const BlockId target = blocks[2];
  FaultInjectingTier t(base(), 13);
  t.Inject(Spec(FaultKind::kReadError).On(target));
  t.Inject(Spec(FaultKind::kWriteError).On(target));
  t.Inject(Spec(FaultKind::kNoSpace).On(target));
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 4; ++i) {
      const BlockId b = blocks[i];
      const Buffer p = Pattern(130 + i);
      Buffer dst = Filled(0xAB);
      const absl::Status rst = ReadSync(t, b, dst.get());
      const absl::Status wst = WriteSync(t, b, p.get());
      if (b == target) {
        EXPECT_EQ(rst.code(), absl::StatusCode::kUnavailable);
        EXPECT_EQ(wst.code(), absl::StatusCode::kUnavailable);  // kWriteError is first in line
      } else {
        EXPECT_TRUE(rst.ok()) << rst;
        EXPECT_TRUE(Equal(dst.get(), p.get()));
        EXPECT_TRUE(wst.ok()) << wst;
      }
    }
  }
  EXPECT_EQ(t.injected(FaultKind::kReadError), 5);
  EXPECT_EQ(t.injected(FaultKind::kWriteError), 5);
  // A block filter never matches Allocate (its block is not known yet).
  absl::StatusOr<BlockId> a = t.Allocate();
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(t.Free(*a).ok());
  EXPECT_EQ(t.injected(FaultKind::kNoSpace), 0);
}

// What one read saw: the status code and, for an OK read, the flipped bit (-1
// for none).
struct Outcome {
  absl::StatusCode code;
  int64_t bit;
  bool operator==(const Outcome&) const = default;
};

std::vector<Outcome> RunSeeded(Tier& base, BlockId b, const char* want, uint64_t seed, int ops) {
  FaultInjectingTier t(base, seed);
  t.Inject(Spec(FaultKind::kReadError, 0.5));
  t.Inject(Spec(FaultKind::kBitFlip, 0.5));
  std::vector<Outcome> out;
  for (int i = 0; i < ops; ++i) {
    Buffer dst = NewBuffer();
    std::memcpy(dst.get(), want, kBlockBytes);
    const absl::Status st = ReadSync(t, b, dst.get());
    out.push_back({st.code(), st.ok() ? FirstDifferingBit(dst.get(), want) : -1});
  }
  return out;
}

TEST_P(FaultTierTest, SameSeedSameFaultsDifferentSeedDiffers) {
  const BlockId b = NewBlock(141);
  const Buffer p = Pattern(141);
  constexpr int kOps = 200;
  const std::vector<Outcome> a = RunSeeded(base(), b, p.get(), 42, kOps);
  const std::vector<Outcome> again = RunSeeded(base(), b, p.get(), 42, kOps);
  const std::vector<Outcome> other = RunSeeded(base(), b, p.get(), 43, kOps);
  EXPECT_EQ(a, again);
  EXPECT_NE(a, other);
  // Both kinds fired, and not always.
  int errors = 0, flips = 0;
  for (const Outcome& o : a) {
    errors += o.code == absl::StatusCode::kUnavailable;
    flips += o.bit >= 0;
  }
  EXPECT_GT(errors, 0);
  EXPECT_LT(errors, kOps);
  EXPECT_GT(flips, 0);
  EXPECT_EQ(errors + flips + std::count(a.begin(), a.end(), Outcome{absl::StatusCode::kOk, -1}), kOps);
}

TEST_P(FaultTierTest, DrainWaitsForDelayedCompletions) {
  const BlockId b = NewBlock(151);
  const Buffer p = Pattern(151);
  FaultInjectingTier t(base(), 15);
  const absl::Duration delay = absl::Milliseconds(200);
  const auto delay_c = absl::ToChronoNanoseconds(delay);
  t.Inject(Spec(FaultKind::kSlowIo).Delay(delay));
  constexpr int kReads = 4;
  std::vector<Buffer> dst;
  std::vector<std::unique_ptr<Completion>> cs;
  const Clock::time_point t0 = Clock::now();
  for (int i = 0; i < kReads; ++i) {
    dst.push_back(Filled(0xAB));
    cs.push_back(std::make_unique<Completion>());
    t.Read(b, dst.back().get(), cs.back()->Done());
  }
  const TierStats mid = t.Stats();
  const Clock::time_point t1 = Clock::now();
  // Nothing can have completed before t0 + delay: if Stats ran before then,
  // every read is still in flight (held by the wrapper).
  if (t1 - t0 < delay_c) {
    EXPECT_EQ(mid.in_flight, kReads);
  }
  t.Drain();
  EXPECT_GE(Clock::now() - t0, delay_c);
  for (int i = 0; i < kReads; ++i) {
    EXPECT_EQ(cs[i]->calls(), 1);
    EXPECT_TRUE(cs[i]->status().ok());
    EXPECT_TRUE(Equal(dst[i].get(), p.get()));
  }
  EXPECT_EQ(t.Stats().in_flight, 0);
}

TEST_P(FaultTierTest, DestructionDrainsDelayedCompletions) {
  const BlockId b = NewBlock(161);
  const Buffer p = Pattern(161);
  const absl::Duration delay = absl::Milliseconds(150);
  constexpr int kOps = 6;
  std::vector<Buffer> dst;
  std::vector<std::unique_ptr<Completion>> cs;
  auto t = std::make_unique<FaultInjectingTier>(base(), 16);
  t->Inject(Spec(FaultKind::kSlowIo).Delay(delay));
  t->Inject(Spec(FaultKind::kReadError, 0.5));
  const Clock::time_point t0 = Clock::now();
  for (int i = 0; i < kOps; ++i) {
    dst.push_back(Filled(0xAB));
    cs.push_back(std::make_unique<Completion>());
    if (i % 2 == 0) {
      t->Read(b, dst.back().get(), cs.back()->Done());
    } else {
      t->Write(b, p.get(), cs.back()->Done());
    }
  }
  const int64_t read_errors = t->injected(FaultKind::kReadError);
  t.reset();
  EXPECT_GE(Clock::now() - t0, absl::ToChronoNanoseconds(delay));
  int unavailable = 0;
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(cs[i]->calls(), 1) << i;
    const absl::Status st = cs[i]->status();
    if (st.code() == absl::StatusCode::kUnavailable) {
      ++unavailable;
      EXPECT_TRUE(AllBytes(dst[i].get(), 0xAB, kBlockBytes));
    } else {
      EXPECT_TRUE(st.ok()) << st;
      if (i % 2 == 0) {
        EXPECT_TRUE(Equal(dst[i].get(), p.get()));
      }
    }
  }
  EXPECT_EQ(unavailable, read_errors);
}

TEST_P(FaultTierTest, DoneCalledExactlyOncePerTransfer) {
  std::vector<BlockId> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(NewBlock(170 + i));
  FaultInjectingTier t(base(), 17);
  t.Inject(Spec(FaultKind::kSlowIo, 0.3).Delay(absl::Milliseconds(5)));
  t.Inject(Spec(FaultKind::kReadError, 0.2));
  t.Inject(Spec(FaultKind::kShortRead, 0.2));
  t.Inject(Spec(FaultKind::kBitFlip, 0.2));
  t.Inject(Spec(FaultKind::kWriteError, 0.2));
  t.Inject(Spec(FaultKind::kNoSpace, 0.2));
  constexpr int kRounds = 25;
  std::vector<std::atomic<int>> calls(kRounds * blocks.size());
  std::vector<Buffer> bufs;
  for (size_t i = 0; i < calls.size(); ++i) bufs.push_back(Pattern(900 + i));
  for (int r = 0; r < kRounds; ++r) {
    // One transfer per block in flight at a time: submit a round, drain it.
    for (size_t i = 0; i < blocks.size(); ++i) {
      const size_t id = r * blocks.size() + i;
      TierDone done = [&calls, id](absl::Status) { calls[id].fetch_add(1); };
      if (r % 2 == 0) {
        t.Read(blocks[i], bufs[id].get(), std::move(done));
      } else {
        t.Write(blocks[i], bufs[id].get(), std::move(done));
      }
    }
    t.Drain();
  }
  for (size_t id = 0; id < calls.size(); ++id) EXPECT_EQ(calls[id].load(), 1) << id;
  EXPECT_EQ(t.Stats().in_flight, 0);
  EXPECT_GT(t.injected(FaultKind::kSlowIo), 0);
}

TEST_P(FaultTierTest, ConcurrentTransfersWithFaults) {
  constexpr int kThreads = 4, kOpsPerThread = 150;
  std::vector<BlockId> blocks;
  for (int i = 0; i < kThreads; ++i) blocks.push_back(NewBlock(180 + i));
  FaultInjectingTier t(base(), 18);
  t.Inject(Spec(FaultKind::kReadError, 0.15));
  t.Inject(Spec(FaultKind::kBitFlip, 0.15));
  t.Inject(Spec(FaultKind::kShortRead, 0.1));
  t.Inject(Spec(FaultKind::kWriteError, 0.15));
  t.Inject(Spec(FaultKind::kNoSpace, 0.1));
  t.Inject(Spec(FaultKind::kSlowIo, 0.05).Delay(absl::Milliseconds(1)));

  struct Tally {
    int64_t clean_reads = 0, clean_writes = 0, read_errors = 0, short_reads = 0, flips = 0, write_errors = 0,
            no_space = 0, other = 0, done_calls = 0;
  };
  std::vector<Tally> tallies(kThreads);
  std::vector<std::thread> threads;
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      Tally& tally = tallies[w];
      const BlockId b = blocks[w];
      const Buffer p = Pattern(180 + w);  // writes rewrite the same data
      for (int i = 0; i < kOpsPerThread; ++i) {
        Buffer dst = Filled(0xAB);
        Completion c;
        const bool read = i % 2 == 0;
        if (read) {
          t.Read(b, dst.get(), c.Done());
        } else {
          t.Write(b, p.get(), c.Done());
        }
        const absl::Status st = c.Wait();
        tally.done_calls += c.calls();
        if (read) {
          if (st.ok()) {
            const int bits = DifferingBits(dst.get(), p.get());
            if (bits == 0) {
              ++tally.clean_reads;
            } else if (bits == 1) {
              ++tally.flips;
            } else {
              ++tally.other;
            }
          } else if (st.code() == absl::StatusCode::kUnavailable) {
            ++tally.read_errors;
          } else if (st.code() == absl::StatusCode::kDataLoss) {
            ++tally.short_reads;
          } else {
            ++tally.other;
          }
        } else {
          if (st.ok()) {
            ++tally.clean_writes;
          } else if (st.code() == absl::StatusCode::kUnavailable) {
            ++tally.write_errors;
          } else if (st.code() == absl::StatusCode::kResourceExhausted) {
            ++tally.no_space;
          } else {
            ++tally.other;
          }
        }
        // Allocate/Free churn alongside (kNoSpace applies here too).
        if (i % 10 == 0) {
          absl::StatusOr<BlockId> a = t.Allocate();
          if (a.ok()) {
            EXPECT_TRUE(t.Free(*a).ok());
          }
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  t.Drain();

  Tally sum;
  for (const Tally& x : tallies) {
    sum.clean_reads += x.clean_reads;
    sum.clean_writes += x.clean_writes;
    sum.read_errors += x.read_errors;
    sum.short_reads += x.short_reads;
    sum.flips += x.flips;
    sum.write_errors += x.write_errors;
    sum.no_space += x.no_space;
    sum.other += x.other;
    sum.done_calls += x.done_calls;
  }
  constexpr int64_t kTotal = int64_t{kThreads} * kOpsPerThread;
  EXPECT_EQ(sum.done_calls, kTotal);
  EXPECT_EQ(sum.other, 0);
  EXPECT_EQ(sum.read_errors, t.injected(FaultKind::kReadError));
  EXPECT_EQ(sum.short_reads, t.injected(FaultKind::kShortRead));
  EXPECT_EQ(sum.flips, t.injected(FaultKind::kBitFlip));
  EXPECT_EQ(sum.write_errors, t.injected(FaultKind::kWriteError));
  EXPECT_LE(sum.no_space, t.injected(FaultKind::kNoSpace));  // also counts failed Allocates
  const int64_t injected = sum.read_errors + sum.short_reads + sum.flips + sum.write_errors + sum.no_space;
  EXPECT_EQ(injected + sum.clean_reads + sum.clean_writes, kTotal);
  EXPECT_GT(injected, 0);
  EXPECT_GT(sum.clean_reads + sum.clean_writes, 0);
  const TierStats ws = t.Stats(), bs = base().Stats();
  EXPECT_EQ(ws.in_flight, 0);
  EXPECT_EQ(ws.read_errors - bs.read_errors, sum.read_errors + sum.short_reads);
  EXPECT_EQ(ws.write_errors - bs.write_errors, sum.write_errors + sum.no_space);
}

TEST(FaultTierStandaloneTest, OutOfRangeSpecValuesAreClamped) {
  ThreadedTier base;
  absl::StatusOr<BlockId> b = base.Allocate();
  ASSERT_TRUE(b.ok());
  const Buffer p = Pattern(191);
  ASSERT_TRUE(WriteSync(base, *b, p.get()).ok());
  FaultInjectingTier t(base, 19);
  t.Inject(Spec(FaultKind::kReadError, -3.0));
  t.Inject(Spec(FaultKind::kSlowIo, 7.0).Delay(absl::Milliseconds(-50)));
  Buffer dst = Filled(0);
  EXPECT_TRUE(ReadSync(t, *b, dst.get()).ok());
  EXPECT_TRUE(Equal(dst.get(), p.get()));
  EXPECT_EQ(t.injected(FaultKind::kReadError), 0);
  EXPECT_EQ(t.injected(FaultKind::kSlowIo), 1);
}

}  // namespace
}  // namespace kvtier
