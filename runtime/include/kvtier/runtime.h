// kvtier/runtime.h — the KV-cache runtime a serving stack calls for every
// layer of every decode step.
//
// A Runtime holds up to options.max_sequences sequences. For each sequence,
// layer and KV head, tokens live in regions (kvtier/stats.h: Region): the
// sink, the recent ring, heavy-hitter candidates and recalled tokens are exact
// on the device; every other token is vague: summarised in the device sketch,
// its exact K/V in the host tier, so no token is ever lost. Attend runs one
// softmax over the resident tokens (exact) and the vague ones (through the
// sketch, by the VaguePolicy).
//
// Tensors: every K/V/Q/output pointer is memory of the runtime's backend
// (host memory on the CPU backend), in options.shape.dtype unless stated.
//   k, v of Append: [n][kv_heads][head_dim]   (keys after RoPE)
//   q, out of Attend: [q_heads][head_dim]      (query head h uses KV head h / group)
// Positions count appended tokens per layer from 0.
//
// Errors: InvalidArgument (bad shape, layer, count or non-finite values),
// NotFound (unknown sequence), AlreadyExists, ResourceExhausted (no sequence
// slot, host tier at its cap, context beyond max_context),
// FailedPrecondition (e.g. attend on an empty layer). A failed call leaves the
// runtime unchanged.
//
// Thread safety: every method is thread-safe. Calls on different sequences
// run in parallel; calls on one sequence are serialised.
#ifndef KVTIER_RUNTIME_H_
#define KVTIER_RUNTIME_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvtier/budget.h"
#include "kvtier/options.h"
#include "kvtier/stats.h"

namespace kvtier {

class Backend;  // kvtier/backend.h

using SequenceId = uint64_t;

// One sequence's query and output in a batched attend.
struct AttendItem {
  SequenceId sequence = 0;
  const void* q = nullptr;  // [q_heads][head_dim]
  void* out = nullptr;      // [q_heads][head_dim]
};

class Runtime {
 public:
  // Validates the options, plans the budget (kvtier/budget.h), creates the
  // backend and reserves the device arena of plan().total_bytes.
  static absl::StatusOr<std::unique_ptr<Runtime>> Create(const Options& options);
  // The same on a backend the caller made (options.backend is not used), for
  // a serving stack that brings its own device or a test that checks the
  // runtime against a backend with other capabilities.
  static absl::StatusOr<std::unique_ptr<Runtime>> Create(const Options& options, std::unique_ptr<Backend> backend);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  const Options& options() const;
  const BudgetPlan& plan() const;
  std::string_view backend_name() const;

  // ---- Sequences ----
  // AlreadyExists; ResourceExhausted when max_sequences are live.
  absl::Status AddSequence(SequenceId id);
  // Frees the sequence's device memory and host-tier blocks. NotFound.
  absl::Status RemoveSequence(SequenceId id);
  // Tokens appended to `layer` so far.
  absl::StatusOr<int64_t> Length(SequenceId id, int layer) const;

  // ---- Per decode step ----
  // Appends n >= 1 tokens' K/V to one layer (a prefill chunk or one decode
  // token). Tokens that leave the recent window become candidates or vague.
  absl::Status Append(SequenceId id, int layer, const void* k, const void* v, int64_t n,
                      const AppendOptions& options = {});
  // One decode step of attention for every query head of `layer`.
  absl::StatusOr<AttendCounts> Attend(SequenceId id, int layer, const void* q, void* out,
                                      const AttendOptions& options = {});
  // Attend for several distinct sequences on one layer, in parallel.
  absl::StatusOr<AttendCounts> AttendBatch(int layer, absl::Span<const AttendItem> items,
                                           const AttendOptions& options = {});

  // ---- Recall ----
  // After every Attend the runtime itself asks for the plan's recall_tokens
  // vague tokens per KV head that options.recall_proxy ranks highest; they
  // arrive asynchronously and are exact from the first Attend after they
  // landed (see Options::recall_wait_us), the sketch serving them until then.
  //
  // Recall is the synchronous form: it brings the exact K/V of vague tokens
  // at `positions` of one (layer, KV head) into staging and waits for them
  // (and for any recall still in flight on the head); when staging is full
  // the staged tokens with the lowest accumulated attention go back to the
  // sketch. Positions already resident or in flight are skipped; at most
  // staging_tokens per call. Returns how many this call installed; the error
  // of a transfer that failed (its tokens stay vague).
  absl::StatusOr<int> Recall(SequenceId id, int layer, int kv_head, absl::Span<const int64_t> positions);
  // The `count` vague tokens of (layer, KV head), not in flight, that the
  // recall proxy (options.recall_proxy; the sketch when that is kNone) ranks
  // highest for q ([q_heads][head_dim]), best first. FailedPrecondition when
  // the proxy is unavailable (no sketch).
  absl::StatusOr<std::vector<int64_t>> RankVague(SequenceId id, int layer, int kv_head, const void* q,
                                                 int count) const;
  // RankVague then Recall of the top `per_head` for every KV head of the
  // layer. Returns the token-heads recalled.
  absl::StatusOr<int64_t> RecallTop(SequenceId id, int layer, const void* q, int per_head);

  // ---- Introspection ----
  absl::StatusOr<Region> TokenRegion(SequenceId id, int layer, int kv_head, int64_t position) const;
  // The exact K and V ([head_dim] each, model dtype, host memory) of any
  // token, from the device or the host tier.
  absl::Status ReadToken(SequenceId id, int layer, int kv_head, int64_t position, void* k, void* v) const;
  // The sketch's reconstruction ([head_dim] fp32 each, host memory) of a vague
  // token, as attention sees it under the configured policy (kShrink shrinks).
  // FailedPrecondition for tokens that are not vague or without a sketch.
  absl::Status EstimateToken(SequenceId id, int layer, int kv_head, int64_t position, float* k, float* v) const;
  absl::StatusOr<RegionCounts> Regions(SequenceId id) const;
  RuntimeStats Stats() const;
  // Waits until every transfer in flight (recalls, demotions) completed.
  // Recalls that arrived are installed by the next Attend as usual.
  void Drain();
  // Verifies every internal invariant (each token in exactly one region, slot
  // maps, sketch counts, host-tier accounting); Internal naming the first
  // violation. O(tokens); for tests and debugging, with no other call in flight.
  absl::Status CheckInvariants() const;

 private:
  class Impl;
  explicit Runtime(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier

#endif  // KVTIER_RUNTIME_H_
