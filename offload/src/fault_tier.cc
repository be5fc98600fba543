#include "kvtier/offload/fault_tier.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"

namespace kvtier {
namespace {

using Clock = std::chrono::steady_clock;

// The longest delay a kSlowIo spec can ask for (longer ones are clamped), so
// that a deadline never overflows the clock.
constexpr absl::Duration kMaxDelay = absl::Hours(24);

enum class Op : uint8_t { kAllocate, kRead, kWrite };

bool Applies(FaultKind kind, Op op) {
  switch (kind) {
    case FaultKind::kReadError:
    case FaultKind::kShortRead:
    case FaultKind::kBitFlip:
      return op == Op::kRead;
    case FaultKind::kWriteError:
      return op == Op::kWrite;
    case FaultKind::kNoSpace:
      return op == Op::kAllocate || op == Op::kWrite;
    case FaultKind::kSlowIo:
      return op == Op::kRead || op == Op::kWrite;
  }
  return false;
}

// A block_bytes buffer, 4096-byte aligned as every tier requires.
struct AlignedFree {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t{4096}); }
};
using AlignedBuffer = std::unique_ptr<char[], AlignedFree>;
AlignedBuffer NewAlignedBuffer(int64_t bytes) {
  return AlignedBuffer(static_cast<char*>(::operator new[](static_cast<size_t>(bytes), std::align_val_t{4096})));
}

// What the dice decided for one operation.
struct Decision {
  std::optional<FaultKind> fault;  // at most one, never kSlowIo
  bool slow = false;
  Clock::duration delay{};     // when slow
  uint64_t bit = 0;            // kBitFlip: the bit to flip, in [0, block_bytes * 8)
};

}  // namespace

class FaultInjectingTier::Impl {
 public:
  Impl(Tier& base, uint64_t seed) : base_(base), block_bytes_(base.block_bytes()), rng_(seed) {
    delayer_ = std::thread([this] { DelayerLoop(); });
  }

  ~Impl() {
    Drain();
    {
      std::lock_guard<std::mutex> lock(delay_mu_);
      stop_ = true;
      delay_cv_.notify_all();
    }
    delayer_.join();
  }

  void Inject(const FaultSpec& spec) {
    SpecState s{.spec = spec, .fired = 0};
    // NaN and out-of-range probabilities are clamped into [0, 1].
    s.spec.probability = std::isnan(spec.probability) ? 0.0 : std::clamp(spec.probability, 0.0, 1.0);
    s.spec.delay = std::clamp(spec.delay, absl::ZeroDuration(), kMaxDelay);
    std::lock_guard<std::mutex> lock(mu_);
    specs_.push_back(s);
  }

  void Clear() {
    std::lock_guard<std::mutex> lock(mu_);
    specs_.clear();
  }

  int64_t injected(FaultKind kind) const {
    const size_t i = static_cast<size_t>(kind);
    return i < injected_.size() ? injected_[i].load(std::memory_order_relaxed) : 0;
  }

  std::string_view name() const { return base_.name(); }
  int64_t block_bytes() const { return base_.block_bytes(); }

  absl::StatusOr<BlockId> Allocate() {
    const Decision d = Decide(Op::kAllocate, std::nullopt);
    if (d.fault == FaultKind::kNoSpace) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("no space left (injected fault): allocate on tier %s", base_.name()));
    }
    return base_.Allocate();
  }

  absl::Status Free(BlockId block) { return base_.Free(block); }

  void Write(BlockId block, const void* src, TierDone done) {
    const Decision d = Decide(Op::kWrite, block);
    BeginTransfer();
    if (d.fault == FaultKind::kWriteError || d.fault == FaultKind::kNoSpace) {
      absl::Status st =
          d.fault == FaultKind::kWriteError
              ? absl::UnavailableError(
                    absl::StrFormat("injected write error: write of block %d to tier %s", block, base_.name()))
              : absl::ResourceExhaustedError(absl::StrFormat(
                    "no space left (injected fault): write of block %d to tier %s", block, base_.name()));
      injected_write_errors_.fetch_add(1, std::memory_order_relaxed);
      Deliver(d, std::move(done), std::move(st));
      return;
    }
    base_.Write(block, src, [this, d, done = std::move(done)](absl::Status st) mutable {
      Deliver(d, std::move(done), std::move(st));
    });
  }

  void Read(BlockId block, void* dst, TierDone done) {
    const Decision d = Decide(Op::kRead, block);
    BeginTransfer();
    if (d.fault == FaultKind::kReadError) {
      injected_read_errors_.fetch_add(1, std::memory_order_relaxed);
      Deliver(d, std::move(done),
              absl::UnavailableError(
                  absl::StrFormat("injected read error: read of block %d from tier %s", block, base_.name())));
      return;
    }
    if (d.fault == FaultKind::kShortRead) {
      const int64_t bytes = block_bytes_;
      AlignedBuffer bounce = NewAlignedBuffer(bytes);
      char* bounce_data = bounce.get();
      base_.Read(block, bounce_data,
                 [this, d, block, bytes, dst, bounce = std::move(bounce), done = std::move(done)](
                     absl::Status st) mutable {
                   if (st.ok()) {
                     const int64_t got = bytes / 2;
                     std::memcpy(dst, bounce.get(), static_cast<size_t>(got));
                     std::memset(static_cast<char*>(dst) + got, 0, static_cast<size_t>(bytes - got));
                     st = absl::DataLossError(absl::StrFormat(
                         "injected short read: read of block %d from tier %s: expected %d bytes, got %d", block,
                         base_.name(), bytes, got));
                     injected_read_errors_.fetch_add(1, std::memory_order_relaxed);
                   }
                   bounce.reset();
                   Deliver(d, std::move(done), std::move(st));
                 });
      return;
    }
    base_.Read(block, dst, [this, d, dst, done = std::move(done)](absl::Status st) mutable {
      if (st.ok() && d.fault == FaultKind::kBitFlip) {
        static_cast<unsigned char*>(dst)[d.bit / 8] ^= static_cast<unsigned char>(1u << (d.bit % 8));
      }
      Deliver(d, std::move(done), std::move(st));
    });
  }

  void Drain() {
    std::unique_lock<std::mutex> lock(drain_mu_);
    drain_cv_.wait(lock, [this] { return in_flight_ == 0; });
  }

  TierStats Stats() const {
    TierStats s = base_.Stats();
    s.read_errors += injected_read_errors_.load(std::memory_order_relaxed);
    s.write_errors += injected_write_errors_.load(std::memory_order_relaxed);
    // The wrapper's own count, not the base's: a transfer stays in flight
    // through its delay, and one whose base completion is still running is
    // not counted twice.
    std::lock_guard<std::mutex> lock(drain_mu_);
    s.in_flight = in_flight_;
    return s;
  }

 private:
  struct SpecState {
    FaultSpec spec;
    int64_t fired = 0;
  };

  struct Pending {
    TierDone done;
    absl::Status status;
  };

  // Rolls the dice for one operation: the specs that apply to `op`, in the
  // order they were injected; the first non-kSlowIo spec that fires is the
  // fault, the first kSlowIo spec that fires the delay. A spec whose class
  // (fault or delay) has already fired for this operation is skipped without
  // a draw and does not count.
  Decision Decide(Op op, std::optional<BlockId> block) {
    Decision d;
    std::lock_guard<std::mutex> lock(mu_);
    for (SpecState& s : specs_) {
      const FaultKind kind = s.spec.kind;
      if (!Applies(kind, op)) continue;
      const bool slow = kind == FaultKind::kSlowIo;
      if (slow ? d.slow : d.fault.has_value()) continue;
      if (s.spec.max_count >= 0 && s.fired >= s.spec.max_count) continue;
      // A block filter never matches Allocate, whose block is not known yet.
      if (s.spec.block.has_value() && (!block.has_value() || *s.spec.block != *block)) continue;
      // One draw per eligible spec, whatever the probability: u in [0, 1) from
      // the top 53 bits, so p = 0 never fires and p = 1 always does.
      const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
      if (!(u < s.spec.probability)) continue;
      ++s.fired;
      injected_[static_cast<size_t>(kind)].fetch_add(1, std::memory_order_relaxed);
      if (slow) {
        d.slow = true;
        d.delay = std::chrono::duration_cast<Clock::duration>(absl::ToChronoNanoseconds(s.spec.delay));
      } else {
        d.fault = kind;
        if (kind == FaultKind::kBitFlip) {
          const uint64_t bits = static_cast<uint64_t>(block_bytes_) * 8;
          d.bit = bits == 0 ? 0 : rng_() % bits;
        }
      }
    }
    return d;
  }

  void BeginTransfer() {
    std::lock_guard<std::mutex> lock(drain_mu_);
    ++in_flight_;
  }

  // Hands the completion of a transfer to its caller: now, or `delay` from
  // now on the delayer thread.
  void Deliver(const Decision& d, TierDone done, absl::Status st) {
    if (!d.slow) {
      Finish(std::move(done), std::move(st));
      return;
    }
    const Clock::time_point when = Clock::now() + d.delay;
    std::lock_guard<std::mutex> lock(delay_mu_);
    const bool earliest = delayed_.empty() || when < delayed_.begin()->first.first;
    delayed_.emplace(std::make_pair(when, next_seq_++), Pending{std::move(done), std::move(st)});
    if (earliest) delay_cv_.notify_one();
  }

  void Finish(TierDone done, absl::Status st) {
    std::move(done)(std::move(st));
    done = nullptr;  // whatever it captured goes before the transfer counts as done
    std::lock_guard<std::mutex> lock(drain_mu_);
    // Notified under the lock: once it is released, a drained destructor may
    // free this object.
    if (--in_flight_ == 0) drain_cv_.notify_all();
  }

  void DelayerLoop() {
    std::unique_lock<std::mutex> lock(delay_mu_);
    while (true) {
      if (delayed_.empty()) {
        if (stop_) return;
        delay_cv_.wait(lock);
        continue;
      }
      const Clock::time_point when = delayed_.begin()->first.first;
      if (Clock::now() < when) {
        delay_cv_.wait_until(lock, when);
        continue;
      }
      Pending p = std::move(delayed_.begin()->second);
      delayed_.erase(delayed_.begin());
      lock.unlock();
      Finish(std::move(p.done), std::move(p.status));
      lock.lock();
    }
  }

  Tier& base_;
  const int64_t block_bytes_;

  std::mutex mu_;  // the dice and the specs
  std::mt19937_64 rng_;
  std::vector<SpecState> specs_;

  std::array<std::atomic<int64_t>, kNumFaultKinds> injected_{};
  std::atomic<int64_t> injected_read_errors_{0}, injected_write_errors_{0};

  mutable std::mutex drain_mu_;
  std::condition_variable drain_cv_;
  int64_t in_flight_ = 0;  // transfers submitted whose done has not returned; guarded by drain_mu_

  std::mutex delay_mu_;
  std::condition_variable delay_cv_;
  std::map<std::pair<Clock::time_point, uint64_t>, Pending> delayed_;  // guarded by delay_mu_
  uint64_t next_seq_ = 0;                                             // guarded by delay_mu_
  bool stop_ = false;                                                 // guarded by delay_mu_
  std::thread delayer_;
};

FaultInjectingTier::FaultInjectingTier(Tier& base, uint64_t seed) : impl_(std::make_unique<Impl>(base, seed)) {}
FaultInjectingTier::~FaultInjectingTier() = default;

void FaultInjectingTier::Inject(const FaultSpec& spec) { impl_->Inject(spec); }
void FaultInjectingTier::Clear() { impl_->Clear(); }
int64_t FaultInjectingTier::injected(FaultKind kind) const { return impl_->injected(kind); }
std::string_view FaultInjectingTier::name() const { return impl_->name(); }
int64_t FaultInjectingTier::block_bytes() const { return impl_->block_bytes(); }
absl::StatusOr<BlockId> FaultInjectingTier::Allocate() { return impl_->Allocate(); }
absl::Status FaultInjectingTier::Free(BlockId block) { return impl_->Free(block); }
void FaultInjectingTier::Write(BlockId block, const void* src, TierDone done) {
  impl_->Write(block, src, std::move(done));
}
void FaultInjectingTier::Read(BlockId block, void* dst, TierDone done) { impl_->Read(block, dst, std::move(done)); }
void FaultInjectingTier::Drain() { impl_->Drain(); }
TierStats FaultInjectingTier::Stats() const { return impl_->Stats(); }

}  // namespace kvtier
