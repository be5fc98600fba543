// The CPU backend: device memory is host memory, copies are memcpy, streams
// complete work on submission, kernels are the CPU kernel set.
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_format.h"
#include "kvtier/backend.h"
#if defined(KVTIER_WITH_CUDA)
#include "cuda_backend.h"
#endif

namespace kvtier {
namespace {

absl::StatusOr<void*> AlignedAlloc(int64_t bytes, int64_t align, const char* what) {
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrFormat("%s of %d bytes", what, bytes));
  const int64_t rounded = (std::max<int64_t>(bytes, 1) + align - 1) / align * align;
  void* p = std::aligned_alloc(static_cast<size_t>(align), static_cast<size_t>(rounded));
  if (p == nullptr) {
    return absl::ResourceExhaustedError(absl::StrFormat("%s: could not allocate %d bytes", what, bytes));
  }
  return p;
}

// Copies in 256-byte pieces, which the compiler turns into vector moves. For
// copies of a few KiB between 4 KiB-aligned blocks and staging rows, glibc's
// memmove/memcpy (rep movsb) ran 1.5-4x slower on the machines here
// (tools/bench/bench_gather).
void CopyBytes(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) std::memcpy(d + i, s + i, 256);
  std::memcpy(d + i, s + i, static_cast<size_t>(bytes - i));
}

class CpuStream final : public Stream {
 public:
  absl::Status Synchronize() override { return absl::OkStatus(); }
};

class CpuEvent final : public Event {
 public:
  absl::Status Record(Stream&) override { return absl::OkStatus(); }
  bool Query() override { return true; }
  absl::Status Synchronize() override { return absl::OkStatus(); }
};

class CpuBackend final : public Backend {
 public:
  CpuBackend() : kernels_(kernels::MakeCpuKernelSet()) {}

  std::string_view name() const override { return "cpu"; }
  BackendCaps caps() const override {
    return BackendCaps{.device_memory_host_accessible = true, .async_streams = false, .pinned_host_memory = false};
  }

  absl::StatusOr<void*> AllocateDevice(int64_t bytes) override {
    return AlignedAlloc(bytes, 256, "cpu device memory");
  }
  void FreeDevice(void* ptr) override { std::free(ptr); }
  absl::StatusOr<void*> AllocateHost(int64_t bytes) override { return AlignedAlloc(bytes, 4096, "host memory"); }
  void FreeHost(void* ptr) override { std::free(ptr); }

  absl::Status Copy(void* dst, const void* src, int64_t bytes, CopyKind, Stream*) override {
    if (bytes < 0) return absl::InvalidArgumentError(absl::StrFormat("copy of %d bytes", bytes));
    if (bytes > 0) CopyBytes(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status ZeroDevice(void* ptr, int64_t bytes) override {
    if (bytes < 0) return absl::InvalidArgumentError(absl::StrFormat("zero of %d bytes", bytes));
    if (bytes > 0) std::memset(ptr, 0, static_cast<size_t>(bytes));
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<Stream>> CreateStream() override { return std::make_unique<CpuStream>(); }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override { return std::make_unique<CpuEvent>(); }

  kernels::KernelSet& kernels() override { return *kernels_; }

 private:
  std::unique_ptr<kernels::KernelSet> kernels_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
#if defined(KVTIER_WITH_CUDA)
      if (absl::StatusOr<std::unique_ptr<Backend>> cuda = CreateCudaBackend(); cuda.ok()) return cuda;
#endif
      [[fallthrough]];
    case BackendKind::kCpu:
      return std::unique_ptr<Backend>(std::make_unique<CpuBackend>());
    case BackendKind::kCuda:
#if defined(KVTIER_WITH_CUDA)
      return CreateCudaBackend();
#else
      return absl::NotFoundError("the CUDA backend is not part of this build of kvtier; use backend cpu or auto");
#endif
  }
  return absl::InvalidArgumentError(absl::StrFormat("unknown backend kind %d", int(kind)));
}

}  // namespace kvtier
