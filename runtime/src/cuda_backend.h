// The CUDA backend (kvtier/backend.h) on device 0. Internal: CreateBackend
// picks it.
#ifndef KVTIER_RUNTIME_CUDA_BACKEND_H_
#define KVTIER_RUNTIME_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvtier/backend.h"

namespace kvtier {

// Unavailable, with the CUDA error, when no device can be used (no driver, no
// GPU, or a driver too old for this build's runtime).
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend();

}  // namespace kvtier

#endif  // KVTIER_RUNTIME_CUDA_BACKEND_H_
