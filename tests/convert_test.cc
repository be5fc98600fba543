// The host/device dtype conversions against the compiler's own fp16 type and
// exhaustive checks, and the CPU kernels' vectorised loads against them.
#include <cmath>
#include <cstring>
#include <random>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_math.h"
#include "kvtier/kernels/convert.h"

namespace kvtier::kernels {
namespace {

TEST(Convert, HalfToFloatMatchesCompilerOnEveryHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ours = HalfToFloat(static_cast<uint16_t>(h));
    _Float16 x;
    std::memcpy(&x, &h, 2);
    const float theirs = static_cast<float>(x);
    if (std::isnan(theirs)) {
      EXPECT_TRUE(std::isnan(ours)) << h;
    } else {
      EXPECT_EQ(FloatBits(ours), FloatBits(theirs)) << h;
    }
  }
}

TEST(Convert, FloatToHalfRoundTripsEveryHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << h;
    } else {
      EXPECT_EQ(FloatToHalf(f), h) << h;
    }
  }
}

// Round to nearest, ties to even, over random floats of every magnitude
// (subnormal halves, overflow to infinity included), against the compiler.
TEST(Convert, FloatToHalfRoundsLikeCompiler) {
  std::mt19937 rng(1);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t bits = rng();
    // Focus on exponents near the half range, where rounding happens.
    const uint32_t exp = 95 + rng() % 60;
    bits = (bits & 0x807fffffu) | (exp << 23);
    if (i % 7 == 0) bits &= 0xffffe000u | (1u << 12);  // exact ties
    const float f = BitsFloat(bits);
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    ASSERT_EQ(FloatToHalf(f), want) << f;
  }
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-INFINITY), 0xfc00);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(NAN))));
}

TEST(Convert, Bf16RoundsToNearestEven) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(b));
    EXPECT_EQ(FloatBits(f), b << 16);
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToBf16(f), b);
    }
  }
  // Ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7; even is 1.
  EXPECT_EQ(FloatToBf16(1.0f + 0x1p-8f), FloatToBf16(1.0f));
  EXPECT_EQ(FloatToBf16(1.0f + 3 * 0x1p-8f), FloatToBf16(1.0f + 0x1p-6f));
  EXPECT_EQ(FloatToBf16(1.0f + 0x1p-8f + 0x1p-20f), FloatToBf16(1.0f + 0x1p-7f));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
}

TEST(Convert, CpuLoadsAndStoresMatchScalarConversions) {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> out(65536);
  cpu::LoadF32(all.data(), DType::kF16, 65536, out.data());
  for (uint32_t i = 0; i < 65536; ++i) {
    const float want = HalfToFloat(all[i]);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(out[i]));
    } else {
      EXPECT_EQ(FloatBits(out[i]), FloatBits(want)) << i;
    }
  }
  cpu::LoadF32(all.data(), DType::kBF16, 65536, out.data());
  for (uint32_t i = 0; i < 65536; ++i) EXPECT_EQ(FloatBits(out[i]), i << 16);
  std::vector<uint16_t> back(1000);
  std::vector<float> src(1000);
  std::mt19937 rng(2);
  std::normal_distribution<float> dist(0.0f, 100.0f);
  for (float& x : src) x = dist(rng);
  cpu::StoreF32(src.data(), DType::kF16, 1000, back.data());
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(back[i], FloatToHalf(src[i]));
  cpu::StoreF32(src.data(), DType::kBF16, 1000, back.data());
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(back[i], FloatToBf16(src[i]));
}

// FastExp against exp: relative error below 3e-7 over the softmax range,
// exactly 0 below -87.
TEST(Convert, FastExpIsAccurate) {
  double worst = 0, worst_x = 0;
  for (double x = -87.0; x <= 88.0; x += 0.001) {
    const float xf = static_cast<float>(x);
    const double want = std::exp(static_cast<double>(xf));
    const double err = std::abs(cpu::FastExp(xf) - want) / want;
    if (err > worst) {
      worst = err;
      worst_x = xf;
    }
  }
  EXPECT_LT(worst, 3e-7) << "at " << worst_x;
  EXPECT_EQ(cpu::FastExp(-88.0f), 0.0f);
  EXPECT_EQ(cpu::FastExp(-INFINITY), 0.0f);
  EXPECT_EQ(cpu::FastExp(0.0f), 1.0f);
}

}  // namespace
}  // namespace kvtier::kernels
