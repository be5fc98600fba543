// The plan-only runtime's bookkeeping path (Options::plan_only, what
// kvtier-replay --content none runs): token-events per second on one core.
// A token-event is one token through one layer: appended in a prefill, or
// appended and attended in a decode step (the replay's count).
// SmolLM2-135M's shape, 10% budget. The second argument: 0 runs every layer
// and KV head; 1 runs the folded head the replay runs (replay::FoldedOptions:
// one head cache stands for all 30 x 3, so one head's work is 30 events).
// Decode's third argument is Options::recall_replace (0 kUnused, 1 kOutranked).
// BM_ReplayExcerpt runs the whole path on a real workload: kvtier-replay
// --content none of the bundled Mooncake excerpt at its real lengths
// (prefill, decode, admission, prefix store, virtual clock), per wall
// second; decode_token_events_per_s is the same for its decode steps alone.
//
//   build/release/tools/bench_plan --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <filesystem>
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "kvtier/runtime.h"
#include "oneapi/tbb/global_control.h"
#include "replay/driver.h"

namespace {

using kvtier::AppendOptions;
using kvtier::Runtime;

// The options' defaults (the replay's), recall on; folded or not.
std::unique_ptr<Runtime> Make(int64_t max_context, bool folded,
                              kvtier::RecallReplace replace = kvtier::Options{}.recall_replace) {
  kvtier::Options o;
  o.recall_replace = replace;
  o.shape = kvtier::ModelShape::SmolLM2_135M();
  o.max_context = max_context;
  o.max_sequences = 1;
  o.device_budget_fraction = 0.10;
  o.plan_only = true;
  if (folded) o = *kvtier::replay::FoldedOptions(o);
  return std::move(*Runtime::Create(o));
}

// Weights like the replay's content model: a few heavy tokens, the rest light.
std::vector<float> Weights(int64_t n, int heads) {
  std::vector<float> w(n * heads);
  for (int64_t i = 0; i < n; ++i) {
    for (int h = 0; h < heads; ++h) w[i * heads + h] = i % 64 == 0 ? 0.25f : (i / 512) % 4 == 0 ? 0.02f : 0.002f;
  }
  return w;
}

// Prefill: a sequence of `context` tokens appended in 512-token chunks to
// every layer, then removed (its blocks freed).
void BM_PlanPrefill(benchmark::State& state) {
  tbb::global_control one_core(tbb::global_control::max_allowed_parallelism, 1);
  const int64_t context = state.range(0);
  auto rt = Make(context, state.range(1) != 0);
  const int L = rt->options().shape.layers, H = rt->options().shape.kv_heads;
  const int64_t events_per_token = kvtier::ModelShape::SmolLM2_135M().layers;
  const std::vector<float> w = Weights(context, H);
  kvtier::SequenceId id = 0;
  for (auto _ : state) {
    (void)rt->AddSequence(++id);
    for (int64_t first = 0; first < context; first += 512) {
      const int64_t c = std::min<int64_t>(512, context - first);
      AppendOptions ao;
      ao.scores = ao.weights = w.data() + first * H;
      for (int l = 0; l < L; ++l) (void)rt->Append(id, l, nullptr, nullptr, c, ao);
    }
    (void)rt->RemoveSequence(id);
  }
  state.SetItemsProcessed(state.iterations() * context * events_per_token);
  state.counters["token_events_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * context * events_per_token), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PlanPrefill)->ArgsProduct({{4096, 32768}, {0, 1}})->Unit(benchmark::kMillisecond);

// Decode: one token appended and attended on every layer of a sequence
// already `context` tokens long (recall on); each step is 30 events.
void BM_PlanDecode(benchmark::State& state) {
  tbb::global_control one_core(tbb::global_control::max_allowed_parallelism, 1);
  const int64_t context = state.range(0);
  const int64_t steps = 4096;
  auto rt = Make(context + steps + 1, state.range(1) != 0, static_cast<kvtier::RecallReplace>(state.range(2)));
  const int L = rt->options().shape.layers, H = rt->options().shape.kv_heads;
  const int64_t events_per_step = kvtier::ModelShape::SmolLM2_135M().layers;
  const std::vector<float> w = Weights(context + steps, H);
  (void)rt->AddSequence(1);
  for (int64_t first = 0; first < context; first += 512) {
    const int64_t c = std::min<int64_t>(512, context - first);
    AppendOptions ao;
    ao.scores = ao.weights = w.data() + first * H;
    for (int l = 0; l < L; ++l) (void)rt->Append(1, l, nullptr, nullptr, c, ao);
  }
  int64_t pos = context, events = 0;
  for (auto _ : state) {
    if (pos == context + steps) {
      state.SkipWithError("more iterations than decode steps prepared");
      break;
    }
    AppendOptions ao;
    ao.weights = w.data() + pos * H;
    for (int l = 0; l < L; ++l) {
      (void)rt->Append(1, l, nullptr, nullptr, 1, ao);
      (void)rt->Attend(1, l, nullptr, nullptr);
    }
    ++pos;
    events += events_per_step;
  }
  state.SetItemsProcessed(events);
  // Tokens recalled per layer, KV head and step (automatic recall).
  state.counters["recalls_per_head_step"] =
      static_cast<double>(rt->Stats().recall.requested) / static_cast<double>(std::max<int64_t>(1, pos - context) * L * H);
  state.counters["token_events_per_s"] = benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PlanDecode)->ArgsProduct({{4096, 16384, 131072}, {0, 1}, {0, 1}})->Iterations(2000)->Unit(benchmark::kMicrosecond);

// The bundled excerpt of the Mooncake trace at its real lengths (token scale
// 1: 300 requests, 4.4M prompt and 0.1M decoded tokens, contexts up to 125k),
// as the replay runs it by default (--content none, heads folded), with the
// tiers of the whole-trace command in docs/results.md. Argument: 0 kUnused,
// 1 kOutranked.
void BM_ReplayExcerpt(benchmark::State& state) {
  tbb::global_control one_core(tbb::global_control::max_allowed_parallelism, 1);
  absl::StatusOr<kvtier::replay::Trace> trace = kvtier::replay::ReadTrace(KVTIER_EXCERPT, {});
  if (!trace.ok()) {
    state.SkipWithError(trace.status().ToString().c_str());
    return;
  }
  kvtier::replay::ReplayOptions o;
  o.shape = kvtier::ModelShape::SmolLM2_135M();
  o.content = kvtier::replay::ContentLevel::kNone;
  const kvtier::Options defaults;  // kvtier-replay's defaults are the runtime's
  o.sketch = defaults.sketch_kind;
  o.proxy = defaults.recall_proxy;
  o.recall_replace = static_cast<kvtier::RecallReplace>(state.range(0));
  o.host_bytes = int64_t{2} << 30;
  o.nvme_dir = std::filesystem::temp_directory_path().string();  // plan-only writes nothing there
  o.nvme_bytes = int64_t{128} << 30;
  o.prefix_host_bytes = int64_t{8} << 30;
  o.prefix_nvme_bytes = int64_t{128} << 30;
  double events = 0, decode_events = 0, decode_seconds = 0;
  for (auto _ : state) {
    absl::StatusOr<kvtier::replay::ReplayResult> r = kvtier::replay::RunReplay(*trace, o);
    if (!r.ok() || r->completed != r->requests) {
      state.SkipWithError(r.ok() ? "not every request completed" : r.status().ToString().c_str());
      return;
    }
    events += static_cast<double>(r->token_events);
    decode_events += static_cast<double>(r->decode_tokens) * o.shape.layers;
    decode_seconds += r->decode_wall_seconds;
  }
  state.SetItemsProcessed(static_cast<int64_t>(events));
  state.counters["token_events_per_s"] = benchmark::Counter(events, benchmark::Counter::kIsRate);
  state.counters["decode_token_events_per_s"] = decode_seconds > 0 ? decode_events / decode_seconds : 0.0;
}
BENCHMARK(BM_ReplayExcerpt)->Arg(0)->Arg(1)->Iterations(2)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
