// The fused decode attention of the CUDA kernel set: plan and launch.
// Internal to kernels/cuda.
//
// One item (a sequence's KV head) is split three ways so a batch fills the
// GPU: its resident tokens in chunks of kAttendChunk, its query group in tiles
// of kGroupTile heads, and one extra split for the sketch's pseudo-tokens.
// Each (chunk, tile) block writes a partial softmax (max, sum, unnormalised
// output) and the logits of its tokens; a combine kernel merges the partials
// of an item into one softmax over resident and vague tokens, as the CPU
// kernel computes it, and derives the heavy-hitter slot probabilities from
// the stored logits.
#ifndef KVTIER_KERNELS_CUDA_ATTEND_H_
#define KVTIER_KERNELS_CUDA_ATTEND_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvtier/kernels/params.h"

namespace kvtier::kernels::cuda {

inline constexpr int kAttendChunk = 256;
inline constexpr int kGroupTile = 8;
inline constexpr int kMaxHeadDim = 256;
inline constexpr int kMaxGroup = 64;

// An item as the kernels see it: its parameters with `ranges` and
// `vague_ids` pointing at device copies, and where its scratch lies.
struct AttendItemDev {
  AttendParams p;
  int64_t n_res = 0;       // resident tokens
  int32_t splits = 0;      // chunks of resident tokens; split `splits` is the sketch's
  int32_t tiles = 0;       // group tiles
  int32_t variant = 0;     // AttendVariant(dtype, head_dim)
  int64_t part_base = 0;   // floats: first partial of the item in `parts`
  int64_t logit_base = 0;  // floats: the item's [group][n_res] logits
  int64_t sketch_base = 0; // floats: the item's [tiles][2][kGroupTile][buckets] scratch
};

// Floats of one partial: max and sum per head of a tile, then the outputs.
__host__ __device__ inline int64_t PartFloats(int head_dim) {
  return static_cast<int64_t>(kGroupTile) * (2 + head_dim);
}
// Floats of the sketch scratch of an item (Count-Sketch with rows >= 2 only).
inline int64_t SketchScratchFloats(const AttendParams& p, int tiles) {
  if (p.sketch.kind != SketchKind::kCountSketch || p.sketch.rows < 2) return 0;
  return static_cast<int64_t>(tiles) * 2 * kGroupTile * p.sketch.rows * p.sketch.width;
}
// The kernel instance of a storage type and head size: 3 dtypes x {64, 128, 256}.
inline int AttendVariant(DType dtype, int head_dim) {
  const int e = head_dim <= 64 ? 0 : head_dim <= 128 ? 1 : 2;
  return static_cast<int>(dtype) * 3 + e;
}
inline constexpr int kAttendVariants = 9;

// Launches the partial kernels of every variant in `present` (bit v set when
// some item has variant v) and the combine kernel on `stream`.
cudaError_t LaunchAttend(const AttendItemDev* items, int n_items, int max_splits, int max_tiles, int max_group,
                         uint32_t present, float* logits, float* parts, float* sketch_scratch, cudaStream_t stream);

}  // namespace kvtier::kernels::cuda

#endif  // KVTIER_KERNELS_CUDA_ATTEND_H_
