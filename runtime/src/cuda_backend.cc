// The CUDA backend: device memory from cudaMalloc (the runtime carves it from
// one DeviceArena allocation), page-locked host memory from cudaHostAlloc,
// copies with cudaMemcpyAsync on a stream, streams and events of the CUDA
// runtime, the kernels of kernels/cuda. Calls without a stream complete
// before they return, waiting on the backend's own stream only: nothing here
// synchronises the whole device.
#include "cuda_backend.h"

#include <cuda_runtime_api.h>

#include <mutex>

#include "absl/strings/str_format.h"
#include "kernels/cuda/cuda_kernel_set.h"
#include "kvtier/log.h"

namespace kvtier {
namespace {

absl::Status CudaError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrFormat("CUDA %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e)));
}

class CudaStream final : public Stream {
 public:
  CudaStream(int device, cudaStream_t s) : device_(device), stream_(s) {}
  ~CudaStream() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  absl::Status Synchronize() override { return CudaError(cudaStreamSynchronize(stream_), "stream synchronize"); }
  cudaStream_t get() const { return stream_; }

 private:
  const int device_;
  const cudaStream_t stream_;
};

class CudaEvent final : public Event {
 public:
  CudaEvent(int device, cudaEvent_t e) : device_(device), event_(e) {}
  ~CudaEvent() override {
    cudaSetDevice(device_);
    cudaEventDestroy(event_);
  }
  absl::Status Record(Stream& stream) override {
    auto* s = dynamic_cast<CudaStream*>(&stream);
    if (s == nullptr) return absl::InvalidArgumentError("a CUDA event records on a CUDA stream only");
    return CudaError(cudaEventRecord(event_, s->get()), "event record");
  }
  bool Query() override {
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) {
      Log(LogSeverity::kError, absl::StrFormat("CUDA event query: %s", cudaGetErrorString(e)));
      return true;  // nothing left to wait for; the error surfaces at the next synchronising call
    }
    return false;
  }
  absl::Status Synchronize() override { return CudaError(cudaEventSynchronize(event_), "event synchronize"); }

 private:
  const int device_;
  const cudaEvent_t event_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t copy_stream, std::unique_ptr<kernels::KernelSet> kernels)
      : device_(device), copy_stream_(copy_stream), kernels_(std::move(kernels)) {}
  ~CudaBackend() override {
    kernels_.reset();
    cudaSetDevice(device_);
    cudaStreamSynchronize(copy_stream_);
    cudaStreamDestroy(copy_stream_);
  }

  std::string_view name() const override { return "cuda"; }
  BackendCaps caps() const override {
    return BackendCaps{.device_memory_host_accessible = false, .async_streams = true, .pinned_host_memory = true};
  }

  absl::StatusOr<void*> AllocateDevice(int64_t bytes) override {
    if (bytes < 0) return absl::InvalidArgumentError(absl::StrFormat("device allocation of %d bytes", bytes));
    if (absl::Status st = SetDevice(); !st.ok()) return st;
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, static_cast<size_t>(std::max<int64_t>(bytes, 1)));
    if (e != cudaSuccess) {
      cudaGetLastError();  // an out-of-memory error is not sticky: clear it
      size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "CUDA device memory: could not allocate %d bytes (%d free of %d): %s", bytes, free_bytes, total,
          cudaGetErrorString(e)));
    }
    return p;
  }
  void FreeDevice(void* ptr) override {
    if (ptr == nullptr) return;
    cudaSetDevice(device_);
    if (cudaError_t e = cudaFree(ptr); e != cudaSuccess) {
      Log(LogSeverity::kError, absl::StrFormat("cudaFree: %s", cudaGetErrorString(e)));
    }
  }
  absl::StatusOr<void*> AllocateHost(int64_t bytes) override {
    if (bytes < 0) return absl::InvalidArgumentError(absl::StrFormat("host allocation of %d bytes", bytes));
    if (absl::Status st = SetDevice(); !st.ok()) return st;
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, static_cast<size_t>(std::max<int64_t>(bytes, 1)), cudaHostAllocPortable);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrFormat("CUDA pinned host memory: could not allocate %d bytes: %s", bytes, cudaGetErrorString(e)));
    }
    if (reinterpret_cast<uintptr_t>(p) % 4096 != 0) {  // the interface promises page alignment
      cudaFreeHost(p);
      return absl::InternalError("cudaHostAlloc returned memory that is not 4096-byte aligned");
    }
    return p;
  }
  void FreeHost(void* ptr) override {
    if (ptr == nullptr) return;
    if (cudaError_t e = cudaFreeHost(ptr); e != cudaSuccess) {
      Log(LogSeverity::kError, absl::StrFormat("cudaFreeHost: %s", cudaGetErrorString(e)));
    }
  }

  absl::Status Copy(void* dst, const void* src, int64_t bytes, CopyKind kind, Stream* stream) override {
    if (bytes < 0) return absl::InvalidArgumentError(absl::StrFormat("copy of %d bytes", bytes));
    if (bytes == 0) return absl::OkStatus();
    if (absl::Status st = SetDevice(); !st.ok()) return st;
    const cudaMemcpyKind k = kind == CopyKind::kHostToDevice   ? cudaMemcpyHostToDevice
                             : kind == CopyKind::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                               : cudaMemcpyDeviceToDevice;
    if (stream != nullptr) {
      auto* s = dynamic_cast<CudaStream*>(stream);
      if (s == nullptr) return absl::InvalidArgumentError("a CUDA copy runs on a CUDA stream only");
      return CudaError(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), k, s->get()), "copy");
    }
    std::lock_guard<std::mutex> lock(copy_mu_);
    if (absl::Status st = CudaError(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), k, copy_stream_), "copy");
        !st.ok()) {
      return st;
    }
    return CudaError(cudaStreamSynchronize(copy_stream_), "copy");
  }

  absl::Status ZeroDevice(void* ptr, int64_t bytes) override {
    if (bytes < 0) return absl::InvalidArgumentError(absl::StrFormat("zero of %d bytes", bytes));
    if (bytes == 0) return absl::OkStatus();
    if (absl::Status st = SetDevice(); !st.ok()) return st;
    std::lock_guard<std::mutex> lock(copy_mu_);
    if (absl::Status st = CudaError(cudaMemsetAsync(ptr, 0, static_cast<size_t>(bytes), copy_stream_), "memset");
        !st.ok()) {
      return st;
    }
    return CudaError(cudaStreamSynchronize(copy_stream_), "memset");
  }

  absl::StatusOr<std::unique_ptr<Stream>> CreateStream() override {
    if (absl::Status st = SetDevice(); !st.ok()) return st;
    cudaStream_t s;
    if (absl::Status st = CudaError(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream create"); !st.ok())
      return st;
    return std::unique_ptr<Stream>(std::make_unique<CudaStream>(device_, s));
  }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override {
    if (absl::Status st = SetDevice(); !st.ok()) return st;
    cudaEvent_t e;
    if (absl::Status st = CudaError(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event create"); !st.ok())
      return st;
    return std::unique_ptr<Event>(std::make_unique<CudaEvent>(device_, e));
  }

  kernels::KernelSet& kernels() override { return *kernels_; }

 private:
  // The device is per host thread in CUDA: every entry point sets it.
  absl::Status SetDevice() const { return CudaError(cudaSetDevice(device_), "set device"); }

  const int device_;
  const cudaStream_t copy_stream_;
  std::mutex copy_mu_;
  std::unique_ptr<kernels::KernelSet> kernels_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend() {
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::UnavailableError(absl::StrFormat("no usable CUDA device: %s",
                                                  e != cudaSuccess ? cudaGetErrorString(e) : "the device count is 0"));
  }
  constexpr int kDevice = 0;
  if (absl::Status st = CudaError(cudaSetDevice(kDevice), "set device"); !st.ok()) return st;
  cudaStream_t copy_stream;
  if (absl::Status st = CudaError(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking), "stream create");
      !st.ok()) {
    return st;
  }
  absl::StatusOr<std::unique_ptr<kernels::KernelSet>> ks = kernels::MakeCudaKernelSet(kDevice);
  if (!ks.ok()) {
    cudaStreamDestroy(copy_stream);
    return ks.status();
  }
  return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(kDevice, copy_stream, std::move(*ks)));
}

}  // namespace kvtier
