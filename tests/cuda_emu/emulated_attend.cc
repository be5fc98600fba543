// kernels/cuda/attend.cu built as plain C++ on the CUDA emulation
// (kvtier_cuda_emu.h), for emulated_kernel_set.cc.
#include "kvtier_cuda_emu.h"

#define cuda cuda_emulated
#include "kernels/cuda/attend.cu"
