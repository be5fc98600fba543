// When the budget holds every token, Attend is exact attention: for every
// dtype, GQA and MHA, head_dim 64 and 128.
#include <cmath>
#include <tuple>

#include "gtest/gtest.h"
#include "test_util.h"

namespace kvtier {
namespace {

using testing::MaxHeadError;
using testing::RandomNormal;
using testing::RoundedQuery;
using testing::Shadow;

struct ExactCase {
  DType dtype;
  int q_heads, kv_heads, head_dim;
};

class ExactTest : public ::testing::TestWithParam<ExactCase> {};

TEST_P(ExactTest, FullBudgetAttendEqualsExactAttention) {
  const ExactCase c = GetParam();
  Options o;
  o.shape = {.layers = 2, .q_heads = c.q_heads, .kv_heads = c.kv_heads, .head_dim = c.head_dim, .dtype = c.dtype};
  o.max_context = 300;
  o.device_budget_fraction = 1.0;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  EXPECT_FALSE((*rt)->plan().compressed);
  KVTIER_ASSERT_OK((*rt)->AddSequence(3));
  Shadow shadow(o.shape);
  const int H = c.kv_heads, d = c.head_dim;
  uint64_t seed = 100;
  for (int layer = 0; layer < 2; ++layer) {
    // Prefill in two chunks, then decode steps of one token.
    for (int n : {128, 72}) {
      seed += 2;
      KVTIER_ASSERT_OK(shadow.Append(**rt, 3, layer, RandomNormal(n * H * d, seed, 1.0f, 0.3f),
                                     RandomNormal(n * H * d, seed + 1), n));
    }
    for (int step = 0; step < 6; ++step) {
      seed += 2;
      KVTIER_ASSERT_OK(shadow.Append(**rt, 3, layer, RandomNormal(H * d, seed, 1.0f, 0.3f),
                                     RandomNormal(H * d, seed + 1), 1));
      auto [q, qr] = RoundedQuery(c.dtype, RandomNormal(c.q_heads * d, ++seed, 0.5f));
      const std::vector<double> ref = shadow.Attention(layer, qr);

      // fp32 output: only fp32 rounding of the same inputs separates the two.
      std::vector<float> out(c.q_heads * d);
      AttendOptions f32;
      f32.out_dtype = DType::kF32;
      auto served = (*rt)->Attend(3, layer, q.data(), out.data(), f32);
      ASSERT_TRUE(served.ok()) << served.status();
      EXPECT_LE(MaxHeadError(out, ref, c.q_heads, d), 1e-5);
      EXPECT_EQ(served->exact, shadow.length(layer) * H);
      EXPECT_EQ(served->from_sketch + served->dropped, 0);

      // Output in the model dtype: the reference rounded to it, give or take
      // one unit in the last place (rounding of a value within 1e-5 of it).
      workload::Tensor out_t(c.dtype, c.q_heads * d);
      ASSERT_TRUE((*rt)->Attend(3, layer, q.data(), out_t.data()).ok());
      const double ulp = c.dtype == DType::kF32 ? 0x1p-23 : (c.dtype == DType::kF16 ? 0x1p-10 : 0x1p-7);
      for (int i = 0; i < c.q_heads * d; ++i) {
        EXPECT_NEAR(out_t.Get(i), ref[i], std::abs(ref[i]) * ulp + 1e-5 * std::abs(ref[i]) + 1e-6) << i;
      }
    }
  }
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
}

INSTANTIATE_TEST_SUITE_P(
    AllShapes, ExactTest,
    ::testing::Values(ExactCase{DType::kF32, 8, 2, 64}, ExactCase{DType::kF32, 4, 4, 128},
                      ExactCase{DType::kF16, 8, 2, 128}, ExactCase{DType::kF16, 4, 4, 64},
                      ExactCase{DType::kBF16, 8, 2, 64}, ExactCase{DType::kBF16, 4, 4, 128},
                      ExactCase{DType::kF32, 8, 2, 128}, ExactCase{DType::kF16, 8, 2, 64},
                      ExactCase{DType::kBF16, 4, 4, 64}),
    [](const ::testing::TestParamInfo<ExactCase>& info) {
      return std::string(DTypeName(info.param.dtype)) + "_q" + std::to_string(info.param.q_heads) + "_kv" +
             std::to_string(info.param.kv_heads) + "_d" + std::to_string(info.param.head_dim);
    });

// A compressed plan is exact too while the context fits in the recent window.
TEST(ExactWhileShort, CompressedPlanIsExactBeforeAnythingIsVague) {
  Options o;
  o.shape = {.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF16};
  o.max_context = 4096;
  o.device_budget_fraction = 0.1;
  auto rt = Runtime::Create(o);
  ASSERT_TRUE(rt.ok()) << rt.status();
  ASSERT_TRUE((*rt)->plan().compressed);
  const int n = (*rt)->plan().sink_tokens + (*rt)->plan().recent_tokens;
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  Shadow shadow(o.shape);
  KVTIER_ASSERT_OK(shadow.Append(**rt, 1, 0, RandomNormal(n * 2 * 64, 1), RandomNormal(n * 2 * 64, 2), n));
  auto [q, qr] = RoundedQuery(DType::kF16, RandomNormal(4 * 64, 3));
  std::vector<float> out(4 * 64);
  AttendOptions f32;
  f32.out_dtype = DType::kF32;
  auto served = (*rt)->Attend(1, 0, q.data(), out.data(), f32);
  ASSERT_TRUE(served.ok());
  EXPECT_EQ(served->exact, 2 * n);
  EXPECT_LE(MaxHeadError(out, shadow.Attention(0, qr), 4, 64), 1e-5);
}

}  // namespace
}  // namespace kvtier
