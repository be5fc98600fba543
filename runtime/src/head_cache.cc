#include "head_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/strings/str_format.h"
#include "kvtier/kernels/hash.h"

namespace kvtier {
namespace {

// Heavy-hitter order: higher score first; ties keep the more recent token.
struct ByScore {
  bool operator()(const HeadCache::Move& a, const HeadCache::Move& b) const {
    return a.score > b.score || (a.score == b.score && a.pos > b.pos);
  }
};

float InitialScore(const AppendSource& src, int64_t row) {
  return src.scores ? src.scores[row * src.score_stride] : 0.0f;
}

}  // namespace

HeadCache::HeadCache(const HeadContext& ctx, char* chunk, int layer, int kv_head)
    : ctx_(ctx),
      layer_(layer),
      kv_head_(kv_head),
      sink_(ctx.plan->sink_tokens),
      recent_(ctx.plan->recent_tokens),
      candidates_(ctx.plan->candidate_tokens),
      staging_(ctx.plan->staging_tokens),
      k_slots_(chunk + ctx.layout.k_slots),
      v_slots_(chunk + ctx.layout.v_slots),
      slot_probs_(ctx.layout.slot_probs >= 0 ? reinterpret_cast<float*>(chunk + ctx.layout.slot_probs) : nullptr),
      vague_ids_dev_(ctx.layout.vague_ids >= 0 ? reinterpret_cast<uint32_t*>(chunk + ctx.layout.vague_ids)
                                               : nullptr) {
  const BudgetPlan& plan = *ctx.plan;
  if (plan.sketch_kind != SketchKind::kNone) {
    const int64_t cells = static_cast<int64_t>(plan.sketch_rows) * plan.sketch_width;
    const int d = ctx.options->shape.head_dim;
    float* base = reinterpret_cast<float*>(chunk + ctx.layout.sketch);
    sketch_.kind = plan.sketch_kind;
    sketch_.rows = plan.sketch_rows;
    sketch_.width = plan.sketch_width;
    sketch_.head_dim = d;
    sketch_.seed = kernels::HeadSeed(ctx.options->seed, layer, kv_head);
    sketch_.key_sums = base;
    sketch_.value_sums = base + cells * d;
    sketch_.counts = base + 2 * cells * d;
    sketch_.totals = sketch_.counts + 2 * cells;
    sketch_.planes = ctx.planes;
  }
  slot_pos_.assign(plan.slots(), -1);
  slot_score_.assign(plan.slots(), 0.0f);
  probs_host_.assign(plan.slots(), 0.0f);
}

absl::Status HeadCache::Init() {
  if (slot_probs_ != nullptr) {
    if (absl::Status st = ctx_.backend->ZeroDevice(slot_probs_, static_cast<int64_t>(slot_pos_.size()) * 4); !st.ok())
      return st;
  }
  if (HasSketch()) {
    return ctx_.backend->ZeroDevice(
        sketch_.key_sums, kernels::SketchStateFloats(sketch_.rows, sketch_.width, sketch_.head_dim) * 4);
  }
  return absl::OkStatus();
}

absl::Status HeadCache::Release() {
  absl::Status result;
  for (BlockId b : blocks_) result.Update(ctx_.tier->Free(b));
  blocks_.clear();
  return result;
}

RegionCounts HeadCache::regions() const {
  RegionCounts c;
  const int64_t len = length();
  c.sink = std::min<int64_t>(len, sink_);
  c.recent = std::min<int64_t>(recent_, std::max<int64_t>(0, len - sink_));
  c.candidate = n_candidates_;
  c.recalled = n_staged_;
  c.vague = static_cast<int64_t>(vague_.size());
  return c;
}

// ---------------------------------------------------------------- Append

void HeadCache::PlanAppend(int64_t n, const AppendSource& src, AppendPlan& plan) const {
  plan.n = n;
  plan.to_slot.clear();
  plan.to_vague.clear();
  plan.candidates_after = n_candidates_;
  const int64_t first = length();
  const int64_t end = first + n;
  int64_t row = 0;
  for (; first + row < sink_ && row < n; ++row) {
    const int32_t pos = static_cast<int32_t>(first + row);
    plan.to_slot.push_back(Move{pos, -1, static_cast<int32_t>(row), pos, InitialScore(src, row)});
  }
  if (row == n) return;

  // Tokens leave the ring oldest first: [ring_first, final_first).
  const int64_t ring_first = std::max<int64_t>(sink_, first - recent_);
  const int64_t final_first = std::max<int64_t>(sink_, end - recent_);
  std::vector<Move> leaving;
  leaving.reserve(std::max<int64_t>(0, final_first - ring_first));
  for (int64_t p = ring_first; p < final_first; ++p) {
    const int32_t pos = static_cast<int32_t>(p);
    if (p < first) {
      const int32_t slot = RingSlot(p);
      leaving.push_back(Move{pos, slot, -1, -1, slot_score_[slot]});
    } else {
      leaving.push_back(Move{pos, -1, static_cast<int32_t>(p - first), -1, InitialScore(src, p - first)});
    }
  }

  if (!leaving.empty()) {
    if (candidates_ == 0) {
      plan.to_vague = std::move(leaving);
    } else if (n_candidates_ + static_cast<int64_t>(leaving.size()) <= candidates_) {
      for (Move& m : leaving) {
        m.dst_slot = CandidateSlot(plan.candidates_after++);
        plan.to_slot.push_back(m);
      }
    } else {
      // Keep the best `candidates_` of the current candidates and the leaving
      // tokens; the rest become vague.
      std::vector<Move> pool;
      pool.reserve(n_candidates_ + leaving.size());
      for (int32_t i = 0; i < n_candidates_; ++i) {
        const int32_t slot = CandidateSlot(i);
        pool.push_back(Move{slot_pos_[slot], slot, -1, slot, slot_score_[slot]});
      }
      pool.insert(pool.end(), leaving.begin(), leaving.end());
      std::nth_element(pool.begin(), pool.begin() + (candidates_ - 1), pool.end(), ByScore());
      const Move& kth = pool[candidates_ - 1];
      auto kept = [&](const Move& m) { return !ByScore()(kth, m); };  // m is at least as good as the kth
      std::vector<int32_t> free_slots;
      for (int32_t i = 0; i < n_candidates_; ++i) {
        const int32_t slot = CandidateSlot(i);
        const Move cur{slot_pos_[slot], slot, -1, slot, slot_score_[slot]};
        if (!kept(cur)) {
          plan.to_vague.push_back(Move{cur.pos, slot, -1, -1, cur.score});
          free_slots.push_back(slot);
        }
      }
      for (int32_t i = n_candidates_; i < candidates_; ++i) free_slots.push_back(CandidateSlot(i));
      size_t next_free = 0;
      for (Move& m : leaving) {
        if (kept(m)) {
          m.dst_slot = free_slots[next_free++];
          plan.to_slot.push_back(m);
        } else {
          plan.to_vague.push_back(m);
        }
      }
      plan.candidates_after = candidates_;
    }
  }

  for (int64_t p = std::max(first, final_first); p < end; ++p) {
    plan.to_slot.push_back(
        Move{static_cast<int32_t>(p), -1, static_cast<int32_t>(p - first), RingSlot(p), InitialScore(src, p - first)});
  }
}

int64_t HeadCache::BlocksNeeded(const AppendPlan& plan) const {
  const int64_t b = ctx_.plan->block_tokens;
  const int64_t ordinals = next_ordinal_ + static_cast<int64_t>(plan.to_vague.size());
  return (ordinals + b - 1) / b - static_cast<int64_t>(blocks_.size());
}

const void* HeadCache::HostView(const char* device, int64_t bytes, std::vector<char>& bounce) const {
  if (ctx_.backend->caps().device_memory_host_accessible) return device;
  bounce.resize(bytes);
  if (!ctx_.backend->Copy(bounce.data(), device, bytes, CopyKind::kDeviceToHost).ok()) return nullptr;
  return bounce.data();
}

absl::Status HeadCache::TierWrite(BlockId block, int64_t offset, const void* src, int64_t bytes) const {
  char* data = ctx_.tier->Data(block);
  if (data == nullptr) return absl::InternalError(absl::StrFormat("host-tier block %d is not allocated", block));
  std::memcpy(data + offset, src, static_cast<size_t>(bytes));
  return absl::OkStatus();
}

absl::Status HeadCache::TierRead(BlockId block, int64_t offset, void* dst, int64_t bytes) const {
  const char* data = ctx_.tier->Data(block);
  if (data == nullptr) return absl::InternalError(absl::StrFormat("host-tier block %d is not allocated", block));
  std::memcpy(dst, data + offset, static_cast<size_t>(bytes));
  return absl::OkStatus();
}

absl::Status HeadCache::WriteToTier(std::span<const Move> moves, const AppendSource& src) {
  const int64_t rb = ctx_.row_bytes;
  std::vector<char> k_run, v_run, bounce;
  size_t i = 0;
  while (i < moves.size()) {
    // A run of consecutive ordinals inside one block: one tier write each for K and V.
    const uint32_t ord0 = ordinal_[moves[i].pos];
    const BlockId block = OrdinalBlock(ord0);
    size_t j = i;
    while (j < moves.size() && OrdinalBlock(ordinal_[moves[j].pos]) == block) ++j;
    const int64_t bytes = static_cast<int64_t>(j - i) * rb;
    k_run.resize(bytes);
    v_run.resize(bytes);
    for (size_t t = i; t < j; ++t) {
      const Move& m = moves[t];
      const char* k = m.src_slot >= 0 ? KSlot(m.src_slot) : src.k + m.src_row * src.stride_bytes;
      const char* v = m.src_slot >= 0 ? VSlot(m.src_slot) : src.v + m.src_row * src.stride_bytes;
      const void* hk = HostView(k, rb, bounce);
      if (hk == nullptr) return absl::InternalError("device-to-host copy of a key failed");
      std::memcpy(k_run.data() + (t - i) * rb, hk, rb);
      const void* hv = HostView(v, rb, bounce);
      if (hv == nullptr) return absl::InternalError("device-to-host copy of a value failed");
      std::memcpy(v_run.data() + (t - i) * rb, hv, rb);
    }
    if (absl::Status st = TierWrite(block, OrdinalOffset(ord0), k_run.data(), bytes); !st.ok()) return st;
    if (absl::Status st = TierWrite(block, VOffset() + OrdinalOffset(ord0), v_run.data(), bytes); !st.ok())
      return st;
    i = j;
  }
  return absl::OkStatus();
}

void HeadCache::SketchUpdate(float sign, std::span<const int32_t> positions, const void* keys, const void* values,
                             int64_t stride_elems, std::span<const int32_t> rows_index) {
  if (!HasSketch() || positions.empty()) return;
  const int rows = sketch_.rows;
  const bool centroid = sketch_.kind == SketchKind::kCentroid;
  std::vector<uint32_t> buckets;
  if (centroid) {
    buckets.resize(positions.size() * rows);
    if (sign < 0) {
      for (size_t i = 0; i < positions.size(); ++i) {
        const uint32_t ord = ordinal_[positions[i]];
        std::copy_n(buckets_.begin() + static_cast<int64_t>(ord) * rows, rows, buckets.begin() + i * rows);
      }
    }
  }
  kernels::SketchUpdateParams p;
  p.sketch = sketch_;
  p.sign = sign;
  p.n = static_cast<int32_t>(positions.size());
  p.ids = reinterpret_cast<const uint32_t*>(positions.data());
  p.keys = keys;
  p.values = values;
  p.stride = stride_elems;
  p.rows_index = rows_index.data();
  p.dtype = ctx_.options->shape.dtype;
  p.buckets = centroid ? buckets.data() : nullptr;
  ctx_.backend->kernels().SketchUpdate({&p, 1});
  if (centroid && sign > 0) {
    for (size_t i = 0; i < positions.size(); ++i) {
      const uint32_t ord = ordinal_[positions[i]];
      if (buckets_.size() < (static_cast<size_t>(ord) + 1) * rows) buckets_.resize((static_cast<size_t>(ord) + 1) * rows);
      std::copy_n(buckets.begin() + i * rows, rows, buckets_.begin() + static_cast<int64_t>(ord) * rows);
    }
  }
}

void HeadCache::SketchUpdateFromSlots(float sign, std::span<const int32_t> positions, std::span<const int32_t> slots) {
  SketchUpdate(sign, positions, k_slots_, v_slots_, ctx_.options->shape.head_dim, slots);
}

void HeadCache::SketchUpdateFromRows(float sign, std::span<const int32_t> positions, std::span<const int32_t> rows,
                                     const AppendSource& src) {
  const int64_t stride_elems = src.stride_bytes / static_cast<int64_t>(DTypeSize(ctx_.options->shape.dtype));
  SketchUpdate(sign, positions, src.k, src.v, stride_elems, rows);
}

absl::Status HeadCache::VagueAppend(std::span<const int32_t> positions) {
  const size_t first = vague_.size();
  for (int32_t pos : positions) {
    region_[pos] = static_cast<uint8_t>(Region::kVague);
    index_[pos] = static_cast<uint32_t>(vague_.size());
    vague_.push_back(static_cast<uint32_t>(pos));
  }
  if (!MirrorsVagueIds() || positions.empty()) return absl::OkStatus();
  return ctx_.backend->Copy(vague_ids_dev_ + first, vague_.data() + first, positions.size() * sizeof(uint32_t),
                            CopyKind::kHostToDevice);
}

absl::Status HeadCache::VagueRemove(int32_t pos) {
  const uint32_t i = index_[pos];
  const uint32_t last = vague_.back();
  vague_[i] = last;
  index_[last] = i;
  vague_.pop_back();
  if (!MirrorsVagueIds() || i == vague_.size()) return absl::OkStatus();
  return ctx_.backend->Copy(vague_ids_dev_ + i, &vague_[i], sizeof(uint32_t), CopyKind::kHostToDevice);
}

absl::Status HeadCache::ApplyAppend(const AppendPlan& plan, const AppendSource& src,
                                    std::span<const BlockId> blocks) {
  const int64_t first = length();
  region_.resize(first + plan.n, static_cast<uint8_t>(Region::kVague));
  index_.resize(first + plan.n, 0);
  ordinal_.resize(first + plan.n, kNoOrdinal);
  blocks_.insert(blocks_.end(), blocks.begin(), blocks.end());

  // 1. Tokens leaving the device: exact K/V to the host tier, then the sketch.
  //    Their slots are read before step 2 overwrites them.
  if (!plan.to_vague.empty()) {
    std::vector<int32_t> slot_pos, slots, row_pos, rows, all;
    for (const Move& m : plan.to_vague) {
      ordinal_[m.pos] = next_ordinal_++;
      all.push_back(m.pos);
      if (m.src_slot >= 0) {
        slot_pos.push_back(m.pos);
        slots.push_back(m.src_slot);
      } else {
        row_pos.push_back(m.pos);
        rows.push_back(m.src_row);
      }
    }
    if (absl::Status st = WriteToTier(plan.to_vague, src); !st.ok()) return st;
    SketchUpdateFromSlots(+1.0f, slot_pos, slots);
    SketchUpdateFromRows(+1.0f, row_pos, rows, src);
    for (int32_t s : slots) slot_pos_[s] = -1;
    if (absl::Status st = VagueAppend(all); !st.ok()) return st;
  }

  // 2. Tokens into slots: slot-to-slot moves (ring -> candidates) first, as
  //    the caller rows of step 3 overwrite ring slots.
  std::vector<int32_t> ss_src, ss_dst, rs_src, rs_dst;
  for (const Move& m : plan.to_slot) {
    if (m.src_slot >= 0) {
      ss_src.push_back(m.src_slot);
      ss_dst.push_back(m.dst_slot);
    } else {
      rs_src.push_back(m.src_row);
      rs_dst.push_back(m.dst_slot);
    }
  }
  kernels::KernelSet& kernels = ctx_.backend->kernels();
  const int64_t rb = ctx_.row_bytes;
  if (!ss_src.empty()) {
    const int32_t n = static_cast<int32_t>(ss_src.size());
    const kernels::RowCopyParams copies[2] = {
        {k_slots_, k_slots_, rb, rb, rb, n, ss_dst.data(), ss_src.data()},
        {v_slots_, v_slots_, rb, rb, rb, n, ss_dst.data(), ss_src.data()}};
    kernels.CopyRows(copies);
    for (int32_t s : ss_src) slot_pos_[s] = -1;
  }
  if (!rs_src.empty()) {
    const int32_t n = static_cast<int32_t>(rs_src.size());
    const kernels::RowCopyParams copies[2] = {
        {k_slots_, src.k, rb, rb, src.stride_bytes, n, rs_dst.data(), rs_src.data()},
        {v_slots_, src.v, rb, rb, src.stride_bytes, n, rs_dst.data(), rs_src.data()}};
    kernels.CopyRows(copies);
  }
  for (const Move& m : plan.to_slot) {
    slot_pos_[m.dst_slot] = m.pos;
    slot_score_[m.dst_slot] = m.score;
    index_[m.pos] = static_cast<uint32_t>(m.dst_slot);
    region_[m.pos] = static_cast<uint8_t>(m.dst_slot < sink_             ? Region::kSink
                                          : m.dst_slot < sink_ + recent_ ? Region::kRecent
                                                                          : Region::kCandidate);
  }
  n_candidates_ = plan.candidates_after;
  return absl::OkStatus();
}

// ---------------------------------------------------------------- Attend

void HeadCache::FillAttend(kernels::AttendParams& p) const {
  const RegionCounts c = regions();
  p.k_slots = k_slots_;
  p.v_slots = v_slots_;
  p.num_ranges = 0;
  auto add = [&](int32_t begin, int64_t count) {
    if (count > 0) p.ranges[p.num_ranges++] = kernels::SlotRange{begin, static_cast<int32_t>(count)};
  };
  add(0, c.sink);
  add(sink_, c.recent);
  add(sink_ + recent_, c.candidate);
  add(sink_ + recent_ + candidates_, c.recalled);
  p.slot_probs = slot_probs_;
  p.sketch = sketch_;
  p.policy = ctx_.options->vague_policy;
  p.vague_ids = vague_ids_dev_;
  p.num_vague = static_cast<int32_t>(vague_.size());
}

absl::Status HeadCache::AfterAttend() {
  if (slot_probs_ == nullptr) return absl::OkStatus();  // nothing is ever evicted
  if (absl::Status st = ctx_.backend->Copy(probs_host_.data(), slot_probs_, probs_host_.size() * sizeof(float),
                                           CopyKind::kDeviceToHost);
      !st.ok())
    return st;
  const float decay = static_cast<float>(ctx_.options->score_decay);
  for (size_t s = 0; s < slot_pos_.size(); ++s) {
    if (slot_pos_[s] >= 0) slot_score_[s] = decay * slot_score_[s] + probs_host_[s];
  }
  return absl::OkStatus();
}

AttendCounts HeadCache::Served() const {
  const RegionCounts c = regions();
  AttendCounts a;
  a.exact = c.resident();
  if (HasSketch() && ctx_.options->vague_policy != VaguePolicy::kDrop) {
    a.from_sketch = c.vague;
  } else {
    a.dropped = c.vague;
  }
  return a;
}

// ---------------------------------------------------------------- Recall

absl::StatusOr<int> HeadCache::Recall(std::span<const int64_t> positions) {
  if (staging_ == 0) {
    return absl::FailedPreconditionError("the budget plan has no staging slots (staging_tokens = 0)");
  }
  const int64_t len = length();
  for (int64_t p : positions) {
    if (p < 0 || p >= len) {
      return absl::InvalidArgumentError(
          absl::StrFormat("recall of position %d, outside [0, %d) of layer %d", p, len, layer_));
    }
  }
  // Vague targets, each once, at most staging_ of them.
  std::vector<int32_t> targets;
  for (int64_t p : positions) {
    if (static_cast<int>(targets.size()) == staging_) break;
    if (region_[p] == static_cast<uint8_t>(Region::kVague) &&
        std::find(targets.begin(), targets.end(), static_cast<int32_t>(p)) == targets.end()) {
      targets.push_back(static_cast<int32_t>(p));
    }
  }
  // Read their exact K/V first: a token whose read fails stays vague.
  const int64_t rb = ctx_.row_bytes;
  std::vector<char> data(targets.size() * 2 * rb);
  absl::Status read_status;
  size_t ok = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    const uint32_t ord = ordinal_[targets[i]];
    char* k = data.data() + ok * 2 * rb;
    absl::Status st = TierRead(OrdinalBlock(ord), OrdinalOffset(ord), k, rb);
    if (st.ok()) st = TierRead(OrdinalBlock(ord), VOffset() + OrdinalOffset(ord), k + rb, rb);
    if (!st.ok()) {
      read_status.Update(st);
      continue;
    }
    targets[ok++] = targets[i];
  }
  targets.resize(ok);
  if (targets.empty()) return read_status.ok() ? absl::StatusOr<int>(0) : read_status;

  // Staged tokens with the lowest accumulated attention make room.
  std::vector<int32_t> free_slots;
  const int64_t need = n_staged_ + static_cast<int64_t>(targets.size()) - staging_;
  if (need > 0) {
    std::vector<int32_t> staged(n_staged_);
    for (int32_t i = 0; i < n_staged_; ++i) staged[i] = StagingSlot(i);
    std::partial_sort(staged.begin(), staged.begin() + need, staged.end(), [&](int32_t a, int32_t b) {
      return slot_score_[a] < slot_score_[b] || (slot_score_[a] == slot_score_[b] && slot_pos_[a] < slot_pos_[b]);
    });
    std::vector<int32_t> victim_pos;
    for (int64_t i = 0; i < need; ++i) {
      victim_pos.push_back(slot_pos_[staged[i]]);
      free_slots.push_back(staged[i]);
    }
    SketchUpdateFromSlots(+1.0f, victim_pos, std::span<const int32_t>(free_slots));
    for (int32_t s : free_slots) slot_pos_[s] = -1;
    if (absl::Status st = VagueAppend(victim_pos); !st.ok()) return st;
  }
  while (free_slots.size() < targets.size()) free_slots.push_back(StagingSlot(n_staged_++));

  std::vector<int32_t> slots(free_slots.begin(), free_slots.begin() + targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const char* k = data.data() + i * 2 * rb;
    if (absl::Status st = ctx_.backend->Copy(KSlot(slots[i]), k, rb, CopyKind::kHostToDevice); !st.ok()) return st;
    if (absl::Status st = ctx_.backend->Copy(VSlot(slots[i]), k + rb, rb, CopyKind::kHostToDevice); !st.ok())
      return st;
  }
  SketchUpdateFromSlots(-1.0f, targets, slots);
  for (size_t i = 0; i < targets.size(); ++i) {
    if (absl::Status st = VagueRemove(targets[i]); !st.ok()) return st;
    region_[targets[i]] = static_cast<uint8_t>(Region::kRecalled);
    index_[targets[i]] = static_cast<uint32_t>(slots[i]);
    slot_pos_[slots[i]] = targets[i];
    slot_score_[slots[i]] = 0.0f;
  }
  if (!read_status.ok()) return read_status;
  return static_cast<int>(targets.size());
}

absl::StatusOr<std::vector<int64_t>> HeadCache::Rank(const void* q_group, int count) const {
  if (!HasSketch()) return absl::FailedPreconditionError("ranking vague tokens needs a sketch (sketch_kind none)");
  const int64_t n = static_cast<int64_t>(vague_.size());
  std::vector<int64_t> out;
  if (n == 0 || count <= 0) return out;
  std::vector<uint32_t> buckets;
  if (sketch_.kind == SketchKind::kCentroid) {
    buckets.resize(n * sketch_.rows);
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(buckets_.begin() + static_cast<int64_t>(ordinal_[vague_[i]]) * sketch_.rows, sketch_.rows,
                  buckets.begin() + i * sketch_.rows);
    }
  }
  std::vector<float> scores(n);
  kernels::SketchScoreParams p;
  p.sketch = sketch_;
  p.policy = ctx_.options->vague_policy;
  p.group = ctx_.options->shape.group();
  p.dtype = ctx_.options->shape.dtype;
  p.scale = 1.0f;  // ranking is invariant to the logit scale
  p.q = q_group;
  p.n = static_cast<int32_t>(n);
  p.ids = vague_.data();
  p.buckets = buckets.empty() ? nullptr : buckets.data();
  p.scores = scores.data();
  ctx_.backend->kernels().SketchScores(p);
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  const int64_t k = std::min<int64_t>(count, n);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && vague_[a] > vague_[b]);
  });
  for (int64_t i = 0; i < k; ++i) out.push_back(vague_[order[i]]);
  return out;
}

// ---------------------------------------------------------------- Introspection

absl::Status HeadCache::ReadToken(int64_t pos, void* k, void* v) const {
  const int64_t rb = ctx_.row_bytes;
  if (region(pos) == Region::kVague) {
    const uint32_t ord = ordinal_[pos];
    if (absl::Status st = TierRead(OrdinalBlock(ord), OrdinalOffset(ord), k, rb); !st.ok()) return st;
    return TierRead(OrdinalBlock(ord), VOffset() + OrdinalOffset(ord), v, rb);
  }
  const int32_t slot = static_cast<int32_t>(index_[pos]);
  if (absl::Status st = ctx_.backend->Copy(k, KSlot(slot), rb, CopyKind::kDeviceToHost); !st.ok()) return st;
  return ctx_.backend->Copy(v, VSlot(slot), rb, CopyKind::kDeviceToHost);
}

absl::Status HeadCache::EstimateToken(int64_t pos, float* k, float* v) const {
  if (!HasSketch()) return absl::FailedPreconditionError("no sketch (sketch_kind none)");
  if (region(pos) != Region::kVague) {
    return absl::FailedPreconditionError(
        absl::StrFormat("token %d of layer %d, KV head %d is %s, not vague", pos, layer_, kv_head_,
                        RegionName(region(pos))));
  }
  const uint32_t id = static_cast<uint32_t>(pos);
  kernels::SketchEstimateParams p;
  p.sketch = sketch_;
  p.policy = ctx_.options->vague_policy == VaguePolicy::kShrink ? VaguePolicy::kShrink : VaguePolicy::kEstimate;
  p.n = 1;
  p.ids = &id;
  p.buckets = sketch_.kind == SketchKind::kCentroid
                  ? buckets_.data() + static_cast<int64_t>(ordinal_[pos]) * sketch_.rows
                  : nullptr;
  p.keys = k;
  p.values = v;
  ctx_.backend->kernels().SketchEstimate(p);
  return absl::OkStatus();
}

absl::Status HeadCache::CheckInvariants() const {
  auto fail = [&](const std::string& what) {
    return absl::InternalError(absl::StrFormat("layer %d, KV head %d: %s", layer_, kv_head_, what));
  };
  const int64_t len = length();
  if (static_cast<int64_t>(index_.size()) != len || static_cast<int64_t>(ordinal_.size()) != len)
    return fail("per-token arrays differ in length");
  RegionCounts seen;
  for (int64_t p = 0; p < len; ++p) {
    const Region r = region(p);
    const uint32_t idx = index_[p];
    switch (r) {
      case Region::kSink:
        ++seen.sink;
        if (p >= sink_ || idx != p) return fail(absl::StrFormat("sink token %d in slot %d", p, idx));
        break;
      case Region::kRecent:
        ++seen.recent;
        if (p < std::max<int64_t>(sink_, len - recent_) || static_cast<int32_t>(idx) != RingSlot(p))
          return fail(absl::StrFormat("recent token %d in slot %d, length %d", p, idx, len));
        break;
      case Region::kCandidate:
        ++seen.candidate;
        if (static_cast<int32_t>(idx) < CandidateSlot(0) || static_cast<int32_t>(idx) >= CandidateSlot(n_candidates_))
          return fail(absl::StrFormat("candidate token %d in slot %d", p, idx));
        if (p >= len - recent_ && p >= sink_) return fail(absl::StrFormat("candidate %d is inside the ring", p));
        break;
      case Region::kRecalled:
        ++seen.recalled;
        if (static_cast<int32_t>(idx) < StagingSlot(0) || static_cast<int32_t>(idx) >= StagingSlot(n_staged_))
          return fail(absl::StrFormat("recalled token %d in slot %d", p, idx));
        if (ordinal_[p] == kNoOrdinal) return fail(absl::StrFormat("recalled token %d has no host copy", p));
        break;
      case Region::kVague:
        ++seen.vague;
        if (idx >= vague_.size() || vague_[idx] != p)
          return fail(absl::StrFormat("vague token %d not at index %d of the vague list", p, idx));
        if (ordinal_[p] == kNoOrdinal || ordinal_[p] >= next_ordinal_)
          return fail(absl::StrFormat("vague token %d has no host copy", p));
        break;
      default:
        return fail(absl::StrFormat("token %d has region %d", p, int(region_[p])));
    }
    if (r != Region::kVague && slot_pos_[idx] != p)
      return fail(absl::StrFormat("slot %d holds %d, not token %d", idx, slot_pos_[idx], p));
  }
  const RegionCounts want = regions();
  if (seen.sink != want.sink || seen.recent != want.recent || seen.candidate != want.candidate ||
      seen.recalled != want.recalled || seen.vague != want.vague || seen.total() != len) {
    return fail(absl::StrFormat("region counts sink %d/%d recent %d/%d candidate %d/%d recalled %d/%d vague %d/%d",
                                seen.sink, want.sink, seen.recent, want.recent, seen.candidate, want.candidate,
                                seen.recalled, want.recalled, seen.vague, want.vague));
  }
  if (n_candidates_ > candidates_ || n_staged_ > staging_) return fail("candidate or staging count over capacity");
  int64_t occupied = 0;
  for (int32_t pos : slot_pos_) occupied += pos >= 0;
  if (occupied != want.resident()) return fail(absl::StrFormat("%d slots occupied for %d resident tokens", occupied, want.resident()));
  const int64_t b = ctx_.plan->block_tokens;
  if (static_cast<int64_t>(blocks_.size()) != (next_ordinal_ + b - 1) / b)
    return fail(absl::StrFormat("%d host blocks for %d ordinals", blocks_.size(), next_ordinal_));
  if (HasSketch()) {
    std::vector<float> totals(2 * sketch_.head_dim + 2);
    std::vector<float> counts(2LL * sketch_.rows * sketch_.width);
    if (absl::Status st = ctx_.backend->Copy(totals.data(), sketch_.totals, totals.size() * 4, CopyKind::kDeviceToHost);
        !st.ok())
      return st;
    if (absl::Status st = ctx_.backend->Copy(counts.data(), sketch_.counts, counts.size() * 4, CopyKind::kDeviceToHost);
        !st.ok())
      return st;
    if (totals[2 * sketch_.head_dim] != static_cast<float>(vague_.size()))
      return fail(absl::StrFormat("sketch holds %g tokens, vague list %d", totals[2 * sketch_.head_dim], vague_.size()));
    for (int r = 0; r < sketch_.rows; ++r) {
      double row_count = 0;
      for (int c = 0; c < sketch_.width; ++c) {
        const int64_t bb = static_cast<int64_t>(r) * sketch_.width + c;
        row_count += counts[2 * bb] + counts[2 * bb + 1];
      }
      if (row_count != static_cast<double>(vague_.size()))
        return fail(absl::StrFormat("sketch row %d counts %g tokens, vague list %d", r, row_count, vague_.size()));
    }
    if (MirrorsVagueIds()) {
      std::vector<uint32_t> mirror(vague_.size());
      if (absl::Status st = ctx_.backend->Copy(mirror.data(), vague_ids_dev_, mirror.size() * 4, CopyKind::kDeviceToHost);
          !st.ok())
        return st;
      if (mirror != vague_) return fail("device vague-token list differs from the host's");
    }
  }
  return absl::OkStatus();
}

}  // namespace kvtier
