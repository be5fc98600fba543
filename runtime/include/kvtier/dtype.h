// kvtier/dtype.h — element types of the tensors a caller hands to kvtier.
//
// K, V, Q and attention outputs cross the API in one of three storage types;
// every kernel computes in fp32. Header-only, no state, thread-safe.
#ifndef KVTIER_DTYPE_H_
#define KVTIER_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kvtier {

enum class DType : uint8_t {
  kF32 = 0,   // IEEE binary32
  kF16 = 1,   // IEEE binary16
  kBF16 = 2,  // bfloat16 (the upper half of a binary32)
};

constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

constexpr std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

}  // namespace kvtier

#endif  // KVTIER_DTYPE_H_
