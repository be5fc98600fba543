#include "kvtier/model_shape.h"

#include "absl/strings/str_format.h"

namespace kvtier {

int64_t ModelShape::HeadTokenBytes() const { return 2LL * head_dim * static_cast<int64_t>(DTypeSize(dtype)); }

absl::Status ModelShape::Validate() const {
  if (layers < 1 || layers > 4096) {
    return absl::InvalidArgumentError(absl::StrFormat("shape.layers must be in [1, 4096], got %d", layers));
  }
  if (kv_heads < 1 || kv_heads > 1024) {
    return absl::InvalidArgumentError(absl::StrFormat("shape.kv_heads must be in [1, 1024], got %d", kv_heads));
  }
  if (q_heads < 1 || q_heads % kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "shape.q_heads must be a positive multiple of kv_heads (%d), got %d", kv_heads, q_heads));
  }
  if (head_dim < 8 || head_dim > 256 || head_dim % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("shape.head_dim must be a multiple of 8 in [8, 256], got %d", head_dim));
  }
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrFormat("shape.dtype %d is not f32, f16 or bf16", int(dtype)));
  }
  return absl::OkStatus();
}

std::string ModelShape::ToString() const {
  return absl::StrFormat("%dL %dq/%dkv d%d %s", layers, q_heads, kv_heads, head_dim, DTypeName(dtype));
}

ModelShape ModelShape::SmolLM2_135M(DType dtype) {
  return ModelShape{.layers = 30, .q_heads = 9, .kv_heads = 3, .head_dim = 64, .dtype = dtype};
}

}  // namespace kvtier
