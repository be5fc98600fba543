#include "kvtier/options.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvtier {

std::string_view SketchKindName(SketchKind k) {
  switch (k) {
    case SketchKind::kNone: return "none";
    case SketchKind::kCountSketch: return "count-sketch";
    case SketchKind::kCentroid: return "centroid";
  }
  return "?";
}

std::string_view VaguePolicyName(VaguePolicy p) {
  switch (p) {
    case VaguePolicy::kDrop: return "drop";
    case VaguePolicy::kEstimate: return "estimate";
    case VaguePolicy::kShrink: return "shrink";
  }
  return "?";
}

std::string_view RecallProxyName(RecallProxy p) {
  switch (p) {
    case RecallProxy::kNone: return "none";
    case RecallProxy::kSketch: return "sketch";
    case RecallProxy::kBlockBounds: return "block-bounds";
  }
  return "?";
}

std::string_view RecallReplaceName(RecallReplace r) {
  switch (r) {
    case RecallReplace::kUnused: return "unused";
    case RecallReplace::kOutranked: return "outranked";
  }
  return "?";
}

std::string_view BackendKindName(BackendKind b) {
  switch (b) {
    case BackendKind::kAuto: return "auto";
    case BackendKind::kCpu: return "cpu";
    case BackendKind::kCuda: return "cuda";
  }
  return "?";
}

namespace {

absl::Status Bad(const char* field, const std::string& want, const std::string& got) {
  return absl::InvalidArgumentError(absl::StrFormat("options.%s must be %s, got %s", field, want, got));
}

bool InUnit(double x) { return std::isfinite(x) && x >= 0.0 && x <= 1.0; }

}  // namespace

absl::Status Options::Validate() const {
  if (absl::Status st = shape.Validate(); !st.ok()) return st;
  if (device_budget_bytes < 0) return Bad("device_budget_bytes", ">= 0", absl::StrCat(device_budget_bytes));
  if (device_budget_bytes == 0 &&
      !(std::isfinite(device_budget_fraction) && device_budget_fraction > 0.0 && device_budget_fraction <= 1.0)) {
    return Bad("device_budget_fraction", "in (0, 1] when device_budget_bytes is 0",
               absl::StrCat(device_budget_fraction));
  }
  if (max_context < 1 || max_context > (int64_t{1} << 30)) {
    return Bad("max_context", "in [1, 2^30]", absl::StrCat(max_context));
  }
  if (max_sequences < 1 || max_sequences > 65536) {
    return Bad("max_sequences", "in [1, 65536]", absl::StrCat(max_sequences));
  }
  if (sink_tokens < 0 || sink_tokens > 1024) return Bad("sink_tokens", "in [0, 1024]", absl::StrCat(sink_tokens));
  if (recent_tokens != 0 && (recent_tokens < kMinRecentTokens || recent_tokens > max_context)) {
    return Bad("recent_tokens", absl::StrFormat("0 (derived) or in [%d, max_context = %d]", kMinRecentTokens,
                                                max_context),
               absl::StrCat(recent_tokens));
  }
  if (candidate_tokens < -1 || candidate_tokens > max_context) {
    return Bad("candidate_tokens", absl::StrFormat("-1 (derived) or in [0, max_context = %d]", max_context),
               absl::StrCat(candidate_tokens));
  }
  if (staging_tokens < -1 || staging_tokens > max_context) {
    return Bad("staging_tokens", absl::StrFormat("-1 (derived) or in [0, max_context = %d]", max_context),
               absl::StrCat(staging_tokens));
  }
  if (!InUnit(recent_share)) return Bad("recent_share", "in [0, 1]", absl::StrCat(recent_share));
  if (!InUnit(candidate_share)) return Bad("candidate_share", "in [0, 1]", absl::StrCat(candidate_share));
  if (!InUnit(staging_share)) return Bad("staging_share", "in [0, 1]", absl::StrCat(staging_share));
  if (!InUnit(sketch_share)) return Bad("sketch_share", "in [0, 1]", absl::StrCat(sketch_share));
  if (!(std::isfinite(score_decay) && score_decay > 0.0 && score_decay <= 1.0)) {
    return Bad("score_decay", "in (0, 1]", absl::StrCat(score_decay));
  }
  if (sketch_kind != SketchKind::kNone && sketch_kind != SketchKind::kCountSketch &&
      sketch_kind != SketchKind::kCentroid) {
    return Bad("sketch_kind", "none, count-sketch or centroid", absl::StrCat(int(sketch_kind)));
  }
  if (vague_policy != VaguePolicy::kDrop && vague_policy != VaguePolicy::kEstimate &&
      vague_policy != VaguePolicy::kShrink) {
    return Bad("vague_policy", "drop, estimate or shrink", absl::StrCat(int(vague_policy)));
  }
  if (sketch_kind == SketchKind::kNone && vague_policy != VaguePolicy::kDrop) {
    return Bad("vague_policy", "drop when sketch_kind is none", std::string(VaguePolicyName(vague_policy)));
  }
  if (sketch_rows < 0 || sketch_rows > kMaxSketchRows) {
    return Bad("sketch_rows", absl::StrFormat("in [0, %d]", kMaxSketchRows), absl::StrCat(sketch_rows));
  }
  if (sketch_width != 0 && (sketch_width < kMinSketchBuckets || sketch_width > 65536)) {
    return Bad("sketch_width", absl::StrFormat("0 (derived) or in [%d, 65536]", kMinSketchBuckets),
               absl::StrCat(sketch_width));
  }
  if (sketch_kind == SketchKind::kCentroid && sketch_width != 0 && (sketch_width & (sketch_width - 1)) != 0) {
    return Bad("sketch_width", "a power of two for the centroid sketch", absl::StrCat(sketch_width));
  }
  if (!(std::isfinite(attention_scale) && attention_scale >= 0.0)) {
    return Bad("attention_scale", "0 (1/sqrt(head_dim)) or > 0", absl::StrCat(attention_scale));
  }
  if (block_tokens != 0) {
    const int64_t block_bytes = shape.HeadTokenBytes() * block_tokens;
    if (block_tokens < 0 || block_tokens > 65536 || block_bytes % 4096 != 0) {
      return Bad("block_tokens",
                 absl::StrFormat("0 (derived) or in [1, 65536] with blocks of a multiple of 4096 bytes (%d bytes "
                                 "per token)",
                                 shape.HeadTokenBytes()),
                 absl::StrFormat("%d (%d-byte blocks)", block_tokens, block_bytes));
    }
  }
  if (host_tier_bytes < 0) return Bad("host_tier_bytes", ">= 0", absl::StrCat(host_tier_bytes));
  if (recall_proxy != RecallProxy::kNone && recall_proxy != RecallProxy::kSketch &&
      recall_proxy != RecallProxy::kBlockBounds) {
    return Bad("recall_proxy", "none, sketch or block-bounds", absl::StrCat(int(recall_proxy)));
  }
  if (recall_replace != RecallReplace::kUnused && recall_replace != RecallReplace::kOutranked) {
    return Bad("recall_replace", "unused or outranked", absl::StrCat(int(recall_replace)));
  }
  if (recall_proxy == RecallProxy::kSketch && sketch_kind == SketchKind::kNone && recall_tokens > 0) {
    return Bad("recall_proxy", "none or block-bounds when sketch_kind is none and recall_tokens > 0", "sketch");
  }
  if (recall_tokens < -1) return Bad("recall_tokens", "-1 (derived) or >= 0", absl::StrCat(recall_tokens));
  if (recall_wait_us < 0 || recall_wait_us > 10'000'000) {
    return Bad("recall_wait_us", "in [0, 10^7]", absl::StrCat(recall_wait_us));
  }
  if (summary_tokens < 0) return Bad("summary_tokens", "0 (derived) or a multiple of the block size", absl::StrCat(summary_tokens));
  if (!(std::isfinite(summary_share) && summary_share > 0.0 && summary_share < 1.0)) {
    return Bad("summary_share", "in (0, 1)", absl::StrCat(summary_share));
  }
  if (disk_tier != nullptr) {
    if (!nvme_dir.empty()) return Bad("disk_tier", "null when nvme_dir is set", "a tier");
    if (host_tier_bytes <= 0) {
      return Bad("host_tier_bytes", "> 0 with a disk tier (blocks move down when the host tier fills)",
                 absl::StrCat(host_tier_bytes));
    }
  }
  if (!nvme_dir.empty()) {
    if (nvme_bytes <= 0) return Bad("nvme_bytes", "> 0 with nvme_dir", absl::StrCat(nvme_bytes));
    if (host_tier_bytes <= 0) {
      return Bad("host_tier_bytes", "> 0 with nvme_dir (blocks move to disk when the host tier fills)",
                 absl::StrCat(host_tier_bytes));
    }
  } else if (nvme_bytes != 0) {
    return Bad("nvme_bytes", "0 without nvme_dir", absl::StrCat(nvme_bytes));
  }
  if (io_queue_depth < 1 || io_queue_depth > 4096) {
    return Bad("io_queue_depth", "in [1, 4096]", absl::StrCat(io_queue_depth));
  }
  if (!(std::isfinite(demote_low) && std::isfinite(demote_high) && demote_low > 0 && demote_low <= demote_high &&
        demote_high <= 1.0)) {
    return Bad("demote_low/demote_high", "0 < low <= high <= 1", absl::StrFormat("%g and %g", demote_low, demote_high));
  }
  if (backend != BackendKind::kAuto && backend != BackendKind::kCpu && backend != BackendKind::kCuda) {
    return Bad("backend", "auto, cpu or cuda", absl::StrCat(int(backend)));
  }
  return absl::OkStatus();
}

}  // namespace kvtier
