// kvtier/backend.h — where the device side of kvtier runs: device memory, host
// memory, copies, streams and events, and the kernels.
//
// The runtime talks to a Backend only through this interface and asks
// capabilities (BackendCaps) instead of compiling per backend. The CPU backend
// is a real implementation: "device" memory is ordinary host memory, copies
// are memcpy, and work on a stream completes before the call returns. A
// Backend is thread-safe.
#ifndef KVTIER_BACKEND_H_
#define KVTIER_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvtier/kernels/kernel_set.h"
#include "kvtier/options.h"

namespace kvtier {

struct BackendCaps {
  // Host code may read and write device memory directly.
  bool device_memory_host_accessible = false;
  // Copies and kernels on a stream run asynchronously to the calling thread.
  bool async_streams = false;
  // AllocateHost returns page-locked memory the device can DMA from.
  bool pinned_host_memory = false;
};

enum class CopyKind : uint8_t { kHostToDevice, kDeviceToHost, kDeviceToDevice };

// An ordered queue of copies and kernels. On the CPU backend work completes
// when it is submitted.
class Stream {
 public:
  virtual ~Stream() = default;
  // Blocks until all work submitted so far has completed.
  virtual absl::Status Synchronize() = 0;
};

// A point in a stream's work.
class Event {
 public:
  virtual ~Event() = default;
  // Marks the point after all work submitted to `stream` so far.
  virtual absl::Status Record(Stream& stream) = 0;
  // True once the work before the recorded point completed (true if never recorded).
  virtual bool Query() = 0;
  virtual absl::Status Synchronize() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual BackendCaps caps() const = 0;

  // Device memory, 256-byte aligned. ResourceExhausted naming the size when
  // the device cannot provide it.
  virtual absl::StatusOr<void*> AllocateDevice(int64_t bytes) = 0;
  virtual void FreeDevice(void* ptr) = 0;
  // Host memory for tiers and staging, 4096-byte aligned (pinned where
  // caps().pinned_host_memory).
  virtual absl::StatusOr<void*> AllocateHost(int64_t bytes) = 0;
  virtual void FreeHost(void* ptr) = 0;

  // Copies `bytes` between buffers that do not overlap; with a stream,
  // ordered on it (and asynchronous where caps().async_streams), else
  // complete on return.
  virtual absl::Status Copy(void* dst, const void* src, int64_t bytes, CopyKind kind, Stream* stream = nullptr) = 0;
  // Zeroes device memory; complete on return.
  virtual absl::Status ZeroDevice(void* ptr, int64_t bytes) = 0;

  virtual absl::StatusOr<std::unique_ptr<Stream>> CreateStream() = 0;
  virtual absl::StatusOr<std::unique_ptr<Event>> CreateEvent() = 0;

  virtual kernels::KernelSet& kernels() = 0;
};

// kCpu: the CPU backend. kCuda: NotFound until the CUDA backend is built in.
// kAuto: CUDA when available, else CPU.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(BackendKind kind);

}  // namespace kvtier

#endif  // KVTIER_BACKEND_H_
