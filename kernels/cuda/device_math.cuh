// Device code shared by the CUDA kernels: dtype loads and stores, warp
// reductions, the slot walk of a range list. Internal to kernels/cuda.
#ifndef KVTIER_KERNELS_CUDA_DEVICE_MATH_CUH_
#define KVTIER_KERNELS_CUDA_DEVICE_MATH_CUH_

#include <cuda_fp16.h>

#include <cstdint>

#include "kvtier/dtype.h"
#include "kvtier/kernels/convert.h"
#include "kvtier/kernels/params.h"

// Kernel launches and dynamic shared memory through macros, so the kernels
// also build as plain C++ against tests/cuda_emu (a CPU emulation of the few
// CUDA features they use) and run in the CPU test suite.
//   KVTIER_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...)
#if defined(KVTIER_CUDA_EMULATION)
#define KVTIER_LAUNCH(grid, block, shared, stream, ...) ::kvtier::emu::Launch(grid, block, shared, __VA_ARGS__)
#define KVTIER_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::kvtier::emu::DynamicShared())
#else
#define KVTIER_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#define KVTIER_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace kvtier::kernels::cuda {

constexpr int kWarp = 32;

// Element i of a tensor in the storage type DT (a DType value), as fp32.
template <int DT>
__device__ __forceinline__ float LoadT(const void* base, int64_t i) {
  if constexpr (DT == static_cast<int>(DType::kF32)) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (DT == static_cast<int>(DType::kF16)) {
    return __half2float(static_cast<const __half*>(base)[i]);
  } else {
    return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16);
  }
}

__device__ __forceinline__ float LoadAny(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::kF16: return LoadT<static_cast<int>(DType::kF16)>(base, i);
    case DType::kBF16: return LoadT<static_cast<int>(DType::kBF16)>(base, i);
    default: return LoadT<static_cast<int>(DType::kF32)>(base, i);
  }
}

// Rounds to nearest even, as the CPU kernels' stores do (convert.h).
__device__ __forceinline__ void StoreAny(void* base, DType t, int64_t i, float x) {
  switch (t) {
    case DType::kF16: static_cast<uint16_t*>(base)[i] = FloatToHalf(x); return;
    case DType::kBF16: static_cast<uint16_t*>(base)[i] = FloatToBf16(x); return;
    default: static_cast<float*>(base)[i] = x; return;
  }
}

// The sum over the warp, in every lane. (The CPU emulation exchanges once
// instead of five times; its sum runs in lane order.)
__device__ __forceinline__ float WarpSum(float x) {
#if defined(KVTIER_CUDA_EMULATION)
  return ::kvtier::emu::WarpAllReduce(x, [](float a, float b) { return a + b; });
#else
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
#endif
}

__device__ __forceinline__ float WarpMax(float x) {
#if defined(KVTIER_CUDA_EMULATION)
  return ::kvtier::emu::WarpAllReduce(x, [](float a, float b) { return fmaxf(a, b); });
#else
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
#endif
}

// The slot of the idx-th resident token of a range list.
__device__ __forceinline__ int64_t SlotOf(const SlotRange* ranges, int num_ranges, int64_t idx) {
  for (int r = 0; r < num_ranges; ++r) {
    if (idx < ranges[r].count) return ranges[r].begin + idx;
    idx -= ranges[r].count;
  }
  return -1;  // unreachable for idx < the ranges' total
}

}  // namespace kvtier::kernels::cuda

#endif  // KVTIER_KERNELS_CUDA_DEVICE_MATH_CUH_
