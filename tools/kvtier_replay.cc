// kvtier-replay: replays a serving trace (Mooncake JSONL or CSV) through the
// real kvtier runtime on a virtual clock and reports memory, tier traffic
// and latency. See docs/replay.md.
#include <atomic>
#include <csignal>
#include <cstdio>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <unistd.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "cli.h"
#include "replay/calibrate.h"
#include "replay/driver.h"
#include "replay/profile.h"
#include "replay/trace.h"

ABSL_FLAG(std::string, trace, "", "trace file: Mooncake JSONL (.jsonl) or CSV arrival_ms,prompt_tokens,output_tokens");
ABSL_FLAG(std::string, format, "auto", "trace format: auto | mooncake | csv");
ABSL_FLAG(bool, lenient, false, "skip malformed trace lines (and count them) instead of stopping at the first");
ABSL_FLAG(std::string, model, "smollm2-135m",
          "model preset: smollm2-135m | llama-3.1-8b | qwen2.5-7b | llama-3.1-70b");
ABSL_FLAG(std::string, shape, "", "shape file (layers, q_heads, kv_heads, head_dim, dtype as key = value); overrides --model");
ABSL_FLAG(std::string, content, "full", "full: kernels on generated K/V/Q | none: plan side only");
ABSL_FLAG(std::string, backend, "auto",
          "--content full: auto (CUDA when a device is present, else CPU) | cpu | cuda; --content none uses the CPU");
ABSL_FLAG(bool, fold_heads, true,
          "--content none: one head cache stands for every layer and KV head (same results, layers x KV heads "
          "less work); --nofold_heads runs them all");
ABSL_FLAG(std::string, capture, "",
          "--content full: replay this captured Q/K/V directory (docs/capture.md) instead of generated content");
ABSL_FLAG(std::string, device_budget, "10%", "device budget: bytes (e.g. 2GiB) or a percentage of the full cache");
ABSL_FLAG(std::string, host_bytes, "0", "host-tier cap in bytes (0: none)");
ABSL_FLAG(std::string, nvme_dir, "", "directory of the NVMe tier's file (needs --host-bytes)");
ABSL_FLAG(std::string, nvme_bytes, "0", "NVMe-tier cap in bytes");
ABSL_FLAG(std::string, prefix_host_bytes, "0", "prefix store in host memory: K/V of prompt blocks by hash id (0: none)");
ABSL_FLAG(std::string, prefix_nvme_bytes, "0", "prefix store on NVMe, below the host part (0: none)");
ABSL_FLAG(int, block_size, 0, "tokens per host-tier block (0: the runtime's default)");
ABSL_FLAG(std::string, policy, "shrink", "vague-token policy: shrink | estimate | drop");
ABSL_FLAG(std::string, sketch, std::string(kvtier::SketchKindName(kvtier::Options{}.sketch_kind)),
          "sketch: count-sketch | centroid | none (default: the library's)");
ABSL_FLAG(std::string, proxy, std::string(kvtier::RecallProxyName(kvtier::Options{}.recall_proxy)),
          "recall ranking: sketch | block-bounds | none (default: the library's)");
ABSL_FLAG(std::string, recall_replace, std::string(kvtier::RecallReplaceName(kvtier::Options{}.recall_replace)),
          "installed tokens automatic recall may replace: unused | outranked (default: the library's)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the content model and the runtime's hashes");
ABSL_FLAG(int64_t, max_requests, 0, "replay only the first N requests (0: all)");
ABSL_FLAG(double, time_scale, 1.0, "virtual arrival = trace timestamp x this (0: every request arrives at once)");
ABSL_FLAG(int, token_scale, 1, "divide prompt and output lengths and the 512-token block by this (power of two)");
ABSL_FLAG(int, max_seqs, 8, "sequences the runtime holds at once");
ABSL_FLAG(int64_t, max_context, 0, "longest context (0: the longest scaled request of the trace)");
ABSL_FLAG(int, prefill_chunk, 512, "prompt tokens per Append call");
ABSL_FLAG(std::string, profile, "", "hardware profile file (key = value) overriding the virtual clock's defaults");
ABSL_FLAG(std::string, json, "", "write the results as JSON to this file");
ABSL_FLAG(std::string, csv, "", "write one CSV line per request to this file");
ABSL_FLAG(bool, progress, true, "print a progress line to stderr every 2 s on long runs");
ABSL_FLAG(bool, print_profile, false, "print the hardware profile in effect and exit");
ABSL_FLAG(bool, calibrate, false,
          "measure this machine's memcpy and the disk under --nvme-dir and print the profile (key = value); "
          "with --trace, to stderr, and replay with it");
ABSL_FLAG(double, calibrate_seconds, 3.0, "rough time --calibrate takes");
ABSL_FLAG(std::string, calibrate_bytes, "64MiB", "size of --calibrate's disk test file");

namespace {

std::atomic<bool> g_stop{false};

void OnSigint(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "kvtier-replay: %s\n", what.c_str());
  return 2;
}

int Run() {
  using namespace kvtier;
  using namespace kvtier::replay;
  ReplayOptions o;
  if (absl::StatusOr<ModelShape> s = LoadShape(absl::GetFlag(FLAGS_shape), absl::GetFlag(FLAGS_model), &o.model_name);
      s.ok()) {
    o.shape = *s;
  } else {
    return Fail(std::string(s.status().message()));
  }
  if (!absl::GetFlag(FLAGS_profile).empty()) {
    absl::StatusOr<HardwareProfile> p = LoadProfile(absl::GetFlag(FLAGS_profile));
    if (!p.ok()) return Fail(std::string(p.status().message()));
    o.profile = *p;
  }
  if (absl::GetFlag(FLAGS_calibrate)) {
    CalibrateOptions co;
    co.nvme_dir = absl::GetFlag(FLAGS_nvme_dir);
    co.seconds = absl::GetFlag(FLAGS_calibrate_seconds);
    absl::StatusOr<int64_t> disk = ParseBytes(absl::GetFlag(FLAGS_calibrate_bytes));
    if (!disk.ok()) return Fail("--calibrate-bytes: " + std::string(disk.status().message()));
    co.disk_bytes = *disk;
    // The runtime's host-tier block (PlanBudget): --block-size tokens, or the
    // smallest count >= 16 whose block is a multiple of 4 KiB.
    const int64_t tok = o.shape.HeadTokenBytes();
    int64_t tokens = absl::GetFlag(FLAGS_block_size);
    if (tokens <= 0) {
      const int64_t unit = 4096 / std::gcd<int64_t>(tok, 4096);
      tokens = (16 + unit - 1) / unit * unit;
    }
    co.block_bytes = tokens * tok;
    absl::StatusOr<Calibration> c = Calibrate(co, o.profile);
    if (!c.ok()) return Fail(std::string(c.status().message()));
    const std::string text = CalibrationToString(*c);
    o.profile = c->profile;
    if (absl::GetFlag(FLAGS_trace).empty() || absl::GetFlag(FLAGS_print_profile)) {
      std::printf("%s", text.c_str());
      return 0;
    }
    std::fprintf(stderr, "%s", text.c_str());
  }
  if (absl::GetFlag(FLAGS_print_profile)) {
    std::printf("%s", ProfileToString(o.profile).c_str());
    return 0;
  }
  if (!cli::ParseName<ContentLevel>(absl::GetFlag(FLAGS_content), {{"full", ContentLevel::kFull}, {"none", ContentLevel::kNone}},
                               o.content))
    return Fail("--content must be full or none, got " + absl::GetFlag(FLAGS_content));
  o.fold_heads = absl::GetFlag(FLAGS_fold_heads);
  if (!absl::GetFlag(FLAGS_capture).empty()) {
    if (o.content != ContentLevel::kFull) return Fail("--capture needs --content full");
    absl::StatusOr<Capture> c = Capture::Load(absl::GetFlag(FLAGS_capture), o.shape);
    if (!c.ok()) return Fail("--capture: " + std::string(c.status().message()));
    o.capture = std::make_shared<const Capture>(*std::move(c));
  }
  if (!cli::ParseName(absl::GetFlag(FLAGS_backend), BackendKindName, 3, o.backend))
    return Fail("--backend must be auto, cpu or cuda, got " + absl::GetFlag(FLAGS_backend));
  if (!cli::ParseName(absl::GetFlag(FLAGS_policy), VaguePolicyName, 3, o.policy))
    return Fail("--policy must be shrink, estimate or drop, got " + absl::GetFlag(FLAGS_policy));
  if (!cli::ParseName(absl::GetFlag(FLAGS_sketch), SketchKindName, 3, o.sketch))
    return Fail("--sketch must be count-sketch, centroid or none, got " + absl::GetFlag(FLAGS_sketch));
  if (!cli::ParseName(absl::GetFlag(FLAGS_proxy), RecallProxyName, 3, o.proxy))
    return Fail("--proxy must be sketch, block-bounds or none, got " + absl::GetFlag(FLAGS_proxy));
  if (!cli::ParseName(absl::GetFlag(FLAGS_recall_replace), RecallReplaceName, 2, o.recall_replace))
    return Fail("--recall-replace must be unused or outranked, got " + absl::GetFlag(FLAGS_recall_replace));
  const std::string budget = absl::GetFlag(FLAGS_device_budget);
  if (absl::EndsWith(budget, "%")) {
    double pct;
    if (!absl::SimpleAtod(budget.substr(0, budget.size() - 1), &pct) || !(pct > 0) || pct > 100)
      return Fail("--device-budget " + budget + ": a percentage must be in (0, 100]");
    o.device_budget_fraction = pct / 100.0;
  } else {
    absl::StatusOr<int64_t> b = ParseBytes(budget);
    if (!b.ok() || *b <= 0) return Fail("--device-budget " + budget + ": expected bytes > 0 or a percentage");
    o.device_budget_bytes = *b;
  }
  for (auto [flag, name, out] : {std::tuple{&FLAGS_host_bytes, "--host-bytes", &o.host_bytes},
                                 {&FLAGS_nvme_bytes, "--nvme-bytes", &o.nvme_bytes},
                                 {&FLAGS_prefix_host_bytes, "--prefix-host-bytes", &o.prefix_host_bytes},
                                 {&FLAGS_prefix_nvme_bytes, "--prefix-nvme-bytes", &o.prefix_nvme_bytes}}) {
    absl::StatusOr<int64_t> b = ParseBytes(absl::GetFlag(*flag));
    if (!b.ok()) return Fail(std::string(name) + ": " + std::string(b.status().message()));
    *out = *b;
  }
  o.nvme_dir = absl::GetFlag(FLAGS_nvme_dir);
  o.block_tokens = absl::GetFlag(FLAGS_block_size);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.max_requests = absl::GetFlag(FLAGS_max_requests);
  o.time_scale = absl::GetFlag(FLAGS_time_scale);
  o.token_scale = absl::GetFlag(FLAGS_token_scale);
  o.max_sequences = absl::GetFlag(FLAGS_max_seqs);
  o.max_context = absl::GetFlag(FLAGS_max_context);
  o.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);

  if (absl::GetFlag(FLAGS_trace).empty()) return Fail("--trace FILE is required (see --help)");
  TraceOptions to;
  to.lenient = absl::GetFlag(FLAGS_lenient);
  if (!cli::ParseName<TraceFormat>(absl::GetFlag(FLAGS_format),
                              {{"auto", TraceFormat::kAuto}, {"mooncake", TraceFormat::kMooncake},
                               {"csv", TraceFormat::kCsv}},
                              to.format))
    return Fail("--format must be auto, mooncake or csv, got " + absl::GetFlag(FLAGS_format));
  absl::StatusOr<Trace> trace = ReadTrace(absl::GetFlag(FLAGS_trace), to);
  if (!trace.ok()) return Fail(std::string(trace.status().message()));
  if (trace->skipped > 0) {
    std::fprintf(stderr, "kvtier-replay: skipped %lld malformed lines (first: %s)\n",
                 static_cast<long long>(trace->skipped), trace->first_skip.c_str());
  }
  if (trace->requests.empty()) return Fail("the trace holds no requests");

  std::signal(SIGINT, OnSigint);
  const bool show = absl::GetFlag(FLAGS_progress);
  auto progress = [&](const Progress& p) {
    std::fprintf(stderr, "replay: %lld/%lld requests done, %lld live, %lld queued, virtual %.1f s, wall %.1f s\n",
                 static_cast<long long>(p.done), static_cast<long long>(p.total), static_cast<long long>(p.live),
                 static_cast<long long>(p.queued), p.virtual_seconds, p.wall_seconds);
  };
  absl::StatusOr<ReplayResult> r = RunReplay(*trace, o, &g_stop, show ? std::function<void(const Progress&)>(progress) : nullptr);
  if (!r.ok()) {
    std::fprintf(stderr, "kvtier-replay: %s\n", r.status().ToString().c_str());
    return 1;
  }
  std::printf("%s", ReplaySummary(*r, o).c_str());
  if (trace->skipped > 0) std::printf("trace: %lld malformed lines skipped\n", static_cast<long long>(trace->skipped));
  if (!absl::GetFlag(FLAGS_json).empty() && !cli::WriteFile(absl::GetFlag(FLAGS_json), ReplayJson(*r, o)))
    return Fail("cannot write " + absl::GetFlag(FLAGS_json));
  if (!absl::GetFlag(FLAGS_csv).empty() && !cli::WriteFile(absl::GetFlag(FLAGS_csv), RequestsCsv(*r)))
    return Fail("cannot write " + absl::GetFlag(FLAGS_csv));
  return r->interrupted ? 130 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  // vLLM-style --dashed-flags: the same flags as --underscored_flags.
  kvtier::cli::AcceptDashedFlags(argc, argv);
  absl::SetProgramUsageMessage(
      "replays a serving trace through the kvtier runtime on a virtual clock.\n"
      "Usage: kvtier-replay --trace FILE [--model NAME | --shape FILE] [--device-budget 10%|BYTES]\n"
      "         [--host-bytes N] [--nvme-dir DIR --nvme-bytes N] [--content full|none] [--capture DIR] [--token-scale N]\n"
      "         [--max-requests N] [--time-scale X] [--max-seqs N] [--json FILE] [--csv FILE] ...\n"
      "       kvtier-replay --calibrate [--nvme-dir DIR] [--model NAME] > my.profile\n"
      "Flags accept dashes or underscores (--device-budget = --device_budget). See docs/replay.md.");
  kvtier::cli::ListOwnFlagsInHelp();
  absl::ParseCommandLine(argc, argv);
  return Run();
}
