// Host tensors in one of kvtier's dtypes, converted from and to fp32, for the
// tools and tests. Not thread-safe per object.
#ifndef KVTIER_TOOLS_WORKLOAD_TENSOR_H_
#define KVTIER_TOOLS_WORKLOAD_TENSOR_H_

#include <cstdint>
#include <cstring>
#include <vector>

#include "kvtier/dtype.h"
#include "kvtier/kernels/convert.h"

namespace kvtier::workload {

// n values of `dtype` holding `src` rounded to nearest even.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, int64_t n) : dtype_(dtype), bytes_(n * DTypeSize(dtype)), n_(n) {}

  DType dtype() const { return dtype_; }
  int64_t size() const { return n_; }
  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }

  void Assign(const float* src, int64_t n) {
    Resize(n);
    for (int64_t i = 0; i < n; ++i) Set(i, src[i]);
  }
  void Resize(int64_t n) {
    n_ = n;
    bytes_.resize(n * DTypeSize(dtype_));
  }
  void Set(int64_t i, float x) {
    switch (dtype_) {
      case DType::kF32: std::memcpy(&bytes_[i * 4], &x, 4); return;
      case DType::kF16: Put16(i, kernels::FloatToHalf(x)); return;
      case DType::kBF16: Put16(i, kernels::FloatToBf16(x)); return;
    }
  }
  float Get(int64_t i) const {
    uint16_t h;
    switch (dtype_) {
      case DType::kF32: {
        float x;
        std::memcpy(&x, &bytes_[i * 4], 4);
        return x;
      }
      case DType::kF16: std::memcpy(&h, &bytes_[i * 2], 2); return kernels::HalfToFloat(h);
      case DType::kBF16: std::memcpy(&h, &bytes_[i * 2], 2); return kernels::Bf16ToFloat(h);
    }
    return 0.0f;
  }
  std::vector<float> ToFloat() const {
    std::vector<float> out(n_);
    for (int64_t i = 0; i < n_; ++i) out[i] = Get(i);
    return out;
  }

 private:
  void Put16(int64_t i, uint16_t h) { std::memcpy(&bytes_[i * 2], &h, 2); }

  DType dtype_ = DType::kF32;
  std::vector<unsigned char> bytes_;
  int64_t n_ = 0;
};

// fp32 value of x after rounding to `dtype`.
inline float RoundTo(DType dtype, float x) {
  switch (dtype) {
    case DType::kF32: return x;
    case DType::kF16: return kernels::HalfToFloat(kernels::FloatToHalf(x));
    case DType::kBF16: return kernels::Bf16ToFloat(kernels::FloatToBf16(x));
  }
  return x;
}

}  // namespace kvtier::workload

#endif  // KVTIER_TOOLS_WORKLOAD_TENSOR_H_
