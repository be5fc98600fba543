// The runtime never touches device memory from the host: a backend whose
// device memory is unreadable (PROT_NONE) except while one of its own calls
// runs, as a GPU's memory is to the host, serves a compressed session with
// recall and host-tier gathers, and gives bit for bit the CPU backend's
// outputs, counters and token reads. A direct host access faults the test.
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kvtier/backend.h"
#include "kvtier/kernels/kernel_set.h"
#include "oneapi/tbb/global_control.h"
#include "cuda_emu/emulated_kernel_set.h"
#include "test_util.h"

namespace kvtier {
namespace {

using testing::RandomNormal;

// Device memory as mappings that are opened (read/write) only for the
// duration of a backend call; calls are serialised so no call sees another's
// mappings closed under it.
class GuardedMemory {
 public:
  ~GuardedMemory() {
    for (auto& [p, n] : regions_) munmap(p, n);
  }
  absl::StatusOr<void*> Allocate(int64_t bytes) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t n = (static_cast<size_t>(std::max<int64_t>(bytes, 1)) + page - 1) / page * page;
    void* p = mmap(nullptr, n, depth_ > 0 ? PROT_READ | PROT_WRITE : PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return absl::ResourceExhaustedError("guarded device memory: mmap failed");
    regions_.emplace_back(p, n);
    return p;
  }
  void Free(void* p) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    for (size_t i = 0; i < regions_.size(); ++i) {
      if (regions_[i].first == p) {
        munmap(p, regions_[i].second);
        regions_.erase(regions_.begin() + static_cast<std::ptrdiff_t>(i));
        return;
      }
    }
  }
  // Runs f with every region readable and writable.
  template <typename F>
  auto Open(F&& f) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (depth_++ == 0) Protect(PROT_READ | PROT_WRITE);
    struct Close {
      GuardedMemory* m;
      ~Close() {
        if (--m->depth_ == 0) m->Protect(PROT_NONE);
      }
    } close{this};
    return f();
  }

 private:
  void Protect(int prot) {
    for (auto& [p, n] : regions_) mprotect(p, n, prot);
  }
  std::recursive_mutex mu_;
  int depth_ = 0;
  std::vector<std::pair<void*, size_t>> regions_;
};

class GuardedKernels final : public kernels::KernelSet {
 public:
  GuardedKernels(GuardedMemory& mem, kernels::KernelSet& inner) : mem_(mem), inner_(inner) {}
  std::string_view name() const override { return "guarded"; }
  void Attend(std::span<const kernels::AttendParams> items) override {
    mem_.Open([&] { inner_.Attend(items); });
  }
  void SketchUpdate(std::span<const kernels::SketchUpdateParams> items) override {
    mem_.Open([&] { inner_.SketchUpdate(items); });
  }
  void SketchEstimate(const kernels::SketchEstimateParams& p) override {
    mem_.Open([&] { inner_.SketchEstimate(p); });
  }
  void SketchScores(std::span<const kernels::SketchScoreParams> items) override {
    mem_.Open([&] { inner_.SketchScores(items); });
  }
  void BoundScores(std::span<const kernels::BoundScoreParams> items) override {
    mem_.Open([&] { inner_.BoundScores(items); });
  }
  void CopyRows(std::span<const kernels::RowCopyParams> items) override {
    mem_.Open([&] { inner_.CopyRows(items); });
  }
  int64_t CountNonFinite(const void* data, int64_t n, DType dtype) override {
    return mem_.Open([&] { return inner_.CountNonFinite(data, n, dtype); });
  }

 private:
  GuardedMemory& mem_;
  kernels::KernelSet& inner_;
};

// The CPU backend with device memory the host cannot read between calls.
class GuardedBackend final : public Backend {
 public:
  GuardedBackend() : cpu_(*CreateBackend(BackendKind::kCpu)), kernels_(mem_, cpu_->kernels()) {}
  std::string_view name() const override { return "guarded"; }
  BackendCaps caps() const override {
    return BackendCaps{.device_memory_host_accessible = false, .async_streams = false, .pinned_host_memory = false};
  }
  absl::StatusOr<void*> AllocateDevice(int64_t bytes) override { return mem_.Allocate(bytes); }
  void FreeDevice(void* ptr) override { mem_.Free(ptr); }
  absl::StatusOr<void*> AllocateHost(int64_t bytes) override { return cpu_->AllocateHost(bytes); }
  void FreeHost(void* ptr) override { cpu_->FreeHost(ptr); }
  absl::Status Copy(void* dst, const void* src, int64_t bytes, CopyKind kind, Stream* stream) override {
    return mem_.Open([&] { return cpu_->Copy(dst, src, bytes, kind, stream); });
  }
  absl::Status ZeroDevice(void* ptr, int64_t bytes) override {
    return mem_.Open([&] { return cpu_->ZeroDevice(ptr, bytes); });
  }
  absl::StatusOr<std::unique_ptr<Stream>> CreateStream() override { return cpu_->CreateStream(); }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override { return cpu_->CreateEvent(); }
  kernels::KernelSet& kernels() override { return kernels_; }

 private:
  GuardedMemory mem_;  // destroyed last among what uses it
  std::unique_ptr<Backend> cpu_;
  GuardedKernels kernels_;
};

Options SessionOptions() {
  Options o;
  o.shape = {.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF16};
  o.max_context = 1200;
  o.max_sequences = 2;
  o.device_budget_fraction = 0.25;
  o.block_tokens = 32;
  o.recall_wait_us = 10'000'000;  // recalls land before the next attend: the runs agree
  return o;
}

struct SessionResult {
  std::vector<std::vector<uint16_t>> outputs;
  std::vector<AttendCounts> counts;
  std::vector<uint16_t> token_reads;
  RuntimeStats stats;
};

// Prefill and decode two sequences; every tensor crosses into the backend's
// device memory with Copy, as a caller with GPU tensors would hold them.
SessionResult RunSession(std::unique_ptr<Backend> owned) {
  Backend& b = *owned;
  const Options o = SessionOptions();
  const int H = o.shape.kv_heads, Q = o.shape.q_heads, d = o.shape.head_dim;
  auto rt = Runtime::Create(o, std::move(owned));
  EXPECT_TRUE(rt.ok()) << rt.status();
  SessionResult r;
  if (!rt.ok()) return r;
  const int64_t kv_bytes = 2LL * 512 * H * d, q_bytes = 2LL * Q * d;
  void *dk = *b.AllocateDevice(kv_bytes), *dv = *b.AllocateDevice(kv_bytes), *dq = *b.AllocateDevice(q_bytes),
       *dout = *b.AllocateDevice(q_bytes);
  auto upload = [&](void* dst, const std::vector<float>& x) {
    std::vector<uint16_t> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = kernels::FloatToHalf(x[i]);
    EXPECT_TRUE(b.Copy(dst, h.data(), static_cast<int64_t>(h.size()) * 2, CopyKind::kHostToDevice).ok());
  };
  uint64_t seed = 7;
  for (SequenceId s : {1, 2}) KVTIER_EXPECT_OK((*rt)->AddSequence(s));
  for (int chunk = 0; chunk < 2; ++chunk) {  // prefill 2 x 400 tokens
    for (SequenceId s : {1, 2}) {
      for (int layer = 0; layer < 2; ++layer) {
        upload(dk, RandomNormal(400 * H * d, ++seed, 1.0f, 0.2f));
        upload(dv, RandomNormal(400 * H * d, ++seed));
        KVTIER_EXPECT_OK((*rt)->Append(s, layer, dk, dv, 400));
      }
    }
  }
  for (int step = 0; step < 12; ++step) {
    for (int layer = 0; layer < 2; ++layer) {
      for (SequenceId s : {1, 2}) {
        upload(dk, RandomNormal(H * d, ++seed, 1.0f, 0.2f));
        upload(dv, RandomNormal(H * d, ++seed));
        KVTIER_EXPECT_OK((*rt)->Append(s, layer, dk, dv, 1));
      }
      for (SequenceId s : {1, 2}) {
        upload(dq, RandomNormal(Q * d, ++seed, 0.5f));
        absl::StatusOr<AttendCounts> c = (*rt)->Attend(s, layer, dq, dout);
        EXPECT_TRUE(c.ok()) << c.status();
        if (c.ok()) r.counts.push_back(*c);
        std::vector<uint16_t> out(Q * d);
        EXPECT_TRUE(b.Copy(out.data(), dout, q_bytes, CopyKind::kDeviceToHost).ok());
        r.outputs.push_back(std::move(out));
      }
    }
  }
  (*rt)->Drain();
  for (int64_t pos : {0, 5, 100, 399, 401, 700, 805, 811}) {  // resident, vague and host-tier tokens
    std::vector<uint16_t> k(d), v(d);
    KVTIER_EXPECT_OK((*rt)->ReadToken(1, 1, 1, pos, k.data(), v.data()));
    r.token_reads.insert(r.token_reads.end(), k.begin(), k.end());
    r.token_reads.insert(r.token_reads.end(), v.begin(), v.end());
  }
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
  r.stats = (*rt)->Stats();
  for (void* p : {dk, dv, dq, dout}) b.FreeDevice(p);
  return r;
}

TEST(DeviceMemory, RuntimeReachesDeviceMemoryOnlyThroughTheBackend) {
  // One thread: calls are serialised anyway, and no work stolen by a waiting
  // thread can run while another call holds the mappings open.
  tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
  SessionResult cpu = RunSession(*CreateBackend(BackendKind::kCpu));
  SessionResult g = RunSession(std::make_unique<GuardedBackend>());

  ASSERT_EQ(g.outputs.size(), cpu.outputs.size());
  ASSERT_EQ(g.outputs.size(), 12u * 2 * 2);
  for (size_t i = 0; i < g.outputs.size(); ++i) EXPECT_EQ(g.outputs[i], cpu.outputs[i]) << "attend " << i;
  ASSERT_EQ(g.counts.size(), cpu.counts.size());
  int64_t from_sketch = 0;
  for (size_t i = 0; i < g.counts.size(); ++i) {
    EXPECT_EQ(g.counts[i].exact, cpu.counts[i].exact) << i;
    EXPECT_EQ(g.counts[i].from_sketch, cpu.counts[i].from_sketch) << i;
    from_sketch += g.counts[i].from_sketch;
  }
  EXPECT_GT(from_sketch, 0) << "the session must be compressed for the check to mean anything";
  EXPECT_EQ(g.token_reads, cpu.token_reads);
  EXPECT_GT(g.stats.recall.exact_hits, 0) << "recalls must have been gathered into device slots";
  EXPECT_EQ(g.stats.recall.exact_hits, cpu.stats.recall.exact_hits);
  EXPECT_EQ(g.stats.recall.requested, cpu.stats.recall.requested);
}

// The same session on the CUDA kernel set (on the CPU emulation of CUDA,
// tests/cuda_emu), heavy-hitter choice and recall included: the outputs match
// the CPU backend's up to the kernels' rounding.
TEST(DeviceMemory, SessionOnTheEmulatedCudaKernelsMatchesTheCpu) {
  SessionResult cpu = RunSession(*CreateBackend(BackendKind::kCpu));
  SessionResult emu = RunSession(MakeEmulatedCudaBackend());
  ASSERT_EQ(emu.outputs.size(), cpu.outputs.size());
  ASSERT_EQ(emu.counts.size(), cpu.counts.size());
  // Per element: the kernel conformance bound, 2e-5 of the value scale
  // (values are N(0, 1): |v| < 5 here, so 1e-4), plus one fp16 unit of the
  // output (2^-10 relative) for two roundings that land a unit apart. The
  // sketch state and the heavy-hitter scores accumulate in another order, so
  // near-ties could pick other tokens; the counts below show they did not.
  int differ = 0;
  for (size_t i = 0; i < emu.outputs.size(); ++i) {
    for (size_t j = 0; j < emu.outputs[i].size(); ++j) {
      const double a = kernels::HalfToFloat(emu.outputs[i][j]), b = kernels::HalfToFloat(cpu.outputs[i][j]);
      EXPECT_LE(std::abs(a - b), 1e-4 + 0x1p-10 * std::abs(b)) << "attend " << i << " element " << j;
      differ += emu.outputs[i][j] != cpu.outputs[i][j];
    }
  }
  EXPECT_LT(differ, static_cast<int>(emu.outputs.size() * emu.outputs[0].size() / 20));
  for (size_t i = 0; i < emu.counts.size(); ++i) {
    EXPECT_EQ(emu.counts[i].exact, cpu.counts[i].exact) << i;
    EXPECT_EQ(emu.counts[i].from_sketch, cpu.counts[i].from_sketch) << i;
  }
  EXPECT_EQ(emu.token_reads, cpu.token_reads);
  EXPECT_EQ(emu.stats.recall.exact_hits, cpu.stats.recall.exact_hits);
}

// The guard itself: device memory is readable through Copy and faults when
// the host reads it directly.
TEST(DeviceMemoryDeathTest, GuardedMemoryFaultsOnDirectHostReads) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  GuardedBackend b;
  auto* p = static_cast<volatile uint32_t*>(*b.AllocateDevice(64));
  const uint32_t x = 0x12345678u;
  uint32_t y = 0;
  KVTIER_ASSERT_OK(b.Copy(const_cast<uint32_t*>(p), &x, 4, CopyKind::kHostToDevice, nullptr));
  KVTIER_ASSERT_OK(b.Copy(&y, const_cast<uint32_t*>(p), 4, CopyKind::kDeviceToHost, nullptr));
  EXPECT_EQ(y, x);
  EXPECT_DEATH({ y = *p; }, "");
  b.FreeDevice(const_cast<uint32_t*>(p));
}

}  // namespace
}  // namespace kvtier
