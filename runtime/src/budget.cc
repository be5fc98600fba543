#include "kvtier/budget.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "head_layout.h"
#include "kvtier/kernels/params.h"

namespace kvtier {

int64_t SummaryBytes(const ModelShape& shape, int64_t groups) { return groups * shape.HeadTokenBytes(); }

HeadLayout ComputeHeadLayout(const ModelShape& shape, int64_t max_context, const BudgetPlan& plan) {
  const int slots = plan.slots();
  const SketchKind kind = plan.sketch_kind;
  const int rows = plan.sketch_rows, width = plan.sketch_width;
  const bool compressed = plan.compressed;
  HeadLayout l;
  const int64_t slot_kv = static_cast<int64_t>(slots) * shape.head_dim * DTypeSize(shape.dtype);
  int64_t off = 0;
  l.k_slots = off;
  off += AlignUp(slot_kv, kDeviceAlign);
  l.v_slots = off;
  off += AlignUp(slot_kv, kDeviceAlign);
  if (compressed) {
    l.slot_probs = off;
    off += AlignUp(static_cast<int64_t>(slots) * 4, kDeviceAlign);
  }
  if (kind == SketchKind::kCountSketch && rows >= 2) {
    l.vague_ids = off;
    off += AlignUp(max_context * 4, kDeviceAlign);
  }
  if (kind != SketchKind::kNone) {
    l.sketch = off;
    off += AlignUp(kernels::SketchStateFloats(rows, width, shape.head_dim) * 4, kDeviceAlign);
  }
  if (plan.summary_groups > 0) {
    l.summary = off;
    off += AlignUp(SummaryBytes(shape, plan.summary_groups), kDeviceAlign);
  }
  l.bytes = off;
  return l;
}

namespace {

std::string Bytes(int64_t b) {
  if (b >= (1LL << 30)) return absl::StrFormat("%.2f GiB", b / double(1LL << 30));
  if (b >= (1LL << 20)) return absl::StrFormat("%.2f MiB", b / double(1LL << 20));
  if (b >= (1LL << 10)) return absl::StrFormat("%.1f KiB", b / double(1LL << 10));
  return absl::StrCat(b, " B");
}

int64_t PlanesBytes(const ModelShape& shape, SketchKind kind, int rows, int width) {
  if (kind != SketchKind::kCentroid) return 0;
  return AlignUp(static_cast<int64_t>(rows) * std::countr_zero(static_cast<unsigned>(width)) * shape.head_dim * 4,
                 kDeviceAlign);
}

// Fills the byte fields of a plan whose sizes are set.
void FillBytes(const Options& o, BudgetPlan& p) {
  const ModelShape& s = o.shape;
  const HeadLayout l = ComputeHeadLayout(s, o.max_context, p);
  const int64_t tok = s.HeadTokenBytes();
  p.per_head = DeviceBytes{};
  p.per_head.sink = p.sink_tokens * tok;
  p.per_head.recent = p.recent_tokens * tok;
  p.per_head.candidate = p.candidate_tokens * tok;
  p.per_head.staging = p.staging_tokens * tok;
  p.per_head.sketch =
      p.sketch_kind == SketchKind::kNone
          ? 0
          : kernels::SketchStateFloats(p.sketch_rows, p.sketch_width, s.head_dim) * 4;
  p.per_head.summary = SummaryBytes(s, p.summary_groups);
  // Slot scores, the vague-token list and alignment padding.
  p.per_head.metadata = l.bytes - p.per_head.sink - p.per_head.recent - p.per_head.candidate -
                        p.per_head.staging - p.per_head.sketch - p.per_head.summary;
  p.per_sequence_bytes = l.bytes * s.layers * s.kv_heads;
  p.shared_bytes = PlanesBytes(s, p.sketch_kind, p.sketch_rows, p.sketch_width);
  p.total_bytes = p.per_sequence_bytes * o.max_sequences + p.shared_bytes;
}

}  // namespace

absl::StatusOr<BudgetPlan> PlanBudget(const Options& o) {
  if (absl::Status st = o.Validate(); !st.ok()) return st;
  const ModelShape& s = o.shape;
  BudgetPlan p;
  p.block_tokens = o.block_tokens;
  if (p.block_tokens == 0) {  // the smallest count >= 16 whose block is a multiple of 4 KiB
    const int64_t tok = s.HeadTokenBytes();
    const int64_t unit = 4096 / std::gcd<int64_t>(tok, 4096);
    p.block_tokens = static_cast<int>((16 + unit - 1) / unit * unit);
  }
  p.sink_tokens = static_cast<int>(std::min<int64_t>(o.sink_tokens, o.max_context));
  const int64_t heads = static_cast<int64_t>(o.max_sequences) * s.layers * s.kv_heads;

  // The uncompressed plan: one recent window over the whole context, no
  // sketch, no scores. Its size is the "full cache" the fraction refers to.
  BudgetPlan full = p;
  full.compressed = false;
  full.recent_tokens = static_cast<int>(o.max_context - p.sink_tokens);
  FillBytes(o, full);
  p.full_cache_bytes = full.total_bytes;
  p.budget_bytes = o.device_budget_bytes > 0
                       ? o.device_budget_bytes
                       : static_cast<int64_t>(std::floor(o.device_budget_fraction * p.full_cache_bytes));
  if (full.total_bytes <= p.budget_bytes) {
    full.full_cache_bytes = p.full_cache_bytes;
    full.budget_bytes = p.budget_bytes;
    return full;
  }

  p.sketch_kind = o.sketch_kind;
  p.sketch_rows = o.sketch_kind == SketchKind::kNone ? 0 : (o.sketch_rows > 0 ? o.sketch_rows : 1);
  const int64_t tok_slot = s.HeadTokenBytes() + 4;  // K, V and the slot's score
  // Key-bounds summaries come out of the budget first, sized by their share.
  if (o.recall_proxy == RecallProxy::kBlockBounds) {
    const int64_t b = p.block_tokens;
    int64_t tokens = o.summary_tokens;
    if (tokens == 0) {
      const int64_t per_head = p.budget_bytes / heads - p.sink_tokens * tok_slot;
      const int64_t groups = std::max<int64_t>(
          1, static_cast<int64_t>(o.summary_share * std::max<int64_t>(0, per_head)) / SummaryBytes(s, 1));
      tokens = (o.max_context + groups - 1) / groups;
      tokens = (tokens + b - 1) / b * b;
    } else if (tokens % b != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "options.summary_tokens must be a multiple of the block size (%d tokens), got %d", b, tokens));
    }
    p.summary_tokens = static_cast<int>(tokens);
    p.summary_groups = static_cast<int>((o.max_context + tokens - 1) / tokens);
  }
  const int64_t bucket_unit =
      static_cast<int64_t>(p.sketch_rows) * (2LL * s.head_dim + 2) * 4;  // one bucket in every row
  const int64_t max_width = 65536;

  // The smallest plan, for the error message and the feasibility check.
  auto smallest = [&] {
    BudgetPlan m = p;
    m.recent_tokens = o.recent_tokens > 0 ? o.recent_tokens : kMinRecentTokens;
    m.candidate_tokens = std::max(o.candidate_tokens, 0);
    m.staging_tokens = std::max(o.staging_tokens, 0);
    m.sketch_width = p.sketch_kind == SketchKind::kNone ? 0 : std::max(o.sketch_width, kMinSketchBuckets);
    FillBytes(o, m);
    return m;
  };
  BudgetPlan minimal = smallest();
  if (minimal.total_bytes > p.budget_bytes && o.recall_proxy == RecallProxy::kBlockBounds &&
      o.summary_tokens == 0 && p.summary_groups > 1) {
    // Derived summaries took their share of a budget too small for the rest:
    // fall back to the coarsest (one summary per head), the smallest plan.
    p.summary_tokens = static_cast<int>((o.max_context + p.block_tokens - 1) / p.block_tokens * p.block_tokens);
    p.summary_groups = 1;
    minimal = smallest();
  }
  if (minimal.total_bytes > p.budget_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "device budget of %d bytes (%s) cannot hold %d sequence(s) x %d layers x %d KV heads of: sink %d + "
        "recent %d + candidates %d + staging %d tokens, a %s of %d x %d buckets and metadata; that needs at "
        "least %d bytes (%d per layer and KV head + %d shared). Raise the budget or lower max_sequences "
        "(%d) or max_context (%d)",
        p.budget_bytes, Bytes(p.budget_bytes), o.max_sequences, s.layers, s.kv_heads, minimal.sink_tokens,
        minimal.recent_tokens, minimal.candidate_tokens, minimal.staging_tokens, SketchKindName(p.sketch_kind),
        minimal.sketch_rows, minimal.sketch_width, minimal.total_bytes, minimal.per_head.total(),
        minimal.shared_bytes, o.max_sequences, o.max_context));
  }

  // Bytes per head left after the sink, metadata and alignment slack of the
  // minimal plan's fixed part.
  const int64_t shared_max = PlanesBytes(s, p.sketch_kind, p.sketch_rows, max_width);
  const int64_t per_head_budget = (p.budget_bytes - shared_max) / heads;
  const int64_t fixed = minimal.per_head.total() - minimal.recent_tokens * tok_slot -
                        minimal.candidate_tokens * tok_slot - minimal.staging_tokens * tok_slot -
                        (p.sketch_kind == SketchKind::kNone ? 0 : minimal.sketch_width * bucket_unit);
  int64_t avail = per_head_budget - fixed;

  // Explicit sizes take their bytes first; derived ones split the rest.
  struct Part {
    bool derived;
    double share;
    int64_t unit;
    int64_t value;
  };
  Part recent{o.recent_tokens == 0, o.recent_share, tok_slot, o.recent_tokens};
  Part cand{o.candidate_tokens < 0, o.candidate_share, tok_slot, std::max(o.candidate_tokens, 0)};
  Part stage{o.staging_tokens < 0, o.staging_share, tok_slot, std::max(o.staging_tokens, 0)};
  Part sketch{p.sketch_kind != SketchKind::kNone && o.sketch_width == 0, o.sketch_share, bucket_unit,
              p.sketch_kind == SketchKind::kNone ? 0 : o.sketch_width};
  Part* parts[] = {&recent, &cand, &stage, &sketch};
  double share_sum = 0.0;
  for (Part* part : parts) {
    if (part->derived) {
      share_sum += part->share;
    } else {
      avail -= part->value * part->unit;
    }
  }
  for (Part* part : parts) {
    if (!part->derived) continue;
    const double bytes = share_sum > 0 ? avail * (part->share / share_sum) : 0.0;
    part->value = std::max<int64_t>(0, static_cast<int64_t>(bytes) / part->unit);
  }
  const int64_t ctx_left = o.max_context - p.sink_tokens;
  recent.value = std::clamp<int64_t>(recent.value, kMinRecentTokens, std::max<int64_t>(ctx_left, kMinRecentTokens));
  cand.value = std::min<int64_t>(cand.value, o.max_context);
  stage.value = std::min<int64_t>(stage.value, o.max_context);
  if (p.sketch_kind != SketchKind::kNone) {
    sketch.value = std::clamp<int64_t>(sketch.value, kMinSketchBuckets, max_width);
    if (p.sketch_kind == SketchKind::kCentroid) {
      // SimHash needs a power of two; what rounding frees goes to candidates.
      const int64_t pow2 = static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(sketch.value)));
      if (sketch.derived && cand.derived) {
        cand.value = std::min<int64_t>(o.max_context, cand.value + (sketch.value - pow2) * sketch.unit / cand.unit);
      }
      sketch.value = pow2;
    }
  }
  p.recent_tokens = static_cast<int>(recent.value);
  p.candidate_tokens = static_cast<int>(cand.value);
  p.staging_tokens = static_cast<int>(stage.value);
  p.sketch_width = static_cast<int>(sketch.value);
  FillBytes(o, p);
  // Alignment can leave a derived part one unit over; take units back from the
  // largest derived part until the plan fits (the minimal plan fits, so this ends).
  while (p.total_bytes > p.budget_bytes) {
    Part* largest = nullptr;
    for (Part* part : parts) {
      const int64_t floor = part == &recent ? kMinRecentTokens : (part == &sketch ? kMinSketchBuckets : 0);
      if (part->derived && part->value > floor && (!largest || part->value * part->unit > largest->value * largest->unit))
        largest = part;
    }
    if (largest == nullptr) break;
    largest->value = largest == &sketch && p.sketch_kind == SketchKind::kCentroid ? largest->value / 2
                                                                                 : largest->value - 1;
    p.recent_tokens = static_cast<int>(recent.value);
    p.candidate_tokens = static_cast<int>(cand.value);
    p.staging_tokens = static_cast<int>(stage.value);
    p.sketch_width = static_cast<int>(sketch.value);
    FillBytes(o, p);
  }
  if (p.total_bytes > p.budget_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "device budget of %d bytes cannot hold the explicit sizes: recent %d, candidates %d, staging %d "
        "tokens and %d sketch buckets per row need %d bytes",
        p.budget_bytes, p.recent_tokens, p.candidate_tokens, p.staging_tokens, p.sketch_width, p.total_bytes));
  }
  if (o.recall_proxy != RecallProxy::kNone) {
    if (o.recall_tokens > p.staging_tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "options.recall_tokens (%d) exceeds the staging slots of the plan (%d)", o.recall_tokens, p.staging_tokens));
    }
    const bool rankable = o.recall_proxy != RecallProxy::kSketch || p.sketch_kind != SketchKind::kNone;
    p.recall_tokens = o.recall_tokens >= 0 ? o.recall_tokens
                                           : (p.staging_tokens > 0 && rankable ? std::max(1, p.staging_tokens / 4) : 0);
  }
  return p;
}

std::string BudgetPlan::Explain() const {
  const double pct = full_cache_bytes > 0 ? 100.0 * budget_bytes / full_cache_bytes : 0.0;
  if (!compressed) {
    return absl::StrFormat(
        "budget %s (%.1f%% of the full cache %s) holds every token: per layer and KV head sink %d + recent %d "
        "tokens, nothing is sketched; reserves %s",
        Bytes(budget_bytes), pct, Bytes(full_cache_bytes), sink_tokens, recent_tokens, Bytes(total_bytes));
  }
  std::string sketch = sketch_kind == SketchKind::kNone
                           ? "no sketch"
                           : absl::StrFormat("%s %dx%d buckets (%s)", SketchKindName(sketch_kind), sketch_rows,
                                             sketch_width, Bytes(per_head.sketch));
  return absl::StrFormat(
      "budget %s (%.1f%% of the full cache %s): per layer and KV head sink %d + recent %d + candidates %d + "
      "staging %d tokens (%s), %s%s, metadata %s = %s; reserves %s in all; recalls %d tokens per step",
      Bytes(budget_bytes), pct, Bytes(full_cache_bytes), sink_tokens, recent_tokens, candidate_tokens,
      staging_tokens, Bytes(per_head.sink + per_head.recent + per_head.candidate + per_head.staging), sketch,
      summary_groups > 0 ? absl::StrFormat(", key bounds per %d tokens (%s)", summary_tokens, Bytes(per_head.summary))
                         : std::string(),
      Bytes(per_head.metadata), Bytes(per_head.total()), Bytes(total_bytes), recall_tokens);
}

}  // namespace kvtier
