// kvtier-plan's capacity model: how many sequences fit at each context
// length with kvtier's tiers and with the whole cache on the GPU, the tier
// traffic of a decode step, and which limit binds. Device bytes come from the
// runtime's own PlanBudget; admission follows the replay driver's rules
// (sequence slots, the device budget split per sequence, host + NVMe room),
// so kvtier-replay on the same workload admits what this predicts
// (tests/plan_test.cc). See docs/replay.md, "kvtier-plan".
#ifndef KVTIER_TOOLS_REPLAY_PLAN_H_
#define KVTIER_TOOLS_REPLAY_PLAN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvtier/budget.h"
#include "kvtier/options.h"
#include "replay/profile.h"
#include "replay/trace.h"

namespace kvtier::replay {

struct PlanOptions {
  ModelShape shape;                    // required
  std::string model_name;              // for the report
  // Capacities (device_kv_bytes, host_bytes, nvme_bytes; host_bytes 0 = no
  // cap, as in kvtier-replay) and the bandwidths of a decode step.
  HardwareProfile profile;
  // Budget policy: each sequence's device bytes are this fraction of its full
  // cache at the context length (kvtier-replay --device-budget PCT).
  double device_budget_fraction = 0.10;
  SketchKind sketch = SketchKind::kCountSketch;
  VaguePolicy policy = VaguePolicy::kShrink;
  RecallProxy proxy = RecallProxy::kSketch;
  RecallReplace recall_replace = RecallReplace::kUnused;
  int block_tokens = 0;                // host-tier block tokens (0: the runtime's default)
  int max_sequences = 0;               // sequence-slot cap (0: none; the runtime's limit is 65536)
  std::vector<int64_t> contexts;       // tokens (prompt + output) of a sequence, one row each
  // Output tokens of the sequence whose replay measures the recall traffic
  // (RecallSample); at most context - 1 of a row are decoded.
  int64_t decode_tokens = 128;
  uint64_t seed = 1;                   // of the content model that replay uses
};

// -1 in a limit: nothing bounds it.
struct PlanRow {
  int64_t context = 0;
  int64_t sequences = 0;               // kvtier: min(device, tier, slot limits)
  int64_t baseline_sequences = 0;      // the whole cache on the GPU
  int64_t device_limit = 0, tier_limit = -1, slot_limit = -1;
  // Sequences at which a decode step's recall transfer outlasts its compute
  // (recalls arrive late beyond it); -1: never.
  int64_t bandwidth_limit = -1;
  std::string binding;                 // device | tiers | slots | bandwidth (h2d) | bandwidth (nvme) | none
  int64_t device_bytes_per_sequence = 0;    // PlanBudget per_sequence_bytes
  int64_t baseline_bytes_per_sequence = 0;  // the uncompressed plan's
  int64_t tier_bytes_per_sequence = 0;      // host-tier block copies at the full context
  int64_t device_bytes = 0;            // plan total at `sequences` (shared bytes included)
  int64_t host_bytes = 0, nvme_bytes = 0;   // tier bytes at `sequences`, all at the full context
  // Per decode step with `sequences` live at the full context.
  int64_t h2d_bytes_per_step = 0;       // recalls: `sequences` x the recall sample's bytes per step
  double recall_tokens_per_head_step = 0;  // the recall sample's tokens per layer, KV head and step
  double recall_step_share = 0;        // the recall sample's share of steps with a recall
  int64_t d2h_bytes_per_step = 0;       // tokens leaving the device
  int64_t nvme_write_bytes_per_step = 0;  // demotions once the host tier is full
  int64_t nvme_read_bytes_per_step_max = 0;  // recalls from NVMe blocks, none of them hot (an upper bound)
  double compute_us = 0, transfer_us = 0;
  BudgetPlan plan;                     // the per-sequence plan at this context
};

struct PlanResult {
  std::vector<PlanRow> rows;
};

// InvalidArgument for an invalid shape, fraction, empty or out-of-range
// context list, or a budget policy PlanBudget cannot satisfy (its message).
absl::StatusOr<PlanResult> RunPlan(const PlanOptions& options);

// Context lengths of a trace (prompt + output, divided by token_scale and
// rounded up): the p50, p90, p99 and longest, distinct and ascending.
std::vector<int64_t> TraceContexts(const Trace& trace, int token_scale);
// The median output tokens of a trace's requests (divided by token_scale and
// rounded up); 0 for an empty trace.
int64_t TraceDecodeTokens(const Trace& trace, int token_scale);

// The recall traffic of one sequence at `context` tokens, from a
// kvtier-replay (--content none, folded) of one request of
// context - decode prompt and decode output tokens, decode =
// min(decode_tokens, context - 1). No closed form gives it: a recall happens
// when a vague token outranks an installed one, which depends on how the
// attention is spread (the replay's content model).
struct RecallRate {
  double h2d_bytes_per_step = 0;  // host->device bytes per decode step, all layers and KV heads
  double recall_step_share = 0;   // share of decode steps that recalled anything
};
absl::StatusOr<RecallRate> RecallSample(const PlanOptions& options, int64_t context);

std::string PlanTable(const PlanResult& r, const PlanOptions& o);
std::string PlanJson(const PlanResult& r, const PlanOptions& o);  // stable keys
std::string PlanSvg(const PlanResult& r, const PlanOptions& o);   // sequences vs context, log axes

}  // namespace kvtier::replay

#endif  // KVTIER_TOOLS_REPLAY_PLAN_H_
