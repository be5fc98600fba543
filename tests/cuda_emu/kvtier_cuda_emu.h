// A CPU emulation of the CUDA features kernels/cuda uses, so its kernels and
// driver build as plain C++ and run in the CPU test suite: every thread of a
// block is a std::thread (blocks run one after another), __syncthreads and
// the warp shuffles are barriers, __shared__ variables are statics (one block
// at a time), atomics are std::atomic_ref, and the runtime API allocates and
// copies host memory synchronously. It checks the kernels' indexing,
// synchronisation and arithmetic against the CPU reference; it says nothing
// about speed, the GPU memory model or the real runtime API. Test-only.
#ifndef KVTIER_TESTS_CUDA_EMU_KVTIER_CUDA_EMU_H_
#define KVTIER_TESTS_CUDA_EMU_KVTIER_CUDA_EMU_H_

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define KVTIER_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline int __ffs(int x) { return __builtin_ffs(x); }

namespace kvtier::emu {

// A reusable barrier whose party can shrink (a thread that returns from the
// kernel no longer holds the others back, as on the GPU).
class Barrier {
 public:
  void Reset(int parties) {
    expected_ = parties;
    arrived_ = 0;
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++arrived_ == expected_) {
      Release();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }
  void Drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) Release();
  }

 private:
  void Release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t gen_ = 0;
};

struct Block {
  Barrier block;
  Barrier warps[32];
  uint64_t lanes[1024];
  std::vector<char> shared;
};

inline thread_local Block* tls_block = nullptr;
inline thread_local int tls_tid = 0;

inline void* DynamicShared() { return tls_block->shared.data(); }

// Runs body() on every thread of every block of the grid.
template <typename Body>
void Run(dim3 grid, dim3 block, size_t shared_bytes, const Body& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) std::abort();
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        auto b = std::make_unique<Block>();
        b->block.Reset(n);
        for (int w = 0; w < 32; ++w) b->warps[w].Reset(std::clamp(n - 32 * w, 0, 32));
        b->shared.assign(shared_bytes + 16, 0);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            tls_block = b.get();
            tls_tid = t;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            body();
            b->block.Drop();
            b->warps[t / 32].Drop();
          });
        }
        for (std::thread& th : threads) th.join();
      }
    }
  }
}

template <typename Kernel>
auto Launch(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel) {
  return [=](auto... args) { Run(grid, block, shared_bytes, [&] { kernel(args...); }); };
}

template <typename T>
uint64_t ToBits(T v) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T FromBits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace kvtier::emu

inline void __syncthreads() { kvtier::emu::tls_block->block.Wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  using namespace kvtier::emu;
  static_assert(sizeof(T) <= 8);
  const int t = tls_tid, w = t / 32, lane = t % 32;
  tls_block->lanes[t] = ToBits(v);
  tls_block->warps[w].Wait();
  const T r = FromBits<T>(tls_block->lanes[w * 32 + (lane ^ lane_mask)]);
  tls_block->warps[w].Wait();
  return r;
}

inline unsigned __ballot_sync(unsigned, int pred) {
  using namespace kvtier::emu;
  const int t = tls_tid, w = t / 32;
  tls_block->lanes[t] = pred != 0;
  tls_block->warps[w].Wait();
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (tls_block->lanes[w * 32 + l] != 0 ? 1u : 0u) << l;
  tls_block->warps[w].Wait();
  return bits;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

// ---- The runtime API, on host memory, synchronous.
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorNotReady = 600 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
inline constexpr unsigned cudaStreamNonBlocking = 1;
inline constexpr unsigned cudaHostAllocDefault = 0;

inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::aligned_alloc(256, (n + 255) / 256 * 256);
  return *p != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) {
  *p = std::aligned_alloc(4096, (n + 4095) / 4096 * 4096);
  return *p != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  if (n > 0) std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }

#endif  // KVTIER_TESTS_CUDA_EMU_KVTIER_CUDA_EMU_H_
