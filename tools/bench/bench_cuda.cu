// bench_cuda — the GPU paths of kvtier against the physical limits of the same
// GPU, measured in the same run. Prints markdown tables.
//
//   a  gather: a kernel copying N scattered blocks (4..16 KiB, random order)
//      of one device buffer into a contiguous one, against one device-to-device
//      cudaMemcpyAsync of the same bytes (goal: ratio >= 0.70);
//   b  recall host->device: scattered blocks of pinned host memory to the
//      device, by one cudaMemcpyAsync per block, by cudaMemcpyBatchAsync, and
//      by a zero-copy kernel reading mapped pinned memory, against one
//      contiguous pinned cudaMemcpyAsync of the same bytes (goal: >= 0.85);
//   c  fused decode attention through the CUDA backend (KernelSet::Attend):
//      kvtier (10% of T resident + a centroid sketch) against dense (all T
//      resident, no sketch) on the same kernel (goal: >= 3x at T = 128k);
//   d  a decode step with recalls in flight: host->device copies on one
//      stream while the backend's attention runs, overlap of the two;
//   e  the sketch kernels: SketchUpdate and SketchScores.
// c-e need the CUDA backend (CreateBackend(kCuda)); without it they are
// skipped with its status and a, b still run.
//
// Times are medians of --reps repetitions after warm-up, from cudaEvents.
// GB/s counts the bytes delivered once (not read + written). Exit status: 0,
// 1 on a CUDA error or a wrong result, 2 on bad flags, 77 when there is no
// CUDA device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvtier/backend.h"
#include "kvtier/kernels/kernel_set.h"
#include "kvtier/kernels/params.h"

// Every CUDA call goes through CK: on an error, file:line, the call and the
// error string, and exit 1.
#define CK(call)                                                                                      \
  do {                                                                                                \
    const cudaError_t ck_err_ = (call);                                                               \
    if (ck_err_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #call,                  \
                   cudaGetErrorString(ck_err_), cudaGetErrorName(ck_err_));                           \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)
// After a kernel launch.
#define CK_LAUNCH() CK(cudaGetLastError())
// absl::Status from the backend.
#define CK_STATUS(expr)                                                                               \
  do {                                                                                                \
    const absl::Status ck_st_ = (expr);                                                               \
    if (!ck_st_.ok()) {                                                                               \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, ck_st_.ToString().c_str()); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

namespace kvtier {
namespace {

constexpr int64_t kKiB = 1024, kMiB = 1024 * 1024;

struct Flags {
  int reps = 15;
  int warmup = 3;
  std::string parts = "abcde";
  int64_t gather_mib = 256;  // (a): far beyond the 60 MB L2
  int64_t recall_mib = 128;  // (b)
  bool quick = false;        // c-e on T = 32k only
};

void Usage() {
  std::printf(
      "bench_cuda: kvtier's GPU paths against the limits of the same GPU, measured in the same run.\n"
      "  a  scattered-block gather kernel vs one device-to-device memcpy     (goal >= 0.70)\n"
      "  b  host->device recall of scattered pinned blocks: per-block memcpy, cudaMemcpyBatchAsync,\n"
      "     zero-copy kernel vs one contiguous pinned memcpy                  (goal >= 0.85)\n"
      "  c  fused decode attention (backend Attend): kvtier 10%% + sketch vs dense (goal >= 3x at 128k)\n"
      "  d  decode step with host->device recalls in flight: overlap of copies and attention\n"
      "  e  SketchUpdate / SketchScores\n"
      "c-e need the CUDA backend of kvtier; without it they are skipped (a, b still run).\n"
      "Flags:\n"
      "  --parts=LETTERS   which parts to run (default abcde)\n"
      "  --reps=N          timed repetitions, medians reported (default 15, at least 10 advised)\n"
      "  --warmup=N        untimed repetitions first (default 3)\n"
      "  --gather-mib=N    bytes moved per gather in (a), MiB (default 256)\n"
      "  --recall-mib=N    bytes moved per recall in (b), MiB (default 128)\n"
      "  --quick           c-e at T = 32k only\n"
      "Exit status: 0 done, 1 CUDA error or wrong result, 2 bad flags, 77 no CUDA device.\n");
}

bool Parse(int argc, char** argv, Flags& f) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto num = [&](const char* name, auto& out) {
      const std::string prefix = std::string("--") + name + "=";
      if (a.rfind(prefix, 0) != 0) return false;
      char* end = nullptr;
      const long long v = std::strtoll(a.c_str() + prefix.size(), &end, 10);
      if (end == a.c_str() + prefix.size() || *end != '\0' || v <= 0) {
        std::fprintf(stderr, "bench_cuda: bad value in %s\n", a.c_str());
        std::exit(2);
      }
      out = static_cast<std::decay_t<decltype(out)>>(v);
      return true;
    };
    if (a == "--help" || a == "-h") {
      Usage();
      std::exit(0);
    }
    if (a == "--quick") {
      f.quick = true;
      continue;
    }
    if (a.rfind("--parts=", 0) == 0) {
      f.parts = a.substr(8);
      if (f.parts.empty() || f.parts.find_first_not_of("abcde") != std::string::npos) {
        std::fprintf(stderr, "bench_cuda: --parts takes letters of abcde\n");
        std::exit(2);
      }
      continue;
    }
    if (!num("reps", f.reps) && !num("warmup", f.warmup) && !num("gather-mib", f.gather_mib) &&
        !num("recall-mib", f.recall_mib)) {
      std::fprintf(stderr, "bench_cuda: unknown flag %s (see --help)\n", a.c_str());
      return false;
    }
  }
  return true;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double GBps(int64_t bytes, double ms) { return ms > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0; }

// ---- timing ----

// Median ms of f() on `stream`, events recorded on that stream around it.
double TimeOnStream(const Flags& fl, cudaStream_t stream, const std::function<void()>& f) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < fl.warmup; ++i) f();
  CK(cudaStreamSynchronize(stream));
  std::vector<double> ms;
  for (int r = 0; r < fl.reps; ++r) {
    CK(cudaEventRecord(a, stream));
    f();
    CK(cudaEventRecord(b, stream));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return Median(ms);
}

// Median ms of f() / inner when f submits work to streams this program does
// not see (the backend's): the device is idle at the first event, and the
// second is recorded once the whole device is idle again, so every stream's
// work falls between them (the host-side cost of the calls too).
double TimeDeviceSpan(const Flags& fl, int inner, const std::function<void()>& f) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < fl.warmup; ++i) f();
  CK(cudaDeviceSynchronize());
  std::vector<double> ms;
  for (int r = 0; r < fl.reps; ++r) {
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(a, nullptr));
    for (int i = 0; i < inner; ++i) f();
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(b, nullptr));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t / inner);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return Median(ms);
}

// ---- kernels ----

constexpr int kGatherThreads = 256;

// One CTA per block: block b of dst <- block order[b] of src, 16-byte
// accesses, every load of a thread issued before its first store. src may be
// device memory or mapped pinned host memory.
template <int kVecPerThread>
__global__ void __launch_bounds__(kGatherThreads) GatherBlocks(uint4* __restrict__ dst, const uint4* __restrict__ src,
                                                              const int32_t* __restrict__ order, int vecs_per_block) {
  const int64_t b = blockIdx.x;
  const uint4* s = src + static_cast<int64_t>(order[b]) * vecs_per_block;
  uint4* d = dst + b * vecs_per_block;
  uint4 r[kVecPerThread];
#pragma unroll
  for (int k = 0; k < kVecPerThread; ++k) {
    const int i = threadIdx.x + k * kGatherThreads;
    if (i < vecs_per_block) r[k] = s[i];
  }
#pragma unroll
  for (int k = 0; k < kVecPerThread; ++k) {
    const int i = threadIdx.x + k * kGatherThreads;
    if (i < vecs_per_block) d[i] = r[k];
  }
}

void LaunchGather(void* dst, const void* src, const int32_t* order_dev, int64_t nblocks, int64_t block_bytes,
                  cudaStream_t stream) {
  const int vecs = static_cast<int>(block_bytes / 16);
  const int per = (vecs + kGatherThreads - 1) / kGatherThreads;
  auto* d = static_cast<uint4*>(dst);
  auto* s = static_cast<const uint4*>(src);
  const dim3 grid(static_cast<unsigned>(nblocks));
  if (per <= 1) GatherBlocks<1><<<grid, kGatherThreads, 0, stream>>>(d, s, order_dev, vecs);
  else if (per <= 2) GatherBlocks<2><<<grid, kGatherThreads, 0, stream>>>(d, s, order_dev, vecs);
  else if (per <= 4) GatherBlocks<4><<<grid, kGatherThreads, 0, stream>>>(d, s, order_dev, vecs);
  else GatherBlocks<8><<<grid, kGatherThreads, 0, stream>>>(d, s, order_dev, vecs);
  CK_LAUNCH();
}

// Word w of the source pool holds w (mod 2^32); block b of the gathered
// buffer must hold the words of source block order[b].
__global__ void FillIota(uint32_t* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = static_cast<uint32_t>(i);
}

__global__ void CountGatherErrors(const uint32_t* dst, const int32_t* order, int64_t nblocks, int64_t words_per_block,
                                  unsigned long long* errors) {
  const int64_t n = nblocks * words_per_block;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / words_per_block, w = i % words_per_block;
    const uint32_t want = static_cast<uint32_t>(static_cast<int64_t>(order[b]) * words_per_block + w);
    if (dst[i] != want) atomicAdd(errors, 1ULL);
  }
}

__device__ __forceinline__ float UnitRandom(uint64_t i, uint32_t seed) {
  uint64_t x = i * 0x9E3779B97F4A7C15ULL + seed * 0xD1B54A32D192ED03ULL + 1;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 33;
  return static_cast<float>(x >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
}

// n 16-bit values in [-amp, amp), bf16 or fp16.
__global__ void FillRandom16(uint16_t* p, int64_t n, uint32_t seed, float amp, bool bf16) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = amp * UnitRandom(i, seed);
    p[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16(v)) : __half_as_ushort(__float2half(v));
  }
}

__global__ void FillRandomF32(float* p, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = lo + (hi - lo) * 0.5f * (UnitRandom(i, seed) + 1.0f);
}

constexpr dim3 kFillGrid(1024), kFillBlock(256);

// Exits unless dst holds the `n` blocks of `order_dev` (iota source): counts
// wrong words into `errors` (device) on `s` and waits for the count.
void CheckGather(const char* what, const void* dst, const int32_t* order_dev, int64_t n, int64_t block,
                 unsigned long long* errors, cudaStream_t s) {
  CK(cudaMemsetAsync(errors, 0, sizeof(*errors), s));
  CountGatherErrors<<<kFillGrid, kFillBlock, 0, s>>>(static_cast<const uint32_t*>(dst), order_dev, n, block / 4, errors);
  CK_LAUNCH();
  unsigned long long bad = 0;
  CK(cudaMemcpyAsync(&bad, errors, sizeof(bad), cudaMemcpyDeviceToHost, s));
  CK(cudaStreamSynchronize(s));
  if (bad) {
    std::fprintf(stderr, "bench_cuda: %s of %" PRId64 " KiB blocks wrote %llu wrong words\n", what, block / kKiB, bad);
    std::exit(1);
  }
}

// ---- device ----

struct Device {
  cudaDeviceProp prop{};
  int driver = 0, runtime = 0;
};

// 77 (the "skipped" status of test drivers) when there is no device.
Device OpenDeviceOrExit() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    std::printf("bench_cuda: no CUDA device (cudaGetDeviceCount: %s); nothing measured\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    std::exit(77);
  }
  Device d;
  CK(cudaSetDevice(0));
  CK(cudaGetDeviceProperties(&d.prop, 0));
  CK(cudaDriverGetVersion(&d.driver));
  CK(cudaRuntimeGetVersion(&d.runtime));
  return d;
}

const char* Verdict(double value, double goal) { return value >= goal ? "yes" : "NO"; }

// ---- (a) gather on the device ----

// n distinct block indices of [0, blocks) in random order, on the host and
// (cudaMalloc'd, the caller frees it) on the device.
std::vector<int32_t> RandomBlocks(std::mt19937_64& rng, int64_t blocks, int64_t n, int32_t** dev) {
  std::vector<int32_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  order.resize(n);
  CK(cudaMalloc(dev, n * sizeof(int32_t)));
  CK(cudaMemcpy(*dev, order.data(), n * sizeof(int32_t), cudaMemcpyHostToDevice));
  return order;
}

void PartGather(const Flags& fl) {
  const int64_t total = fl.gather_mib * kMiB;
  std::printf("\n## a. Device gather of scattered blocks vs one device-to-device memcpy (%" PRId64 " MiB)\n\n",
              fl.gather_mib);
  std::printf("| block | blocks | gather GB/s | memcpy GB/s | ratio | goal >= 0.70 |\n|---|---|---|---|---|---|\n");
  // A source pool of twice the bytes: the gathered blocks are a random half
  // of it, in random order.
  const int64_t pool = 2 * total;
  void *src = nullptr, *dst = nullptr;
  CK(cudaMalloc(&src, pool));
  CK(cudaMalloc(&dst, total));
  FillIota<<<kFillGrid, kFillBlock>>>(static_cast<uint32_t*>(src), pool / 4);
  CK_LAUNCH();
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  unsigned long long* errors = nullptr;
  CK(cudaMalloc(&errors, sizeof(*errors)));
  std::mt19937_64 rng(1);
  for (int64_t block : {4 * kKiB, 8 * kKiB, 16 * kKiB}) {
    const int64_t n = total / block;
    int32_t* order_dev = nullptr;
    const std::vector<int32_t> order = RandomBlocks(rng, pool / block, n, &order_dev);

    CK(cudaMemsetAsync(dst, 0xff, total, s));  // poisoned: the check sees only what the gather wrote
    const double gather_ms = TimeOnStream(fl, s, [&] { LaunchGather(dst, src, order_dev, n, block, s); });
    CheckGather("gather", dst, order_dev, n, block, errors, s);
    const double memcpy_ms =
        TimeOnStream(fl, s, [&] { CK(cudaMemcpyAsync(dst, src, total, cudaMemcpyDeviceToDevice, s)); });
    const double ratio = memcpy_ms / gather_ms;
    std::printf("| %" PRId64 " KiB | %" PRId64 " | %.1f | %.1f | %.2f | %s |\n", block / kKiB, n,
                GBps(total, gather_ms), GBps(total, memcpy_ms), ratio, Verdict(ratio, 0.70));
    CK(cudaFree(order_dev));
  }
  std::fflush(stdout);
  CK(cudaFree(errors));
  CK(cudaStreamDestroy(s));
  CK(cudaFree(src));
  CK(cudaFree(dst));
}

// ---- (b) recall host -> device ----

#if CUDART_VERSION >= 13000
constexpr bool kHaveBatch = true;
// cudaMemcpyBatchAsync (CUDA 13 signature): one call for every block, the
// sources read in stream order.
void BatchCopy(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t n, cudaStream_t s) {
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t first = 0;
  CK(cudaMemcpyBatchAsync(dsts, srcs, sizes, n, &attr, &first, 1, s));
}
#else
constexpr bool kHaveBatch = false;
void BatchCopy(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t n, cudaStream_t s) {
  for (size_t i = 0; i < n; ++i) CK(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyHostToDevice, s));
}
#endif

void PartRecall(const Flags& fl) {
  const int64_t total = fl.recall_mib * kMiB;
  const int64_t pool = 2 * total;
  std::printf("\n## b. Host->device recall of scattered pinned blocks vs one contiguous pinned memcpy (%" PRId64
              " MiB)\n\n",
              fl.recall_mib);
  std::printf("| block | blocks | memcpy/block GB/s | batch GB/s | zero-copy GB/s | contiguous GB/s | best | best ratio "
              "| goal >= 0.85 |\n|---|---|---|---|---|---|---|---|---|\n");
  void* host = nullptr;
  CK(cudaHostAlloc(&host, pool, cudaHostAllocMapped));
  {
    auto* w = static_cast<uint32_t*>(host);
    for (int64_t i = 0; i < pool / 4; ++i) w[i] = static_cast<uint32_t>(i);
  }
  void* host_dev = nullptr;
  CK(cudaHostGetDevicePointer(&host_dev, host, 0));
  void* dst = nullptr;
  CK(cudaMalloc(&dst, total));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  unsigned long long* errors = nullptr;
  CK(cudaMalloc(&errors, sizeof(*errors)));
  auto check = [&](const char* what, const int32_t* order_dev, int64_t n, int64_t block) {
    CheckGather(what, dst, order_dev, n, block, errors, s);
    CK(cudaMemsetAsync(dst, 0xff, total, s));
  };
  std::mt19937_64 rng(2);
  CK(cudaMemset(dst, 0xff, total));  // poisoned: every check sees only what the copy wrote
  for (int64_t block : {4 * kKiB, 8 * kKiB, 16 * kKiB}) {
    const int64_t n = total / block;
    int32_t* order_dev = nullptr;
    const std::vector<int32_t> order = RandomBlocks(rng, pool / block, n, &order_dev);
    std::vector<void*> dsts(n);
    std::vector<const void*> srcs(n);
    std::vector<size_t> sizes(n, block);
    for (int64_t i = 0; i < n; ++i) {
      dsts[i] = static_cast<char*>(dst) + i * block;
      srcs[i] = static_cast<const char*>(host) + int64_t(order[i]) * block;
    }
    const double per_ms = TimeOnStream(fl, s, [&] {
      for (int64_t i = 0; i < n; ++i) CK(cudaMemcpyAsync(dsts[i], srcs[i], block, cudaMemcpyHostToDevice, s));
    });
    check("per-block memcpy", order_dev, n, block);
    double batch_ms = 0;
    if (kHaveBatch) {
      batch_ms = TimeOnStream(fl, s, [&] { BatchCopy(dsts.data(), srcs.data(), sizes.data(), n, s); });
      check("cudaMemcpyBatchAsync", order_dev, n, block);
    }
    const double zc_ms = TimeOnStream(fl, s, [&] { LaunchGather(dst, host_dev, order_dev, n, block, s); });
    check("zero-copy gather", order_dev, n, block);
    const double contig_ms =
        TimeOnStream(fl, s, [&] { CK(cudaMemcpyAsync(dst, host, total, cudaMemcpyHostToDevice, s)); });
    CK(cudaMemsetAsync(dst, 0xff, total, s));
    const char* best = "memcpy/block";
    double best_ms = per_ms;
    if (kHaveBatch && batch_ms < best_ms) best = "batch", best_ms = batch_ms;
    if (zc_ms < best_ms) best = "zero-copy", best_ms = zc_ms;
    const double ratio = contig_ms / best_ms;
    char batch_col[32];
    if (kHaveBatch) std::snprintf(batch_col, sizeof batch_col, "%.1f", GBps(total, batch_ms));
    else std::snprintf(batch_col, sizeof batch_col, "n/a");
    std::printf("| %" PRId64 " KiB | %" PRId64 " | %.1f | %s | %.1f | %.1f | %s | %.2f | %s |\n", block / kKiB, n,
                GBps(total, per_ms), batch_col, GBps(total, zc_ms), GBps(total, contig_ms), best, ratio,
                Verdict(ratio, 0.85));
    CK(cudaFree(order_dev));
  }
  std::fflush(stdout);
  CK(cudaFree(errors));
  CK(cudaStreamDestroy(s));
  CK(cudaFree(dst));
  CK(cudaFreeHost(host));
}

// ---- (c)-(e) through the backend ----

constexpr int kHeadDim = 128, kGroup = 4, kKvHeads = 8;
constexpr int kSketchWidth = 256, kSketchBits = 8;  // centroid: width = 2^bits
// Bytes past which repeated calls no longer fit the 60 MB L2 several times
// over: input sets rotate until this many bytes are touched.
constexpr int64_t kRotateBytes = 512 * kMiB;

void* DevAlloc(Backend& b, int64_t bytes) {
  absl::StatusOr<void*> p = b.AllocateDevice(bytes);
  CK_STATUS(p.status());
  return *p;
}

// A decode step's worth of attention items for `seqs` sequences x 8 KV heads,
// `sets` copies so that repeated calls read memory the L2 does not hold.
struct AttendBatch {
  std::vector<std::vector<kernels::AttendParams>> sets;
  std::vector<std::vector<kernels::SlotRange>> ranges;  // per item of every set, [host]
  int64_t kv_bytes = 0;      // K/V bytes one call reads (resident slots)
  int64_t sketch_bytes = 0;  // sketch bytes one call reads
  void* out0 = nullptr;      // outputs of set 0, for the finite check
  int64_t out_elems = 0;
};

struct AttendArena {
  Backend* b = nullptr;
  char* kv = nullptr;  // K and V slots of every item and set
  int64_t kv_bytes = 0;
  char* small = nullptr;  // q, out, slot_probs, sketches
  int64_t small_bytes = 0;
  float* planes = nullptr;
};

// kvtier: capacity = 10% of T (4 sinks, a recent ring of a quarter of the
// budget, the rest candidate slots) and a centroid sketch of rows 1, width
// 256 holding the other 90%. dense: all T resident, no sketch.
AttendBatch MakeAttendBatch(AttendArena& ar, DType dtype, int64_t T, int seqs, bool kvtier_mode) {
  AttendBatch ab;
  const int items = seqs * kKvHeads;
  const int64_t cap = kvtier_mode ? std::max<int64_t>(T / 10, 8) : T;
  const int64_t row = kHeadDim * DTypeSize(dtype);
  const int64_t item_kv = 2 * cap * row;
  const int64_t sketch_floats = kernels::SketchStateFloats(1, kSketchWidth, kHeadDim);
  const int64_t item_small = 256 * (3 + (2 * kGroup * kHeadDim * 4 + cap * 4 + sketch_floats * 4) / 256 + 3);
  int sets = static_cast<int>(std::clamp<int64_t>((kRotateBytes + items * item_kv - 1) / (items * item_kv), 1, 64));
  sets = static_cast<int>(std::min<int64_t>(sets, ar.kv_bytes / (items * item_kv)));
  sets = static_cast<int>(std::min<int64_t>(sets, ar.small_bytes / (items * item_small)));
  if (sets < 1) {
    std::fprintf(stderr, "bench_cuda: attention arena too small\n");
    std::exit(1);
  }
  ab.kv_bytes = items * item_kv;
  ab.sketch_bytes = kvtier_mode ? items * 2LL * kSketchWidth * (kHeadDim + 1) * 4 : 0;
  const int64_t ring = cap / 4, sinks = 4;
  std::mt19937 rng(static_cast<uint32_t>(T + seqs));
  std::vector<float> counts(2 * kSketchWidth), totals(2 * kHeadDim + 2, 0.0f);
  for (int s = 0; s < sets; ++s) {
    std::vector<kernels::AttendParams> ps(items);
    for (int i = 0; i < items; ++i) {
      const int64_t idx = int64_t(s) * items + i;
      char* kvp = ar.kv + idx * item_kv;
      char* sp = ar.small + idx * item_small;
      kernels::AttendParams& p = ps[i];
      p.head_dim = kHeadDim;
      p.group = kGroup;
      p.dtype = dtype;
      p.out_dtype = dtype;
      p.scale = 1.0f / std::sqrt(float(kHeadDim));
      p.k_slots = kvp;
      p.v_slots = kvp + cap * row;
      p.q = sp;
      p.out = sp + 256 * ((kGroup * kHeadDim * 4 + 255) / 256);
      p.slot_probs = nullptr;
      std::vector<kernels::SlotRange> r;
      if (kvtier_mode) {
        r = {{0, int32_t(sinks)}, {int32_t(sinks), int32_t(ring)}, {int32_t(sinks + ring), int32_t(cap - sinks - ring)}};
        // The heavy-hitter scores the runtime asks for in this mode.
        p.slot_probs = reinterpret_cast<float*>(sp + 2 * 256 * ((kGroup * kHeadDim * 4 + 255) / 256));
        float* sk = reinterpret_cast<float*>(reinterpret_cast<char*>(p.slot_probs) + 256 * ((cap * 4 + 255) / 256));
        kernels::SketchState& st = p.sketch;
        st.kind = SketchKind::kCentroid;
        st.rows = 1;
        st.width = kSketchWidth;
        st.head_dim = kHeadDim;
        st.seed = static_cast<uint32_t>(i + 1);
        st.key_sums = sk;
        st.value_sums = sk + kSketchWidth * kHeadDim;
        st.counts = sk + 2 * kSketchWidth * kHeadDim;
        st.totals = st.counts + 2 * kSketchWidth;
        st.planes = ar.planes;
        // Sums of `count` keys/values of magnitude ~0.5: fill with values in
        // [-0.5, 0.5] times the bucket's count below, on the host for counts.
        FillRandomF32<<<kFillGrid, kFillBlock>>>(st.key_sums, 2LL * kSketchWidth * kHeadDim,
                                                 static_cast<uint32_t>(idx * 7 + 3), -4.0f, 4.0f);
        CK_LAUNCH();
        const double vague = double(T - cap);
        double sum = 0;
        for (int b = 0; b < kSketchWidth; ++b) {
          counts[2 * b] = std::floor(float(vague / kSketchWidth) * (0.25f + 1.5f * (rng() % 1000) / 1000.0f));
          counts[2 * b + 1] = 0;
          sum += counts[2 * b];
        }
        totals[2 * kHeadDim] = float(sum);
        CK(cudaMemcpy(st.counts, counts.data(), counts.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(st.totals, totals.data(), totals.size() * 4, cudaMemcpyHostToDevice));
        p.policy = VaguePolicy::kEstimate;
      } else {
        r = {{0, int32_t(cap)}};
        p.policy = VaguePolicy::kDrop;
      }
      FillRandom16<<<kFillGrid, kFillBlock>>>(static_cast<uint16_t*>(const_cast<void*>(p.q)), kGroup * kHeadDim,
                                              static_cast<uint32_t>(idx * 7 + 5), 1.0f, dtype == DType::kBF16);
      CK_LAUNCH();
      ab.ranges.push_back(std::move(r));
      p.ranges = ab.ranges.back().data();
      p.num_ranges = static_cast<int32_t>(ab.ranges.back().size());
    }
    ab.sets.push_back(std::move(ps));
  }
  // ranges moved into the vector may have relocated: point at the final storage.
  for (int s = 0, k = 0; s < sets; ++s)
    for (auto& p : ab.sets[s]) p.ranges = ab.ranges[k++].data();
  ab.out0 = ab.sets[0][0].out;
  ab.out_elems = int64_t(kGroup) * kHeadDim;
  CK(cudaDeviceSynchronize());
  return ab;
}

int64_t NonFiniteOutputs(Backend& b, const AttendBatch& ab, DType dtype) {
  int64_t bad = 0;
  for (const auto& set : ab.sets)
    for (const auto& p : set) bad += b.kernels().CountNonFinite(p.out, int64_t(kGroup) * kHeadDim, dtype);
  return bad;
}

struct AttendArenaOwner {
  AttendArena ar;
  explicit AttendArenaOwner(Backend& b, int64_t max_T) {
    ar.b = &b;
    // Dense at max_T for 4 sequences x 8 heads in bf16 is the largest single
    // call (2 GiB at 128k); the arena holds that plus room to rotate.
    ar.kv_bytes = std::max<int64_t>(4LL * kKvHeads * 2 * max_T * kHeadDim * 2, kRotateBytes) + kRotateBytes;
    ar.kv = static_cast<char*>(DevAlloc(b, ar.kv_bytes));
    ar.small_bytes = 256 * kMiB;
    ar.small = static_cast<char*>(DevAlloc(b, ar.small_bytes));
    ar.planes = static_cast<float*>(DevAlloc(b, int64_t(kSketchBits) * kHeadDim * 4));
    FillRandomF32<<<kFillGrid, kFillBlock>>>(ar.planes, int64_t(kSketchBits) * kHeadDim, 11, -1.0f, 1.0f);
    CK_LAUNCH();
  }
  void Fill(DType dtype) {
    FillRandom16<<<kFillGrid, kFillBlock>>>(reinterpret_cast<uint16_t*>(ar.kv), ar.kv_bytes / 2,
                                            dtype == DType::kBF16 ? 21 : 22, 1.0f, dtype == DType::kBF16);
    CK_LAUNCH();
    CK(cudaDeviceSynchronize());
  }
  ~AttendArenaOwner() {
    ar.b->FreeDevice(ar.kv);
    ar.b->FreeDevice(ar.small);
    ar.b->FreeDevice(ar.planes);
  }
};

// Median microseconds of one Attend call over a batch (sets rotating).
double TimeAttend(const Flags& fl, Backend& b, const AttendBatch& ab) {
  const int nsets = static_cast<int>(ab.sets.size());
  const int inner = std::max(nsets, 8);
  int next = 0;
  return 1e3 * TimeDeviceSpan(fl, inner, [&] {
           b.kernels().Attend(ab.sets[next]);
           next = (next + 1) % nsets;
         });
}

void PartAttend(const Flags& fl, Backend& b, AttendArenaOwner& arena) {
  std::printf("\n## c. Fused decode attention (backend %s): kvtier (10%% resident + centroid sketch) vs dense\n\n",
              std::string(b.name()).c_str());
  std::printf("8 KV heads x seqs, group %d, head_dim %d; kvtier writes slot_probs, dense does not. GB/s: K/V (and "
              "sketch) bytes read per call / time.\n\n",
              kGroup, kHeadDim);
  std::printf("| dtype | T | seqs | items | kvtier us | kvtier GB/s | dense us | dense GB/s | speedup | goal | finite |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n");
  std::vector<int64_t> Ts = {32 * 1024};
  if (!fl.quick) Ts.push_back(128 * 1024);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    arena.Fill(dtype);
    for (int64_t T : Ts) {
      for (int seqs : {1, 4}) {
        AttendBatch kv = MakeAttendBatch(arena.ar, dtype, T, seqs, true);
        const double kv_us = TimeAttend(fl, b, kv);
        const int64_t bad_kv = NonFiniteOutputs(b, kv, dtype);
        AttendBatch dense = MakeAttendBatch(arena.ar, dtype, T, seqs, false);
        const double dense_us = TimeAttend(fl, b, dense);
        const int64_t bad_dense = NonFiniteOutputs(b, dense, dtype);
        const double speedup = dense_us / kv_us;
        std::printf("| %s | %" PRId64 "k | %d | %d | %.1f | %.0f | %.1f | %.0f | %.2fx | %s | %s |\n",
                    std::string(DTypeName(dtype)).c_str(), T / 1024, seqs, seqs * kKvHeads, kv_us,
                    GBps(kv.kv_bytes + kv.sketch_bytes, kv_us * 1e-3), dense_us, GBps(dense.kv_bytes, dense_us * 1e-3),
                    speedup, T >= 128 * 1024 ? (speedup >= 3.0 ? ">= 3x: yes" : ">= 3x: NO") : "-",
                    bad_kv + bad_dense == 0 ? "yes" : "NO");
        std::fflush(stdout);
        if (bad_kv + bad_dense) {
          std::fprintf(stderr, "bench_cuda: attention wrote %" PRId64 " non-finite outputs\n", bad_kv + bad_dense);
          std::exit(1);
        }
      }
    }
  }
}

// (d) recall copies of ~5% of T per item (blocks of 16 tokens, K and V) from
// pinned memory on one stream while the backend runs kvtier attention.
void PartOverlap(const Flags& fl, Backend& b, AttendArenaOwner& arena) {
  const int64_t T = fl.quick ? 32 * 1024 : 128 * 1024;
  const int seqs = 4, items = seqs * kKvHeads;
  const DType dtype = DType::kBF16;
  arena.Fill(dtype);
  AttendBatch ab = MakeAttendBatch(arena.ar, dtype, T, seqs, true);
  const int64_t block = 16 * kHeadDim * DTypeSize(dtype);  // 16 tokens of K (or V): 4 KiB
  const int64_t blocks_per_item = 2 * ((T / 20 + 15) / 16);  // K and V
  const int64_t n = items * blocks_per_item, bytes = n * block;
  absl::StatusOr<void*> host_or = b.AllocateHost(4 * bytes);
  CK_STATUS(host_or.status());
  char* host = static_cast<char*>(*host_or);
  std::memset(host, 0x3c, 4 * bytes);
  char* dst = static_cast<char*>(DevAlloc(b, bytes));
  std::mt19937_64 rng(4);
  std::vector<int64_t> order(4 * n);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<void*> dsts(n);
  std::vector<const void*> srcs(n);
  std::vector<size_t> sizes(n, block);
  for (int64_t i = 0; i < n; ++i) {
    dsts[i] = dst + i * block;
    srcs[i] = host + order[i] * block;
  }
  cudaStream_t a;
  CK(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
  const int nsets = static_cast<int>(ab.sets.size());
  int next = 0;
  auto attend = [&] {
    b.kernels().Attend(ab.sets[next]);
    next = (next + 1) % nsets;
  };
  auto copies = [&] { BatchCopy(dsts.data(), srcs.data(), sizes.data(), n, a); };
  absl::StatusOr<std::unique_ptr<Stream>> bs = b.CreateStream();
  CK_STATUS(bs.status());
  auto backend_copies = [&] {
    for (int64_t i = 0; i < n; ++i)
      CK_STATUS(b.Copy(dsts[i], srcs[i], block, CopyKind::kHostToDevice, bs->get()));
  };
  // One step per span: the span's own cost (two device synchronizations)
  // would count once in each of t_copies, t_attend and t_both and inflate the
  // overlap, so it is measured empty and taken off.
  const double t_empty = TimeDeviceSpan(fl, 1, [] {});
  auto step = [&](const std::function<void()>& f) { return std::max(TimeDeviceSpan(fl, 1, f) - t_empty, 1e-6); };
  const double t_attend = step(attend);
  const double t_copy = step(copies);
  const double t_both = step([&] { copies(), attend(); });
  const double t_bcopy = step(backend_copies);
  const double t_bboth = step([&] { backend_copies(), attend(); });
  auto overlap = [](double ta, double tb, double both) { return (ta + tb - both) / std::min(ta, tb); };
  std::printf("\n## d. Decode step with recalls in flight (bf16, T = %" PRId64 "k, %d items, %" PRId64
              " blocks of %" PRId64 " KiB = %.1f MiB, ~5%% of T per item)\n\n",
              T / 1024, items, n, block / kKiB, double(bytes) / kMiB);
  std::printf("overlap = (t_copies + t_attend - t_both) / min(t_copies, t_attend): 1 = fully hidden, 0 = serial. "
              "Times exclude the %.1f us an empty timed span takes.\n\n",
              t_empty * 1e3);
  std::printf("| copies | t_copies us | copy GB/s | t_attend us | t_both us | overlap |\n|---|---|---|---|---|---|\n");
  std::printf("| %s, raw stream | %.1f | %.1f | %.1f | %.1f | %.2f |\n",
              kHaveBatch ? "cudaMemcpyBatchAsync" : "cudaMemcpyAsync/block", t_copy * 1e3, GBps(bytes, t_copy),
              t_attend * 1e3, t_both * 1e3, overlap(t_copy, t_attend, t_both));
  std::printf("| Backend::Copy/block, backend Stream | %.1f | %.1f | %.1f | %.1f | %.2f |\n", t_bcopy * 1e3,
              GBps(bytes, t_bcopy), t_attend * 1e3, t_bboth * 1e3, overlap(t_bcopy, t_attend, t_bboth));
  std::fflush(stdout);
  CK_STATUS((*bs)->Synchronize());
  bs->reset();
  CK(cudaStreamDestroy(a));
  b.FreeDevice(dst);
  b.FreeHost(host);
}

// (e) SketchUpdate: 512 tokens into the centroid sketch of each of 32 items;
// SketchScores: 4096 sketched tokens of one item per call.
void PartSketch(const Flags& fl, Backend& b) {
  const int items = 32, n = 512, nscore = 4096;
  const DType dtype = DType::kBF16;
  const int64_t sketch_floats = kernels::SketchStateFloats(1, kSketchWidth, kHeadDim);
  float* sk = static_cast<float*>(DevAlloc(b, items * sketch_floats * 4));
  CK(cudaMemset(sk, 0, items * sketch_floats * 4));
  float* planes = static_cast<float*>(DevAlloc(b, int64_t(kSketchBits) * kHeadDim * 4));
  FillRandomF32<<<kFillGrid, kFillBlock>>>(planes, int64_t(kSketchBits) * kHeadDim, 31, -1.0f, 1.0f);
  CK_LAUNCH();
  const int64_t kv_elems = int64_t(items) * n * kHeadDim;
  auto* keys = static_cast<uint16_t*>(DevAlloc(b, 2 * kv_elems * 2));
  FillRandom16<<<kFillGrid, kFillBlock>>>(keys, 2 * kv_elems, 32, 1.0f, true);
  CK_LAUNCH();
  auto* q = static_cast<uint16_t*>(DevAlloc(b, kGroup * kHeadDim * 2));
  FillRandom16<<<kFillGrid, kFillBlock>>>(q, kGroup * kHeadDim, 33, 1.0f, true);
  CK_LAUNCH();
  CK(cudaDeviceSynchronize());
  std::vector<uint32_t> ids(n), buckets(size_t(items) * n);
  std::iota(ids.begin(), ids.end(), 100000u);
  std::vector<kernels::SketchUpdateParams> ups(items);
  for (int i = 0; i < items; ++i) {
    kernels::SketchUpdateParams& u = ups[i];
    kernels::SketchState& st = u.sketch;
    st.kind = SketchKind::kCentroid;
    st.rows = 1;
    st.width = kSketchWidth;
    st.head_dim = kHeadDim;
    st.seed = static_cast<uint32_t>(i + 1);
    st.key_sums = sk + i * sketch_floats;
    st.value_sums = st.key_sums + kSketchWidth * kHeadDim;
    st.counts = st.value_sums + kSketchWidth * kHeadDim;
    st.totals = st.counts + 2 * kSketchWidth;
    st.planes = planes;
    u.sign = 1.0f;
    u.n = n;
    u.ids = ids.data();
    u.keys = keys + int64_t(i) * n * kHeadDim;
    u.values = keys + kv_elems + int64_t(i) * n * kHeadDim;
    u.stride = kHeadDim;
    u.dtype = dtype;
    u.buckets = buckets.data() + size_t(i) * n;
  }
  // Insert then remove the same tokens: the sketch returns to where it was,
  // so every repetition sees the same state.
  std::vector<kernels::SketchUpdateParams> removes = ups;
  for (auto& u : removes) u.sign = -1.0f;
  const double t_insert = TimeDeviceSpan(fl, 1, [&] {
    b.kernels().SketchUpdate(ups);
    b.kernels().SketchUpdate(removes);
  });
  // Leave one insert in place for the scores.
  b.kernels().SketchUpdate(ups);
  std::vector<uint32_t> sids(nscore), sbuckets(nscore);
  std::vector<float> scores(nscore);
  std::mt19937 rng(5);
  // Tokens of buckets the inserts filled (an empty bucket has no estimate).
  for (int i = 0; i < nscore; ++i) sids[i] = i, sbuckets[i] = buckets[rng() % n];
  kernels::SketchScoreParams sp;
  sp.sketch = ups[0].sketch;
  sp.policy = VaguePolicy::kEstimate;
  sp.group = kGroup;
  sp.dtype = dtype;
  sp.scale = 1.0f / std::sqrt(float(kHeadDim));
  sp.q = q;
  sp.n = nscore;
  sp.ids = sids.data();
  sp.buckets = sbuckets.data();
  sp.scores = scores.data();
  const double t_scores = TimeDeviceSpan(fl, 4, [&] { b.kernels().SketchScores({&sp, 1}); });
  int64_t nonfinite = 0;
  for (float s : scores) nonfinite += !std::isfinite(s);
  std::printf("\n## e. Sketch kernels (centroid, rows 1, width %d, head_dim %d, bf16)\n\n", kSketchWidth, kHeadDim);
  std::printf("| kernel | work per call | us per call | finite |\n|---|---|---|---|\n");
  std::printf("| SketchUpdate insert + remove | %d items x %d tokens, each way | %.1f | - |\n", items, n, t_insert * 1e3);
  std::printf("| SketchScores | 1 item x %d tokens, group %d | %.1f | %s |\n", nscore, kGroup, t_scores * 1e3,
              nonfinite ? "NO" : "yes");
  std::fflush(stdout);
  b.FreeDevice(sk);
  b.FreeDevice(planes);
  b.FreeDevice(keys);
  b.FreeDevice(q);
  if (nonfinite) {
    std::fprintf(stderr, "bench_cuda: SketchScores wrote %" PRId64 " non-finite scores\n", nonfinite);
    std::exit(1);
  }
}

int Main(int argc, char** argv) {
  Flags fl;
  if (!Parse(argc, argv, fl)) return 2;
  const Device dev = OpenDeviceOrExit();
  std::printf("# bench_cuda\n\n");
  std::printf("device 0: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MiB; driver %d.%d, runtime %d.%d; reps %d (medians), "
              "warm-up %d\n",
              dev.prop.name, dev.prop.major, dev.prop.minor, dev.prop.multiProcessorCount,
              double(dev.prop.totalGlobalMem) / (1024.0 * kMiB), double(dev.prop.l2CacheSize) / kMiB,
              dev.driver / 1000, (dev.driver % 1000) / 10, dev.runtime / 1000, (dev.runtime % 1000) / 10, fl.reps,
              fl.warmup);
  std::fflush(stdout);
  auto want = [&](char c) { return fl.parts.find(c) != std::string::npos; };
  if (want('a')) PartGather(fl);
  if (want('b')) PartRecall(fl);
  if (want('c') || want('d') || want('e')) {
    absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(BackendKind::kCuda);
    if (!backend.ok()) {
      std::printf("\n## c-e skipped\n\nCreateBackend(kCuda): %s\n", backend.status().ToString().c_str());
      return 0;
    }
    Backend& b = **backend;
    {
      AttendArenaOwner arena(b, fl.quick ? 32 * 1024 : 128 * 1024);
      if (want('c')) PartAttend(fl, b, arena);
      if (want('d')) PartOverlap(fl, b, arena);
    }
    if (want('e')) PartSketch(fl, b);
    CK(cudaDeviceSynchronize());
  }
  return 0;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) { return kvtier::Main(argc, argv); }
