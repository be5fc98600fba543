// The replay driver: requests of a trace arrive on a virtual clock, are
// admitted while the runtime's sequence slots and tiers allow, then prefill
// and decode through a real kvtier::Runtime. See docs/replay.md.
#ifndef KVTIER_TOOLS_REPLAY_DRIVER_H_
#define KVTIER_TOOLS_REPLAY_DRIVER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvtier/backend.h"
#include "kvtier/options.h"
#include "kvtier/runtime.h"
#include "replay/capture.h"
#include "replay/content.h"
#include "replay/profile.h"
#include "replay/trace.h"

namespace kvtier::replay {

enum class ContentLevel { kFull, kNone };

struct ReplayOptions {
  ModelShape shape;                 // required
  std::string model_name;           // for the report
  ContentLevel content = ContentLevel::kFull;
  // --content none: one head cache stands for every layer and KV head (see
  // FoldedOptions), L x H times less work with the same results; false runs
  // all of them (to check the fold).
  bool fold_heads = true;
  // Divides every prompt and output length (rounding up) and the 512-token
  // hash block; a power of two in [1, 512]. 1 = the trace as it is.
  int token_scale = 1;
  int64_t max_requests = 0;         // 0: all
  // Arrival of a request on the virtual clock = trace timestamp * time_scale;
  // 0 = every request arrives at time 0.
  double time_scale = 1.0;
  int max_sequences = 8;            // runtime sequence slots (the batch limit)
  // Longest context a sequence may reach; 0: the longest request of the
  // (scaled) trace. Longer requests are rejected.
  int64_t max_context = 0;
  int64_t device_budget_bytes = 0;     // 0: device_budget_fraction of the full cache
  double device_budget_fraction = 0.10;
  int64_t host_bytes = 0;           // host-tier cap (0: none)
  std::string nvme_dir;
  int64_t nvme_bytes = 0;
  int block_tokens = 0;             // host-tier block tokens (0: the runtime's default)
  SketchKind sketch = SketchKind::kCountSketch;
  VaguePolicy policy = VaguePolicy::kShrink;
  RecallProxy proxy = RecallProxy::kSketch;
  RecallReplace recall_replace = RecallReplace::kUnused;
  int prefill_chunk = 512;          // prompt tokens per Append call
  // Prefix store: K/V of prompt blocks (by hash id) kept after their prefill,
  // least recently used first out, host part then NVMe part; 0 = none.
  int64_t prefix_host_bytes = 0;
  int64_t prefix_nvme_bytes = 0;
  uint64_t seed = 1;
  HardwareProfile profile;
  ContentOptions content_options;   // seed and block_tokens are set from the above
  // --content full only: K/V/Q from a real model's capture instead of the
  // content model (which still gives the prefill's initial scores). Loaded
  // for this shape (Capture::Load); docs/capture.md.
  std::shared_ptr<const Capture> capture;
  // --content full: the runtime's backend (kAuto: CUDA when a device and the
  // CUDA backend are present, else CPU). Where its device memory is not
  // host-accessible, every K/V/Q crosses into device buffers before its call.
  // --content none runs no kernel and always uses the CPU backend.
  BackendKind backend = BackendKind::kCpu;
  // --content full, tests: makes the backend instead of `backend` (e.g. the
  // CUDA kernels on a CPU emulation of CUDA); null: CreateBackend(backend).
  std::function<std::unique_ptr<Backend>()> make_backend;
  // Called after every prefill with the runtime and the request's sequence
  // id (its index), before any decode step: lets tests read the K/V held.
  std::function<void(const Runtime&, SequenceId)> after_prefill;
};

struct RequestResult {
  int64_t index = 0;                // in the trace (after max_requests)
  int64_t line = 0;
  int64_t prompt_tokens = 0;        // after token_scale
  int64_t output_tokens = 0;
  bool admitted = false;
  bool completed = false;
  std::string rejected;             // why, when not admitted
  double arrival_us = 0, admit_us = 0, first_token_us = 0, finish_us = 0;  // virtual clock
  int64_t exact = 0, from_sketch = 0, dropped = 0;  // token-heads served by its attends
  int64_t prefix_blocks = 0;        // prompt blocks with a hash id
  int64_t prefix_hits_host = 0, prefix_hits_nvme = 0;
};

struct ReplayResult {
  int64_t requests = 0, admitted = 0, rejected = 0, completed = 0;
  int64_t prompt_tokens = 0, decode_tokens = 0;  // processed (admitted requests)
  int64_t decode_steps = 0;
  int64_t max_live = 0;
  int64_t peak_device_bytes = 0, peak_host_bytes = 0, peak_nvme_bytes = 0;
  int64_t budget_bytes = 0, per_sequence_bytes = 0;
  int64_t served_exact = 0, served_sketch = 0, served_dropped = 0;
  int64_t recall_requested = 0, recall_late = 0;  // token-heads; late by the virtual clock
  int64_t recall_steps = 0;         // decode steps that requested any recall
  int64_t bytes_d2h = 0, bytes_h2d = 0, bytes_nvme_read = 0, bytes_nvme_write = 0;
  int64_t prefix_blocks = 0, prefix_hits_host = 0, prefix_hits_nvme = 0;
  int64_t prefix_bytes_loaded = 0;  // K/V of prefix hits copied instead of recomputed
  int64_t final_host_bytes = 0, final_nvme_bytes = 0, final_blocks = 0;
  double virtual_seconds = 0;
  double wall_seconds = 0;
  double decode_wall_seconds = 0;   // of wall_seconds, in decode steps (append + attend of the live sequences)
  int64_t token_events = 0;         // tokens x layers appended, plus decode attends x layers
  std::vector<double> step_us;      // virtual duration of every decode step
  std::vector<RequestResult> per_request;
  std::string plan;                 // the runtime's budget plan, explained
  std::string backend;
  bool interrupted = false;
};

struct Progress {
  int64_t done = 0, total = 0, live = 0, queued = 0;
  double virtual_seconds = 0, wall_seconds = 0;
};

// Runs the replay. `stop` (optional) ends it early between decode steps with
// the partial result (interrupted = true); `progress` (optional) is called
// about every `progress_every_s` wall seconds. Errors: invalid options, a
// runtime that cannot be created; a request the runtime fails is an error
// too (a bug), never skipped silently.
absl::StatusOr<ReplayResult> RunReplay(const Trace& trace, const ReplayOptions& options,
                                       const std::atomic<bool>* stop = nullptr,
                                       const std::function<void(const Progress&)>& progress = nullptr,
                                       double progress_every_s = 2.0);

std::string ReplaySummary(const ReplayResult& r, const ReplayOptions& options);
// Stable keys, one per line, in a fixed order.
std::string ReplayJson(const ReplayResult& r, const ReplayOptions& options);
std::string RequestsCsv(const ReplayResult& r);

// The runtime options a replay with `options` creates its runtime with, for
// contexts up to `max_context` tokens (no sketch: the drop policy, and no
// ranking by the sketch).
Options ReplayRuntimeOptions(const ReplayOptions& options, int64_t max_context);

double Percentile(std::vector<double> v, double p);

// The options of a plan-only runtime of one layer and one KV head that
// stands for all of `o`'s (a plan-only `o`): every size of `o`'s per-head
// plan made explicit, a budget of one head per sequence, and host and NVMe
// tiers of 1/(layers x kv_heads) of `o`'s. When every layer and KV head gets
// the same attention weights (the replay's content model), they all make the
// same choices, so this head's counts times layers x kv_heads are the
// model's; only which tier blocks are demoted can differ (docs/replay.md).
// InternalError if the one head's plan is not the per-head plan.
absl::StatusOr<Options> FoldedOptions(const Options& o);

}  // namespace kvtier::replay

#endif  // KVTIER_TOOLS_REPLAY_DRIVER_H_
