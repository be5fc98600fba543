// Byte layout of one (sequence, layer, KV head) chunk of device memory.
// Internal to the runtime; the budget planner sizes chunks with it.
#ifndef KVTIER_RUNTIME_SRC_HEAD_LAYOUT_H_
#define KVTIER_RUNTIME_SRC_HEAD_LAYOUT_H_

#include <cstdint>

#include "kvtier/budget.h"
#include "kvtier/options.h"

namespace kvtier {

inline constexpr int64_t kDeviceAlign = 64;

inline int64_t AlignUp(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// Offsets in bytes from the start of the chunk; every array 64-byte aligned.
struct HeadLayout {
  int64_t k_slots = 0;     // [slots][head_dim], model dtype
  int64_t v_slots = 0;     // [slots][head_dim], model dtype
  int64_t slot_probs = -1; // [slots] fp32; compressed plans only (nothing is evicted otherwise)
  int64_t vague_ids = -1;  // [max_context] uint32; Count-Sketch with rows >= 2 only
  int64_t sketch = -1;     // kernels::SketchState arrays (fp32); -1 without a sketch
  int64_t summary = -1;    // [summary_groups][2][head_dim] model dtype key bounds; -1 without
  int64_t bytes = 0;       // size of the chunk (a multiple of 64)
};

HeadLayout ComputeHeadLayout(const ModelShape& shape, int64_t max_context, const BudgetPlan& plan);

// Device bytes of `groups` key-bounds summaries (min and max rows of head_dim).
int64_t SummaryBytes(const ModelShape& shape, int64_t groups);

}  // namespace kvtier

#endif  // KVTIER_RUNTIME_SRC_HEAD_LAYOUT_H_
