// The CUDA kernel set running on the CUDA emulation (tests/cuda_emu).
#ifndef KVTIER_TESTS_CUDA_EMU_EMULATED_KERNEL_SET_H_
#define KVTIER_TESTS_CUDA_EMU_EMULATED_KERNEL_SET_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvtier/kernels/kernel_set.h"

namespace kvtier::kernels {

absl::StatusOr<std::unique_ptr<KernelSet>> MakeEmulatedCudaKernelSet(int device);

}  // namespace kvtier::kernels

#endif  // KVTIER_TESTS_CUDA_EMU_EMULATED_KERNEL_SET_H_
