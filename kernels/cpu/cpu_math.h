// Inner loops of the CPU kernels: dtype loads and stores, dot, axpy, exp.
// Written so the compiler vectorises them (-O3, OpenMP SIMD pragmas, F16C for
// fp16 where the target has it). Internal to kernels/cpu.
#ifndef KVTIER_KERNELS_CPU_CPU_MATH_H_
#define KVTIER_KERNELS_CPU_CPU_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "kvtier/dtype.h"
#include "kvtier/kernels/convert.h"

namespace kvtier::kernels::cpu {

// Converts n elements of `src` (in dtype t) to fp32.
inline void LoadF32(const void* src, DType t, int n, float* __restrict dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, sizeof(float) * n);
      return;
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      int i = 0;
#if defined(__F16C__)
      // The compiler does not vectorise half conversions; F16C does 8 at once.
      for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
      }
#endif
      RowToFloat(s + i, t, n - i, dst + i);
      return;
    }
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
      for (int i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
      return;
    }
  }
}

// Stores n fp32 values as dtype t, rounding to nearest even.
inline void StoreF32(const float* src, DType t, int n, void* dst) {
  if (t == DType::kF32) {
    std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  FloatToRow(src, t, n, dst);
}

inline const void* RowPtr(const void* base, DType t, int64_t row, int64_t stride_elems) {
  return static_cast<const char*>(base) + row * stride_elems * static_cast<int64_t>(DTypeSize(t));
}

// 32 partial sums (four 8-lane vectors) so successive multiply-adds do not
// wait on each other.
inline float Dot(const float* __restrict a, const float* __restrict b, int n) {
  float acc[32] = {};
  int i = 0;
  for (; i + 32 <= n; i += 32) {
#pragma omp simd
    for (int j = 0; j < 32; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < 32; ++j) s += acc[j];
  return s;
}

// y += a * x
inline void Axpy(float a, const float* __restrict x, float* __restrict y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

// exp(x) with relative error below 3e-7 for x in [-87, 88]; 0 below -87.
// Cephes' single-precision polynomial, branch-free so loops over it vectorise.
inline float FastExp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

}  // namespace kvtier::kernels::cpu

#endif  // KVTIER_KERNELS_CPU_CPU_MATH_H_
