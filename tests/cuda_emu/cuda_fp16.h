// The fp16 type of the CUDA emulation (kvtier_cuda_emu.h), bit-exact through
// kvtier's own conversions.
#ifndef KVTIER_TESTS_CUDA_EMU_CUDA_FP16_H_
#define KVTIER_TESTS_CUDA_EMU_CUDA_FP16_H_

#include "kvtier/kernels/convert.h"
#include "kvtier_cuda_emu.h"

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) { return kvtier::kernels::HalfToFloat(h.bits); }

#endif  // KVTIER_TESTS_CUDA_EMU_CUDA_FP16_H_
