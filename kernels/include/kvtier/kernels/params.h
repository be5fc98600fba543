// kvtier/kernels/params.h — the plain parameter structs of every kernel.
//
// One struct per operation, shared by all backends (CPU now, CUDA later).
// Pointers are tagged [device] (the backend's device memory: host memory on
// the CPU backend) or [host] (small plan arrays the CPU decided; a backend
// whose device cannot read host memory uploads them itself). Kernels never
// allocate and never own what they point to. All math is fp32.
#ifndef KVTIER_KERNELS_PARAMS_H_
#define KVTIER_KERNELS_PARAMS_H_

#include <cstdint>

#include "kvtier/dtype.h"
#include "kvtier/options.h"

namespace kvtier::kernels {

// The sketch of one (sequence, layer, KV head), in device memory.
//
// Layout, all fp32, row-major:
//   key_sums   [rows][width][head_dim]  Count-Sketch: sum of sign*key per bucket;
//                                       centroid: sum of keys per bucket
//   value_sums [rows][width][head_dim]  the same for values
//   counts     [rows][width][2]         Count-Sketch: tokens hashed with sign +1
//                                       and with sign -1; centroid: [0] tokens in
//                                       the bucket, [1] always 0
//   totals     [2*head_dim + 2]         sum of keys, sum of values, token count, 0
//   planes     [rows][bits][head_dim]   centroid only: SimHash planes, width = 2^bits
//
// Keys and values are stored raw; Count-Sketch centres at query time with the
// current mean (bucket - mean * (count+ - count-)), which is exact however the
// mean moved since insertion. The centroid sketch hashes the key centred on
// the mean at insertion time.
struct SketchState {
  SketchKind kind = SketchKind::kNone;
  int32_t rows = 0;
  int32_t width = 0;
  int32_t head_dim = 0;
  uint32_t seed = 0;  // HeadSeed of this (layer, KV head)
  float* key_sums = nullptr;
  float* value_sums = nullptr;
  float* counts = nullptr;
  float* totals = nullptr;
  const float* planes = nullptr;
};

// Floats of a SketchState's arrays (planes excluded, they are shared).
inline int64_t SketchStateFloats(int rows, int width, int head_dim) {
  return 2LL * rows * width * head_dim + 2LL * rows * width + 2LL * head_dim + 2;
}

// Inserts (sign = +1) or removes (sign = -1) n tokens. Removing a token that
// was inserted restores the sketch up to fp32 rounding.
struct SketchUpdateParams {
  SketchState sketch;
  float sign = 1.0f;
  int32_t n = 0;
  const uint32_t* ids = nullptr;      // [host] [n] token positions (Count-Sketch hashing)
  // Token i's key is at keys + rows_index[i] * stride elements (i when
  // rows_index is null); likewise values. [device], in `dtype`.
  const void* keys = nullptr;
  const void* values = nullptr;
  int64_t stride = 0;
  const int32_t* rows_index = nullptr;  // [host] optional [n]
  DType dtype = DType::kF32;
  // Centroid only, [host] [n][rows]: the buckets, written on insert (hashed on
  // the mean that includes this batch), read on remove.
  uint32_t* buckets = nullptr;
};

// A run of resident slots.
struct SlotRange {
  int32_t begin = 0;
  int32_t count = 0;
};

// One decode step of attention for one (sequence, KV head): the `group` query
// heads that share this KV head attend to the resident slots exactly and, by
// `policy`, to the non-resident vague tokens through the sketch, in one
// softmax.
struct AttendParams {
  int32_t head_dim = 0;
  int32_t group = 1;
  DType dtype = DType::kF32;      // of q, k_slots, v_slots
  DType out_dtype = DType::kF32;  // of out
  float scale = 1.0f;             // logit = scale * q . k
  const void* q = nullptr;        // [device] [group][head_dim]
  void* out = nullptr;            // [device] [group][head_dim]
  const void* k_slots = nullptr;  // [device] [capacity][head_dim]
  const void* v_slots = nullptr;  // [device] [capacity][head_dim]
  const SlotRange* ranges = nullptr;  // [host] [num_ranges] the resident slots
  int32_t num_ranges = 0;
  // [device] [capacity]: for each slot in `ranges`, the sum over the group of
  // its softmax probability (the heavy-hitter score). May be null.
  float* slot_probs = nullptr;
  SketchState sketch;             // kind kNone: no vague tokens
  VaguePolicy policy = VaguePolicy::kDrop;
  // [device] [num_vague] sketched token positions; Count-Sketch with rows >= 2
  // only (one row attends per bucket and sign and needs no list).
  const uint32_t* vague_ids = nullptr;
  int32_t num_vague = 0;
};

// Per-token reconstruction of sketched tokens (the reference the fast paths
// are tested against).
struct SketchEstimateParams {
  SketchState sketch;
  VaguePolicy policy = VaguePolicy::kEstimate;  // kShrink applies alpha
  int32_t n = 0;
  const uint32_t* ids = nullptr;      // [host] [n]
  const uint32_t* buckets = nullptr;  // [host] [n][rows], centroid only
  float* keys = nullptr;              // [host] [n][head_dim] out
  float* values = nullptr;            // [host] [n][head_dim] out
};

// Recall-ranking score of sketched tokens: the largest estimated logit over
// the query group, scale * max_g q_g . k_hat.
struct SketchScoreParams {
  SketchState sketch;
  VaguePolicy policy = VaguePolicy::kEstimate;
  int32_t group = 1;
  DType dtype = DType::kF32;
  float scale = 1.0f;
  const void* q = nullptr;            // [device] [group][head_dim]
  int32_t n = 0;
  const uint32_t* ids = nullptr;      // [host] [n]
  const uint32_t* buckets = nullptr;  // [host] [n][rows], centroid only
  float* scores = nullptr;            // [host] [n] out
};

// Quest-style upper bounds of attention logits per group of tokens: for each
// group g with key bounds lo <= k <= hi (per coordinate), the largest logit
// any key of the group can reach for any query head of the KV head:
// scores[g] = scale * max_q sum_i max(q_i lo_i, q_i hi_i).
struct BoundScoreParams {
  int32_t head_dim = 0;
  int32_t group = 1;                // query heads of the KV head
  DType dtype = DType::kF32;        // of q and bounds
  float scale = 1.0f;
  const void* q = nullptr;          // [device] [group][head_dim]
  const void* bounds = nullptr;     // [device] [n][2][head_dim]: min, then max
  int32_t n = 0;
  float* scores = nullptr;          // [host] [n] out
};

// Copies n rows of row_bytes: dst + dst_rows[i] * dst_stride <- src +
// src_rows[i] * src_stride (strides in bytes). Both [device].
struct RowCopyParams {
  void* dst = nullptr;
  const void* src = nullptr;
  int64_t row_bytes = 0;
  int64_t dst_stride = 0;
  int64_t src_stride = 0;
  int32_t n = 0;
  const int32_t* dst_rows = nullptr;  // [host] [n]
  const int32_t* src_rows = nullptr;  // [host] [n]
};

}  // namespace kvtier::kernels

#endif  // KVTIER_KERNELS_PARAMS_H_
