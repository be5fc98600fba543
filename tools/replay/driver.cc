#include "replay/driver.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <list>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvtier/budget.h"
#include "kvtier/runtime.h"

namespace kvtier::replay {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One admitted request while it runs.
struct Live {
  int64_t index = 0;
  std::vector<uint64_t> keys;  // content block keys over prompt + output
  int64_t length = 0;          // tokens appended to every layer
  int64_t decode_left = 0;     // decode steps still to run
  int64_t tier_bytes = 0;      // projected tier bytes at its final length
};

// Prompt blocks by hash id whose K/V were computed once: an LRU list over a
// host part and an NVMe part (accounting of the driver, not runtime blocks).
class PrefixStore {
 public:
  PrefixStore(int64_t block_bytes, int64_t host_bytes, int64_t nvme_bytes)
      : host_cap_(block_bytes > 0 ? host_bytes / block_bytes : 0),
        nvme_cap_(block_bytes > 0 ? nvme_bytes / block_bytes : 0) {}
  enum Where { kMiss = 0, kHost = 1, kNvme = 2 };
  // Where the block is now; a hit moves it to the front of the host part.
  Where Lookup(int64_t id) {
    auto it = where_.find(id);
    if (it == where_.end()) return kMiss;
    const Where w = it->second.first;
    Erase(id);
    Insert(id);
    return w;
  }
  void Insert(int64_t id) {
    if (host_cap_ + nvme_cap_ == 0 || where_.contains(id)) return;
    host_.push_front(id);
    where_[id] = {kHost, host_.begin()};
    while (static_cast<int64_t>(host_.size()) > host_cap_) {  // LRU host block down to NVMe
      const int64_t down = host_.back();
      host_.pop_back();
      nvme_.push_front(down);
      where_[down] = {kNvme, nvme_.begin()};
    }
    while (static_cast<int64_t>(nvme_.size()) > nvme_cap_) {
      where_.erase(nvme_.back());
      nvme_.pop_back();
    }
  }

 private:
  void Erase(int64_t id) {
    auto it = where_.find(id);
    (it->second.first == kHost ? host_ : nvme_).erase(it->second.second);
    where_.erase(it);
  }
  int64_t host_cap_, nvme_cap_;
  std::list<int64_t> host_, nvme_;
  absl::flat_hash_map<int64_t, std::pair<Where, std::list<int64_t>::iterator>> where_;
};

struct Totals {
  int64_t d2h = 0, h2d = 0, nvme_read = 0, nvme_write = 0, disk_reads = 0, requested = 0;
};

// The runtime's counters; `fold` heads each (FoldedOptions).
Totals Snapshot(const Runtime& rt, int64_t fold) {
  const RuntimeStats s = rt.Stats();
  return Totals{s.store.bytes_device_to_host * fold, s.store.bytes_host_to_device * fold,
                s.store.bytes_disk_to_host * fold,   s.store.bytes_host_to_disk * fold,
                s.disk_tier.reads * fold,            s.recall.requested * fold};
}

absl::Status Validate(const ReplayOptions& o) {
  if (absl::Status st = o.shape.Validate(); !st.ok()) return st;
  if (o.token_scale < 1 || o.token_scale > kTraceBlockTokens || (o.token_scale & (o.token_scale - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("token_scale %d must be a power of two in [1, %d]", o.token_scale, kTraceBlockTokens));
  }
  if (!(o.time_scale >= 0) || !std::isfinite(o.time_scale)) {
    return absl::InvalidArgumentError(absl::StrFormat("time_scale %g must be finite and >= 0", o.time_scale));
  }
  if (o.max_sequences < 1) return absl::InvalidArgumentError(absl::StrFormat("max_sequences %d < 1", o.max_sequences));
  if (o.max_requests < 0) return absl::InvalidArgumentError(absl::StrFormat("max_requests %d < 0", o.max_requests));
  if (o.max_context < 0) return absl::InvalidArgumentError(absl::StrFormat("max_context %d < 0", o.max_context));
  if (o.prefill_chunk < 1) return absl::InvalidArgumentError(absl::StrFormat("prefill_chunk %d < 1", o.prefill_chunk));
  if (o.capture != nullptr) {
    if (o.content != ContentLevel::kFull) return absl::InvalidArgumentError("a capture needs content full");
    if (absl::Status st = o.capture->Check(o.shape); !st.ok()) return st;
  }
  return absl::OkStatus();
}

// Events per second of `seconds`, 0 where none passed.
double Rate(double events, double seconds) { return seconds > 0 ? events / seconds : 0.0; }
// Decoded tokens x layers.
double DecodeEvents(const ReplayResult& r, const ReplayOptions& o) {
  return static_cast<double>(r.decode_tokens) * o.shape.layers;
}

}  // namespace

absl::StatusOr<Options> FoldedOptions(const Options& o) {
  absl::StatusOr<BudgetPlan> plan = PlanBudget(o);
  if (!plan.ok()) return plan.status();
  const ModelShape& sh = o.shape;
  const int64_t fold = static_cast<int64_t>(sh.layers) * sh.kv_heads;
  Options f = o;
  f.shape = ModelShape{.layers = 1, .q_heads = sh.group(), .kv_heads = 1, .head_dim = sh.head_dim, .dtype = sh.dtype};
  // Every size explicit, so the one head's plan is the per-head plan above,
  // and a budget of exactly one head per sequence plus the shared planes.
  f.sink_tokens = plan->sink_tokens;
  f.block_tokens = plan->block_tokens;
  f.device_budget_bytes = plan->per_sequence_bytes / fold * o.max_sequences + plan->shared_bytes;
  if (plan->compressed) {
    f.recent_tokens = plan->recent_tokens;
    f.candidate_tokens = plan->candidate_tokens;
    f.staging_tokens = plan->staging_tokens;
    if (plan->sketch_kind != SketchKind::kNone) {
      f.sketch_rows = plan->sketch_rows;
      f.sketch_width = plan->sketch_width;
    }
    if (plan->summary_groups > 0) f.summary_tokens = plan->summary_tokens;
    if (o.recall_proxy != RecallProxy::kNone) f.recall_tokens = plan->recall_tokens;
  }
  // The tiers hold one head's share of the blocks.
  f.host_tier_bytes = o.host_tier_bytes / fold;
  f.nvme_bytes = o.nvme_bytes / fold;
  absl::StatusOr<BudgetPlan> one = PlanBudget(f);
  if (!one.ok()) return one.status();
  const BudgetPlan& p = *plan;
  const BudgetPlan& q = *one;
  if (q.compressed != p.compressed || q.sink_tokens != p.sink_tokens || q.recent_tokens != p.recent_tokens ||
      q.candidate_tokens != p.candidate_tokens || q.staging_tokens != p.staging_tokens ||
      q.sketch_rows != p.sketch_rows || q.sketch_width != p.sketch_width || q.block_tokens != p.block_tokens ||
      q.recall_tokens != p.recall_tokens || q.summary_tokens != p.summary_tokens ||
      q.per_head.total() != p.per_head.total()) {
    return absl::InternalError(absl::StrFormat("the folded head's plan (%s) differs from the model's (%s)",
                                               q.Explain(), p.Explain()));
  }
  return f;
}

Options ReplayRuntimeOptions(const ReplayOptions& options, int64_t max_context) {
  Options o;
  o.shape = options.shape;
  o.max_context = max_context;
  o.max_sequences = options.max_sequences;
  o.device_budget_bytes = options.device_budget_bytes;
  o.device_budget_fraction = options.device_budget_fraction;
  o.host_tier_bytes = options.host_bytes;
  o.nvme_dir = options.nvme_dir;
  o.nvme_bytes = options.nvme_bytes;
  o.block_tokens = options.block_tokens;
  o.sketch_kind = options.sketch;
  o.vague_policy = options.sketch == SketchKind::kNone ? VaguePolicy::kDrop : options.policy;
  o.recall_proxy = options.sketch == SketchKind::kNone && options.proxy == RecallProxy::kSketch ? RecallProxy::kNone
                                                                                                 : options.proxy;
  o.recall_replace = options.recall_replace;
  o.seed = options.seed * 0x9e3779b97f4a7c15ull + 0x6b7674696572ull;
  // --content none: the same runtime without contents; the content model's
  // expected attention shares stand in for the kernels' softmax.
  o.plan_only = options.content == ContentLevel::kNone;
  o.backend = o.plan_only ? BackendKind::kCpu : options.backend;
  return o;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double rank = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - static_cast<double>(lo));
}

absl::StatusOr<ReplayResult> RunReplay(const Trace& trace, const ReplayOptions& options,
                                       const std::atomic<bool>* stop,
                                       const std::function<void(const Progress&)>& progress,
                                       double progress_every_s) {
  if (absl::Status st = Validate(options); !st.ok()) return st;
  const double wall0 = Now();
  const ModelShape& sh = options.shape;
  const int L = sh.layers, H = sh.kv_heads;
  const int S = options.token_scale;
  const int64_t block = kTraceBlockTokens / S;

  ReplayResult res;
  const int64_t n = options.max_requests > 0
                        ? std::min<int64_t>(options.max_requests, static_cast<int64_t>(trace.requests.size()))
                        : static_cast<int64_t>(trace.requests.size());
  res.requests = n;
  res.per_request.resize(n);
  int64_t longest = 1;
  const double first_ms = n > 0 ? trace.requests[0].arrival_ms : 0.0;  // the clock starts at the first arrival
  for (int64_t i = 0; i < n; ++i) {
    const Request& q = trace.requests[i];
    RequestResult& r = res.per_request[i];
    r.index = i;
    r.line = q.line;
    r.prompt_tokens = CeilDiv(q.input_tokens, S);
    r.output_tokens = CeilDiv(q.output_tokens, S);
    r.arrival_us = (q.arrival_ms - first_ms) * 1000.0 * options.time_scale;
    r.prefix_blocks = static_cast<int64_t>(q.hash_ids.size());
    longest = std::max(longest, r.prompt_tokens + r.output_tokens);
  }
  const int64_t max_context = options.max_context > 0 ? options.max_context : CeilDiv(longest, block) * block;

  Options o = ReplayRuntimeOptions(options, max_context);
  const bool plan_only = o.plan_only;
  const bool disk_tier = !plan_only && !o.nvme_dir.empty();
  absl::StatusOr<BudgetPlan> model_plan = PlanBudget(o);
  if (!model_plan.ok()) return model_plan.status();
  const BudgetPlan& plan = *model_plan;
  // Plan-only, folded: one head cache stands for all L x H (FoldedOptions);
  // its counts are multiplied by `fold`.
  const bool folded = plan_only && options.fold_heads;
  const int64_t fold = folded ? static_cast<int64_t>(L) * H : 1;
  if (folded) {
    absl::StatusOr<Options> f = FoldedOptions(o);
    if (!f.ok()) return f.status();
    o = *f;
  }
  absl::StatusOr<std::unique_ptr<Backend>> made =
      !plan_only && options.make_backend ? options.make_backend() : CreateBackend(o.backend);
  if (!made.ok()) return made.status();
  if (*made == nullptr) return absl::InvalidArgumentError("replay: make_backend returned no backend");
  Backend& backend = **made;  // owned by the runtime from here on
  absl::StatusOr<std::unique_ptr<Runtime>> created = Runtime::Create(o, std::move(*made));
  if (!created.ok()) return created.status();
  Runtime& rt = **created;
  const int RL = o.shape.layers, RH = o.shape.kv_heads;  // the runtime's layers and KV heads
  res.plan = plan.Explain();
  res.backend = std::string(rt.backend_name());
  res.budget_bytes = plan.budget_bytes;
  res.per_sequence_bytes = plan.per_sequence_bytes;

  ContentOptions co = options.content_options;
  co.seed = options.seed;
  co.block_tokens = static_cast<int>(block);
  // The content model gives every layer and KV head the same attention
  // weights (ContentModel::Scores), which is what makes the fold exact.
  const ContentModel content(o.shape, co);
  const Capture* capture = options.capture.get();  // null: the content model's K/V/Q

  // Tier bytes a request needs at its final length: every token that ever
  // leaves the device keeps a host-tier block copy.
  const int64_t resident = plan.compressed ? plan.sink_tokens + plan.recent_tokens + plan.candidate_tokens : max_context;
  const int64_t block_bytes = plan.block_tokens * sh.HeadTokenBytes();
  auto tier_need = [&](int64_t tokens) {
    return CeilDiv(std::max<int64_t>(0, tokens - resident), plan.block_tokens) * block_bytes * L * H;
  };
  const int64_t tier_capacity =
      options.host_bytes > 0 ? options.host_bytes + (options.nvme_dir.empty() ? 0 : options.nvme_bytes) : 0;

  const HardwareProfile& hw = options.profile;
  const int64_t prefix_block_bytes = block * sh.TokenBytes();
  PrefixStore prefix(prefix_block_bytes, options.prefix_host_bytes, options.prefix_nvme_bytes);
  const int64_t row = sh.head_dim * static_cast<int64_t>(DTypeSize(sh.dtype));
  const int64_t token_bytes = sh.HeadTokenBytes();
  double t = 0;  // virtual microseconds
  std::deque<int64_t> queue;
  std::vector<Live> live;
  int64_t next = 0, done = 0, tier_committed = 0;
  double last_progress = wall0;
  std::vector<char> kbuf, vbuf;
  std::vector<float> scores;
  const int64_t q_bytes = sh.q_heads * row;  // one sequence's Q (and attention output) on a layer
  // K/V/Q in the backend's memory: host memory passes as it is, else they
  // cross into device buffers before each call (as in kvtier-demo); freed
  // before the runtime (which owns the backend) is.
  const bool host_tensors = plan_only || backend.caps().device_memory_host_accessible;
  struct DeviceBuffers {
    Backend& backend;
    std::vector<void*> ptrs;
    ~DeviceBuffers() {
      for (void* p : ptrs) backend.FreeDevice(p);
    }
  } device{backend, {}};
  char *dk = nullptr, *dv = nullptr, *dq = nullptr, *dout = nullptr;
  if (!host_tensors) {
    const int64_t kv_bytes = std::max(options.prefill_chunk, 1) * RH * row;
    const int64_t qs_bytes = options.max_sequences * q_bytes;
    for (auto [buffer, bytes] : {std::pair{&dk, kv_bytes}, {&dv, kv_bytes}, {&dq, qs_bytes}, {&dout, qs_bytes}}) {
      absl::StatusOr<void*> p = backend.AllocateDevice(bytes);
      if (!p.ok()) return p.status();
      device.ptrs.push_back(*p);
      *buffer = static_cast<char*>(*p);
    }
  }
  // The tensor a call takes: `host` itself, or its copy in `dev`.
  auto to_device = [&](char* dev, const void* host, int64_t bytes) -> absl::StatusOr<const void*> {
    if (host_tensors) return host;
    if (absl::Status st = backend.Copy(dev, host, bytes, CopyKind::kHostToDevice); !st.ok()) return st;
    return dev;
  };

  auto finish = [&](Live& s) -> absl::Status {
    RequestResult& r = res.per_request[s.index];
    r.completed = true;
    r.finish_us = t;
    ++res.completed;
    ++done;
    tier_committed -= s.tier_bytes;
    return rt.RemoveSequence(static_cast<SequenceId>(s.index));
  };

  // Prefill of one admitted request: every layer, in chunks, with the
  // content model's scores as the initial accumulated attention.
  auto admit = [&](int64_t i) -> absl::Status {
    const Request& tq = trace.requests[i];
    RequestResult& r = res.per_request[i];
    Live s;
    s.index = i;
    const int64_t total = r.prompt_tokens + r.output_tokens;
    s.keys.resize(CeilDiv(total, block));
    for (int64_t b = 0; b < static_cast<int64_t>(s.keys.size()); ++b) {
      s.keys[b] = content.BlockKey(static_cast<uint64_t>(i), b, tq.hash_ids);
    }
    s.tier_bytes = tier_need(total);
    if (absl::Status st = rt.AddSequence(static_cast<SequenceId>(i)); !st.ok()) return st;
    const Totals before = Snapshot(rt, fold);
    const int64_t P = r.prompt_tokens;
    // Prefix reuse: the leading prompt blocks found in the prefix store are
    // copied in (the same K/V: the content model keys blocks by hash id)
    // instead of recomputed; the rest of the prompt is prefilled.
    double load_us = 0;
    int64_t reused = 0;
    for (int64_t b = 0; b < static_cast<int64_t>(tq.hash_ids.size()) && (b + 1) * block <= P; ++b) {
      const PrefixStore::Where w = prefix.Lookup(tq.hash_ids[b]);
      if (w == PrefixStore::kMiss) break;
      ++reused;
      (w == PrefixStore::kHost ? r.prefix_hits_host : r.prefix_hits_nvme) += 1;
      load_us += static_cast<double>(prefix_block_bytes) / (hw.h2d_gbps * 1e3);
      if (w == PrefixStore::kNvme) load_us += static_cast<double>(prefix_block_bytes) / (hw.nvme_read_gbps * 1e3) + hw.nvme_latency_us;
    }
    res.prefix_hits_host += r.prefix_hits_host;
    res.prefix_hits_nvme += r.prefix_hits_nvme;
    res.prefix_bytes_loaded += reused * prefix_block_bytes;
    for (int64_t b = 0; b < static_cast<int64_t>(tq.hash_ids.size()) && (b + 1) * block <= P; ++b) {
      prefix.Insert(tq.hash_ids[b]);
    }
    for (int64_t first = 0; first < P; first += options.prefill_chunk) {
      const int64_t c = std::min<int64_t>(options.prefill_chunk, P - first);
      kbuf.resize(c * RH * row);
      vbuf.resize(kbuf.size());
      scores.resize(c * RH);
      if (!plan_only && capture == nullptr) content.KeysValues(s.keys, first, c, kbuf.data(), vbuf.data());
      content.Scores(s.keys, first, c, P - 1, scores.data());
      AppendOptions ao;
      ao.scores = scores.data();
      ao.weights = scores.data();  // plan-only: the same shares are the attention model
      for (int l = 0; l < RL; ++l) {
        if (capture != nullptr) capture->KeysValues(l, first, c, kbuf.data(), vbuf.data());
        const void* k = nullptr;
        const void* v = nullptr;
        if (!plan_only) {
          absl::StatusOr<const void*> kd = to_device(dk, kbuf.data(), c * RH * row);
          absl::StatusOr<const void*> vd = to_device(dv, vbuf.data(), c * RH * row);
          if (!kd.ok() || !vd.ok()) return kd.ok() ? vd.status() : kd.status();
          k = *kd;
          v = *vd;
        }
        if (absl::Status st = rt.Append(static_cast<SequenceId>(i), l, k, v, c, ao); !st.ok()) {
          return absl::Status(st.code(), absl::StrFormat("prefill of request %d (trace line %d, %d prompt tokens): %s",
                                                         i, r.line, P, st.message()));
        }
      }
    }
    rt.Drain();
    if (options.after_prefill) options.after_prefill(rt, static_cast<SequenceId>(i));
    const Totals after = Snapshot(rt, fold);
    res.bytes_d2h += after.d2h - before.d2h;
    res.bytes_nvme_write += after.nvme_write - before.nvme_write;
    res.prompt_tokens += P;
    res.prefix_blocks += r.prefix_blocks;
    res.token_events += P * L;
    // The model's prefill work, and the tokens leaving the device for the host tier.
    t += static_cast<double>(P - reused * block) * hw.prefill_token_us + load_us +
         static_cast<double>(after.d2h - before.d2h) / (hw.d2h_gbps * 1e3);
    r.admitted = true;
    r.admit_us = r.admit_us == 0 ? t : r.admit_us;
    r.first_token_us = t;
    ++res.admitted;
    s.length = P;
    s.decode_left = std::max<int64_t>(0, r.output_tokens - 1);  // the prefill yields the first token
    tier_committed += s.tier_bytes;
    live.push_back(std::move(s));
    res.max_live = std::max<int64_t>(res.max_live, static_cast<int64_t>(live.size()));
    if (live.back().decode_left == 0) {
      absl::Status st = finish(live.back());
      live.pop_back();
      return st;
    }
    return absl::OkStatus();
  };

  while (true) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) {
      res.interrupted = true;
      break;
    }
    while (next < n && res.per_request[next].arrival_us <= t) queue.push_back(next++);
    // Admission, first come first served: the head waits for a slot and tier room.
    while (!queue.empty()) {
      const int64_t i = queue.front();
      RequestResult& r = res.per_request[i];
      const int64_t total = r.prompt_tokens + r.output_tokens;
      if (total > max_context) {
        r.rejected = absl::StrFormat("context %d > max_context %d", total, max_context);
      } else if (tier_capacity > 0 && tier_need(total) > tier_capacity) {
        r.rejected = absl::StrFormat("needs %d tier bytes > capacity %d", tier_need(total), tier_capacity);
      }
      if (!r.rejected.empty()) {
        ++res.rejected;
        ++done;
        queue.pop_front();
        continue;
      }
      if (static_cast<int>(live.size()) >= options.max_sequences) break;
      if (tier_capacity > 0 && tier_committed + tier_need(total) > tier_capacity) break;
      queue.pop_front();
      r.admit_us = t;
      if (absl::Status st = admit(i); !st.ok()) return st;
    }
    if (live.empty()) {
      if (next >= n) break;  // the queue is empty too: a lone request always fits
      t = std::max(t, res.per_request[next].arrival_us);
      continue;
    }

    // One decode step of every live sequence: append its token, attend, per layer.
    const double step_wall0 = Now();
    const Totals before = Snapshot(rt, fold);
    int64_t exact = 0, sketch = 0;
    std::vector<AttendItem> items(live.size());
    std::vector<std::vector<char>> qs(plan_only ? 0 : live.size(), std::vector<char>(q_bytes)), outs = qs;
    kbuf.resize(RH * row);
    vbuf.resize(kbuf.size());
    // Plan-only: the new token's weight, as seen from itself.
    std::vector<float> decode_weights(plan_only ? live.size() * RH : 0);
    for (size_t j = 0; j < decode_weights.size() / RH; ++j) {
      content.Scores(live[j].keys, live[j].length, 1, live[j].length, decode_weights.data() + j * RH);
    }
    for (int l = 0; l < RL; ++l) {
      for (size_t j = 0; j < live.size(); ++j) {
        Live& s = live[j];
        const SequenceId id = static_cast<SequenceId>(s.index);
        absl::Status st;
        if (plan_only) {
          AppendOptions ao;
          ao.weights = decode_weights.data() + j * RH;
          st = rt.Append(id, l, nullptr, nullptr, 1, ao);
          items[j] = AttendItem{id, nullptr, nullptr};
        } else {
          if (capture != nullptr) {
            capture->KeysValues(l, s.length, 1, kbuf.data(), vbuf.data());
            capture->Query(l, s.length, qs[j].data());
          } else {
            content.KeysValues(s.keys, s.length, 1, kbuf.data(), vbuf.data());
            content.Query(s.keys, s.length, qs[j].data());
          }
          absl::StatusOr<const void*> kd = to_device(dk, kbuf.data(), RH * row);
          absl::StatusOr<const void*> vd = to_device(dv, vbuf.data(), RH * row);
          absl::StatusOr<const void*> qd = to_device(host_tensors ? nullptr : dq + j * q_bytes, qs[j].data(), q_bytes);
          st = !kd.ok() ? kd.status() : !vd.ok() ? vd.status() : !qd.ok() ? qd.status() : rt.Append(id, l, *kd, *vd, 1);
          if (st.ok()) items[j] = AttendItem{id, *qd, host_tensors ? outs[j].data() : dout + j * q_bytes};
        }
        if (!st.ok()) {
          return absl::Status(st.code(), absl::StrFormat("decode of request %d (trace line %d): %s", s.index,
                                                         res.per_request[s.index].line, st.message()));
        }
      }
      // With a disk tier, the demotions the appends started and the recalls
      // the attends started finish before the next layer's work, so which
      // blocks are demoted and which are read from the disk tier do not
      // depend on I/O timing (the same seed gives the same JSON).
      if (disk_tier) rt.Drain();
      absl::StatusOr<AttendCounts> c = rt.AttendBatch(l, items);
      if (!c.ok()) return c.status();
      if (disk_tier) rt.Drain();
      exact += c->exact * fold;
      sketch += c->from_sketch * fold;
      res.served_dropped += c->dropped * fold;
    }
    rt.Drain();
    // Per-request shares: every live sequence's layers see the same region sizes.
    for (Live& s : live) {
      RequestResult& r = res.per_request[s.index];
      const absl::StatusOr<RegionCounts> rc = rt.Regions(static_cast<SequenceId>(s.index));
      if (rc.ok()) {
        r.exact += rc->resident() * fold;
        r.from_sketch += o.vague_policy == VaguePolicy::kDrop ? 0 : rc->vague * fold;
        r.dropped += o.vague_policy == VaguePolicy::kDrop ? rc->vague * fold : 0;
      }
    }
    const Totals after = Snapshot(rt, fold);
    res.served_exact += exact;
    res.served_sketch += sketch;
    const int64_t h2d = after.h2d - before.h2d, nvme_read = after.nvme_read - before.nvme_read;
    const int64_t requested = after.requested - before.requested;
    res.bytes_h2d += h2d;
    res.bytes_nvme_read += nvme_read;
    res.bytes_d2h += after.d2h - before.d2h;
    res.bytes_nvme_write += after.nvme_write - before.nvme_write;
    res.recall_requested += requested;
    res.recall_steps += requested > 0;
    // Virtual clock: attention reads the resident K/V and the sketches; the
    // recalls this step requested travel while the next step computes.
    const double compute_us =
        hw.step_base_us +
        (static_cast<double>(exact) * token_bytes +
         static_cast<double>(live.size()) * L * H * plan.per_head.sketch) / (hw.device_gbps * 1e3);
    const double recall_heads = requested > 0 ? static_cast<double>(live.size()) * L * H : 0.0;
    const double transfer_us = static_cast<double>(h2d) / (hw.h2d_gbps * 1e3) + recall_heads * hw.h2d_latency_us +
                               static_cast<double>(nvme_read) / (hw.nvme_read_gbps * 1e3) +
                               static_cast<double>(after.disk_reads - before.disk_reads) * hw.nvme_latency_us;
    if (transfer_us > compute_us) res.recall_late += requested;
    const double step = std::max(compute_us, transfer_us);
    res.step_us.push_back(step);
    t += step;
    ++res.decode_steps;
    res.decode_tokens += static_cast<int64_t>(live.size());
    res.token_events += static_cast<int64_t>(live.size()) * L;
    res.decode_wall_seconds += Now() - step_wall0;
    for (size_t j = 0; j < live.size();) {
      Live& s = live[j];
      ++s.length;
      if (--s.decode_left == 0) {
        if (absl::Status st = finish(s); !st.ok()) return st;
        live[j] = std::move(live.back());
        live.pop_back();
      } else {
        ++j;
      }
    }
    if (progress && Now() - last_progress >= progress_every_s) {
      last_progress = Now();
      progress(Progress{done, n, static_cast<int64_t>(live.size()), static_cast<int64_t>(queue.size()), t / 1e6,
                        last_progress - wall0});
    }
  }
  rt.Drain();
  const RuntimeStats st = rt.Stats();
  // The arena's peak: the shared planes and the sequences' chunks; a folded
  // sequence's chunk is 1/fold of the model's.
  const int64_t shared = rt.plan().shared_bytes;
  res.peak_device_bytes = shared + (st.peak_device_bytes - shared) * fold;
  res.peak_host_bytes = st.host_tier.peak_bytes_in_use * fold;
  res.peak_nvme_bytes = st.disk_tier.peak_bytes_in_use * fold;
  // What is still held: zero once every admitted request finished.
  res.final_host_bytes = st.host_tier.bytes_in_use * fold;
  res.final_nvme_bytes = st.disk_tier.bytes_in_use * fold;
  res.final_blocks = st.store.blocks * fold;
  res.virtual_seconds = t / 1e6;
  res.wall_seconds = Now() - wall0;
  return res;
}

std::string ReplaySummary(const ReplayResult& r, const ReplayOptions& o) {
  std::string s;
  const double served = static_cast<double>(r.served_exact + r.served_sketch + r.served_dropped);
  auto pct = [](double a, double b) { return b > 0 ? 100.0 * a / b : 0.0; };
  absl::StrAppendFormat(&s, "kvtier-replay: %s (%s), content %s, token scale 1/%d, seed %d, %s backend%s\n",
                        o.model_name.empty() ? "custom shape" : o.model_name, o.shape.ToString(),
                        o.content != ContentLevel::kFull ? "none"
                        : o.capture != nullptr            ? "full (captured " + o.capture->dir() + ")"
                                                          : "full",
                        o.token_scale, o.seed, r.backend, r.interrupted ? "  [INTERRUPTED: partial results]" : "");
  absl::StrAppendFormat(&s, "plan: %s\n", r.plan);
  absl::StrAppendFormat(&s, "requests: %d, admitted %d, completed %d, rejected %d; at most %d live\n", r.requests,
                        r.admitted, r.completed, r.rejected, r.max_live);
  absl::StrAppendFormat(&s, "tokens: %d prompt, %d decoded in %d steps\n", r.prompt_tokens, r.decode_tokens,
                        r.decode_steps);
  absl::StrAppendFormat(&s, "peak bytes: device %d (budget %d), host tier %d, NVMe tier %d\n", r.peak_device_bytes,
                        r.budget_bytes, r.peak_host_bytes, r.peak_nvme_bytes);
  absl::StrAppendFormat(&s, "served (token-heads): exact %.2f%%, from sketch %.2f%%, dropped %.2f%%\n",
                        pct(r.served_exact, served), pct(r.served_sketch, served), pct(r.served_dropped, served));
  absl::StrAppendFormat(&s, "recall (replaces %s tokens): %d token-heads requested in %d steps, %.2f%% late by the "
                        "virtual clock\n",
                        RecallReplaceName(o.recall_replace), r.recall_requested, r.recall_steps,
                        pct(r.recall_late, r.recall_requested));
  absl::StrAppendFormat(&s, "bytes: device->host %d, host->device %d, NVMe read %d, NVMe write %d\n", r.bytes_d2h,
                        r.bytes_h2d, r.bytes_nvme_read, r.bytes_nvme_write);
  if (r.prefix_blocks > 0) {
    absl::StrAppendFormat(&s, "prefix blocks: %d, reused from host %.2f%%, from NVMe %.2f%% (%d bytes copied, not recomputed)\n",
                          r.prefix_blocks, pct(r.prefix_hits_host, r.prefix_blocks),
                          pct(r.prefix_hits_nvme, r.prefix_blocks), r.prefix_bytes_loaded);
  }
  absl::StrAppendFormat(&s, "virtual clock: %.1f s; decode step p50 %.0f us, p99 %.0f us\n", r.virtual_seconds,
                        Percentile(r.step_us, 50), Percentile(r.step_us, 99));
  absl::StrAppendFormat(&s, "wall: %.2f s, %.3g token-events/s; decode steps %.2f s, %.3g token-events/s\n",
                        r.wall_seconds, Rate(r.token_events, r.wall_seconds), r.decode_wall_seconds,
                        Rate(DecodeEvents(r, o), r.decode_wall_seconds));
  return s;
}

namespace {

// The characters a JSON string must escape.
std::string JsonEscape(std::string_view in) {
  std::string out;
  for (const char c : in) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", static_cast<unsigned char>(c));
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

std::string ReplayJson(const ReplayResult& r, const ReplayOptions& o) {
  const double served = static_cast<double>(r.served_exact + r.served_sketch + r.served_dropped);
  auto rate = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  std::string s = "{\n";
  auto i64 = [&](const char* k, int64_t v) { absl::StrAppendFormat(&s, "  \"%s\": %d,\n", k, v); };
  auto dbl = [&](const char* k, double v) { absl::StrAppendFormat(&s, "  \"%s\": %.9g,\n", k, v); };
  absl::StrAppendFormat(&s, "  \"model\": \"%s\",\n  \"shape\": \"%s\",\n  \"content\": \"%s\",\n", o.model_name,
                        o.shape.ToString(), o.content == ContentLevel::kFull ? "full" : "none");
  absl::StrAppendFormat(&s, "  \"capture\": \"%s\",\n", o.capture != nullptr ? JsonEscape(o.capture->dir()) : "");
  i64("token_scale", o.token_scale);
  i64("seed", static_cast<int64_t>(o.seed));
  i64("requests", r.requests);
  i64("admitted", r.admitted);
  i64("rejected", r.rejected);
  i64("completed", r.completed);
  i64("prompt_tokens", r.prompt_tokens);
  i64("decode_tokens", r.decode_tokens);
  i64("decode_steps", r.decode_steps);
  i64("max_live_sequences", r.max_live);
  i64("budget_bytes", r.budget_bytes);
  i64("peak_device_bytes", r.peak_device_bytes);
  i64("peak_host_bytes", r.peak_host_bytes);
  i64("peak_nvme_bytes", r.peak_nvme_bytes);
  dbl("exact_hit_rate", rate(r.served_exact, served));
  dbl("sketch_fallback_rate", rate(r.served_sketch, served));
  dbl("dropped_rate", rate(r.served_dropped, served));
  dbl("late_rate", rate(r.recall_late, r.recall_requested));
  i64("recall_requested", r.recall_requested);
  i64("recall_steps", r.recall_steps);
  i64("bytes_d2h", r.bytes_d2h);
  i64("bytes_h2d", r.bytes_h2d);
  i64("bytes_nvme_read", r.bytes_nvme_read);
  i64("bytes_nvme_write", r.bytes_nvme_write);
  i64("prefix_blocks", r.prefix_blocks);
  dbl("prefix_hit_rate", rate(r.prefix_hits_host + r.prefix_hits_nvme, r.prefix_blocks));
  dbl("prefix_hit_rate_host", rate(r.prefix_hits_host, r.prefix_blocks));
  dbl("prefix_hit_rate_nvme", rate(r.prefix_hits_nvme, r.prefix_blocks));
  i64("prefix_bytes_loaded", r.prefix_bytes_loaded);
  i64("final_host_bytes", r.final_host_bytes);
  i64("final_nvme_bytes", r.final_nvme_bytes);
  i64("final_blocks", r.final_blocks);
  dbl("virtual_seconds", r.virtual_seconds);
  dbl("step_latency_p50_us", Percentile(r.step_us, 50));
  dbl("step_latency_p99_us", Percentile(r.step_us, 99));
  absl::StrAppendFormat(&s, "  \"interrupted\": %s,\n", r.interrupted ? "true" : "false");
  // Wall-clock figures last: the only keys that differ between identical runs.
  dbl("wall_seconds", r.wall_seconds);
  dbl("decode_wall_seconds", r.decode_wall_seconds);
  dbl("decode_token_events_per_second", Rate(DecodeEvents(r, o), r.decode_wall_seconds));
  absl::StrAppendFormat(&s, "  \"token_events_per_second\": %.6g\n}\n", Rate(r.token_events, r.wall_seconds));
  return s;
}

std::string RequestsCsv(const ReplayResult& r) {
  std::string s =
      "index,trace_line,prompt_tokens,output_tokens,admitted,completed,arrival_us,admit_us,first_token_us,finish_us,"
      "exact,from_sketch,dropped,prefix_blocks,prefix_hits_host,prefix_hits_nvme,rejected\n";
  for (const RequestResult& q : r.per_request) {
    absl::StrAppendFormat(&s, "%d,%d,%d,%d,%d,%d,%.0f,%.0f,%.0f,%.0f,%d,%d,%d,%d,%d,%d,%s\n", q.index, q.line,
                          q.prompt_tokens, q.output_tokens, q.admitted, q.completed, q.arrival_us, q.admit_us,
                          q.first_token_us, q.finish_us, q.exact, q.from_sketch, q.dropped, q.prefix_blocks,
                          q.prefix_hits_host, q.prefix_hits_nvme, q.rejected.empty() ? "" : "\"" + q.rejected + "\"");
  }
  return s;
}

}  // namespace kvtier::replay
