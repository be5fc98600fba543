// Compiles the host/device math headers as device code. Built (not run)
// wherever nvcc is, so a change that breaks them for the GPU fails the build.
#include "kvtier/kernels/convert.h"
#include "kvtier/kernels/hash.h"

namespace kvtier::kernels {

__global__ void HashAndConvert(const uint32_t* tokens, const float* planes, const float* x, uint32_t* buckets,
                               float* signs, uint16_t* halves, int n, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t h = TokenHash(RowSeed(HeadSeed(1, 2, 3), 0), tokens[i]);
  buckets[i] = Bucket(h, static_cast<uint32_t>(width)) ^ SimHash(x + i * 8, planes, 4, 8);
  signs[i] = Sign(h);
  halves[i] = FloatToHalf(HalfToFloat(FloatToBf16(Bf16ToFloat(static_cast<uint16_t>(i)))));
}

}  // namespace kvtier::kernels
