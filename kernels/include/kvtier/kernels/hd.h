// kvtier/kernels/hd.h — the annotation for functions shared by host and device
// code. Headers that use it are compiled by the host compiler for the CPU
// kernels and by nvcc for the CUDA kernels, so both run the same math.
#ifndef KVTIER_KERNELS_HD_H_
#define KVTIER_KERNELS_HD_H_

#if defined(__CUDACC__)
#define KVTIER_HD __host__ __device__ __forceinline__
#else
#define KVTIER_HD inline __attribute__((always_inline))
#endif

#endif  // KVTIER_KERNELS_HD_H_
