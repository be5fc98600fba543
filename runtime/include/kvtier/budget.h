// kvtier/budget.h — the budget planner: from one device budget, the model
// shape and the maximum context, derive the sink, recent, candidate, staging
// and sketch sizes of every (sequence, layer, KV head).
//
// Plan first: PlanBudget is a pure function, testable without a device. The
// device bytes the runtime reserves are exactly the plan's, so they never
// exceed the budget. Kernel scratch (per CPU thread: group x (resident slots
// + 4 x buckets) floats; on a GPU on-chip memory) is not part of the budget.
#ifndef KVTIER_BUDGET_H_
#define KVTIER_BUDGET_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "kvtier/options.h"
#include "kvtier/stats.h"

namespace kvtier {

struct BudgetPlan {
  // Sizes per (sequence, layer, KV head).
  int sink_tokens = 0;
  int recent_tokens = 0;
  int candidate_tokens = 0;
  int staging_tokens = 0;
  SketchKind sketch_kind = SketchKind::kNone;
  int sketch_rows = 0;
  int sketch_width = 0;      // buckets per row
  // False when the budget holds every token up to max_context: the recent
  // window spans the whole context and nothing ever becomes vague.
  bool compressed = true;
  // Tokens per host-tier block (Options::block_tokens, or derived).
  int block_tokens = 0;
  // Vague tokens requested per KV head after each attend (0: no automatic recall).
  int recall_tokens = 0;
  // RecallProxy::kBlockBounds: vague tokens per key-bounds summary, and the
  // summaries per (sequence, layer, KV head) that cover max_context; else 0.
  int summary_tokens = 0;
  int summary_groups = 0;

  int slots() const { return sink_tokens + recent_tokens + candidate_tokens + staging_tokens; }

  DeviceBytes per_head;           // one (sequence, layer, KV head), by purpose
  int64_t per_sequence_bytes = 0; // per_head.total() * layers * kv_heads
  int64_t shared_bytes = 0;       // runtime-wide (SimHash planes), counted as metadata
  int64_t total_bytes = 0;        // max_sequences * per_sequence_bytes + shared_bytes
  int64_t budget_bytes = 0;       // the budget this plan fits in
  // Device bytes of the uncompressed plan (every token of max_sequences at
  // max_context on the device: K/V plus alignment); device_budget_fraction
  // is a fraction of this.
  int64_t full_cache_bytes = 0;

  // One line: the sizes chosen and why.
  std::string Explain() const;
};

// InvalidArgument for invalid options or for a budget that cannot hold the
// sink, a minimal recent window (kMinRecentTokens), a minimal sketch
// (kMinSketchBuckets per row) and the metadata; the message names the numbers.
absl::StatusOr<BudgetPlan> PlanBudget(const Options& options);

}  // namespace kvtier

#endif  // KVTIER_BUDGET_H_
