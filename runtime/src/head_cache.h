// HeadCache: the tokens of one (sequence, layer, KV head) — regions, slots,
// sketch, key bounds, blocks in the block store and recalls in flight.
// Internal to the runtime.
//
// Plan, then run: PlanAppend decides where every token goes without touching
// anything; ApplyAppend carries the plan out through the backend (slot copies,
// sketch updates) and the block store (exact K/V of vague tokens). Host-side
// state (regions, slot maps, scores, the vague list) is the truth; device
// memory holds K/V slots, the sketch, key bounds and, for multi-row
// Count-Sketch, a mirror of the vague list.
//
// Recall is asynchronous: RequestRecall (explicit) and Prefetch (after each
// attend) reserve staging slots (sending the tokens they held back to the
// sketch) and ask the block store to copy the tokens' exact K/V into them;
// until PollRecalls installs a completed transfer, the tokens stay vague and
// attention uses the sketch for them.
//
// Plan-only (Options::plan_only): the same bookkeeping without contents. No
// kernel runs and no K/V are read or written (src.k, src.v are null); each
// token carries an attention weight, AfterAttend takes the step's slot
// probabilities from the weights instead of the attention kernel, and the
// vague tokens are ranked by weight, in classes of a quarter octave: the
// heaviest class first, the most recent first within a class.
//
// Not thread-safe: the owning sequence serialises calls; distinct HeadCaches
// may be used concurrently.
#ifndef KVTIER_RUNTIME_SRC_HEAD_CACHE_H_
#define KVTIER_RUNTIME_SRC_HEAD_CACHE_H_

#include <bit>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "head_layout.h"
#include "kvtier/backend.h"
#include "kvtier/budget.h"
#include "kvtier/kernels/params.h"
#include "kvtier/offload/block_store.h"
#include "kvtier/options.h"
#include "kvtier/stats.h"

namespace kvtier {

// What every HeadCache of a runtime shares.
struct HeadContext {
  const Options* options = nullptr;
  const BudgetPlan* plan = nullptr;
  HeadLayout layout;
  Backend* backend = nullptr;
  BlockStore* store = nullptr;
  const float* planes = nullptr;  // [device] SimHash planes, centroid sketch only
  int64_t row_bytes = 0;          // one K (or V) row: head_dim * dtype size
};

// Where the K/V of the tokens of one Append call come from, for one head.
struct AppendSource {
  const char* k = nullptr;      // [device] row i at k + i * stride_bytes
  const char* v = nullptr;
  int64_t stride_bytes = 0;
  const float* scores = nullptr;  // [host] row i's initial score at scores[i * score_stride]; may be null
  int64_t score_stride = 0;
  const float* weights = nullptr;  // [host] plan-only: row i's attention weight (stride score_stride); may be null
  // [host] the same rows as k and v (same stride), where the backend's device
  // memory is not host-accessible: what the host tier stores. Else null.
  const char* host_k = nullptr;
  const char* host_v = nullptr;
};

class HeadCache {
 public:
  HeadCache(const HeadContext& ctx, char* chunk, int layer, int kv_head);
  HeadCache(const HeadCache&) = delete;
  HeadCache& operator=(const HeadCache&) = delete;

  // Zeroes the device state (sketch, slot scores, key bounds). Called once before use.
  absl::Status Init();
  // Waits for recalls in flight, then deletes every block.
  absl::Status Release();

  int64_t length() const { return static_cast<int64_t>(region_.size()); }
  int64_t blocks() const { return static_cast<int64_t>(blocks_.size()); }
  RegionCounts regions() const;
  const RecallStats& recall_stats() const { return recall_; }

  // ---- Append ----
  struct Move {
    int32_t pos;
    int32_t src_slot;  // -1: the caller's row
    int32_t src_row;
    int32_t dst_slot;  // for moves into slots
    float score;
  };
  struct AppendPlan {
    int64_t n = 0;
    std::vector<Move> to_slot;   // into sink, ring or candidate slots
    std::vector<Move> to_vague;  // out of the device: sketch + block store
    int32_t candidates_after = 0;
  };
  void PlanAppend(int64_t n, const AppendSource& src, AppendPlan& plan) const;
  // A plan the runtime may reuse for this head's appends (its vectors keep
  // their capacity, so a decode step allocates nothing for it).
  AppendPlan& plan_scratch() { return plan_scratch_; }
  // Blocks ApplyAppend will need beyond those held.
  int64_t BlocksNeeded(const AppendPlan& plan) const;
  // Carries out the plan with `blocks` (BlocksNeeded of them, already created).
  absl::Status ApplyAppend(const AppendPlan& plan, const AppendSource& src,
                           std::span<const BlockStore::Ref> blocks);
  // Seals the blocks ApplyAppend filled: from then on they may move down the
  // tiers (a seal may start demotions). Separate from ApplyAppend so that the
  // runtime seals in head order after heads were applied in parallel: which
  // blocks are demoted does not depend on thread timing.
  void SealFullBlocks();

  // ---- Attend ----
  // Fills the head's part of the kernel parameters (slots, sketch, ranges).
  // The ranges live in the HeadCache until the next FillAttend.
  void FillAttend(kernels::AttendParams& p);
  // Adds the step's slot probabilities to the accumulated scores.
  absl::Status AfterAttend();
  AttendCounts Served() const;

  // ---- Recall ----
  // Asks for the exact K/V of the vague tokens at `positions` (those not
  // already requested); they are needed from the next attend on. Room in
  // staging: free slots, then installed tokens by lowest accumulated score.
  // Returns how many were requested.
  absl::StatusOr<int> RequestRecall(std::span<const int64_t> positions);
  // Installs every completed recall; waits up to `wait` for the rest.
  absl::Status PollRecalls(absl::Duration wait);
  // RequestRecall, then wait for those transfers and install them. Returns
  // how many were installed.
  absl::StatusOr<int> Recall(std::span<const int64_t> positions);
  // The `count` vague tokens not in flight that `proxy` ranks highest for
  // the query group, best first.
  absl::StatusOr<std::vector<int64_t>> Rank(RecallProxy proxy, const void* q_group, int count) const;
  // Rank in three steps, so that a batch of heads shares the kernel calls:
  // RankPrepare fills this head's kernel parameters (none in plan-only
  // runs), the caller runs SketchScores on every `sketch` whose sketch_call
  // is set and BoundScores on every `bounds` whose bound_call is set, then
  // RankFinish selects into `out`. Nothing may change the head in between.
  // With `score_staged`, the proxy also scores the installed tokens, for
  // Prefetch to compare (RecallReplace::kOutranked); plan-only, the ranking
  // then stops where nothing more could be prefetched, so `out` may hold
  // fewer than `count`.
  struct RankWork {
    RecallProxy proxy = RecallProxy::kNone;
    int count = 0;
    bool done = true;  // no kernel is needed
    bool score_staged = false;
    bool sketch_call = false, bound_call = false;
    kernels::SketchScoreParams sketch;
    kernels::BoundScoreParams bounds;
    std::vector<int64_t> out;        // the ranked vague tokens, best first
    std::vector<float> out_scores;   // the proxy's score of each (higher is better; ties within a class or group)
    std::vector<float> staged_scores;  // [staging] score_staged: the same for each installed token, else unset
    std::vector<uint32_t> ids, classes, buckets;  // scored tokens, their classes (by_class_), centroid buckets
    size_t staged_from = 0;          // ids[staged_from, ...) are installed tokens, scored for staged_scores
    std::vector<float> scores, group_scores;      // the kernels' outputs
  };
  absl::Status RankPrepare(RecallProxy proxy, const void* q_group, int count, bool score_staged, RankWork& w) const;
  void RankFinish(RankWork& w) const;
  // The automatic recall after an attend: the ranked tokens (RankFinish's
  // `out`) into free staging slots, then in place of installed tokens the
  // last attend used less than a uniform share of attention (lowest
  // accumulated score first). With a score_staged ranking
  // (RecallReplace::kOutranked), a token displaces one only where the proxy
  // scores it strictly higher (the targets best first against the installed
  // tokens lowest first), so tokens the proxy ranks alike do not trade places
  // every step. Returns how many were requested.
  absl::StatusOr<int> Prefetch(const RankWork& ranked);
  int64_t pending_tokens() const;

  // ---- Introspection ----
  Region region(int64_t pos) const { return static_cast<Region>(region_[pos]); }
  absl::Status ReadToken(int64_t pos, void* k, void* v) const;
  absl::Status EstimateToken(int64_t pos, float* k, float* v) const;
  absl::Status CheckInvariants() const;

 private:
  static constexpr uint32_t kNoOrdinal = 0xffffffffu;
  enum class Stage : uint8_t { kFree, kPending, kInstalled };

  // A recall in flight: tokens on their way into staging slots, one
  // transfer part per block.
  struct Pending {
    std::shared_ptr<Transfer> transfer;
    std::vector<int32_t> positions;  // all parts, in part order
    std::vector<int32_t> slots;
    std::vector<int32_t> part_end;   // part i covers [part_end[i-1], part_end[i])
    int64_t needed_at = 0;           // the attend (attends_ value) that wanted them
    bool fallback_counted = false;
  };

  int32_t RingSlot(int64_t pos) const { return sink_ + static_cast<int32_t>((pos - sink_) % recent_); }
  int32_t CandidateSlot(int32_t i) const { return sink_ + recent_ + i; }
  int32_t StagingSlot(int32_t i) const { return sink_ + recent_ + candidates_ + i; }
  char* KSlot(int32_t slot) const { return k_slots_ + slot * ctx_.row_bytes; }
  char* VSlot(int32_t slot) const { return v_slots_ + slot * ctx_.row_bytes; }
  // The first staging index from i (at most staging_) whose slot is
  // installed, or is not; staging_ where none is.
  int32_t NextStaging(int32_t i, bool installed) const;
  bool HasSketch() const { return sketch_.kind != SketchKind::kNone; }
  bool MirrorsVagueIds() const { return vague_ids_dev_ != nullptr && !plan_only_; }
  int block_tokens() const { return ctx_.plan->block_tokens; }

  // Block-store location of an ordinal: block and byte offset of its K row
  // (its V row follows block_tokens rows later).
  BlockStore::Ref OrdinalBlock(uint32_t ordinal) const { return blocks_[ordinal / block_tokens()]; }
  int64_t OrdinalOffset(uint32_t ordinal) const {
    return static_cast<int64_t>(ordinal % block_tokens()) * ctx_.row_bytes;
  }
  int64_t VOffset() const { return static_cast<int64_t>(block_tokens()) * ctx_.row_bytes; }

  // Sketch update of tokens at `positions`, data read from `slots` (or, with
  // slots empty, caller rows `rows` of src).
  void SketchUpdateFromSlots(float sign, std::span<const int32_t> positions, std::span<const int32_t> slots);
  void SketchUpdateFromRows(float sign, std::span<const int32_t> positions, std::span<const int32_t> rows,
                            const AppendSource& src);
  void SketchUpdate(float sign, std::span<const int32_t> positions, const void* keys, const void* values,
                    int64_t stride_elems, std::span<const int32_t> rows_index);
  // Vague-set maintenance: the list (host truth and device mirror), or
  // plan-only's weight-class sets; and the count.
  absl::Status VagueAppend(std::span<const int32_t> positions);
  absl::Status VagueRemove(std::span<const int32_t> positions);
  uint32_t ClassOf(int32_t pos) const;  // by_class_ only, for a token in the sketch
  // Writes the exact K/V of first-time vague tokens to their blocks, seals
  // full blocks, and widens the key bounds.
  absl::Status WriteToStore(std::span<const Move> moves, const AppendSource& src);
  const void* HostView(const char* device, int64_t bytes, std::vector<char>& bounce) const;
  // Staged tokens back to the sketch (their slots become free).
  absl::Status Unstage(std::span<const int32_t> slots);
  // Installs a completed recall (or releases its slots on failure).
  absl::Status Install(Pending& p);
  // RequestRecall (ranked null) and Prefetch.
  absl::StatusOr<int> Request(std::span<const int64_t> positions, const RankWork* ranked);

  const HeadContext& ctx_;
  const int layer_;
  const int kv_head_;
  const int32_t sink_, recent_, candidates_, staging_;
  const bool plan_only_;

  // Device memory.
  char* k_slots_;
  char* v_slots_;
  float* slot_probs_;
  uint32_t* vague_ids_dev_;
  char* bounds_dev_;  // [summary_groups][2][head_dim] model dtype, or null
  kernels::SketchState sketch_;

  // Host truth.
  std::vector<int32_t> slot_pos_;   // [slots] token position, -1 = empty
  std::vector<float> slot_score_;   // [slots] accumulated attention
  std::vector<float> probs_host_;   // [slots] this step's probabilities
  int32_t n_candidates_ = 0;        // candidate slots [0, n) are used
  std::vector<Stage> stage_;        // [staging] state of each staging slot
  std::vector<int64_t> installed_at_;  // [staging] attends_ when installed
  int32_t n_installed_ = 0;
  std::vector<uint8_t> region_;     // [length] Region
  std::vector<uint8_t> in_flight_;  // [length] 1 while a recall of the token is pending
  std::vector<uint32_t> index_;     // [length] slot (resident) or index in vague_ (vague, not plan-only)
  std::vector<uint32_t> ordinal_;   // [length] block-store ordinal, kNoOrdinal before first vague
  std::vector<uint32_t> pos_of_ordinal_;  // [ordinal] the token's position
  std::vector<uint32_t> vague_;     // sketched token positions (not plan-only: class_order_ holds them)
  int64_t n_vague_ = 0;             // vague tokens
  // One-row sketches give every vague token of a class (Count-Sketch: bucket
  // and sign; centroid: bucket) the same score: rank classes, not tokens.
  bool by_class_ = false;
  std::vector<std::vector<uint32_t>> class_members_;  // [class] vague positions
  std::vector<uint32_t> class_of_;  // [length] class of a vague token (plan-only: of every token)
  std::vector<uint32_t> in_class_;  // [length] its index in class_members_
  // Plan-only: each class's members as a set of positions, so that ranking
  // walks them most recent first in O(tokens taken), not O(class).
  class PositionSet {
   public:
    void Insert(uint32_t pos) {
      const size_t w = pos >> 6;
      if (bits_.size() <= w) {
        bits_.resize(w + 1, 0);
        summary_.resize((w >> 6) + 1, 0);
      }
      bits_[w] |= uint64_t{1} << (pos & 63);
      summary_[w >> 6] |= uint64_t{1} << (w & 63);
    }
    bool Contains(uint32_t pos) const {
      const size_t w = pos >> 6;
      return w < bits_.size() && (bits_[w] >> (pos & 63) & 1) != 0;
    }
    int64_t Count() const {
      int64_t n = 0;
      for (uint64_t word : bits_) n += std::popcount(word);
      return n;
    }
    void Erase(uint32_t pos) {
      const size_t w = pos >> 6;
      bits_[w] &= ~(uint64_t{1} << (pos & 63));
      if (bits_[w] == 0) summary_[w >> 6] &= ~(uint64_t{1} << (w & 63));
    }
    // f(pos) for the members, highest first, while f returns true.
    template <typename F>
    void ForEachDescending(F&& f) const {
      for (size_t s = summary_.size(); s-- > 0;) {
        for (uint64_t m = summary_[s]; m != 0;) {
          const int b = 63 - __builtin_clzll(m);
          m &= ~(uint64_t{1} << b);
          const size_t w = s * 64 + static_cast<size_t>(b);
          for (uint64_t word = bits_[w]; word != 0;) {
            const int t = 63 - __builtin_clzll(word);
            word &= ~(uint64_t{1} << t);
            if (!f(static_cast<uint32_t>(w * 64 + static_cast<size_t>(t)))) return;
          }
        }
      }
    }

   private:
    std::vector<uint64_t> bits_;     // bit p: position p is a member
    std::vector<uint64_t> summary_;  // bit w: bits_[w] != 0
  };
  std::vector<PositionSet> class_order_;  // [class], plan-only
  std::vector<uint32_t> buckets_;   // [ordinal][rows] centroid buckets of sketched tokens
  std::vector<BlockStore::Ref> blocks_;  // blocks in ordinal order
  int64_t sealed_ = 0;              // blocks_[0, sealed_) are sealed
  uint32_t next_ordinal_ = 0;
  std::vector<float> bounds_host_;  // [summary_groups][2][head_dim] fp32 mirror of the key bounds
  std::vector<Pending> pending_;
  std::vector<Pending> spare_;      // installed recalls, for their vectors
  std::vector<kernels::SlotRange> ranges_;
  int64_t attends_ = 0;             // attends run so far
  int64_t last_resident_ = 0;       // tokens the last attend saw exactly
  RecallStats recall_;
  // Plan-only: attention weight of every token, and their sum.
  std::vector<float> weight_;       // [length]
  double weight_sum_ = 0;
  std::vector<float> slot_weight_;  // [slots] weight_ of the token in each occupied slot
  std::vector<uint32_t> class_count_;  // [class] vague members of each weight class
  std::vector<uint32_t> staged_class_count_;  // [class] installed staging tokens of each weight class
  // Scratch kept across calls: the decode path allocates none of these.
  AppendPlan plan_scratch_;
  mutable std::vector<Move> leaving_;
  mutable std::vector<uint64_t> pool_;
  mutable std::vector<int32_t> free_scratch_;
  std::vector<int32_t> recall_free_, recall_installed_, recall_targets_, unstage_pos_, install_pos_, install_slots_;
  std::vector<float> recall_target_scores_;
  std::vector<uint64_t> recall_order_, recall_order_scratch_;
  std::vector<GatherPart> recall_parts_;  // [0, parts of the last request) used
  std::vector<uint64_t> recall_keyed_;
  // RankFinish's scratch (key bounds): the group heap, one group's tokens, per-position sketch scores.
  mutable std::vector<uint32_t> rank_groups_;
  mutable std::vector<std::pair<float, uint32_t>> rank_members_;
  mutable std::vector<float> rank_token_score_;
  std::vector<std::pair<std::pair<float, uint64_t>, int32_t>> recall_victims_;
  std::vector<int32_t> scratch_[5];  // ApplyAppend's lists of slots and positions
};

}  // namespace kvtier

#endif  // KVTIER_RUNTIME_SRC_HEAD_CACHE_H_
