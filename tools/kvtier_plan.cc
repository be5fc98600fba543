// kvtier-plan: how many sequences fit at each context length with kvtier's
// tiers and with the whole cache on the GPU, the tier traffic of a decode
// step and the binding limit. See docs/replay.md, "kvtier-plan".
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli.h"
#include "replay/plan.h"
#include "replay/profile.h"
#include "replay/trace.h"

ABSL_FLAG(std::string, model, "llama-3.1-8b", "model preset: smollm2-135m | llama-3.1-8b | qwen2.5-7b | llama-3.1-70b");
ABSL_FLAG(std::string, shape, "", "shape file (layers, q_heads, kv_heads, head_dim, dtype as key = value); overrides --model");
ABSL_FLAG(std::string, profile, "", "hardware profile file (key = value): capacities and bandwidths");
ABSL_FLAG(std::string, device_kv_bytes, "", "GPU memory for the KV cache (overrides the profile), e.g. 40GB");
ABSL_FLAG(std::string, host_bytes, "", "host-tier bytes (overrides the profile; 0: no cap)");
ABSL_FLAG(std::string, nvme_bytes, "", "NVMe-tier bytes (overrides the profile; 0: none)");
ABSL_FLAG(std::string, device_budget, "10%", "budget policy: each sequence's device bytes as a percentage of its full cache");
ABSL_FLAG(std::string, contexts, "1024,4096,16384,65536,131072", "context lengths (prompt + output tokens), comma-separated");
ABSL_FLAG(std::string, trace, "", "plan the p50/p90/p99/longest context of this trace instead (Mooncake JSONL or CSV)");
ABSL_FLAG(int, token_scale, 1, "divide the trace's lengths by this (as kvtier-replay --token-scale)");
ABSL_FLAG(std::string, sketch, std::string(kvtier::SketchKindName(kvtier::Options{}.sketch_kind)),
          "sketch: count-sketch | centroid | none (default: the library's)");
ABSL_FLAG(std::string, proxy, std::string(kvtier::RecallProxyName(kvtier::Options{}.recall_proxy)),
          "recall ranking: sketch | block-bounds | none (default: the library's)");
ABSL_FLAG(std::string, recall_replace, std::string(kvtier::RecallReplaceName(kvtier::Options{}.recall_replace)),
          "installed tokens automatic recall may replace: unused | outranked (default: the library's)");
ABSL_FLAG(int, block_size, 0, "tokens per host-tier block (0: the runtime's default)");
ABSL_FLAG(int, max_seqs, 0, "sequence-slot cap (0: none)");
ABSL_FLAG(int64_t, decode_tokens, 0,
          "output tokens of the one-sequence replay that measures recall traffic (0: the trace's median output, "
          "else 128)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the content model of that replay");
ABSL_FLAG(std::string, json, "", "write the plan as JSON to this file");
ABSL_FLAG(std::string, svg, "", "write a plot of sequences vs context length (SVG) to this file");

namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "kvtier-plan: %s\n", what.c_str());
  return 2;
}

int Run() {
  using namespace kvtier;
  using namespace kvtier::replay;
  PlanOptions o;
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
  for (auto [flag, name, out] : {std::tuple{&FLAGS_device_kv_bytes, "--device-kv-bytes", &o.profile.device_kv_bytes},
                                 {&FLAGS_host_bytes, "--host-bytes", &o.profile.host_bytes},
                                 {&FLAGS_nvme_bytes, "--nvme-bytes", &o.profile.nvme_bytes}}) {
    if (absl::GetFlag(*flag).empty()) continue;
    absl::StatusOr<int64_t> b = ParseBytes(absl::GetFlag(*flag));
    if (!b.ok()) return Fail(std::string(name) + ": " + std::string(b.status().message()));
    *out = static_cast<double>(*b);
  }
  const std::string budget = absl::GetFlag(FLAGS_device_budget);
  double pct;
  if (!absl::EndsWith(budget, "%") || !absl::SimpleAtod(budget.substr(0, budget.size() - 1), &pct) || !(pct > 0) ||
      pct > 100)
    return Fail("--device-budget " + budget + ": expected a percentage in (0, 100], e.g. 10%");
  o.device_budget_fraction = pct / 100.0;
  const std::string sketch = absl::GetFlag(FLAGS_sketch), proxy = absl::GetFlag(FLAGS_proxy);
  if (!cli::ParseName(sketch, SketchKindName, 3, o.sketch))
    return Fail("--sketch must be count-sketch, centroid or none, got " + sketch);
  if (!cli::ParseName(proxy, RecallProxyName, 3, o.proxy))
    return Fail("--proxy must be sketch, block-bounds or none, got " + proxy);
  if (!cli::ParseName(absl::GetFlag(FLAGS_recall_replace), RecallReplaceName, 2, o.recall_replace))
    return Fail("--recall-replace must be unused or outranked, got " + absl::GetFlag(FLAGS_recall_replace));
  o.block_tokens = absl::GetFlag(FLAGS_block_size);
  o.max_sequences = absl::GetFlag(FLAGS_max_seqs);

  if (!absl::GetFlag(FLAGS_trace).empty()) {
    const int scale = absl::GetFlag(FLAGS_token_scale);
    if (scale < 1) return Fail("--token-scale must be >= 1, got " + std::to_string(scale));
    absl::StatusOr<Trace> trace = ReadTrace(absl::GetFlag(FLAGS_trace), {});
    if (!trace.ok()) return Fail(std::string(trace.status().message()));
    if (trace->requests.empty()) return Fail("the trace holds no requests");
    o.contexts = TraceContexts(*trace, scale);
    o.decode_tokens = std::max<int64_t>(1, TraceDecodeTokens(*trace, scale));
  } else {
    for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_contexts), ',', absl::SkipWhitespace())) {
      int64_t c;
      if (!absl::SimpleAtoi(part, &c) || c < 1)
        return Fail("--contexts: \"" + std::string(part) + "\" is not a token count >= 1");
      o.contexts.push_back(c);
    }
  }
  if (absl::GetFlag(FLAGS_decode_tokens) < 0)
    return Fail("--decode-tokens must be >= 0, got " + std::to_string(absl::GetFlag(FLAGS_decode_tokens)));
  if (absl::GetFlag(FLAGS_decode_tokens) > 0) o.decode_tokens = absl::GetFlag(FLAGS_decode_tokens);
  o.seed = absl::GetFlag(FLAGS_seed);
  absl::StatusOr<PlanResult> r = RunPlan(o);
  if (!r.ok()) return Fail(std::string(r.status().message()));
  std::printf("%s", PlanTable(*r, o).c_str());
  if (!absl::GetFlag(FLAGS_json).empty() && !cli::WriteFile(absl::GetFlag(FLAGS_json), PlanJson(*r, o)))
    return Fail("cannot write " + absl::GetFlag(FLAGS_json));
  if (!absl::GetFlag(FLAGS_svg).empty() && !cli::WriteFile(absl::GetFlag(FLAGS_svg), PlanSvg(*r, o)))
    return Fail("cannot write " + absl::GetFlag(FLAGS_svg));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // --dashed-flags as --underscored_flags, as kvtier-replay.
  kvtier::cli::AcceptDashedFlags(argc, argv);
  absl::SetProgramUsageMessage(
      "plans KV-cache capacity: sequences that fit per context length with kvtier's tiers and all on the GPU.\n"
      "Usage: kvtier-plan [--model NAME | --shape FILE] [--profile FILE] [--device-kv-bytes N] [--host-bytes N]\n"
      "         [--nvme-bytes N] [--device-budget 10%] [--contexts 4096,32768 | --trace FILE]\n"
      "         [--json FILE] [--svg FILE] ...\n"
      "Flags accept dashes or underscores. See docs/replay.md.");
  kvtier::cli::ListOwnFlagsInHelp();
  absl::ParseCommandLine(argc, argv);
  return Run();
}
