// kvtier/kernels/convert.h — bit-exact conversions between fp32 and the 16-bit
// storage types (IEEE binary16, bfloat16), shared by host and device code.
//
// Narrowing rounds to nearest, ties to even; NaN stays NaN, overflow becomes
// infinity. Stateless, thread-safe.
#ifndef KVTIER_KERNELS_CONVERT_H_
#define KVTIER_KERNELS_CONVERT_H_

#include <cstdint>
#include <cstring>

#include "kvtier/dtype.h"
#include "kvtier/kernels/hd.h"

namespace kvtier::kernels {

KVTIER_HD uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

KVTIER_HD float BitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

KVTIER_HD float Bf16ToFloat(uint16_t b) { return BitsFloat(uint32_t{b} << 16); }

KVTIER_HD uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

KVTIER_HD float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return BitsFloat(sign);  // +-0
  // Subnormal: value = mant * 2^-24.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

KVTIER_HD uint16_t FloatToHalf(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {  // normal half (|f| >= 2^-14)
    uint32_t r = a - 0x38000000u;           // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);         // round to nearest even at bit 13
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (a < 0x33000000u) return sign;  // below half of the smallest subnormal: +-0
  // Subnormal half: shift the full mantissa right, rounding to nearest even.
  const uint32_t e = a >> 23;                 // 102..112
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;            // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

// n values of `src` (in dtype t) as fp32: the scalar reference of every
// vectorised load.
KVTIER_HD void RowToFloat(const void* src, DType t, int n, float* dst) {
  for (int i = 0; i < n; ++i) {
    switch (t) {
      case DType::kF32: dst[i] = static_cast<const float*>(src)[i]; break;
      case DType::kF16: dst[i] = HalfToFloat(static_cast<const uint16_t*>(src)[i]); break;
      case DType::kBF16: dst[i] = Bf16ToFloat(static_cast<const uint16_t*>(src)[i]); break;
    }
  }
}

// n fp32 values stored as dtype t, rounding to nearest even.
KVTIER_HD void FloatToRow(const float* src, DType t, int n, void* dst) {
  for (int i = 0; i < n; ++i) {
    switch (t) {
      case DType::kF32: static_cast<float*>(dst)[i] = src[i]; break;
      case DType::kF16: static_cast<uint16_t*>(dst)[i] = FloatToHalf(src[i]); break;
      case DType::kBF16: static_cast<uint16_t*>(dst)[i] = FloatToBf16(src[i]); break;
    }
  }
}

}  // namespace kvtier::kernels

#endif  // KVTIER_KERNELS_CONVERT_H_
