#include "replay/plan.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "replay/driver.h"

namespace kvtier::replay {
namespace {

constexpr int64_t kMaxSlots = 65536;  // Options::max_sequences

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A --content none replay of `sequences` slots at `context` tokens with the
// plan's model and budget policy, no tier caps.
ReplayOptions PlanReplay(const PlanOptions& p, int64_t context, int64_t sequences) {
  ReplayOptions o;
  o.shape = p.shape;
  o.content = ContentLevel::kNone;
  o.time_scale = 0;
  o.max_sequences = static_cast<int>(sequences);
  o.max_context = context;
  o.device_budget_fraction = p.device_budget_fraction;
  o.block_tokens = p.block_tokens;
  o.sketch = p.sketch;
  o.policy = p.policy;
  o.proxy = p.proxy;
  o.recall_replace = p.recall_replace;
  o.seed = p.seed;
  o.profile = p.profile;
  return o;
}

// The runtime options kvtier-replay creates its runtime with.
Options RuntimeOptions(const PlanOptions& p, int64_t context, int64_t sequences) {
  return ReplayRuntimeOptions(PlanReplay(p, context, sequences), context);
}

std::string Limit(int64_t v) { return v < 0 ? "-" : absl::StrCat(v); }

std::string Bytes(double b) {
  if (b >= 1e12) return absl::StrFormat("%.2f TB", b / 1e12);
  if (b >= 1e9) return absl::StrFormat("%.2f GB", b / 1e9);
  if (b >= 1e6) return absl::StrFormat("%.2f MB", b / 1e6);
  if (b >= 1e3) return absl::StrFormat("%.1f kB", b / 1e3);
  return absl::StrFormat("%.0f B", b);
}

}  // namespace

absl::StatusOr<RecallRate> RecallSample(const PlanOptions& p, int64_t context) {
  const int64_t decode = std::min(p.decode_tokens, context - 1);
  if (decode < 1) return RecallRate{};
  absl::StatusOr<Trace> trace = ParseTrace(absl::StrCat("0,", context - decode, ",", decode, "\n"), {}, "sample.csv");
  if (!trace.ok()) return trace.status();
  // No tier caps: the sample measures recalls, not room.
  absl::StatusOr<ReplayResult> r = RunReplay(*trace, PlanReplay(p, context, 1));
  if (!r.ok()) return r.status();
  RecallRate rate;
  if (r->decode_steps > 0) {
    rate.h2d_bytes_per_step = static_cast<double>(r->bytes_h2d) / static_cast<double>(r->decode_steps);
    rate.recall_step_share = static_cast<double>(r->recall_steps) / static_cast<double>(r->decode_steps);
  }
  return rate;
}

absl::StatusOr<PlanResult> RunPlan(const PlanOptions& p) {
  if (absl::Status st = p.shape.Validate(); !st.ok()) return st;
  if (!(p.device_budget_fraction > 0 && p.device_budget_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("device budget fraction %g must be in (0, 1]", p.device_budget_fraction));
  }
  if (p.max_sequences < 0 || p.max_sequences > kMaxSlots) {
    return absl::InvalidArgumentError(absl::StrFormat("max_sequences %d must be in [0, %d]", p.max_sequences, kMaxSlots));
  }
  if (p.contexts.empty()) return absl::InvalidArgumentError("no context lengths to plan");
  if (p.decode_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("decode_tokens %d must be >= 1", p.decode_tokens));
  }
  const HardwareProfile& hw = p.profile;
  const int64_t device_kv = static_cast<int64_t>(hw.device_kv_bytes);
  const int64_t host_cap = static_cast<int64_t>(hw.host_bytes);
  const int64_t nvme_cap = host_cap > 0 ? static_cast<int64_t>(hw.nvme_bytes) : 0;  // the NVMe tier needs a host cap
  const int64_t tier_cap = host_cap > 0 ? host_cap + nvme_cap : 0;                   // 0: no cap
  const Options defaults;
  const int L = p.shape.layers, H = p.shape.kv_heads;
  const int64_t tok = p.shape.HeadTokenBytes();

  PlanResult res;
  for (const int64_t C : p.contexts) {
    if (C < 1 || C > kMaxTraceTokens) {
      return absl::InvalidArgumentError(absl::StrFormat("context %d must be in [1, %d]", C, kMaxTraceTokens));
    }
    PlanRow row;
    row.context = C;
    absl::StatusOr<BudgetPlan> one = PlanBudget(RuntimeOptions(p, C, 1));
    if (!one.ok()) {
      return absl::Status(one.status().code(), absl::StrFormat("context %d: %s", C, one.status().message()));
    }
    // The whole cache on the GPU: the runtime's uncompressed plan.
    Options full = RuntimeOptions(p, C, 1);
    full.device_budget_fraction = 1.0;
    absl::StatusOr<BudgetPlan> full_plan = PlanBudget(full);
    if (!full_plan.ok()) return full_plan.status();
    row.baseline_bytes_per_sequence = full_plan->per_sequence_bytes;
    row.baseline_sequences = device_kv / std::max<int64_t>(1, full_plan->per_sequence_bytes);

    // Device limit: the most slots whose plan (the budget split per slot) fits
    // the GPU's KV memory. The plan grows with the slots, so bisect.
    auto fits = [&](int64_t n) {
      absl::StatusOr<BudgetPlan> b = PlanBudget(RuntimeOptions(p, C, n));
      return b.ok() && b->total_bytes <= device_kv;
    };
    int64_t lo = 0, hi = kMaxSlots;  // fits(lo) (or lo = 0), !fits(hi + 1)
    if (!fits(1)) {
      hi = 0;
    } else if (!fits(hi)) {
      lo = 1;
      while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        (fits(mid) ? lo : hi) = mid;
      }
      hi = lo;
    }
    row.device_limit = hi;
    row.slot_limit = p.max_sequences > 0 ? p.max_sequences : -1;
    const int64_t slots = std::max<int64_t>(
        1, p.max_sequences > 0 ? std::min<int64_t>(row.device_limit, p.max_sequences) : row.device_limit);
    absl::StatusOr<BudgetPlan> plan = PlanBudget(RuntimeOptions(p, C, slots));
    const bool slots_fit = plan.ok();
    if (!slots_fit) plan = one;  // no slot fits: report the one-sequence plan
    row.plan = *plan;
    row.device_bytes_per_sequence = plan->per_sequence_bytes;

    // Tier room, as the driver admits: one host-tier block copy of every
    // token that can leave the device, at the full context.
    const int64_t resident = plan->compressed ? plan->sink_tokens + plan->recent_tokens + plan->candidate_tokens : C;
    const int64_t block_bytes = plan->block_tokens * tok;
    row.tier_bytes_per_sequence =
        CeilDiv(std::max<int64_t>(0, C - resident), plan->block_tokens) * block_bytes * L * H;
    row.tier_limit = tier_cap > 0 && row.tier_bytes_per_sequence > 0 ? tier_cap / row.tier_bytes_per_sequence : -1;

    int64_t n = row.device_limit;
    row.binding = "device";
    if (row.tier_limit >= 0 && row.tier_limit < n) {
      n = row.tier_limit;
      row.binding = "tiers";
    }
    if (row.slot_limit >= 0 && row.slot_limit < n) {
      n = row.slot_limit;
      row.binding = "slots";
    }
    row.sequences = n;
    if (n > 0 && slots_fit) row.device_bytes = plan->total_bytes;

    // Tier bytes with n sequences at the full context. Past the host cap the
    // block store keeps the host tier between its demotion watermarks.
    const int64_t tier_total = n * row.tier_bytes_per_sequence;
    if (host_cap == 0 || nvme_cap == 0 || tier_total <= static_cast<int64_t>(defaults.demote_high * host_cap)) {
      row.host_bytes = tier_total;
    } else {
      row.host_bytes = static_cast<int64_t>((defaults.demote_low + defaults.demote_high) / 2 * host_cap);
    }
    // A full NVMe tier leaves the rest in the host tier (admission keeps the sum within both).
    row.host_bytes = std::max(row.host_bytes, tier_total - nvme_cap);
    row.nvme_bytes = tier_total - row.host_bytes;

    // One decode step of n sequences (per layer and KV head: one token in,
    // one token out of the recent window once the context exceeds the
    // resident regions; the recall sample's tokens recalled).
    const int64_t heads = n * L * H;
    const bool spills = plan->compressed && C > resident;
    RecallRate rate;  // per sequence and step
    if (spills && plan->recall_tokens > 0) {
      absl::StatusOr<RecallRate> b = RecallSample(p, C);
      if (!b.ok()) {
        return absl::Status(b.status().code(), absl::StrFormat("context %d: recall sample: %s", C, b.status().message()));
      }
      rate = *b;
    }
    const double recall = rate.h2d_bytes_per_step / static_cast<double>(L * H * tok);  // tokens per head and step
    row.recall_tokens_per_head_step = recall;
    row.recall_step_share = rate.recall_step_share;
    row.h2d_bytes_per_step = std::llround(static_cast<double>(n) * rate.h2d_bytes_per_step);
    row.d2h_bytes_per_step = spills ? heads * tok : 0;
    row.nvme_write_bytes_per_step = row.nvme_bytes > 0 ? row.d2h_bytes_per_step : 0;
    const double on_nvme = tier_total > 0 ? static_cast<double>(row.nvme_bytes) / tier_total : 0.0;
    row.nvme_read_bytes_per_step_max =
        static_cast<int64_t>(std::ceil(static_cast<double>(heads) * recall * on_nvme)) * block_bytes;
    // The replay's virtual clock: compute reads the resident K/V and the
    // sketches; the recalls (bytes plus a latency per recalling KV head)
    // travel meanwhile.
    const int64_t exact = plan->compressed ? std::min<int64_t>(C, plan->slots()) : C;
    const double compute_per_seq =
        static_cast<double>(L * H) * (exact * tok + plan->per_head.sketch) / (hw.device_gbps * 1e3);
    // The replay charges the latency to every KV head of a step that
    // recalled (under the fold all heads recall alike): the sample's share of
    // such steps.
    const double transfer_per_seq =
        static_cast<double>(L * H) * (recall * tok / (hw.h2d_gbps * 1e3) + rate.recall_step_share * hw.h2d_latency_us);
    row.compute_us = hw.step_base_us + n * compute_per_seq;
    row.transfer_us = n * transfer_per_seq;
    if (transfer_per_seq > compute_per_seq) {
      row.bandwidth_limit = static_cast<int64_t>(std::floor(hw.step_base_us / (transfer_per_seq - compute_per_seq)));
      if (row.bandwidth_limit < n) row.binding = "bandwidth (h2d)";
    }
    res.rows.push_back(std::move(row));
  }
  return res;
}

std::vector<int64_t> TraceContexts(const Trace& trace, int token_scale) {
  std::vector<int64_t> len;
  const int64_t s = std::max(token_scale, 1);
  for (const Request& q : trace.requests) len.push_back(CeilDiv(q.input_tokens, s) + CeilDiv(q.output_tokens, s));
  if (len.empty()) return {};
  std::sort(len.begin(), len.end());
  std::vector<int64_t> out;
  for (double q : {0.50, 0.90, 0.99, 1.0}) {
    out.push_back(len[static_cast<size_t>(std::ceil(q * static_cast<double>(len.size()))) - 1]);
  }
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

int64_t TraceDecodeTokens(const Trace& trace, int token_scale) {
  std::vector<int64_t> out;
  const int64_t s = std::max(token_scale, 1);
  for (const Request& q : trace.requests) out.push_back(CeilDiv(q.output_tokens, s));
  if (out.empty()) return 0;
  std::nth_element(out.begin(), out.begin() + static_cast<ptrdiff_t>(out.size() / 2), out.end());
  return out[out.size() / 2];
}

std::string PlanTable(const PlanResult& r, const PlanOptions& o) {
  const HardwareProfile& hw = o.profile;
  std::string s = absl::StrFormat(
      "kvtier-plan: %s (%s); GPU KV %s, host %s, NVMe %s; device budget %.1f%% of each sequence's full cache, "
      "%s sketch\n",
      o.model_name.empty() ? "custom shape" : o.model_name, o.shape.ToString(), Bytes(hw.device_kv_bytes),
      hw.host_bytes > 0 ? Bytes(hw.host_bytes) : "no cap", hw.host_bytes > 0 ? Bytes(hw.nvme_bytes) : "none",
      100 * o.device_budget_fraction, SketchKindName(o.sketch));
  absl::StrAppendFormat(&s, "%10s %10s %10s %7s %9s %9s %9s %16s %11s %11s %11s %11s %10s %10s\n", "context",
                        "kvtier", "all-GPU", "gain", "device", "tiers", "bandwidth", "binding", "dev/seq",
                        "tier/seq", "host", "NVMe", "h2d/step", "d2h/step");
  for (const PlanRow& w : r.rows) {
    const std::string gain = w.baseline_sequences > 0
                                 ? absl::StrFormat("%.1fx", static_cast<double>(w.sequences) / w.baseline_sequences)
                                 : (w.sequences > 0 ? "inf" : "-");
    absl::StrAppendFormat(&s, "%10d %10d %10d %7s %9s %9s %9s %16s %11s %11s %11s %11s %10s %10s\n", w.context,
                          w.sequences, w.baseline_sequences, gain, Limit(w.device_limit), Limit(w.tier_limit),
                          Limit(w.bandwidth_limit), w.binding, Bytes(w.device_bytes_per_sequence),
                          Bytes(w.tier_bytes_per_sequence), Bytes(w.host_bytes), Bytes(w.nvme_bytes),
                          Bytes(w.h2d_bytes_per_step), Bytes(w.d2h_bytes_per_step));
  }
  return s;
}

std::string PlanJson(const PlanResult& r, const PlanOptions& o) {
  std::string s = "{\n";
  absl::StrAppendFormat(&s, "  \"model\": \"%s\",\n  \"shape\": \"%s\",\n", o.model_name, o.shape.ToString());
  absl::StrAppendFormat(&s, "  \"device_kv_bytes\": %.0f,\n  \"host_bytes\": %.0f,\n  \"nvme_bytes\": %.0f,\n",
                        o.profile.device_kv_bytes, o.profile.host_bytes, o.profile.nvme_bytes);
  absl::StrAppendFormat(&s, "  \"device_budget_fraction\": %.9g,\n  \"sketch\": \"%s\",\n  \"max_sequences\": %d,\n",
                        o.device_budget_fraction, SketchKindName(o.sketch), o.max_sequences);
  s += "  \"rows\": [\n";
  for (size_t i = 0; i < r.rows.size(); ++i) {
    const PlanRow& w = r.rows[i];
    s += "    {";
    auto i64 = [&](const char* k, int64_t v) { absl::StrAppendFormat(&s, "\"%s\": %d, ", k, v); };
    i64("context", w.context);
    i64("sequences", w.sequences);
    i64("baseline_sequences", w.baseline_sequences);
    i64("device_limit", w.device_limit);
    i64("tier_limit", w.tier_limit);
    i64("slot_limit", w.slot_limit);
    i64("bandwidth_limit", w.bandwidth_limit);
    absl::StrAppendFormat(&s, "\"binding\": \"%s\", ", w.binding);
    i64("device_bytes_per_sequence", w.device_bytes_per_sequence);
    i64("baseline_bytes_per_sequence", w.baseline_bytes_per_sequence);
    i64("tier_bytes_per_sequence", w.tier_bytes_per_sequence);
    i64("device_bytes", w.device_bytes);
    i64("host_bytes", w.host_bytes);
    i64("nvme_bytes", w.nvme_bytes);
    i64("h2d_bytes_per_step", w.h2d_bytes_per_step);
    i64("d2h_bytes_per_step", w.d2h_bytes_per_step);
    i64("nvme_write_bytes_per_step", w.nvme_write_bytes_per_step);
    i64("nvme_read_bytes_per_step_max", w.nvme_read_bytes_per_step_max);
    absl::StrAppendFormat(&s, "\"recall_tokens_per_head_step\": %.6g, \"recall_step_share\": %.6g, ",
                          w.recall_tokens_per_head_step, w.recall_step_share);
    absl::StrAppendFormat(&s, "\"compute_us\": %.6g, \"transfer_us\": %.6g, ", w.compute_us, w.transfer_us);
    i64("recent_tokens", w.plan.recent_tokens);
    i64("candidate_tokens", w.plan.candidate_tokens);
    i64("staging_tokens", w.plan.staging_tokens);
    i64("recall_tokens", w.plan.recall_tokens);
    absl::StrAppendFormat(&s, "\"block_tokens\": %d}%s\n", w.plan.block_tokens, i + 1 < r.rows.size() ? "," : "");
  }
  s += "  ]\n}\n";
  return s;
}

std::string PlanSvg(const PlanResult& r, const PlanOptions& o) {
  const double W = 640, Ht = 420, left = 70, right = 20, top = 40, bottom = 50;
  double xmin = 1e300, xmax = 0, ymax = 1;
  for (const PlanRow& w : r.rows) {
    xmin = std::min(xmin, static_cast<double>(w.context));
    xmax = std::max(xmax, static_cast<double>(w.context));
    ymax = std::max({ymax, static_cast<double>(w.sequences), static_cast<double>(w.baseline_sequences)});
  }
  if (r.rows.empty()) xmin = xmax = 1;
  const double lx0 = std::floor(std::log10(xmin)), lx1 = std::max(lx0 + 1, std::ceil(std::log10(xmax)));
  const double ly1 = std::max(1.0, std::ceil(std::log10(ymax)));
  // log10(y + 1) so that 0 sequences sits on the axis.
  auto X = [&](double x) { return left + (std::log10(x) - lx0) / (lx1 - lx0) * (W - left - right); };
  auto Y = [&](double y) { return Ht - bottom - std::log10(y + 1) / (ly1 + 0.05) * (Ht - top - bottom); };
  std::string s = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
      W, Ht);
  absl::StrAppendFormat(&s, "<text x=\"%.0f\" y=\"22\" font-size=\"14\">%s: concurrent sequences vs context length</text>\n",
                        left, o.model_name.empty() ? "custom shape" : o.model_name);
  for (double e = lx0; e <= lx1; ++e) {
    const double x = X(std::pow(10, e));
    absl::StrAppendFormat(&s, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x, top, x,
                          Ht - bottom);
    absl::StrAppendFormat(&s, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">1e%.0f</text>\n", x,
                          Ht - bottom + 16, e);
  }
  for (double e = 0; e <= ly1; ++e) {
    const double y = Y(std::pow(10, e) - 1 + (e == 0 ? 1 : 0));
    absl::StrAppendFormat(&s, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left, y,
                          W - right, y);
    absl::StrAppendFormat(&s, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.0f</text>\n", left - 6, y + 4,
                          std::pow(10, e));
  }
  absl::StrAppendFormat(&s, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">context length (tokens, log)</text>\n",
                        (left + W - right) / 2, Ht - 12);
  absl::StrAppendFormat(&s,
                        "<text transform=\"translate(16 %.1f) rotate(-90)\" text-anchor=\"middle\">concurrent "
                        "sequences (log)</text>\n",
                        (top + Ht - bottom) / 2);
  auto series = [&](bool kvtier, const char* colour, const char* name, double ly) {
    std::string pts;
    for (const PlanRow& w : r.rows) {
      const double y = static_cast<double>(kvtier ? w.sequences : w.baseline_sequences);
      absl::StrAppendFormat(&pts, "%.1f,%.1f ", X(static_cast<double>(w.context)), Y(y));
      absl::StrAppendFormat(&s, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"/>\n",
                            X(static_cast<double>(w.context)), Y(y), colour);
    }
    absl::StrAppendFormat(&s, "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"/>\n", pts,
                          colour);
    absl::StrAppendFormat(&s, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>",
                          W - right - 170, ly, W - right - 150, ly, colour);
    absl::StrAppendFormat(&s, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", W - right - 144, ly + 4, name);
  };
  series(true, "#1f77b4", "kvtier (tiers)", top + 10);
  series(false, "#d62728", "whole cache on GPU", top + 28);
  s += "</svg>\n";
  return s;
}

}  // namespace kvtier::replay
