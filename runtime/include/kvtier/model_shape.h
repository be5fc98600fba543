// kvtier/model_shape.h — the attention shape of the model whose KV cache kvtier
// holds: layers, query heads, KV heads (GQA), head size and tensor dtype.
//
// A plain value type; thread-safe to copy and read.
#ifndef KVTIER_MODEL_SHAPE_H_
#define KVTIER_MODEL_SHAPE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kvtier/dtype.h"

namespace kvtier {

struct ModelShape {
  int layers = 0;     // >= 1
  int q_heads = 0;    // >= 1, a multiple of kv_heads
  int kv_heads = 0;   // >= 1
  int head_dim = 0;   // a multiple of 8 in [8, 256]; 64 and 128 are the common cases
  DType dtype = DType::kF16;  // dtype of every K/V/Q/output tensor the caller passes

  // Query heads that share one KV head (1 = multi-head attention).
  int group() const { return q_heads / kv_heads; }

  // Bytes of K and V of one token in one layer and KV head, in `dtype`.
  int64_t HeadTokenBytes() const;

  // Bytes of the full (uncompressed) cache of one token: all layers, all KV heads.
  int64_t TokenBytes() const { return HeadTokenBytes() * layers * kv_heads; }

  // InvalidArgument naming the offending field and value.
  absl::Status Validate() const;

  // "30L 9q/3kv d64 f16"
  std::string ToString() const;

  // SmolLM2-135M: 30 layers, 9 query / 3 KV heads, head_dim 64.
  static ModelShape SmolLM2_135M(DType dtype = DType::kF16);
};

}  // namespace kvtier

#endif  // KVTIER_MODEL_SHAPE_H_
