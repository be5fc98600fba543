// The CUDA kernel set (kernels/cuda): the KernelSet interface on one GPU.
// Internal to kvtier; the CUDA backend (runtime/src/cuda_backend.cc) owns it.
//
// Every call runs on the kernel set's own stream and returns when its work is
// complete (the CPU kernel set's contract), so the runtime needs no
// device-wide synchronisation. The small [host] plan arrays of a call are
// packed into one pinned buffer and uploaded with one copy; outputs tagged
// [host] come back the same way. Scratch grows to the largest call seen and
// is then reused: a steady decode loop allocates nothing.
#ifndef KVTIER_KERNELS_CUDA_CUDA_KERNEL_SET_H_
#define KVTIER_KERNELS_CUDA_CUDA_KERNEL_SET_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvtier/kernels/kernel_set.h"

namespace kvtier::kernels {

// The kernel set of CUDA device `device` (which must be current on the
// calling thread when it is created).
absl::StatusOr<std::unique_ptr<KernelSet>> MakeCudaKernelSet(int device);

}  // namespace kvtier::kernels

#endif  // KVTIER_KERNELS_CUDA_CUDA_KERNEL_SET_H_
