// The CUDA kernel set running on the CUDA emulation (tests/cuda_emu), and a
// backend around it.
#ifndef KVTIER_TESTS_CUDA_EMU_EMULATED_KERNEL_SET_H_
#define KVTIER_TESTS_CUDA_EMU_EMULATED_KERNEL_SET_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvtier/backend.h"
#include "kvtier/kernels/kernel_set.h"

namespace kvtier {
namespace kernels {

absl::StatusOr<std::unique_ptr<KernelSet>> MakeEmulatedCudaKernelSet(int device);

}  // namespace kernels

// The CPU backend with that kernel set and a GPU's capabilities: device
// memory is (ordinary memory, but) not host-accessible to the runtime.
std::unique_ptr<Backend> MakeEmulatedCudaBackend();

}  // namespace kvtier

#endif  // KVTIER_TESTS_CUDA_EMU_EMULATED_KERNEL_SET_H_
