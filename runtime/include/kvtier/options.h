// kvtier/options.h — everything a Runtime is configured with, with defaults.
//
// Options is a plain value type. Runtime::Create validates it (Validate()) and
// derives the region and sketch sizes from the device budget (kvtier/budget.h).
// Every field documents its default and its limits.
#ifndef KVTIER_OPTIONS_H_
#define KVTIER_OPTIONS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "kvtier/dtype.h"
#include "kvtier/model_shape.h"

namespace kvtier {

class Tier;  // kvtier/offload/tier.h

// How the exact K/V of pushed-out ("vague") tokens are summarised on the device.
enum class SketchKind : uint8_t {
  // No sketch: vague tokens leave attention entirely (an eviction policy).
  // Requires VaguePolicy::kDrop.
  kNone = 0,
  // Signed Count-Sketch over vectors (the KVReviver sketch), centred on the
  // running mean of the vague keys and values.
  kCountSketch = 1,
  // Content-hashed buckets (SimHash of the centred key): each bucket keeps the
  // sum of its keys and values and its count, i.e. a streaming cluster that
  // enters attention as one pseudo-token with a log(count) logit bias.
  kCentroid = 2,
};

// What attention does with vague tokens whose exact K/V are not on the device.
enum class VaguePolicy : uint8_t {
  kDrop = 0,      // leave them out of the softmax
  kEstimate = 1,  // include the sketch's reconstruction as is
  // Count-Sketch: include mu + alpha * (reconstructed residual), alpha the
  // signal/(signal + collision noise) ratio rows*width / (rows*width + n - 1)
  // for n sketched tokens. Centroid: bucket means are already pooled
  // estimates, so kShrink behaves as kEstimate.
  kShrink = 2,
};

// How the runtime picks the vague tokens to recall after each attend.
enum class RecallProxy : uint8_t {
  kNone = 0,         // no automatic recall (Runtime::Recall still works)
  kSketch = 1,       // the sketch's per-token score (largest estimated logit)
  // Quest-style key bounds (per coordinate min and max) per group of
  // summary_tokens vague tokens, kept on the device: the groups whose bound
  // on the logit is highest are recalled; within a group that the recall
  // budget only partly covers, in the sketch's order.
  kBlockBounds = 2,
};

// Which installed (recalled) tokens the automatic recall may give the slot
// of to a newly ranked token. Either way only those the last attend used
// less than a uniform share of attention; the others keep their slot.
enum class RecallReplace : uint8_t {
  // Any of them, for the best-ranked tokens not yet there: the staged set
  // follows the proxy's picks for each query, and tokens the proxy ranks
  // alike trade places every step (up to recall_tokens per KV head and step).
  kUnused = 0,
  // Only for a token the proxy scores strictly higher, under the same query
  // and in the same ranking call: recall moves tokens only when the ranking
  // improves (docs/results.md has the traffic, docs/fidelity.md the cost).
  kOutranked = 1,
};

enum class BackendKind : uint8_t {
  kAuto = 0,  // CUDA when a device and the CUDA backend are present, else CPU
  kCpu = 1,
  kCuda = 2,
};

std::string_view SketchKindName(SketchKind k);
std::string_view VaguePolicyName(VaguePolicy p);
std::string_view BackendKindName(BackendKind b);
std::string_view RecallProxyName(RecallProxy p);
std::string_view RecallReplaceName(RecallReplace r);

// Smallest recent window and sketch the budget planner accepts.
inline constexpr int kMinRecentTokens = 16;
inline constexpr int kMinSketchBuckets = 16;  // per row
inline constexpr int kMaxSketchRows = 8;

struct Options {
  ModelShape shape;  // required; see ModelShape::Validate

  // ---- Device budget: one number covers sink, recent, candidate, staging,
  // sketch and metadata of every sequence. ----
  // Total device bytes. 0 (default): use device_budget_fraction.
  int64_t device_budget_bytes = 0;
  // Used when device_budget_bytes == 0: the fraction of the full cache of
  // max_sequences sequences at max_context tokens (BudgetPlan::full_cache_bytes).
  // Default 0.10, in (0, 1]; 1.0 holds every token exactly (no compression).
  double device_budget_fraction = 0.10;
  // Longest sequence, in tokens. Default 8192, in [1, 2^30].
  int64_t max_context = 8192;
  // Sequences held at once; the budget is split evenly between them.
  // Default 1, in [1, 65536].
  int max_sequences = 1;

  // ---- Regions (sizes are per layer and KV head, in tokens) ----
  // Attention-sink tokens kept at the start. Default 4, in [0, 1024].
  int sink_tokens = 4;
  // Recent window. 0 (default): derived from recent_share; else >= kMinRecentTokens.
  int recent_tokens = 0;
  // Heavy-hitter candidates. -1 (default): derived from candidate_share; 0 disables.
  int candidate_tokens = -1;
  // Staging slots for recalled vague tokens. -1 (default): derived from staging_share.
  int staging_tokens = -1;
  // Shares of the bytes left after sink and metadata, used for the sizes that
  // are derived (explicit sizes take their bytes first; the derived ones split
  // the rest in proportion to their shares). Each in [0, 1].
  double recent_share = 0.25;     // default 0.25
  double candidate_share = 0.35;  // default 0.35
  double staging_share = 0.15;    // default 0.15
  double sketch_share = 0.10;     // default 0.10
  // Accumulated-attention decay applied before each step's probabilities are
  // added to a resident token's score. Default 0.9, in (0, 1]; 1.0 gives plain
  // H2O sums, which keep long-resident tokens over tokens that matter now: on
  // SmolLM2-135M 0.9 is closer to the full cache at every budget measured,
  // with and without a sketch (docs/fidelity.md).
  double score_decay = 0.9;

  // ---- Sketch ----
  // Default kCentroid: on SmolLM2-135M's real KV it keeps the model closer to
  // the full cache than the Count-Sketch does (docs/fidelity.md).
  SketchKind sketch_kind = SketchKind::kCentroid;  // default centroid
  // Hash rows. 0 (default): 1 (at equal memory more rows do not lower the
  // mean-combined error, and one row lets attention run per bucket). In [0, 8].
  int sketch_rows = 0;
  // Buckets per row. 0 (default): derived from sketch_share; the centroid
  // sketch rounds down to a power of two (SimHash bits). In [0, 65536].
  int sketch_width = 0;
  VaguePolicy vague_policy = VaguePolicy::kShrink;  // default kShrink

  // ---- Recall (asynchronous, lag one step) ----
  // Default kBlockBounds: on SmolLM2-135M it retrieves a passkey that the
  // centroid sketch's scores miss (7 of 7 trials vs 0 at a 50% budget, 2 vs
  // 0 at 25%) and matches them on agreement from 25% up (docs/fidelity.md).
  RecallProxy recall_proxy = RecallProxy::kBlockBounds;
  // Vague tokens requested per KV head after each attend. -1 (default):
  // staging_tokens / 4, at least 1 when there is staging (0 for the sketch
  // proxy without a sketch); 0: none. At most staging_tokens.
  int recall_tokens = -1;
  // Default kUnused: on SmolLM2-135M its mean KL to the full cache is 4-14%
  // lower than kOutranked's at 5-25% budgets (2k and 8k tokens), for 2-83x
  // the host->device traffic (docs/fidelity.md, docs/results.md).
  RecallReplace recall_replace = RecallReplace::kUnused;
  // How long an attend waits for recalls in flight before serving their
  // tokens from the sketch. Default 0 (never waits), in [0, 10^7] us.
  int64_t recall_wait_us = 0;
  // kBlockBounds: vague tokens per key-bounds summary, a multiple of the
  // block size. 0 (default): the smallest multiple whose summaries fit in
  // summary_share of the budget left after the sink.
  int summary_tokens = 0;
  double summary_share = 0.05;  // default 0.05, in (0, 1)

  // ---- Host tier ----
  // Tokens per host block (one layer and KV head, K then V); a block must be
  // a multiple of 4096 bytes (O_DIRECT). 0 (default): the smallest count >= 16
  // that gives one (16 for head_dim 64 fp16: 4 KiB). Else in [1, 65536].
  int block_tokens = 0;
  // Cap on host-tier bytes; 0 (default) = no cap. The new blocks of one
  // Append call are reserved before it changes anything, so the cap must hold
  // them at once (with a disk tier, older sealed blocks are demoted to make
  // room); an Append that cannot get them fails with ResourceExhausted and
  // leaves the sequence unchanged.
  int64_t host_tier_bytes = 0;

  // Logit scale of attention. 0 (default): 1 / sqrt(head_dim). Else > 0.
  double attention_scale = 0.0;

  // ---- Disk tier (below the host tier) ----
  // A tier of the caller's (any kvtier::Tier: a remote store, or a
  // FaultInjectingTier in tests) used as the disk tier instead of an NVMe
  // file; its blocks must be plan().block_tokens tokens. Null (default): the
  // NVMe tier of nvme_dir, if any. Needs host_tier_bytes > 0.
  std::shared_ptr<Tier> disk_tier;
  // Directory of the disk tier's file; empty (default): no disk tier. Needs a
  // host-tier cap (host_tier_bytes > 0): blocks move down when the host tier
  // fills.
  std::string nvme_dir;
  // Cap on the disk tier's bytes; required (> 0) with nvme_dir.
  int64_t nvme_bytes = 0;
  // io_uring queue depth of the disk tier. Default 32, in [1, 4096].
  int io_queue_depth = 32;
  // Demote coldest host blocks to disk when the host tier holds more than
  // demote_high of its cap, down to demote_low. Defaults 0.9 and 0.8;
  // 0 < low <= high <= 1.
  double demote_high = 0.9;
  double demote_low = 0.8;

  // ---- Plan-only mode ----
  // true: the runtime runs its bookkeeping without contents — the same
  // regions, heavy-hitter choice, budget, recall scheduling, block store,
  // demotion and tier accounting, but no kernel runs and no K/V exist.
  // Append takes null k and v; each token's attention weight comes from
  // AppendOptions::weights, and an attend gives every resident token the
  // probability weight / (sum of the weights of the layer and KV head's
  // tokens) per query head instead of running attention (q and out may be
  // null). Recall ranks vague tokens by weight (any recall_proxy but kNone).
  // The tiers count blocks and bytes without holding them (the disk tier is a
  // CountingTier of nvme_bytes; nvme_dir is not touched); ReadToken and
  // EstimateToken are FailedPrecondition. Default false.
  bool plan_only = false;

  // Seed for the sketch hashes and SimHash planes. Default fixed.
  uint64_t seed = 0x6b7674696572ull;
  // Where the K/V/Q/output pointers of Append and Attend live: kCpu takes
  // host memory; kCuda and kAuto (CUDA when a device is present) take CUDA
  // device memory. Default kCpu, so host tensors work on any machine.
  BackendKind backend = BackendKind::kCpu;

  // InvalidArgument naming the offending field and value.
  absl::Status Validate() const;
};

// Per-call options of Runtime::Append.
struct AppendOptions {
  // Optional [n][kv_heads] initial accumulated attention of each appended
  // token (for example column sums of the prefill attention), used to pick
  // heavy hitters when a prefill chunk overflows the recent window. Host
  // memory. Null (default): 0 for every token.
  const float* scores = nullptr;
  // Plan-only runtimes (Options::plan_only): optional [n][kv_heads]
  // attention weight of each appended token, finite and >= 0: its
  // unnormalised share of every later attend's softmax. Host memory. Null
  // (default): 1 for every token. Ignored with contents.
  const float* weights = nullptr;
};

// Per-call options of Runtime::Attend.
struct AttendOptions {
  // dtype of the output; default: the model dtype.
  std::optional<DType> out_dtype;
};

}  // namespace kvtier

#endif  // KVTIER_OPTIONS_H_
