// kvtier-replay's driver: determinism, accounting, admission and stopping.
#include <atomic>
#include <map>
#include <mutex>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "cuda_emu/emulated_kernel_set.h"
#include "kvtier/backend.h"
#include "replay/driver.h"
#include "replay/trace.h"

namespace kvtier::replay {
namespace {

using ::testing::HasSubstr;

// A small Mooncake-style trace: shared prefix blocks, bursts, one long request.
Trace SmallTrace() {
  const char* text =
      R"({"timestamp": 0, "input_length": 2000, "output_length": 40, "hash_ids": [0, 1, 2, 3]}
{"timestamp": 0, "input_length": 1500, "output_length": 25, "hash_ids": [0, 1, 4]}
{"timestamp": 30, "input_length": 700, "output_length": 60, "hash_ids": [5, 6]}
{"timestamp": 35, "input_length": 2500, "output_length": 12, "hash_ids": [0, 1, 2, 3, 7]}
{"timestamp": 200, "input_length": 300, "output_length": 1, "hash_ids": [8]}
{"timestamp": 210, "input_length": 1200, "output_length": 33, "hash_ids": [9, 10, 11]}
{"timestamp": 211, "input_length": 900, "output_length": 20}
{"timestamp": 400, "input_length": 3000, "output_length": 48, "hash_ids": [0, 1, 2, 3, 12, 13]}
)";
  absl::StatusOr<Trace> t = ParseTrace(text, {});
  EXPECT_TRUE(t.ok()) << t.status();
  return *t;
}

ReplayOptions SmallOptions() {
  ReplayOptions o;
  o.shape = ModelShape{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF16};
  o.model_name = "test";
  o.token_scale = 4;
  o.max_sequences = 3;
  o.device_budget_fraction = 0.2;
  o.prefill_chunk = 128;
  o.seed = 7;
  return o;
}

// The JSON without the wall-clock keys.
std::string Stable(const std::string& json) {
  std::string out;
  for (absl::string_view line : absl::StrSplit(json, '\n')) {
    if (line.find("wall_seconds") != absl::string_view::npos ||
        line.find("token_events_per_second") != absl::string_view::npos)
      continue;
    out.append(line.data(), line.size());
    out += '\n';
  }
  return out;
}

TEST(Replay, SameSeedSameJson) {
  const Trace t = SmallTrace();
  const ReplayOptions o = SmallOptions();
  absl::StatusOr<ReplayResult> a = RunReplay(t, o);
  absl::StatusOr<ReplayResult> b = RunReplay(t, o);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(Stable(ReplayJson(*a, o)), Stable(ReplayJson(*b, o)));
  EXPECT_EQ(RequestsCsv(*a), RequestsCsv(*b));
  ReplayOptions other = o;
  other.seed = 8;
  absl::StatusOr<ReplayResult> c = RunReplay(t, other);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NE(Stable(ReplayJson(*a, o)), Stable(ReplayJson(*c, other)));
}

// With an NVMe tier the runtime demotes and reads blocks on I/O threads; the
// driver lets demotions finish before each layer's attends, so which blocks
// are read from the disk tier does not depend on I/O timing.
TEST(Replay, SameSeedSameJsonWithAnNvmeTier) {
  const Trace t = SmallTrace();
  ReplayOptions o = SmallOptions();
  o.host_bytes = 256 << 10;  // 64 blocks of 4 KiB: most blocks go down to the disk tier
  o.nvme_dir = ::testing::TempDir() + "/kvtier_replay_nvme_determinism";
  o.nvme_bytes = 64 << 20;
  std::filesystem::create_directories(o.nvme_dir);
  std::string first;
  for (int run = 0; run < 3; ++run) {
    absl::StatusOr<ReplayResult> r = RunReplay(t, o);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_GT(r->bytes_nvme_write, 0);
    ASSERT_GT(r->bytes_nvme_read, 0);
    const std::string json = Stable(ReplayJson(*r, o));
    if (run == 0) {
      first = json;
    } else {
      EXPECT_EQ(json, first) << "run " << run;
    }
  }
  std::filesystem::remove_all(o.nvme_dir);
}

TEST(Replay, EveryAdmittedRequestCompletesAndTiersEmpty) {
  const Trace t = SmallTrace();
  ReplayOptions o = SmallOptions();
  o.host_bytes = 1 << 20;  // tight: admission must wait for tier room
  absl::StatusOr<ReplayResult> r = RunReplay(t, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->requests, 8);
  EXPECT_EQ(r->admitted + r->rejected, r->requests);
  EXPECT_EQ(r->completed, r->admitted);
  EXPECT_EQ(r->admitted, 8);
  int64_t prompt = 0, decode = 0;
  for (const RequestResult& q : r->per_request) {
    EXPECT_EQ(q.completed, q.admitted) << q.index;
    if (!q.admitted) continue;
    prompt += q.prompt_tokens;
    decode += q.output_tokens - 1;
    EXPECT_LE(q.arrival_us, q.admit_us);
    EXPECT_LE(q.admit_us, q.first_token_us);
    EXPECT_LE(q.first_token_us, q.finish_us);
  }
  EXPECT_EQ(r->prompt_tokens, prompt);
  EXPECT_EQ(r->decode_tokens, decode);
  // Every block written to the tiers was freed again.
  EXPECT_EQ(r->final_blocks, 0);
  EXPECT_EQ(r->final_host_bytes, 0);
  EXPECT_EQ(r->final_nvme_bytes, 0);
  EXPECT_GT(r->bytes_d2h, 0);
  EXPECT_LE(r->peak_host_bytes, o.host_bytes);
  EXPECT_LE(r->peak_device_bytes, r->budget_bytes);
  EXPECT_LE(r->max_live, o.max_sequences);
}

TEST(Replay, RejectsWhatCanNeverFit) {
  const Trace t = SmallTrace();
  ReplayOptions o = SmallOptions();
  o.max_context = 600;  // scaled by 4: requests over 600 tokens
  absl::StatusOr<ReplayResult> r = RunReplay(t, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->rejected, 2);  // 2500 + 12 and 3000 + 48 tokens / 4
  EXPECT_EQ(r->completed, 6);
  EXPECT_THAT(r->per_request[3].rejected, HasSubstr("> max_context 600"));
}

TEST(Replay, StopGivesPartialResults) {
  const Trace t = SmallTrace();
  const ReplayOptions o = SmallOptions();
  std::atomic<bool> stop{true};
  absl::StatusOr<ReplayResult> r = RunReplay(t, o, &stop);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->interrupted);
  EXPECT_EQ(r->completed, 0);
  EXPECT_THAT(ReplaySummary(*r, o), HasSubstr("INTERRUPTED"));
  EXPECT_THAT(ReplayJson(*r, o), HasSubstr("\"interrupted\": true"));
}

// The emulated CUDA backend (its device memory is host memory), refusing a
// copy whose device side is not memory it allocated: a host pointer handed
// to the runtime as a device tensor fails the run instead of passing
// unnoticed.
class DeviceCheckingBackend final : public Backend {
 public:
  DeviceCheckingBackend() : inner_(MakeEmulatedCudaBackend()) {}
  std::string_view name() const override { return inner_->name(); }
  BackendCaps caps() const override { return inner_->caps(); }
  absl::StatusOr<void*> AllocateDevice(int64_t bytes) override {
    absl::StatusOr<void*> p = inner_->AllocateDevice(bytes);
    if (p.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      device_[static_cast<const char*>(*p)] = bytes;
    }
    return p;
  }
  void FreeDevice(void* ptr) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      device_.erase(static_cast<const char*>(ptr));
    }
    inner_->FreeDevice(ptr);
  }
  absl::StatusOr<void*> AllocateHost(int64_t bytes) override { return inner_->AllocateHost(bytes); }
  void FreeHost(void* ptr) override { inner_->FreeHost(ptr); }
  absl::Status Copy(void* dst, const void* src, int64_t bytes, CopyKind kind, Stream* stream) override {
    if ((kind != CopyKind::kDeviceToHost && !OnDevice(dst, bytes)) ||
        (kind != CopyKind::kHostToDevice && !OnDevice(src, bytes))) {
      return absl::InvalidArgumentError(absl::StrCat("a copy of ", bytes, " bytes whose device side is not device memory"));
    }
    return inner_->Copy(dst, src, bytes, kind, stream);
  }
  absl::Status ZeroDevice(void* ptr, int64_t bytes) override { return inner_->ZeroDevice(ptr, bytes); }
  absl::StatusOr<std::unique_ptr<Stream>> CreateStream() override { return inner_->CreateStream(); }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override { return inner_->CreateEvent(); }
  kernels::KernelSet& kernels() override { return inner_->kernels(); }

 private:
  bool OnDevice(const void* ptr, int64_t bytes) {
    const char* p = static_cast<const char*>(ptr);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = device_.upper_bound(p);  // the first allocation above p
    if (it == device_.begin()) return false;
    --it;
    return p + bytes <= it->first + it->second;
  }
  std::unique_ptr<Backend> inner_;
  std::mutex mu_;
  std::map<const char*, int64_t> device_;  // allocation -> bytes
};

// --content full on a backend whose device memory the host cannot read (the
// CUDA kernels on the CPU emulation of CUDA, every copy's device side
// checked): K/V/Q cross into device buffers before each call, and the
// replay serves, recalls and moves what it does on the CPU backend.
TEST(Replay, RunsOnABackendWithoutHostAccessibleMemory) {
  // Two short requests (150 and 100 prompt tokens): the emulated kernels are slow.
  absl::StatusOr<Trace> t = ParseTrace(R"({"timestamp": 0, "input_length": 1200, "output_length": 24, "hash_ids": [0, 1, 2]}
{"timestamp": 0, "input_length": 800, "output_length": 24, "hash_ids": [0, 3]}
)",
                                       {});
  ASSERT_TRUE(t.ok()) << t.status();
  ReplayOptions o = SmallOptions();
  o.token_scale = 8;
  o.device_budget_fraction = 0.3;
  absl::StatusOr<ReplayResult> cpu = RunReplay(*t, o);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_GT(cpu->recall_requested, 0);  // recall and the tiers take part
  o.make_backend = [] { return std::make_unique<DeviceCheckingBackend>(); };
  absl::StatusOr<ReplayResult> emulated = RunReplay(*t, o);
  ASSERT_TRUE(emulated.ok()) << emulated.status();
  EXPECT_EQ(emulated->backend, "cuda-emulated");
  EXPECT_EQ(emulated->completed, 2);
  EXPECT_EQ(Stable(ReplayJson(*emulated, o)), Stable(ReplayJson(*cpu, o)));
}

TEST(Replay, JsonHasTheStableKeys) {
  const Trace t = SmallTrace();
  const ReplayOptions o = SmallOptions();
  absl::StatusOr<ReplayResult> r = RunReplay(t, o);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string json = ReplayJson(*r, o);
  for (const char* key : {"requests", "admitted", "rejected", "prompt_tokens", "decode_tokens", "peak_device_bytes",
                          "peak_host_bytes", "peak_nvme_bytes", "exact_hit_rate", "sketch_fallback_rate", "late_rate",
                          "bytes_h2d", "bytes_nvme_read", "bytes_nvme_write", "prefix_hit_rate",
                          "step_latency_p50_us", "step_latency_p99_us", "wall_seconds", "token_events_per_second"}) {
    EXPECT_THAT(json, HasSubstr(std::string("\"") + key + "\": ")) << key;
  }
  EXPECT_THAT(json, HasSubstr("\"capture\": \"\",\n"));  // generated content, no capture
  // The decode steps' share of the wall time: some of it, not more.
  EXPECT_THAT(json, HasSubstr("\"decode_token_events_per_second\": "));
  EXPECT_GT(r->decode_tokens, 0);
  EXPECT_GT(r->decode_wall_seconds, 0.0);
  EXPECT_LE(r->decode_wall_seconds, r->wall_seconds);
  const std::string csv = RequestsCsv(*r);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 9);  // header + 8 requests
}

TEST(Replay, SharedPrefixBlocksAreReused) {
  const Trace t = SmallTrace();
  ReplayOptions o = SmallOptions();
  o.time_scale = 0;  // all at once: admission order is trace order
  absl::StatusOr<ReplayResult> none = RunReplay(t, o);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->prefix_hits_host + none->prefix_hits_nvme, 0);
  // Blocks of 512 / 4 = 128 tokens: 128 tokens x 2 layers x 2 KV heads x
  // 256 bytes = 128 KiB. Only full blocks of a prompt are stored and reused.
  o.prefix_host_bytes = 2 * 131072;  // two blocks in host memory
  o.prefix_nvme_bytes = 64 * 131072;
  absl::StatusOr<ReplayResult> r = RunReplay(t, o);
  ASSERT_TRUE(r.ok()) << r.status();
  // Request 0 (500 tokens) stores blocks 0-2. Request 1 (375 tokens) reuses
  // 0, 1; request 3 (625 tokens) reuses 0-2 and stores 3; request 7 reuses 0-3.
  EXPECT_EQ(r->per_request[1].prefix_hits_host + r->per_request[1].prefix_hits_nvme, 2);
  EXPECT_EQ(r->per_request[3].prefix_hits_host + r->per_request[3].prefix_hits_nvme, 3);
  EXPECT_EQ(r->per_request[7].prefix_hits_host + r->per_request[7].prefix_hits_nvme, 4);
  EXPECT_GT(r->prefix_hits_nvme, 0);  // the host part holds two blocks only
  EXPECT_EQ(r->prefix_bytes_loaded, 9 * 131072);
  // The same K/V either way: only the clock and the counters differ.
  EXPECT_EQ(r->served_exact, none->served_exact);
  EXPECT_LT(r->virtual_seconds, none->virtual_seconds);
}

TEST(Replay, BadOptionsAreErrors) {
  const Trace t = SmallTrace();
  ReplayOptions o = SmallOptions();
  o.token_scale = 3;
  EXPECT_THAT(RunReplay(t, o).status().message(), HasSubstr("token_scale 3"));
  o = SmallOptions();
  o.time_scale = -1;
  EXPECT_THAT(RunReplay(t, o).status().message(), HasSubstr("time_scale -1"));
}

}  // namespace
}  // namespace kvtier::replay
