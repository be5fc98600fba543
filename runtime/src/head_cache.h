// HeadCache: the tokens of one (sequence, layer, KV head) — regions, slots,
// sketch and host-tier blocks. Internal to the runtime.
//
// Plan, then run: PlanAppend decides where every token goes without touching
// anything; ApplyAppend carries the plan out through the backend (slot copies,
// sketch updates) and the tier (exact K/V of vague tokens). Host-side state
// (regions, slot maps, scores, the vague list) is the truth; device memory
// holds K/V slots, the sketch and, for multi-row Count-Sketch, a mirror of the
// vague list. Not thread-safe: the owning sequence serialises calls; distinct
// HeadCaches may be used concurrently.
#ifndef KVTIER_RUNTIME_SRC_HEAD_CACHE_H_
#define KVTIER_RUNTIME_SRC_HEAD_CACHE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "head_layout.h"
#include "kvtier/backend.h"
#include "kvtier/budget.h"
#include "kvtier/kernels/params.h"
#include "kvtier/offload/host_tier.h"
#include "kvtier/options.h"
#include "kvtier/stats.h"

namespace kvtier {

// What every HeadCache of a runtime shares.
struct HeadContext {
  const Options* options = nullptr;
  const BudgetPlan* plan = nullptr;
  HeadLayout layout;
  Backend* backend = nullptr;
  HostTier* tier = nullptr;
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
};

class HeadCache {
 public:
  HeadCache(const HeadContext& ctx, char* chunk, int layer, int kv_head);
  HeadCache(const HeadCache&) = delete;
  HeadCache& operator=(const HeadCache&) = delete;

  // Zeroes the device state (sketch, slot scores). Called once before use.
  absl::Status Init();
  // Returns every host-tier block.
  absl::Status Release();

  int64_t length() const { return static_cast<int64_t>(region_.size()); }
  int64_t blocks() const { return static_cast<int64_t>(blocks_.size()); }
  RegionCounts regions() const;

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
    std::vector<Move> to_vague;  // out of the device: sketch + host tier
    int32_t candidates_after = 0;
  };
  void PlanAppend(int64_t n, const AppendSource& src, AppendPlan& plan) const;
  // Host-tier blocks ApplyAppend will need beyond those held.
  int64_t BlocksNeeded(const AppendPlan& plan) const;
  // Carries out the plan with `blocks` (BlocksNeeded of them, already allocated).
  absl::Status ApplyAppend(const AppendPlan& plan, const AppendSource& src, std::span<const BlockId> blocks);

  // ---- Attend ----
  // Fills the head's part of the kernel parameters (slots, sketch, ranges).
  void FillAttend(kernels::AttendParams& p) const;
  // Adds the step's slot probabilities to the accumulated scores.
  absl::Status AfterAttend();
  AttendCounts Served() const;

  // ---- Recall ----
  absl::StatusOr<int> Recall(std::span<const int64_t> positions);
  absl::StatusOr<std::vector<int64_t>> Rank(const void* q_group, int count) const;

  // ---- Introspection ----
  Region region(int64_t pos) const { return static_cast<Region>(region_[pos]); }
  absl::Status ReadToken(int64_t pos, void* k, void* v) const;
  absl::Status EstimateToken(int64_t pos, float* k, float* v) const;
  absl::Status CheckInvariants() const;

 private:
  static constexpr uint32_t kNoOrdinal = 0xffffffffu;

  int32_t RingSlot(int64_t pos) const { return sink_ + static_cast<int32_t>((pos - sink_) % recent_); }
  int32_t CandidateSlot(int32_t i) const { return sink_ + recent_ + i; }
  int32_t StagingSlot(int32_t i) const { return sink_ + recent_ + candidates_ + i; }
  char* KSlot(int32_t slot) const { return k_slots_ + slot * ctx_.row_bytes; }
  char* VSlot(int32_t slot) const { return v_slots_ + slot * ctx_.row_bytes; }
  bool HasSketch() const { return sketch_.kind != SketchKind::kNone; }
  bool MirrorsVagueIds() const { return vague_ids_dev_ != nullptr; }

  // Host-tier location of an ordinal: (block, byte offset of K; V follows B rows later).
  BlockId OrdinalBlock(uint32_t ordinal) const { return blocks_[ordinal / ctx_.plan->block_tokens]; }
  int64_t OrdinalOffset(uint32_t ordinal) const {
    return static_cast<int64_t>(ordinal % ctx_.plan->block_tokens) * ctx_.row_bytes;
  }
  int64_t VOffset() const { return static_cast<int64_t>(ctx_.plan->block_tokens) * ctx_.row_bytes; }

  // Sketch update of tokens at `positions`, data read from `slots` (or, with
  // slots empty, caller rows `rows` of src).
  void SketchUpdateFromSlots(float sign, std::span<const int32_t> positions, std::span<const int32_t> slots);
  void SketchUpdateFromRows(float sign, std::span<const int32_t> positions, std::span<const int32_t> rows,
                            const AppendSource& src);
  void SketchUpdate(float sign, std::span<const int32_t> positions, const void* keys, const void* values,
                    int64_t stride_elems, std::span<const int32_t> rows_index);
  // Vague-list maintenance (host truth and device mirror).
  absl::Status VagueAppend(std::span<const int32_t> positions);
  absl::Status VagueRemove(int32_t pos);
  // Writes exact K/V of first-time vague tokens to the host tier.
  absl::Status WriteToTier(std::span<const Move> moves, const AppendSource& src);
  const void* HostView(const char* device, int64_t bytes, std::vector<char>& bounce) const;
  // Copies between host memory and [offset, offset + bytes) of a host-tier block.
  absl::Status TierWrite(BlockId block, int64_t offset, const void* src, int64_t bytes) const;
  absl::Status TierRead(BlockId block, int64_t offset, void* dst, int64_t bytes) const;

  const HeadContext& ctx_;
  const int layer_;
  const int kv_head_;
  const int32_t sink_, recent_, candidates_, staging_;

  // Device memory.
  char* k_slots_;
  char* v_slots_;
  float* slot_probs_;
  uint32_t* vague_ids_dev_;
  kernels::SketchState sketch_;

  // Host truth.
  std::vector<int32_t> slot_pos_;   // [slots] token position, -1 = empty
  std::vector<float> slot_score_;   // [slots] accumulated attention
  std::vector<float> probs_host_;   // [slots] this step's probabilities
  int32_t n_candidates_ = 0;        // candidate slots [0, n) are used
  int32_t n_staged_ = 0;            // staging slots [0, n) are used
  std::vector<uint8_t> region_;     // [length] Region
  std::vector<uint32_t> index_;     // [length] slot (resident) or index in vague_ (vague)
  std::vector<uint32_t> ordinal_;   // [length] host-tier ordinal, kNoOrdinal before first vague
  std::vector<uint32_t> vague_;     // sketched token positions
  std::vector<uint32_t> buckets_;   // [ordinal][rows] centroid buckets of sketched tokens
  std::vector<BlockId> blocks_;     // host-tier blocks in ordinal order
  uint32_t next_ordinal_ = 0;
};

}  // namespace kvtier

#endif  // KVTIER_RUNTIME_SRC_HEAD_CACHE_H_
