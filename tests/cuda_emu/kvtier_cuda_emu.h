// A CPU emulation of the CUDA features kernels/cuda uses, so its kernels and
// driver build as plain C++ and run in the CPU test suite: the threads of a
// block are fibers on the launching thread (blocks run one after another),
// __syncthreads and the warp shuffles are barriers between them, __shared__
// variables are statics (one block at a time), atomics are std::atomic_ref,
// and the runtime API allocates and copies host memory synchronously. It checks the kernels' indexing,
// synchronisation and arithmetic against the CPU reference; it says nothing
// about speed, the GPU memory model or the real runtime API. Test-only.
#ifndef KVTIER_TESTS_CUDA_EMU_KVTIER_CUDA_EMU_H_
#define KVTIER_TESTS_CUDA_EMU_KVTIER_CUDA_EMU_H_

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif
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

struct Block {
  uint64_t lanes[1024];
  std::vector<char> shared;
};

inline thread_local Block* tls_block = nullptr;
inline thread_local int tls_tid = 0;

inline void* DynamicShared() { return tls_block->shared.data(); }

inline void SetThread(int t, dim3 block, dim3 grid) {
  tls_tid = t;
  threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
  blockDim = block;
  gridDim = grid;
}

// The threads of a block are fibers (ucontext) on the launching thread: each
// runs until a barrier or its end, and a barrier opens when every live
// thread of its scope (block or warp) waits at it. Threads waiting at
// different barriers with none runnable would hang a GPU too: it aborts with
// a message. Under ASan and TSan the switches are announced to the sanitizer.
struct Fiber {
  ucontext_t ctx;
  enum State { kReady, kAtBlock, kAtWarp, kDone } state = kReady;
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;
};

inline constexpr size_t kFiberStackBytes = 256 << 10;

// Fiber stacks, kept for the process (allocating them per launch dominated).
inline char* FiberStack(int t) {
  static thread_local std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= t) stacks.emplace_back(new char[kFiberStackBytes]);
  return stacks[t].get();
}

struct FiberBlock {
  ucontext_t main;
  std::vector<Fiber> fibers;
  int current = 0;
  const std::function<void()>* body = nullptr;
  // The scheduler's stack and sanitizer state.
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  void* main_asan_fake_stack = nullptr;
  void* main_tsan_fiber = nullptr;
};

inline thread_local FiberBlock* tls_fibers = nullptr;

// Switches from the running context to `to` (a fiber's stack at `bottom`, or
// the scheduler's when bottom is null); `save` keeps this side's ASan fake
// stack (null: this side ends for good).
inline void SwitchTo(ucontext_t* from, ucontext_t* to, void** save, const void* bottom, size_t size,
                     void* tsan_target) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(tsan_target, 0);
#else
  (void)tsan_target;
#endif
  swapcontext(from, to);
#if defined(__SANITIZE_ADDRESS__)
  if (save != nullptr) __sanitizer_finish_switch_fiber(*save, nullptr, nullptr);
#endif
}

inline void Park(Fiber::State s) {
  FiberBlock& fb = *tls_fibers;
  Fiber& f = fb.fibers[fb.current];
  f.state = s;
  SwitchTo(&f.ctx, &fb.main, &f.asan_fake_stack, fb.main_bottom, fb.main_size, fb.main_tsan_fiber);
}
inline void BlockSync() { Park(Fiber::kAtBlock); }
inline void WarpSync() { Park(Fiber::kAtWarp); }

inline void FiberEntry() {
  FiberBlock& fb = *tls_fibers;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &fb.main_bottom, &fb.main_size);
#endif
  (*fb.body)();
  Fiber& f = fb.fibers[fb.current];
  f.state = Fiber::kDone;
  SwitchTo(&f.ctx, &fb.main, nullptr, fb.main_bottom, fb.main_size, fb.main_tsan_fiber);  // never resumed
}

// Runs body() on every thread of every block of the grid, one block at a time.
// (getcontext returns once here, makecontext replaces the context: no local
// is clobbered.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
template <typename Body>
void Run(dim3 grid, dim3 block, size_t shared_bytes, const Body& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) std::abort();
  Block b;
  b.shared.assign(shared_bytes + 16, 0);
  FiberBlock fb;
  const std::function<void()> fn = [&] { body(); };
  fb.body = &fn;
  fb.fibers.resize(n);
#if defined(__SANITIZE_THREAD__)
  fb.main_tsan_fiber = __tsan_get_current_fiber();
  for (Fiber& f : fb.fibers) f.tsan_fiber = __tsan_create_fiber(0);
#endif
  Block* const saved_block = tls_block;
  FiberBlock* const saved_fibers = tls_fibers;
  tls_block = &b;
  tls_fibers = &fb;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (int t = 0; t < n; ++t) {
          Fiber& f = fb.fibers[t];
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = FiberStack(t);
          f.ctx.uc_stack.ss_size = kFiberStackBytes;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, FiberEntry, 0);
          f.state = Fiber::kReady;
        }
        int live = n;
        while (live > 0) {
          bool ran = false;
          for (int t = 0; t < n; ++t) {
            if (fb.fibers[t].state != Fiber::kReady) continue;
            fb.current = t;
            SetThread(t, block, grid);
            SwitchTo(&fb.main, &fb.fibers[t].ctx, &fb.main_asan_fake_stack, FiberStack(t), kFiberStackBytes,
                     fb.fibers[t].tsan_fiber);
            ran = true;
            if (fb.fibers[t].state == Fiber::kDone) --live;
          }
          if (ran || live == 0) continue;
          // Everyone waits: open the block barrier, else the full warp barriers.
          int at_block = 0;
          for (const Fiber& f : fb.fibers) at_block += f.state == Fiber::kAtBlock;
          bool opened = false;
          if (at_block == live) {
            for (Fiber& f : fb.fibers) {
              if (f.state == Fiber::kAtBlock) f.state = Fiber::kReady;
            }
            opened = true;
          } else {
            for (int w = 0; w * 32 < n; ++w) {
              int at_warp = 0, alive = 0;
              for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t) {
                alive += fb.fibers[t].state != Fiber::kDone;
                at_warp += fb.fibers[t].state == Fiber::kAtWarp;
              }
              if (at_warp > 0 && at_warp == alive) {
                for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t) fb.fibers[t].state = Fiber::kReady;
                opened = true;
              }
            }
          }
          if (!opened) {
            std::fprintf(stderr, "cuda emulation: deadlock in block (%u, %u, %u): threads wait at different barriers\n",
                         bx, by, bz);
            std::abort();
          }
        }
      }
    }
  }
#if defined(__SANITIZE_THREAD__)
  for (Fiber& f : fb.fibers) __tsan_destroy_fiber(f.tsan_fiber);
#endif
  tls_block = saved_block;
  tls_fibers = saved_fibers;
}
#pragma GCC diagnostic pop

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

inline void __syncthreads() { kvtier::emu::BlockSync(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  using namespace kvtier::emu;
  static_assert(sizeof(T) <= 8);
  const int t = tls_tid, w = t / 32, lane = t % 32;
  tls_block->lanes[t] = ToBits(v);
  WarpSync();
  const T r = FromBits<T>(tls_block->lanes[w * 32 + (lane ^ lane_mask)]);
  WarpSync();
  return r;
}

namespace kvtier::emu {
// Every lane gets op over the warp's 32 values, reduced in lane order: what
// the kernels' shuffle butterflies compute, in one exchange instead of five.
template <typename T, typename Op>
T WarpAllReduce(T v, Op op) {
  const int t = tls_tid, w = t / 32;
  tls_block->lanes[t] = ToBits(v);
  WarpSync();
  T r = FromBits<T>(tls_block->lanes[w * 32]);
  for (int l = 1; l < 32; ++l) r = op(r, FromBits<T>(tls_block->lanes[w * 32 + l]));
  WarpSync();
  return r;
}
}  // namespace kvtier::emu

inline unsigned __ballot_sync(unsigned, int pred) {
  using namespace kvtier::emu;
  const int t = tls_tid, w = t / 32;
  tls_block->lanes[t] = pred != 0;
  WarpSync();
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (tls_block->lanes[w * 32 + l] != 0 ? 1u : 0u) << l;
  WarpSync();
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
