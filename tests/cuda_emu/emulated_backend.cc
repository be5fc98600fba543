// The CPU backend with the emulated CUDA kernel set and a GPU's capabilities
// (device memory not host-accessible), so the runtime takes the paths it
// takes on CUDA while the kernels run on the CPU emulation.
#include "emulated_kernel_set.h"
#include "kvtier/backend.h"

namespace kvtier {
namespace {

class EmulatedCudaBackend final : public Backend {
 public:
  EmulatedCudaBackend(std::unique_ptr<Backend> cpu, std::unique_ptr<kernels::KernelSet> kernels)
      : cpu_(std::move(cpu)), kernels_(std::move(kernels)) {}
  std::string_view name() const override { return "cuda-emulated"; }
  BackendCaps caps() const override {
    return BackendCaps{.device_memory_host_accessible = false, .async_streams = false, .pinned_host_memory = false};
  }
  absl::StatusOr<void*> AllocateDevice(int64_t bytes) override { return cpu_->AllocateDevice(bytes); }
  void FreeDevice(void* ptr) override { cpu_->FreeDevice(ptr); }
  absl::StatusOr<void*> AllocateHost(int64_t bytes) override { return cpu_->AllocateHost(bytes); }
  void FreeHost(void* ptr) override { cpu_->FreeHost(ptr); }
  absl::Status Copy(void* dst, const void* src, int64_t bytes, CopyKind kind, Stream* stream) override {
    return cpu_->Copy(dst, src, bytes, kind, stream);
  }
  absl::Status ZeroDevice(void* ptr, int64_t bytes) override { return cpu_->ZeroDevice(ptr, bytes); }
  absl::StatusOr<std::unique_ptr<Stream>> CreateStream() override { return cpu_->CreateStream(); }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override { return cpu_->CreateEvent(); }
  kernels::KernelSet& kernels() override { return *kernels_; }

 private:
  std::unique_ptr<Backend> cpu_;
  std::unique_ptr<kernels::KernelSet> kernels_;
};

}  // namespace

std::unique_ptr<Backend> MakeEmulatedCudaBackend() {
  return std::make_unique<EmulatedCudaBackend>(*CreateBackend(BackendKind::kCpu),
                                               *kernels::MakeEmulatedCudaKernelSet(0));
}

}  // namespace kvtier
