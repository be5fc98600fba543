// kernels/cuda/kernel_set.cu built as plain C++ on the CUDA emulation
// (kvtier_cuda_emu.h): MakeEmulatedCudaKernelSet() is the CUDA kernel set
// running on the CPU, for the conformance tests. Renamed so that it can share
// a binary with the real one.
#include "kvtier_cuda_emu.h"

#define cuda cuda_emulated
#define MakeCudaKernelSet MakeEmulatedCudaKernelSet
#include "kernels/cuda/kernel_set.cu"
