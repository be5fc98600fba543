#include "head_cache.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "absl/strings/str_format.h"
#include "kvtier/kernels/convert.h"
#include "kvtier/kernels/hash.h"
#include "radix_sort.h"

namespace kvtier {
namespace {

// Heavy-hitter order: higher score first; ties keep the more recent token.
struct ByScore {
  bool operator()(const HeadCache::Move& a, const HeadCache::Move& b) const {
    return a.score > b.score || (a.score == b.score && a.pos > b.pos);
  }
};

// (score, position) as one integer that orders as the pair does: scores are
// >= 0 (+ 0.0f turns a -0 into +0), so their bits order as the floats do.
uint64_t ScoreKey(float score, int32_t pos) {
  return uint64_t{std::bit_cast<uint32_t>(score + 0.0f)} << 32 | static_cast<uint32_t>(pos);
}
// Above every ScoreKey of a score that is not NaN (positive NaN bits are
// above infinity's; scores here are sums of probabilities, never NaN).
constexpr uint64_t kNoKey = ~uint64_t{0};

float InitialScore(const AppendSource& src, int64_t row) {
  return src.scores ? src.scores[row * src.score_stride] : 0.0f;
}

// Plan-only weight classes: a quarter octave each, the heaviest first.
constexpr int kWeightClasses = 64;
uint32_t WeightClass(float w) {
  if (!(w > 0)) return kWeightClasses - 1;
  const double c = std::floor((2.0 - std::log2(static_cast<double>(w))) * 4.0);
  return static_cast<uint32_t>(std::clamp(c, 0.0, static_cast<double>(kWeightClasses - 1)));
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
      plan_only_(ctx.options->plan_only),
      k_slots_(chunk + ctx.layout.k_slots),
      v_slots_(chunk + ctx.layout.v_slots),
      slot_probs_(ctx.layout.slot_probs >= 0 ? reinterpret_cast<float*>(chunk + ctx.layout.slot_probs) : nullptr),
      vague_ids_dev_(ctx.layout.vague_ids >= 0 ? reinterpret_cast<uint32_t*>(chunk + ctx.layout.vague_ids)
                                               : nullptr),
      bounds_dev_(ctx.layout.summary >= 0 ? chunk + ctx.layout.summary : nullptr) {
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
  stage_.assign(staging_, Stage::kFree);
  installed_at_.assign(staging_, 0);
  by_class_ = !plan_only_ && HasSketch() && sketch_.rows == 1;  // plan-only has weight classes
  if (plan_only_) {
    class_count_.assign(kWeightClasses, 0);
    class_order_.resize(kWeightClasses);
    staged_class_count_.assign(kWeightClasses, 0);
    slot_weight_.assign(plan.slots(), 0.0f);
  } else if (by_class_) {
    class_members_.resize(sketch_.kind == SketchKind::kCountSketch ? 2 * sketch_.width : sketch_.width);
  }
}

absl::Status HeadCache::Init() {
  if (plan_only_) return absl::OkStatus();  // no device state is ever read
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
  // Transfers in flight write into this head's slots: wait for them before
  // the device memory can be reused.
  for (Pending& p : pending_) p.transfer->Wait();
  pending_.clear();
  absl::Status result;
  for (BlockStore::Ref b : blocks_) result.Update(ctx_.store->Delete(b));
  blocks_.clear();
  return result;
}

RegionCounts HeadCache::regions() const {
  RegionCounts c;
  const int64_t len = length();
  c.sink = std::min<int64_t>(len, sink_);
  c.recent = std::min<int64_t>(recent_, std::max<int64_t>(0, len - sink_));
  c.candidate = n_candidates_;
  c.recalled = n_installed_;
  c.vague = n_vague_;
  return c;
}

int64_t HeadCache::pending_tokens() const {
  int64_t n = 0;
  for (const Pending& p : pending_) n += static_cast<int64_t>(p.positions.size());
  return n;
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
  std::vector<Move>& leaving = leaving_;
  leaving.clear();
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
      plan.to_vague.assign(leaving.begin(), leaving.end());
    } else if (n_candidates_ + static_cast<int64_t>(leaving.size()) <= candidates_) {
      for (Move& m : leaving) {
        m.dst_slot = CandidateSlot(plan.candidates_after++);
        plan.to_slot.push_back(m);
      }
    } else if (leaving.size() == 1 && n_candidates_ == candidates_) {
      // A decode step: the one token leaving the ring and the worst
      // candidate compete for a slot (what the general case below decides
      // for a pool of candidates_ + 1, without building the pool).
      // The lowest (score, position): the lowest score's bits (scores are
      // >= 0, + 0.0f turns a -0 into +0, so the bits order as the floats
      // do), then the lowest position with it. Two passes that vectorise,
      // without branches or a loop-carried load.
      const float* score = slot_score_.data() + CandidateSlot(0);
      const int32_t* pos = slot_pos_.data() + CandidateSlot(0);
      uint32_t low = ~0u;
      for (int32_t i = 0; i < n_candidates_; ++i) low = std::min(low, std::bit_cast<uint32_t>(score[i] + 0.0f));
      int32_t low_pos = std::numeric_limits<int32_t>::max();
      for (int32_t i = 0; i < n_candidates_; ++i) {
        // Positions are >= 0: or-ing the others with the largest int32 leaves it.
        const int32_t other = -static_cast<int32_t>(std::bit_cast<uint32_t>(score[i] + 0.0f) != low) &
                              std::numeric_limits<int32_t>::max();
        low_pos = std::min(low_pos, pos[i] | other);
      }
      const int32_t worst = static_cast<int32_t>(index_[low_pos]);  // a candidate's slot
      Move m = leaving[0];
      const Move cur{slot_pos_[worst], worst, -1, -1, slot_score_[worst]};
      if (ByScore()(m, cur)) {
        plan.to_vague.push_back(cur);
        m.dst_slot = worst;
        plan.to_slot.push_back(m);
      } else {
        plan.to_vague.push_back(m);
      }
    } else {
      // Keep the best `candidates_` of the current candidates and the leaving
      // tokens; the rest become vague.
      // ByScore as one integer per token (ScoreKey); positions break ties.
      std::vector<uint64_t>& pool = pool_;
      pool.clear();
      for (int32_t i = 0; i < n_candidates_; ++i) {
        const int32_t slot = CandidateSlot(i);
        pool.push_back(ScoreKey(slot_score_[slot], slot_pos_[slot]));
      }
      for (const Move& m : leaving) pool.push_back(ScoreKey(m.score, m.pos));
      std::nth_element(pool.begin(), pool.begin() + (candidates_ - 1), pool.end(), std::greater<>());
      const uint64_t kth = pool[candidates_ - 1];
      auto kept = [&](const Move& m) { return ScoreKey(m.score, m.pos) >= kth; };  // at least as good as the kth
      std::vector<int32_t>& free_slots = free_scratch_;
      free_slots.clear();
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
  const int64_t b = block_tokens();
  const int64_t ordinals = next_ordinal_ + static_cast<int64_t>(plan.to_vague.size());
  return (ordinals + b - 1) / b - static_cast<int64_t>(blocks_.size());
}

const void* HeadCache::HostView(const char* device, int64_t bytes, std::vector<char>& bounce) const {
  if (ctx_.backend->caps().device_memory_host_accessible) return device;
  bounce.resize(bytes);
  if (!ctx_.backend->Copy(bounce.data(), device, bytes, CopyKind::kDeviceToHost).ok()) return nullptr;
  return bounce.data();
}

absl::Status HeadCache::WriteToStore(std::span<const Move> moves, const AppendSource& src) {
  const int64_t rb = ctx_.row_bytes;
  const int d = ctx_.options->shape.head_dim;
  const DType dtype = ctx_.options->shape.dtype;
  std::vector<char> k_run, v_run, bounce;
  std::vector<float> kf(plan_only_ ? 0 : d);
  const bool host_accessible = ctx_.backend->caps().device_memory_host_accessible;
  int64_t first_group = -1, last_group = -1;
  size_t i = 0;
  while (i < moves.size()) {
    // A run of consecutive ordinals inside one block: one write each for K and V.
    const uint32_t ord0 = ordinal_[moves[i].pos];
    const BlockStore::Ref block = OrdinalBlock(ord0);
    size_t j = i;
    float heat = 0.0f;
    while (j < moves.size() && OrdinalBlock(ordinal_[moves[j].pos]) == block) heat += moves[j++].score;
    const int64_t bytes = static_cast<int64_t>(j - i) * rb;
    // Plan-only: the same runs, blocks, heat and seals; no bytes to gather.
    if (!plan_only_) {
      k_run.resize(bytes);
      v_run.resize(bytes);
    }
    size_t filled = i;  // rows [i, filled) of k_run and v_run hold their bytes
    for (size_t t = i; t < j && !plan_only_; ++t) {
      const Move& m = moves[t];
      if (t >= filled && m.src_slot >= 0 && !host_accessible) {
        // Device slots the host cannot read: a run of consecutive slots
        // (the ring's oldest tokens) comes back in one copy each for K and V.
        size_t e = t + 1;
        while (e < j && moves[e].src_slot == moves[e - 1].src_slot + 1) ++e;
        const int64_t n_bytes = static_cast<int64_t>(e - t) * rb;
        if (absl::Status st = ctx_.backend->Copy(k_run.data() + (t - i) * rb, KSlot(m.src_slot), n_bytes,
                                                 CopyKind::kDeviceToHost);
            !st.ok())
          return st;
        if (absl::Status st = ctx_.backend->Copy(v_run.data() + (t - i) * rb, VSlot(m.src_slot), n_bytes,
                                                 CopyKind::kDeviceToHost);
            !st.ok())
          return st;
        filled = e;
      } else if (t >= filled) {
        const char* k = m.src_slot >= 0 ? KSlot(m.src_slot) : src.k + m.src_row * src.stride_bytes;
        const char* v = m.src_slot >= 0 ? VSlot(m.src_slot) : src.v + m.src_row * src.stride_bytes;
        const bool bounced = m.src_slot < 0 && src.host_k != nullptr;  // the caller's rows, copied once per append
        const void* hk = bounced ? src.host_k + m.src_row * src.stride_bytes : HostView(k, rb, bounce);
        if (hk == nullptr) return absl::InternalError("device-to-host copy of a key failed");
        std::memcpy(k_run.data() + (t - i) * rb, hk, rb);
        const void* hv = bounced ? src.host_v + m.src_row * src.stride_bytes : HostView(v, rb, bounce);
        if (hv == nullptr) return absl::InternalError("device-to-host copy of a value failed");
        std::memcpy(v_run.data() + (t - i) * rb, hv, rb);
        filled = t + 1;
      }
      if (bounds_dev_ != nullptr) {  // widen the key bounds of the token's group
        const int64_t g = ordinal_[m.pos] / ctx_.plan->summary_tokens;
        if (first_group < 0) first_group = g;
        last_group = std::max(last_group, g);
        if (static_cast<int64_t>(bounds_host_.size()) < (g + 1) * 2 * d) {
          const size_t old = bounds_host_.size();
          bounds_host_.resize((g + 1) * 2 * d);
          for (size_t x = old; x < bounds_host_.size(); x += 2 * d) {
            std::fill_n(bounds_host_.begin() + x, d, INFINITY);
            std::fill_n(bounds_host_.begin() + x + d, d, -INFINITY);
          }
        }
        kernels::RowToFloat(k_run.data() + (t - i) * rb, dtype, d, kf.data());
        float* lo = bounds_host_.data() + g * 2 * d;
        float* hi = lo + d;
        for (int x = 0; x < d; ++x) {
          lo[x] = std::min(lo[x], kf[x]);
          hi[x] = std::max(hi[x], kf[x]);
        }
      }
    }
    if (absl::Status st = ctx_.store->Write(block, OrdinalOffset(ord0), plan_only_ ? nullptr : k_run.data(), bytes);
        !st.ok())
      return st;
    if (absl::Status st =
            ctx_.store->Write(block, VOffset() + OrdinalOffset(ord0), plan_only_ ? nullptr : v_run.data(), bytes);
        !st.ok())
      return st;
    ctx_.store->AddHeat(block, heat);
    i = j;
  }
  if (first_group >= 0) {  // the widened bounds to the device, in the model dtype
    const int64_t groups = last_group - first_group + 1;
    std::vector<char> rows(groups * 2 * rb);
    for (int64_t g = 0; g < groups; ++g) {
      kernels::FloatToRow(bounds_host_.data() + (first_group + g) * 2 * d, dtype, d, rows.data() + g * 2 * rb);
      kernels::FloatToRow(bounds_host_.data() + (first_group + g) * 2 * d + d, dtype, d, rows.data() + g * 2 * rb + rb);
    }
    if (absl::Status st = ctx_.backend->Copy(bounds_dev_ + first_group * 2 * rb, rows.data(), groups * 2 * rb,
                                             CopyKind::kHostToDevice);
        !st.ok())
      return st;
  }
  return absl::OkStatus();
}

void HeadCache::SketchUpdate(float sign, std::span<const int32_t> positions, const void* keys, const void* values,
                             int64_t stride_elems, std::span<const int32_t> rows_index) {
  if (!HasSketch() || plan_only_ || positions.empty()) return;
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

uint32_t HeadCache::ClassOf(int32_t pos) const {
  if (sketch_.kind == SketchKind::kCountSketch) {
    const uint32_t h = kernels::TokenHash(kernels::RowSeed(sketch_.seed, 0), static_cast<uint32_t>(pos));
    return 2 * kernels::Bucket(h, sketch_.width) + (kernels::Sign(h) < 0 ? 1 : 0);
  }
  return buckets_[ordinal_[pos]];  // centroid, one row
}

absl::Status HeadCache::VagueAppend(std::span<const int32_t> positions) {
  n_vague_ += static_cast<int64_t>(positions.size());
  if (plan_only_) {  // the weight classes' sets are the vague set
    for (int32_t pos : positions) {
      region_[pos] = static_cast<uint8_t>(Region::kVague);
      const uint32_t c = class_of_[pos];
      ++class_count_[c];
      class_order_[c].Insert(static_cast<uint32_t>(pos));
    }
    return absl::OkStatus();
  }
  const size_t first = vague_.size();
  if (by_class_ && class_of_.size() < region_.size()) {
    class_of_.resize(region_.size());
    in_class_.resize(region_.size());
  }
  for (int32_t pos : positions) {
    region_[pos] = static_cast<uint8_t>(Region::kVague);
    index_[pos] = static_cast<uint32_t>(vague_.size());
    vague_.push_back(static_cast<uint32_t>(pos));
    if (by_class_) {
      const uint32_t c = ClassOf(pos);
      class_of_[pos] = c;
      in_class_[pos] = static_cast<uint32_t>(class_members_[c].size());
      class_members_[c].push_back(static_cast<uint32_t>(pos));
    }
  }
  if (!MirrorsVagueIds() || positions.empty()) return absl::OkStatus();
  return ctx_.backend->Copy(vague_ids_dev_ + first, vague_.data() + first, positions.size() * sizeof(uint32_t),
                            CopyKind::kHostToDevice);
}

absl::Status HeadCache::VagueRemove(std::span<const int32_t> positions) {
  if (plan_only_) {
    n_vague_ -= static_cast<int64_t>(positions.size());
    for (int32_t pos : positions) {
      --class_count_[class_of_[pos]];
      class_order_[class_of_[pos]].Erase(static_cast<uint32_t>(pos));
    }
    return absl::OkStatus();
  }
  for (int32_t pos : positions) {
    --n_vague_;  // token by token: a failed mirror copy below leaves the count matching the list
    if (by_class_) {
      std::vector<uint32_t>& members = class_members_[class_of_[pos]];
      const uint32_t j = in_class_[pos];
      members[j] = members.back();
      in_class_[members[j]] = j;
      members.pop_back();
    }
    const uint32_t i = index_[pos];
    const uint32_t last = vague_.back();
    vague_[i] = last;
    index_[last] = i;
    vague_.pop_back();
    if (!MirrorsVagueIds() || i == vague_.size()) continue;
    if (absl::Status st = ctx_.backend->Copy(vague_ids_dev_ + i, &vague_[i], sizeof(uint32_t), CopyKind::kHostToDevice);
        !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

absl::Status HeadCache::ApplyAppend(const AppendPlan& plan, const AppendSource& src,
                                    std::span<const BlockStore::Ref> blocks) {
  const int64_t first = length();
  region_.resize(first + plan.n, static_cast<uint8_t>(Region::kVague));
  in_flight_.resize(first + plan.n, 0);
  index_.resize(first + plan.n, 0);
  ordinal_.resize(first + plan.n, kNoOrdinal);
  blocks_.insert(blocks_.end(), blocks.begin(), blocks.end());
  if (plan_only_) {
    weight_.resize(first + plan.n, 1.0f);
    class_of_.resize(first + plan.n);
    if (src.weights != nullptr) {
      for (int64_t i = 0; i < plan.n; ++i) weight_[first + i] = src.weights[i * src.score_stride];
    }
    for (int64_t i = 0; i < plan.n; ++i) {
      weight_sum_ += weight_[first + i];
      class_of_[first + i] = WeightClass(weight_[first + i]);
    }
  }

  // 1. Tokens leaving the device: exact K/V to the host tier, then the sketch.
  //    Their slots are read before step 2 overwrites them.
  if (!plan.to_vague.empty()) {
    std::vector<int32_t>&slot_pos = scratch_[0], &slots = scratch_[1], &row_pos = scratch_[2], &rows = scratch_[3],
                        &all = scratch_[4];
    for (int i = 0; i < 5; ++i) scratch_[i].clear();
    for (const Move& m : plan.to_vague) {
      pos_of_ordinal_.push_back(m.pos);
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
    if (absl::Status st = WriteToStore(plan.to_vague, src); !st.ok()) return st;
    SketchUpdateFromSlots(+1.0f, slot_pos, slots);
    SketchUpdateFromRows(+1.0f, row_pos, rows, src);
    for (int32_t s : slots) slot_pos_[s] = -1;
    if (absl::Status st = VagueAppend(all); !st.ok()) return st;
  }

  // 2. Tokens into slots: slot-to-slot moves (ring -> candidates) first, as
  //    the caller rows of step 3 overwrite ring slots.
  std::vector<int32_t>&ss_src = scratch_[0], &ss_dst = scratch_[1], &rs_src = scratch_[2], &rs_dst = scratch_[3];
  for (int i = 0; i < 4; ++i) scratch_[i].clear();
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
    if (!plan_only_) {
    const kernels::RowCopyParams copies[2] = {
        {k_slots_, k_slots_, rb, rb, rb, n, ss_dst.data(), ss_src.data()},
        {v_slots_, v_slots_, rb, rb, rb, n, ss_dst.data(), ss_src.data()}};
    kernels.CopyRows(copies);
    }
    for (int32_t s : ss_src) slot_pos_[s] = -1;
  }
  if (!rs_src.empty() && !plan_only_) {
    const int32_t n = static_cast<int32_t>(rs_src.size());
    const kernels::RowCopyParams copies[2] = {
        {k_slots_, src.k, rb, rb, src.stride_bytes, n, rs_dst.data(), rs_src.data()},
        {v_slots_, src.v, rb, rb, src.stride_bytes, n, rs_dst.data(), rs_src.data()}};
    kernels.CopyRows(copies);
  }
  for (const Move& m : plan.to_slot) {
    slot_pos_[m.dst_slot] = m.pos;
    slot_score_[m.dst_slot] = m.score;
    if (plan_only_) slot_weight_[m.dst_slot] = weight_[m.pos];
    index_[m.pos] = static_cast<uint32_t>(m.dst_slot);
    region_[m.pos] = static_cast<uint8_t>(m.dst_slot < sink_             ? Region::kSink
                                          : m.dst_slot < sink_ + recent_ ? Region::kRecent
                                                                          : Region::kCandidate);
  }
  n_candidates_ = plan.candidates_after;
  return absl::OkStatus();
}

void HeadCache::SealFullBlocks() {
  while (sealed_ < static_cast<int64_t>(blocks_.size()) &&
         (sealed_ + 1) * static_cast<int64_t>(block_tokens()) <= static_cast<int64_t>(next_ordinal_)) {
    ctx_.store->Seal(blocks_[sealed_++]);
  }
}

// ---------------------------------------------------------------- Attend

int32_t HeadCache::NextStaging(int32_t i, bool installed) const {
  // The states read 8 at a time: of the three only kInstalled has bit 1
  // set, so a word's installed slots are its bytes' bit 1, and the first
  // installed (or not installed) one is the lowest set bit (the lowest
  // address, little-endian).
  static_assert(sizeof(Stage) == 1 && std::endian::native == std::endian::little);
  static_assert(static_cast<uint8_t>(Stage::kFree) == 0 && static_cast<uint8_t>(Stage::kPending) == 1 &&
                static_cast<uint8_t>(Stage::kInstalled) == 2);
  constexpr uint64_t kInstalledBits = 0x0202020202020202ull;
  const Stage* stage = stage_.data();
  for (; i + 8 <= staging_; i += 8) {
    uint64_t word;
    std::memcpy(&word, stage + i, sizeof(word));
    const uint64_t hits = (installed ? word : ~word) & kInstalledBits;
    if (hits != 0) return i + std::countr_zero(hits) / 8;
  }
  for (; i < staging_; ++i) {
    if ((stage[i] == Stage::kInstalled) == installed) return i;
  }
  return staging_;
}

void HeadCache::FillAttend(kernels::AttendParams& p) {
  const RegionCounts c = regions();
  ranges_.clear();
  auto add = [&](int32_t begin, int64_t count) {
    if (count > 0) ranges_.push_back(kernels::SlotRange{begin, static_cast<int32_t>(count)});
  };
  add(0, c.sink);
  add(sink_, c.recent);
  add(sink_ + recent_, c.candidate);
  for (int32_t i = NextStaging(0, true); i < staging_;) {  // runs of installed staging slots
    const int32_t j = NextStaging(i + 1, false);
    add(StagingSlot(i), j - i);
    i = NextStaging(j, true);
  }
  p.k_slots = k_slots_;
  p.v_slots = v_slots_;
  p.ranges = ranges_.data();
  p.num_ranges = static_cast<int32_t>(ranges_.size());
  p.slot_probs = slot_probs_;
  p.sketch = sketch_;
  p.policy = ctx_.options->vague_policy;
  p.vague_ids = vague_ids_dev_;
  p.num_vague = static_cast<int32_t>(n_vague_);
}

absl::Status HeadCache::AfterAttend() {
  ++attends_;
  if (slot_probs_ == nullptr) return absl::OkStatus();  // nothing is ever evicted
  const float decay = static_cast<float>(ctx_.options->score_decay);
  last_resident_ = 0;
  if (plan_only_) {
    // The model's softmax: weight over all the head's weights, summed over the
    // query group (as the kernel's slot probabilities are).
    const float norm = weight_sum_ > 0 ? static_cast<float>(ctx_.options->shape.group() / weight_sum_) : 0.0f;
    for (const kernels::SlotRange& r : ranges_) {
      last_resident_ += r.count;
      for (int32_t s = r.begin; s < r.begin + r.count; ++s) {
        probs_host_[s] = slot_weight_[s] * norm;
        slot_score_[s] = decay * slot_score_[s] + probs_host_[s];
      }
    }
    return absl::OkStatus();
  }
  if (absl::Status st = ctx_.backend->Copy(probs_host_.data(), slot_probs_, probs_host_.size() * sizeof(float),
                                           CopyKind::kDeviceToHost);
      !st.ok()) {
    return st;
  }
  for (const kernels::SlotRange& r : ranges_) {
    last_resident_ += r.count;
    for (int32_t s = r.begin; s < r.begin + r.count; ++s) slot_score_[s] = decay * slot_score_[s] + probs_host_[s];
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

absl::Status HeadCache::Unstage(std::span<const int32_t> slots) {
  if (slots.empty()) return absl::OkStatus();
  std::vector<int32_t>& positions = unstage_pos_;
  positions.clear();
  for (int32_t slot : slots) positions.push_back(slot_pos_[slot]);
  // Their exact K/V are in the slots: back into the sketch from there.
  SketchUpdateFromSlots(+1.0f, positions, slots);
  if (absl::Status st = VagueAppend(positions); !st.ok()) return st;
  for (int32_t slot : slots) {
    const int32_t i = slot - StagingSlot(0);
    if (plan_only_) --staged_class_count_[class_of_[slot_pos_[slot]]];
    if (installed_at_[i] == attends_) ++recall_.wasted_prefetches;  // no attend used it
    stage_[i] = Stage::kFree;
    slot_pos_[slot] = -1;
    --n_installed_;
  }
  return absl::OkStatus();
}

absl::StatusOr<int> HeadCache::RequestRecall(std::span<const int64_t> positions) {
  // The caller's positions; a ranking's (Prefetch) are this head's vague tokens.
  const int64_t len = length();
  for (int64_t p : positions) {
    if (p < 0 || p >= len) {
      return absl::InvalidArgumentError(
          absl::StrFormat("recall of position %d, outside [0, %d) of layer %d", p, len, layer_));
    }
  }
  return Request(positions, nullptr);
}

absl::StatusOr<int> HeadCache::Prefetch(const RankWork& ranked) {
  return Request(ranked.out, &ranked);
}

absl::StatusOr<int> HeadCache::Request(std::span<const int64_t> positions, const RankWork* ranked) {
  if (staging_ == 0) {
    return absl::FailedPreconditionError("the budget plan has no staging slots (staging_tokens = 0)");
  }
  if (positions.empty()) return 0;
  const bool make_room = ranked == nullptr;
  const bool compare = !make_room && ranked->score_staged;  // RecallReplace::kOutranked
  if (compare && (ranked->out_scores.size() != positions.size() ||
                  ranked->staged_scores.size() != static_cast<size_t>(staging_))) {
    return absl::InternalError(absl::StrFormat(
        "prefetch of %d ranked tokens with %d scores and %d staged scores (staging %d): not a score_staged ranking",
        positions.size(), ranked->out_scores.size(), ranked->staged_scores.size(), staging_));
  }
  // Staging slots: free ones first, then installed tokens (all of them with
  // make_room, else those the last attend did not use). The installed
  // tokens' (accumulated score, position) keys, for taking the lowest (a
  // key's position gives back its slot), are written run by run of
  // installed slots, with kNoKey where the token is no candidate: within a
  // run one pass without branches or data-dependent stores, which the
  // compiler vectorises (whether a token is used is in no order a branch
  // predictor could learn). The free slots are listed from the gaps between
  // runs. Scratch sized once.
  if (recall_keyed_.size() != static_cast<size_t>(staging_)) {
    recall_free_.assign(staging_, 0);
    recall_installed_.assign(staging_, 0);
    recall_keyed_.assign(staging_, 0);
  }
  int32_t* free_slots = recall_free_.data();
  uint64_t* keyed = recall_keyed_.data();
  // slot_probs sum over the query group: a uniform share is group / resident.
  const float uniform =
      last_resident_ > 0 ? ctx_.options->shape.group() / static_cast<float>(last_resident_) : 0.0f;
  const int32_t first = StagingSlot(0);
  const Stage* stage = stage_.data();
  const int64_t* installed_at = installed_at_.data();
  const float* probs = probs_host_.data() + first;
  const float* score = slot_score_.data() + first;
  const int32_t* slot_pos = slot_pos_.data() + first;
  const int64_t now = attends_;
  size_t n_free = 0, n_installed = 0, n_keys = 0;
  for (int32_t gap = 0; gap < staging_;) {
    const int32_t begin = NextStaging(gap, true), end = NextStaging(begin + 1, false);
    for (int32_t i = gap; i < begin; ++i) {
      if (stage[i] == Stage::kFree) free_slots[n_free++] = first + i;
    }
    if (begin == staging_) break;
    uint64_t* out = keyed + n_keys - begin;  // out[i]: slot i's key
    for (int32_t i = begin; i < end; ++i) {
      const bool used = (installed_at[i] == now) | (probs[i] >= uniform);  // | and &: no branches
      const bool candidate = make_room | !used;
      out[i] = ScoreKey(score[i], slot_pos[i]) | (uint64_t{!candidate} * kNoKey);  // kNoKey unless a candidate
      n_installed += candidate;
    }
    n_keys += static_cast<size_t>(end - begin);
    gap = end;
  }
  const size_t room = n_free + n_installed;
  std::vector<int32_t>& targets = recall_targets_;
  std::vector<float>& target_scores = recall_target_scores_;  // Prefetch: the proxy's score of each target
  targets.clear();
  target_scores.clear();
  // kOutranked: the lowest score among the installed tokens Prefetch may
  // displace; past the free slots, only targets above it can displace any.
  const float* staged = compare ? ranked->staged_scores.data() - first : nullptr;  // by slot
  // kOutranked: the candidates' slots and keys in slot order, and the lowest
  // proxy score among them.
  int32_t* installed = recall_installed_.data();
  float lowest = INFINITY;
  if (compare) {
    for (size_t k = 0, n = 0; k < n_keys; ++k) {
      if (keyed[k] == kNoKey) continue;
      const int32_t slot = static_cast<int32_t>(index_[keyed[k] & 0xffffffffu]);
      installed[n] = slot;
      keyed[n++] = keyed[k];
      lowest = std::min(lowest, staged[slot]);
    }
  }
  for (size_t r = 0; r < positions.size() && targets.size() < room; ++r) {
    const int64_t p = positions[r];
    if (compare && targets.size() >= n_free && !(ranked->out_scores[r] > lowest)) break;  // scores do not rise
    if (region_[p] == static_cast<uint8_t>(Region::kVague) && !in_flight_[p]) {
      in_flight_[p] = 1;  // also marks duplicates
      targets.push_back(static_cast<int32_t>(p));
      if (compare) target_scores.push_back(ranked->out_scores[r]);
    }
  }
  if (targets.size() > n_free && compare) {
    // kOutranked: the unused installed tokens by the proxy's score, lowest
    // first (then by accumulated score and position). The targets past the
    // free slots, best first (the ranking's order), each displace the next
    // one while they score strictly higher.
    std::vector<std::pair<std::pair<float, uint64_t>, int32_t>>& victims = recall_victims_;
    victims.resize(n_installed);
    for (size_t j = 0; j < n_installed; ++j) victims[j] = {{staged[installed[j]], keyed[j]}, installed[j]};
    // Lowest first, popped as long as targets beat them: O(installed + taken log installed).
    std::make_heap(victims.begin(), victims.end(), std::greater<>());
    auto end = victims.end();
    const size_t want = targets.size() - n_free;  // <= n_installed: targets fit the room
    size_t taken = 0;
    while (taken < want && target_scores[n_free + taken] > victims.front().first.first) {
      std::pop_heap(victims.begin(), end--, std::greater<>());
      free_slots[n_free + taken++] = end->second;
    }
    for (size_t i = n_free + taken; i < targets.size(); ++i) in_flight_[targets[i]] = 0;
    targets.resize(n_free + taken);
    if (absl::Status st = Unstage(std::span<const int32_t>(free_slots + n_free, taken)); !st.ok()) return st;
    n_free += taken;
  }
  if (targets.empty()) return 0;
  if (targets.size() > n_free) {  // installed tokens (Prefetch: unused ones) by lowest accumulated score
    const size_t need = targets.size() - n_free;
    // The `need` lowest keys (positions differ, so keys do too), in order:
    // kOutranked packed its candidates' keys first, the default left kNoKey
    // (above every key) where an installed token is no candidate.
    const size_t n_select = compare ? n_installed : n_keys;
    if (need < n_select) std::nth_element(keyed, keyed + need, keyed + n_select);
    // Their order is the order they re-enter the sketch; plan-only has no
    // sketch, and the order decides nothing there.
    if (!plan_only_) std::sort(keyed, keyed + need);
    // The slots taken join the free ones.
    for (size_t i = 0; i < need; ++i) free_slots[n_free + i] = static_cast<int32_t>(index_[keyed[i] & 0xffffffffu]);
    if (absl::Status st = Unstage(std::span<const int32_t>(free_slots + n_free, need)); !st.ok()) return st;
    n_free += need;
  }
  // One gather per block: its tokens' K and V rows into their slots. The
  // targets in ordinal order: one packed (ordinal, index) key each.
  std::vector<uint64_t>& order = recall_order_;
  order.resize(targets.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = uint64_t{ordinal_[targets[i]]} << 32 | i;
  SortByUpper32(order, recall_order_scratch_, next_ordinal_);
  auto ordinal_of = [&](size_t i) { return static_cast<uint32_t>(order[i] >> 32); };
  auto target_of = [&](size_t i) { return static_cast<size_t>(order[i] & 0xffffffffu); };
  const int64_t rb = ctx_.row_bytes, v_offset = VOffset();
  const size_t n = order.size();
  // Vectors of an installed recall's, reused: a step allocates none.
  Pending p;
  if (!spare_.empty()) {
    p = std::move(spare_.back());
    spare_.pop_back();
  }
  p.positions.resize(n);
  p.slots.resize(n);
  p.part_end.clear();
  // Parts kept across requests, rows and all: the store copies what it keeps.
  std::vector<GatherPart>& parts = recall_parts_;
  size_t n_parts = 0;
  const uint32_t bt = static_cast<uint32_t>(block_tokens());
  Stage* stage_of_slot = stage_.data() - StagingSlot(0);
  size_t i = 0;
  while (i < n) {
    // The block of the next target and the targets in it (one division per block).
    const uint32_t first_ord = ordinal_of(i) / bt * bt;
    size_t end = i + 1;
    while (end < n && ordinal_of(end) - first_ord < bt) ++end;
    if (n_parts == parts.size()) parts.emplace_back();
    GatherPart& part = parts[n_parts++];
    part.block = blocks_[first_ord / bt];
    part.rows.resize(2 * (end - i));  // a token's K and V rows
    part.heat = static_cast<float>(end - i);
    GatherRow* row = part.rows.data();
    for (; i < end; ++i, row += 2) {
      const int32_t slot = free_slots[target_of(i)];
      const int64_t offset = static_cast<int64_t>(ordinal_of(i) - first_ord) * rb;  // OrdinalOffset
      row[0] = GatherRow{offset, KSlot(slot), rb};
      row[1] = GatherRow{v_offset + offset, VSlot(slot), rb};
      stage_of_slot[slot] = Stage::kPending;
      p.positions[i] = targets[target_of(i)];
      p.slots[i] = slot;
    }
    p.part_end.push_back(static_cast<int32_t>(end));
  }
  p.needed_at = attends_;
  p.transfer = ctx_.store->Gather(std::span<const GatherPart>(parts.data(), n_parts));
  pending_.push_back(std::move(p));
  recall_.requested += static_cast<int64_t>(targets.size());
  return static_cast<int>(targets.size());
}

absl::Status HeadCache::Install(Pending& p) {
  for (int32_t pos : p.positions) in_flight_[pos] = 0;
  std::span<const int32_t> positions = p.positions, slots = p.slots;
  if (!p.transfer->status().ok()) {
    // Parts that failed: their tokens stay vague (the store counted and
    // logged the fault); the others are installed.
    install_pos_.clear();
    install_slots_.clear();
    int32_t begin = 0;
    for (size_t part = 0; part < p.part_end.size(); ++part) {
      const int32_t end = p.part_end[part];
      const bool ok = p.transfer->part_status(static_cast<int>(part)).ok();
      for (int32_t i = begin; i < end; ++i) {
        if (ok) {
          install_pos_.push_back(p.positions[i]);
          install_slots_.push_back(p.slots[i]);
        } else {
          stage_[p.slots[i] - StagingSlot(0)] = Stage::kFree;
          ++recall_.failed;
        }
      }
      begin = end;
    }
    positions = install_pos_;
    slots = install_slots_;
  }
  const int64_t n = static_cast<int64_t>(positions.size());
  SketchUpdateFromSlots(-1.0f, positions, slots);
  if (absl::Status st = VagueRemove(positions); !st.ok()) return st;
  for (size_t i = 0; i < positions.size(); ++i) {
    const int32_t pos = positions[i], slot = slots[i];
    region_[pos] = static_cast<uint8_t>(Region::kRecalled);
    index_[pos] = static_cast<uint32_t>(slot);
    slot_pos_[slot] = pos;
    slot_score_[slot] = 0.0f;
    if (plan_only_) {
      slot_weight_[slot] = weight_[pos];
      ++staged_class_count_[class_of_[pos]];
    }
    stage_[slot - StagingSlot(0)] = Stage::kInstalled;
    installed_at_[slot - StagingSlot(0)] = attends_;
    ++n_installed_;
  }
  if (p.fallback_counted) {
    recall_.late_arrivals += n;
  } else {
    recall_.exact_hits += n;
  }
  return absl::OkStatus();
}

absl::Status HeadCache::PollRecalls(absl::Duration wait) {
  if (pending_.empty()) return absl::OkStatus();
  if (wait > absl::ZeroDuration()) {
    const absl::Time deadline = absl::Now() + wait;
    bool waited = false;
    for (Pending& p : pending_) {
      if (p.transfer->Done()) continue;
      waited = true;
      if (!p.transfer->WaitFor(std::max(deadline - absl::Now(), absl::ZeroDuration()))) break;
    }
    if (waited) ++recall_.waits;
  }
  absl::Status result;
  size_t kept = 0;
  for (size_t i = 0; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    if (p.transfer->Done()) {
      result.Update(Install(p));
      // Its vectors for a later request; the rest is reset.
      p.transfer.reset();
      p.fallback_counted = false;
      spare_.push_back(std::move(p));
      continue;
    }
    if (!p.fallback_counted && attends_ >= p.needed_at) {
      recall_.sketch_fallbacks += static_cast<int64_t>(p.positions.size());
      p.fallback_counted = true;
    }
    if (kept != i) pending_[kept] = std::move(p);
    ++kept;
  }
  pending_.resize(kept);
  return result;
}

absl::StatusOr<int> HeadCache::Recall(std::span<const int64_t> positions) {
  const size_t before = pending_.size();
  absl::StatusOr<int> n = RequestRecall(positions);
  if (!n.ok()) return n;
  // Everything in flight lands now, earlier requests included.
  absl::Status failed;
  int installed = 0;
  for (size_t i = 0; i < pending_.size(); ++i) {
    const Pending& p = pending_[i];
    p.transfer->Wait();
    if (i < before) continue;
    int32_t begin = 0;
    for (size_t part = 0; part < p.part_end.size(); ++part) {
      const absl::Status st = p.transfer->part_status(static_cast<int>(part));
      if (st.ok()) {
        installed += p.part_end[part] - begin;
      } else {
        failed.Update(st);
      }
      begin = p.part_end[part];
    }
  }
  if (absl::Status st = PollRecalls(absl::ZeroDuration()); !st.ok()) return st;
  if (!failed.ok()) return failed;
  return installed;
}

absl::Status HeadCache::RankPrepare(RecallProxy proxy, const void* q_group, int count, bool score_staged,
                                    RankWork& w) const {
  w.proxy = proxy;
  w.count = count;
  w.score_staged = score_staged;
  w.out.clear();
  w.out_scores.clear();
  w.ids.clear();
  w.classes.clear();
  w.staged_from = 0;
  w.sketch_call = w.bound_call = false;
  w.done = true;
  if (score_staged && !plan_only_) w.staged_scores.assign(staging_, -INFINITY);
  if (proxy == RecallProxy::kNone || count <= 0) return absl::OkStatus();
  if (proxy == RecallProxy::kSketch && !HasSketch()) {
    return absl::FailedPreconditionError("ranking vague tokens by sketch score needs a sketch (sketch_kind none)");
  }
  if (proxy == RecallProxy::kBlockBounds && bounds_dev_ == nullptr) {
    return absl::FailedPreconditionError("ranking by key bounds needs recall_proxy block-bounds in the options");
  }
  if (plan_only_) {
    // Weight classes are disjoint weight intervals, the heaviest first: the
    // classes in index order, each one's members the most recent first. A
    // token's score is minus its class. With score_staged, the ranking ends
    // where no token could be prefetched: past as many tokens as there are
    // free staging slots, at a score no higher than any installed token's.
    const int32_t free_slots = staging_ - n_installed_;
    float lowest = -INFINITY;  // the installed tokens' lowest score
    if (score_staged) {
      lowest = INFINITY;
      for (uint32_t c = kWeightClasses; c-- > 0;) {
        if (staged_class_count_[c] > 0) {
          lowest = -static_cast<float>(c);
          break;
        }
      }
    }
    for (uint32_t c = 0; c < class_count_.size(); ++c) {
      if (class_count_[c] == 0) continue;
      const float score = -static_cast<float>(c);
      if (!(score > lowest) && static_cast<int>(w.out.size()) >= free_slots) break;
      class_order_[c].ForEachDescending([&](uint32_t pos) {
        if (!in_flight_[pos]) {
          w.out.push_back(pos);
          w.out_scores.push_back(score);
        }
        const int taken = static_cast<int>(w.out.size());
        return taken < count && (score > lowest || taken < free_slots);
      });
      if (static_cast<int>(w.out.size()) == count) break;
    }
    if (score_staged && !w.out.empty()) {  // what Prefetch compares; nothing to compare without targets
      w.staged_scores.assign(staging_, -INFINITY);
      for (int32_t i = 0; i < staging_; ++i) {
        const int32_t pos = slot_pos_[StagingSlot(i)];
        if (pos >= 0) w.staged_scores[i] = -static_cast<float>(class_of_[pos]);
      }
    }
    return absl::OkStatus();
  }
  const ModelShape& sh = ctx_.options->shape;
  // The sketch scores (the estimated logit) of w.ids: one member per class,
  // or, without classes, every vague token not in flight; then, for
  // score_staged with the sketch proxy, the installed tokens.
  if (by_class_) {
    for (uint32_t c = 0; c < class_members_.size(); ++c) {
      if (class_members_[c].empty()) continue;
      w.ids.push_back(class_members_[c][0]);
      w.classes.push_back(c);
    }
  } else if (HasSketch()) {
    for (uint32_t pos : vague_) {
      if (!in_flight_[pos]) w.ids.push_back(pos);
    }
    if (w.ids.empty()) return absl::OkStatus();
  } else if (vague_.empty()) {  // key bounds alone: RankFinish reads the groups, not ids
    return absl::OkStatus();
  }
  w.staged_from = w.ids.size();
  if (score_staged && proxy == RecallProxy::kSketch) {
    for (int32_t i = 0; i < staging_; ++i) {
      if (stage_[i] == Stage::kInstalled) w.ids.push_back(static_cast<uint32_t>(slot_pos_[StagingSlot(i)]));
    }
  }
  w.done = false;
  const int64_t n = static_cast<int64_t>(w.ids.size());
  w.sketch_call = HasSketch() && n > 0;
  if (w.sketch_call) {
    w.buckets.clear();
    if (sketch_.kind == SketchKind::kCentroid) {
      w.buckets.resize(n * sketch_.rows);
      for (int64_t i = 0; i < n; ++i) {
        std::copy_n(buckets_.begin() + static_cast<int64_t>(ordinal_[w.ids[i]]) * sketch_.rows, sketch_.rows,
                    w.buckets.begin() + i * sketch_.rows);
      }
    }
    w.scores.resize(n);
    kernels::SketchScoreParams& p = w.sketch;
    p = kernels::SketchScoreParams{};
    p.sketch = sketch_;
    p.policy = ctx_.options->vague_policy;
    p.group = sh.group();
    p.dtype = sh.dtype;
    p.scale = 1.0f;  // ranking is invariant to the logit scale
    p.q = q_group;
    p.n = static_cast<int32_t>(n);
    p.ids = w.ids.data();
    p.buckets = w.buckets.empty() ? nullptr : w.buckets.data();
    p.scores = w.scores.data();
  }
  // Key bounds: a score for every group written so far.
  w.bound_call = proxy == RecallProxy::kBlockBounds;
  if (w.bound_call) {
    const int64_t S = ctx_.plan->summary_tokens;
    const int64_t groups = (static_cast<int64_t>(next_ordinal_) + S - 1) / S;
    w.group_scores.resize(groups);
    kernels::BoundScoreParams& bp = w.bounds;
    bp = kernels::BoundScoreParams{};
    bp.head_dim = sh.head_dim;
    bp.group = sh.group();
    bp.dtype = sh.dtype;
    bp.scale = 1.0f;
    bp.q = q_group;
    bp.bounds = bounds_dev_;
    bp.n = static_cast<int32_t>(groups);
    bp.scores = w.group_scores.data();
  }
  return absl::OkStatus();
}

void HeadCache::RankFinish(RankWork& w) const {
  if (w.done) return;
  const int count = w.count;
  std::vector<int64_t>& out = w.out;
  std::vector<float>& out_scores = w.out_scores;
  const int64_t S = ctx_.plan->summary_tokens;
  if (w.score_staged) {  // installed tokens share no ids with the vague ones
    if (w.proxy == RecallProxy::kSketch) {
      for (size_t j = w.staged_from; j < w.ids.size(); ++j) {
        w.staged_scores[index_[w.ids[j]] - StagingSlot(0)] = w.scores[j];
      }
    } else {
      for (int32_t i = 0; i < staging_; ++i) {
        const int32_t pos = slot_pos_[StagingSlot(i)];
        if (stage_[i] == Stage::kInstalled) w.staged_scores[i] = w.group_scores[ordinal_[pos] / S];
      }
    }
  }
  // Per class: the representative's score stands for all its members.
  std::vector<float> class_score;
  if (by_class_) {
    class_score.assign(class_members_.size(), -INFINITY);
    for (size_t i = 0; i < w.classes.size(); ++i) class_score[w.classes[i]] = w.scores[i];
  }
  if (w.proxy == RecallProxy::kSketch && by_class_) {
    std::vector<uint32_t> classes;
    for (uint32_t c = 0; c < class_members_.size(); ++c) {
      if (!class_members_[c].empty()) classes.push_back(c);
    }
    std::sort(classes.begin(), classes.end(), [&](uint32_t a, uint32_t b) {
      return class_score[a] > class_score[b] || (class_score[a] == class_score[b] && a < b);
    });
    for (uint32_t c : classes) {
      // The most recent first within a class: order only as many members as
      // can still be taken, all of them when some of those are in flight.
      std::vector<uint32_t> members = class_members_[c];
      const size_t want = std::min(members.size(), static_cast<size_t>(count) - out.size());
      std::partial_sort(members.begin(), members.begin() + want, members.end(), std::greater<>());
      size_t taken = 0;
      for (size_t m = 0; m < want; ++m) taken += !in_flight_[members[m]];
      if (taken < want) std::sort(members.begin() + want, members.end(), std::greater<>());
      for (uint32_t pos : members) {
        if (static_cast<int>(out.size()) == count) return;
        if (!in_flight_[pos]) {
          out.push_back(pos);
          out_scores.push_back(class_score[c]);
        }
      }
    }
    return;
  }
  if (w.proxy == RecallProxy::kBlockBounds) {
    // Key bounds: the vague tokens of the best groups (a token's score is its
    // group's; ties: the later group first). Within a group (when the recall
    // budget ends inside one), the sketch's order, else the most recent
    // first. Groups come off a heap and their tokens from pos_of_ordinal_,
    // so a step costs the groups and the tokens it reaches, not every vague
    // token.
    const std::vector<float>& scores = w.group_scores;
    const bool token_scored = !by_class_ && HasSketch();  // the kernel scored every vague token
    if (token_scored) {
      rank_token_score_.resize(region_.size());
      for (size_t i = 0; i < w.staged_from; ++i) rank_token_score_[w.ids[i]] = w.scores[i];
    }
    std::vector<uint32_t>& heap = rank_groups_;
    heap.resize(scores.size());
    std::iota(heap.begin(), heap.end(), 0u);
    auto worse = [&](uint32_t a, uint32_t b) { return scores[a] < scores[b] || (scores[a] == scores[b] && a < b); };
    std::make_heap(heap.begin(), heap.end(), worse);
    std::vector<std::pair<float, uint32_t>>& members = rank_members_;
    for (auto end = heap.end(); end != heap.begin() && static_cast<int>(out.size()) < count;) {
      std::pop_heap(heap.begin(), end, worse);
      const uint32_t g = *--end;
      members.clear();
      const uint32_t last = static_cast<uint32_t>(std::min<int64_t>((g + 1) * S, next_ordinal_));
      for (uint32_t ord = static_cast<uint32_t>(g * S); ord < last; ++ord) {
        const uint32_t pos = pos_of_ordinal_[ord];
        if (region_[pos] != static_cast<uint8_t>(Region::kVague) || in_flight_[pos]) continue;
        members.emplace_back(by_class_ ? class_score[class_of_[pos]] : token_scored ? rank_token_score_[pos] : 0.0f,
                             pos);
      }
      std::sort(members.begin(), members.end(), std::greater<>());
      for (const auto& [score, pos] : members) {
        if (static_cast<int>(out.size()) == count) return;
        out.push_back(pos);
        out_scores.push_back(scores[g]);
      }
    }
    return;
  }
  // The sketch's score of every vague token not in flight: w.ids[0, staged_from).
  const std::span<const uint32_t> ids(w.ids.data(), w.staged_from);
  const std::vector<float>& scores = w.scores;
  std::vector<int64_t> order(ids.size());
  std::iota(order.begin(), order.end(), 0);
  const int64_t k = std::min<int64_t>(count, static_cast<int64_t>(ids.size()));
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && ids[a] > ids[b]);
  });
  for (int64_t i = 0; i < k; ++i) {
    out.push_back(ids[order[i]]);
    out_scores.push_back(scores[order[i]]);
  }
}

absl::StatusOr<std::vector<int64_t>> HeadCache::Rank(RecallProxy proxy, const void* q_group, int count) const {
  RankWork w;
  if (absl::Status st = RankPrepare(proxy, q_group, count, /*score_staged=*/false, w); !st.ok()) return st;
  kernels::KernelSet& kernels = ctx_.backend->kernels();
  if (w.sketch_call) kernels.SketchScores({&w.sketch, 1});
  if (w.bound_call) kernels.BoundScores({&w.bounds, 1});
  if (absl::Status st = kernels.error(); !st.ok()) return st;
  RankFinish(w);
  return std::move(w.out);
}

// ---------------------------------------------------------------- Introspection

absl::Status HeadCache::ReadToken(int64_t pos, void* k, void* v) const {
  if (plan_only_) return absl::FailedPreconditionError("a plan-only runtime holds no K/V");
  const int64_t rb = ctx_.row_bytes;
  if (region(pos) == Region::kVague) {
    const uint32_t ord = ordinal_[pos];
    if (absl::Status st = ctx_.store->Read(OrdinalBlock(ord), OrdinalOffset(ord), k, rb); !st.ok()) return st;
    return ctx_.store->Read(OrdinalBlock(ord), VOffset() + OrdinalOffset(ord), v, rb);
  }
  const int32_t slot = static_cast<int32_t>(index_[pos]);
  if (absl::Status st = ctx_.backend->Copy(k, KSlot(slot), rb, CopyKind::kDeviceToHost); !st.ok()) return st;
  return ctx_.backend->Copy(v, VSlot(slot), rb, CopyKind::kDeviceToHost);
}

absl::Status HeadCache::EstimateToken(int64_t pos, float* k, float* v) const {
  if (!HasSketch()) return absl::FailedPreconditionError("no sketch (sketch_kind none)");
  if (plan_only_) return absl::FailedPreconditionError("a plan-only runtime holds no sketch contents");
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
  return ctx_.backend->kernels().error();
}

absl::Status HeadCache::CheckInvariants() const {
  auto fail = [&](const std::string& what) {
    return absl::InternalError(absl::StrFormat("layer %d, KV head %d: %s", layer_, kv_head_, what));
  };
  const int64_t len = length();
  if (static_cast<int64_t>(index_.size()) != len || static_cast<int64_t>(ordinal_.size()) != len)
    return fail("per-token arrays differ in length");
  if (pos_of_ordinal_.size() != next_ordinal_)
    return fail(absl::StrFormat("%d ordinals given, %d mapped to positions", next_ordinal_, pos_of_ordinal_.size()));
  RegionCounts seen;
  std::vector<int64_t> seen_class(class_count_.size(), 0);  // plan-only: vague tokens per weight class
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
        if (static_cast<int32_t>(idx) < StagingSlot(0) || static_cast<int32_t>(idx) >= StagingSlot(staging_) ||
            stage_[idx - StagingSlot(0)] != Stage::kInstalled)
          return fail(absl::StrFormat("recalled token %d in slot %d, which is not an installed staging slot", p, idx));
        if (in_flight_[p]) return fail(absl::StrFormat("recalled token %d is also in flight", p));
        if (ordinal_[p] == kNoOrdinal) return fail(absl::StrFormat("recalled token %d has no host copy", p));
        break;
      case Region::kVague:
        ++seen.vague;
        if (plan_only_) {
          if (!class_order_[class_of_[p]].Contains(static_cast<uint32_t>(p)))
            return fail(absl::StrFormat("vague token %d not in the set of its weight class %d", p, class_of_[p]));
          ++seen_class[class_of_[p]];
        } else if (idx >= vague_.size() || vague_[idx] != p) {
          return fail(absl::StrFormat("vague token %d not at index %d of the vague list", p, idx));
        }
        if (ordinal_[p] == kNoOrdinal || ordinal_[p] >= next_ordinal_)
          return fail(absl::StrFormat("vague token %d has no host copy", p));
        break;
      default:
        return fail(absl::StrFormat("token %d has region %d", p, int(region_[p])));
    }
    if (ordinal_[p] != kNoOrdinal && (ordinal_[p] >= pos_of_ordinal_.size() || pos_of_ordinal_[ordinal_[p]] != p))
      return fail(absl::StrFormat("token %d has ordinal %d, which maps to another position", p, ordinal_[p]));
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
  if (!plan_only_ && static_cast<int64_t>(vague_.size()) != n_vague_)
    return fail(absl::StrFormat("vague list of %d tokens, count %d", vague_.size(), n_vague_));
  for (size_t c = 0; c < class_count_.size(); ++c) {  // plan-only: the class sets hold the vague tokens, no others
    if (seen_class[c] != class_count_[c] || class_order_[c].Count() != class_count_[c])
      return fail(absl::StrFormat("weight class %d: %d vague tokens, count %d, set of %d", c, seen_class[c],
                                  class_count_[c], class_order_[c].Count()));
  }
  if (n_candidates_ > candidates_ || n_installed_ > staging_) return fail("candidate or staging count over capacity");
  int64_t installed = 0, pending_slots = 0, in_flight = 0;
  for (int32_t i = 0; i < staging_; ++i) {
    installed += stage_[i] == Stage::kInstalled;
    pending_slots += stage_[i] == Stage::kPending;
    if (stage_[i] != Stage::kInstalled && slot_pos_[StagingSlot(i)] >= 0)
      return fail(absl::StrFormat("staging slot %d is not installed but holds token %d", i, slot_pos_[StagingSlot(i)]));
  }
  for (uint8_t f : in_flight_) in_flight += f;
  if (installed != n_installed_) return fail(absl::StrFormat("%d installed slots, count %d", installed, n_installed_));
  if (pending_slots != pending_tokens() || in_flight != pending_tokens())
    return fail(absl::StrFormat("%d pending slots and %d tokens in flight for %d pending recalls", pending_slots,
                                in_flight, pending_tokens()));
  for (const Pending& pr : pending_) {
    for (int32_t pos : pr.positions) {
      if (region(pos) != Region::kVague || !in_flight_[pos])
        return fail(absl::StrFormat("token %d is pending but %s", pos, RegionName(region(pos))));
    }
  }
  int64_t occupied = 0;
  for (int32_t pos : slot_pos_) occupied += pos >= 0;
  if (occupied != want.resident()) return fail(absl::StrFormat("%d slots occupied for %d resident tokens", occupied, want.resident()));
  const int64_t b = ctx_.plan->block_tokens;
  if (static_cast<int64_t>(blocks_.size()) != (next_ordinal_ + b - 1) / b)
    return fail(absl::StrFormat("%d blocks for %d ordinals", blocks_.size(), next_ordinal_));
  if (HasSketch() && !plan_only_) {
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
