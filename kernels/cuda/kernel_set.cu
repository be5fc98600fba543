// CudaKernelSet (cuda_kernel_set.h): the sketch, bound, copy and check
// kernels, and the driver of every call: pack the [host] plan arrays into one
// pinned upload, launch on the set's stream, bring [host] outputs back, wait
// for the stream (never for the whole device).
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "attend.h"
#include "cuda_kernel_set.h"
#include "device_math.cuh"
#include "kvtier/kernels/hash.h"

namespace kvtier::kernels {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// ---- Sketch updates: a block per item, tokens in order (as the CPU does, so
// emptied buckets are cleared at the same moments), threads across head_dim.

__device__ float TokenElem(const SketchUpdateParams& p, const void* base, int i, int j) {
  const int64_t row = p.rows_index != nullptr ? p.rows_index[i] : i;
  return LoadAny(base, p.dtype, row * p.stride + j);
}

// totals += sign * (k, v), count += sign; cleared exactly when empty.
__device__ void UpdateTotals(const SketchUpdateParams& p, int i, float sign, int* flag) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    s.totals[j] = fmaf(sign, TokenElem(p, p.keys, i, j), s.totals[j]);
    s.totals[d + j] = fmaf(sign, TokenElem(p, p.values, i, j), s.totals[d + j]);
  }
  if (threadIdx.x == 0) {
    s.totals[2 * d] += sign;
    *flag = s.totals[2 * d] <= 0.5f;
  }
  __syncthreads();
  if (*flag) {
    for (int j = threadIdx.x; j < 2 * d + 2; j += blockDim.x) s.totals[j] = 0.0f;
  }
  __syncthreads();
}

// Adds a * (k, v) of token i to bucket bb and `count_delta` to its count
// `slot` (0 or 1); clears the bucket when its counts reach zero.
__device__ void UpdateBucket(const SketchUpdateParams& p, int i, int64_t bb, float a, int slot, float count_delta,
                             int* flag) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    s.key_sums[bb * d + j] = fmaf(a, TokenElem(p, p.keys, i, j), s.key_sums[bb * d + j]);
    s.value_sums[bb * d + j] = fmaf(a, TokenElem(p, p.values, i, j), s.value_sums[bb * d + j]);
  }
  if (threadIdx.x == 0) {
    s.counts[2 * bb + slot] += count_delta;
    *flag = s.counts[2 * bb] + s.counts[2 * bb + 1] <= 0.5f;
  }
  __syncthreads();
  if (*flag) {
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
      s.key_sums[bb * d + j] = 0.0f;
      s.value_sums[bb * d + j] = 0.0f;
    }
    if (threadIdx.x == 0) s.counts[2 * bb] = s.counts[2 * bb + 1] = 0.0f;
  }
  __syncthreads();
}

__global__ void SketchUpdateKernel(const SketchUpdateParams* items) {
  const SketchUpdateParams& p = items[blockIdx.x];
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  __shared__ int flag;
  __shared__ float x[kMaxHeadDim];
  __shared__ uint32_t code;
  if (p.n <= 0) return;
  if (s.kind == SketchKind::kCountSketch) {
    for (int i = 0; i < p.n; ++i) {
      UpdateTotals(p, i, p.sign, &flag);
      for (int r = 0; r < s.rows; ++r) {
        const uint32_t h = TokenHash(RowSeed(s.seed, r), p.ids[i]);
        const float sg = Sign(h);
        UpdateBucket(p, i, static_cast<int64_t>(r) * s.width + Bucket(h, s.width), p.sign * sg, sg < 0 ? 1 : 0,
                     p.sign, &flag);
      }
    }
    return;
  }
  if (s.kind != SketchKind::kCentroid) return;
  const int bits = __ffs(s.width) - 1;
  // Inserted keys hash around the mean that includes their own batch.
  if (p.sign > 0) {
    for (int i = 0; i < p.n; ++i) UpdateTotals(p, i, 1.0f, &flag);
  }
  const float inv_n = s.totals[2 * d] > 0.5f ? 1.0f / s.totals[2 * d] : 0.0f;
  const int lane = threadIdx.x % kWarp;
  for (int i = 0; i < p.n; ++i) {
    if (p.sign > 0) {
      for (int j = threadIdx.x; j < d; j += blockDim.x) x[j] = fmaf(-s.totals[j], inv_n, TokenElem(p, p.keys, i, j));
      __syncthreads();
    } else {
      UpdateTotals(p, i, -1.0f, &flag);
    }
    for (int r = 0; r < s.rows; ++r) {
      if (p.sign > 0) {
        // SimHash: lane j of the first warp takes plane j, summing in the CPU's order.
        if (threadIdx.x < kWarp) {
          float dot = 0.0f;
          if (lane < bits) {
            const float* plane = s.planes + (static_cast<int64_t>(r) * bits + lane) * d;
            for (int t = 0; t < d; ++t) dot = fmaf(plane[t], x[t], dot);
          }
          const uint32_t c = __ballot_sync(0xffffffffu, lane < bits && dot >= 0.0f);
          if (lane == 0) {
            code = c;
            p.buckets[static_cast<int64_t>(i) * s.rows + r] = c;
          }
        }
        __syncthreads();
      } else if (threadIdx.x == 0) {
        code = p.buckets[static_cast<int64_t>(i) * s.rows + r];
      }
      __syncthreads();
      UpdateBucket(p, i, static_cast<int64_t>(r) * s.width + code, p.sign, 0, p.sign, &flag);
    }
  }
}

// ---- Per-token reconstruction: a block per token.
__global__ void SketchEstimateKernel(SketchEstimateParams p) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  const int i = blockIdx.x;
  const float n = s.totals[2 * d];
  const float inv = n > 0.5f ? 1.0f / n : 0.0f;
  float alpha = 1.0f;
  if (s.kind == SketchKind::kCountSketch && p.policy == VaguePolicy::kShrink) {
    const float cells = static_cast<float>(s.rows) * static_cast<float>(s.width);
    alpha = cells / (cells + fmaxf((n > 0.5f ? n : 0.0f) - 1.0f, 0.0f));
  }
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float mu_k = s.totals[j] * inv, mu_v = s.totals[d + j] * inv;
    float k = 0.0f, v = 0.0f;
    for (int r = 0; r < s.rows; ++r) {
      if (s.kind == SketchKind::kCountSketch) {
        const uint32_t h = TokenHash(RowSeed(s.seed, r), p.ids[i]);
        const int64_t bb = static_cast<int64_t>(r) * s.width + Bucket(h, s.width);
        const float sigma = s.counts[2 * bb] - s.counts[2 * bb + 1];
        const float c = alpha * Sign(h) / s.rows;
        k += c * (s.key_sums[bb * d + j] - sigma * mu_k);
        v += c * (s.value_sums[bb * d + j] - sigma * mu_v);
      } else {
        const int64_t bb = static_cast<int64_t>(r) * s.width + p.buckets[static_cast<int64_t>(i) * s.rows + r];
        const float cnt = s.counts[2 * bb];
        const float c = cnt > 0.5f ? 1.0f / (cnt * s.rows) : 0.0f;
        k = fmaf(c, s.key_sums[bb * d + j], k);
        v = fmaf(c, s.value_sums[bb * d + j], v);
      }
    }
    if (s.kind == SketchKind::kCountSketch) {
      k += mu_k;
      v += mu_v;
    }
    p.keys[static_cast<int64_t>(i) * d + j] = k;
    p.values[static_cast<int64_t>(i) * d + j] = v;
  }
}

// ---- Recall scores: projections per bucket (a warp each), then a thread per token.
__global__ void ScoreProjKernel(SketchScoreParams p, float* proj, float* qmu_out) {
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t B = static_cast<int64_t>(s.rows) * s.width;
  const float n = s.totals[2 * d];
  const float inv = n > 0.5f ? 1.0f / n : 0.0f;
  for (int g = 0; g < p.group; ++g) {
    float qm = 0.0f;
    for (int j = lane; j < d; j += kWarp) qm = fmaf(LoadAny(p.q, p.dtype, static_cast<int64_t>(g) * d + j) * p.scale,
                                                     s.totals[j] * inv, qm);
    qm = WarpSum(qm);
    if (warp == 0 && lane == 0) qmu_out[g] = qm;
    for (int64_t bb = warp; bb < B; bb += warps) {
      float dot = 0.0f;
      for (int j = lane; j < d; j += kWarp) {
        dot = fmaf(LoadAny(p.q, p.dtype, static_cast<int64_t>(g) * d + j) * p.scale, s.key_sums[bb * d + j], dot);
      }
      dot = WarpSum(dot);
      const float c0 = s.counts[2 * bb], c1 = s.counts[2 * bb + 1];
      if (lane == 0) {
        proj[g * B + bb] = s.kind == SketchKind::kCountSketch ? dot - (c0 - c1) * qm : (c0 > 0.5f ? dot / c0 : 0.0f);
      }
    }
  }
}

__global__ void ScoreTokensKernel(SketchScoreParams p, const float* proj, const float* qmu, float* scores) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const SketchState& s = p.sketch;
  const int d = s.head_dim;
  const int64_t B = static_cast<int64_t>(s.rows) * s.width;
  const float n = s.totals[2 * d];
  float alpha = 1.0f;
  if (s.kind == SketchKind::kCountSketch && p.policy == VaguePolicy::kShrink) {
    const float cells = static_cast<float>(s.rows) * static_cast<float>(s.width);
    alpha = cells / (cells + fmaxf((n > 0.5f ? n : 0.0f) - 1.0f, 0.0f));
  }
  const float coef = alpha / s.rows;
  float best = -INFINITY;
  for (int g = 0; g < p.group; ++g) {
    float acc = 0.0f;
    for (int r = 0; r < s.rows; ++r) {
      if (s.kind == SketchKind::kCountSketch) {
        const uint32_t h = TokenHash(RowSeed(s.seed, r), p.ids[i]);
        acc += Sign(h) * proj[g * B + static_cast<int64_t>(r) * s.width + Bucket(h, s.width)];
      } else {
        acc += proj[g * B + static_cast<int64_t>(r) * s.width + p.buckets[static_cast<int64_t>(i) * s.rows + r]];
      }
    }
    best = fmaxf(best, s.kind == SketchKind::kCountSketch ? qmu[g] + coef * acc : acc / s.rows);
  }
  scores[i] = best;
}

// ---- Key-bound scores: a warp per group of tokens.
__global__ void BoundScoresKernel(BoundScoreParams p, float* scores) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (i >= p.n) return;
  const int d = p.head_dim;
  float best = -INFINITY;
  for (int g = 0; g < p.group; ++g) {
    float s = 0.0f;
    for (int j = lane; j < d; j += kWarp) {
      const float q = LoadAny(p.q, p.dtype, static_cast<int64_t>(g) * d + j);
      s += fmaxf(q * LoadAny(p.bounds, p.dtype, 2 * i * d + j), q * LoadAny(p.bounds, p.dtype, (2 * i + 1) * d + j));
    }
    best = fmaxf(best, WarpSum(s));
  }
  if (lane == 0) scores[i] = p.scale * best;
}

// ---- Row copies: a block per (row, item).
__global__ void CopyRowsKernel(const RowCopyParams* items) {
  const RowCopyParams& c = items[blockIdx.y];
  const int r = blockIdx.x;
  if (r >= c.n) return;
  char* dst = static_cast<char*>(c.dst) + c.dst_rows[r] * c.dst_stride;
  const char* src = static_cast<const char*>(c.src) + c.src_rows[r] * c.src_stride;
  const bool wide = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15u) == 0;
  int64_t done = 0;
  if (wide) {
    const int64_t words = c.row_bytes / 16;
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
      reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<const uint4*>(src)[w];
    }
    done = words * 16;
  }
  for (int64_t b = done + threadIdx.x; b < c.row_bytes; b += blockDim.x) dst[b] = src[b];
}

// ---- NaN/Inf count: exponent all ones.
__global__ void CountNonFiniteKernel(const void* data, int64_t n, DType dtype, unsigned long long* out) {
  unsigned long long bad = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (dtype == DType::kF32) {
      bad += (static_cast<const uint32_t*>(data)[i] & 0x7f800000u) == 0x7f800000u;
    } else {
      const uint16_t u = static_cast<const uint16_t*>(data)[i];
      bad += dtype == DType::kF16 ? (u & 0x7c00u) == 0x7c00u : (u & 0x7f80u) == 0x7f80u;
    }
  }
  for (int o = kWarp / 2; o > 0; o >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, o);
  if (threadIdx.x % kWarp == 0 && bad != 0) atomicAdd(out, bad);
}

// ---- The driver.

int64_t Align(int64_t x) { return (x + 255) / 256 * 256; }

// Offsets of the pieces of one call's upload, in bytes.
class Layout {
 public:
  int64_t Add(int64_t bytes) {
    const int64_t at = size_;
    size_ = Align(size_ + std::max<int64_t>(bytes, 0));
    return at;
  }
  int64_t size() const { return size_; }

 private:
  int64_t size_ = 0;
};

class CudaKernelSet final : public KernelSet {
 public:
  CudaKernelSet(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~CudaKernelSet() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaFree(dev_);
    cudaFreeHost(pinned_);
    cudaStreamDestroy(stream_);
  }

  std::string_view name() const override { return "cuda"; }

  absl::Status Supports(int head_dim, int group) const override {
    if (head_dim < 1 || head_dim > kMaxHeadDim) {
      return absl::InvalidArgumentError(
          absl::StrFormat("the CUDA kernels take head_dim 1..%d, not %d", kMaxHeadDim, head_dim));
    }
    if (group < 1 || group > kMaxGroup) {
      return absl::InvalidArgumentError(
          absl::StrFormat("the CUDA kernels take 1..%d query heads per KV head, not %d", kMaxGroup, group));
    }
    return absl::OkStatus();
  }

  absl::Status error() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }

  void Attend(std::span<const AttendParams> items) override {
    if (items.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (!Begin()) return;
    const int n_items = static_cast<int>(items.size());
    // Plan: per item its resident count, splits and scratch offsets.
    std::vector<AttendItemDev>& dev = attend_items_;
    dev.assign(items.size(), AttendItemDev{});
    int64_t total_ranges = 0, logits = 0, parts = 0, sketch = 0;
    int max_splits = 0, max_tiles = 0, max_group = 1;
    uint32_t present = 0;
    for (int i = 0; i < n_items; ++i) {
      const AttendParams& p = items[i];
      AttendItemDev& d = dev[i];
      d.p = p;
      for (int r = 0; r < p.num_ranges; ++r) d.n_res += p.ranges[r].count;
      d.splits = static_cast<int32_t>((d.n_res + kAttendChunk - 1) / kAttendChunk);
      d.tiles = (p.group + kGroupTile - 1) / kGroupTile;
      d.variant = AttendVariant(p.dtype, p.head_dim);
      d.logit_base = logits;
      d.part_base = parts;
      d.sketch_base = sketch;
      logits += static_cast<int64_t>(p.group) * d.n_res;
      parts += static_cast<int64_t>(d.tiles) * (d.splits + 1) * PartFloats(p.head_dim);
      sketch += SketchScratchFloats(p, d.tiles);
      total_ranges += p.num_ranges;
      max_splits = std::max(max_splits, d.splits);
      max_tiles = std::max(max_tiles, d.tiles);
      max_group = std::max(max_group, p.group);
      present |= 1u << d.variant;
    }
    Layout up;
    const int64_t at_items = up.Add(sizeof(AttendItemDev) * n_items);
    const int64_t at_ranges = up.Add(sizeof(SlotRange) * total_ranges);
    Layout scratch = up;
    const int64_t at_logits = scratch.Add(4 * logits);
    const int64_t at_parts = scratch.Add(4 * parts);
    const int64_t at_sketch = scratch.Add(4 * sketch);
    if (!Reserve(scratch.size(), up.size())) return;
    // Pack the ranges (the items point at their device copies), then the items.
    int64_t r_off = 0;
    for (int i = 0; i < n_items; ++i) {
      const AttendParams& p = items[i];
      if (p.num_ranges > 0) {
        std::memcpy(pinned_ + at_ranges + r_off * sizeof(SlotRange), p.ranges, sizeof(SlotRange) * p.num_ranges);
      }
      dev[i].p.ranges = reinterpret_cast<const SlotRange*>(dev_ + at_ranges) + r_off;
      r_off += p.num_ranges;
    }
    std::memcpy(pinned_ + at_items, dev.data(), sizeof(AttendItemDev) * n_items);
    if (!Check(cudaMemcpyAsync(dev_, pinned_, up.size(), cudaMemcpyHostToDevice, stream_), "attend: upload")) return;
    const auto* items_dev = reinterpret_cast<const AttendItemDev*>(dev_ + at_items);
    // Grids have at most 65535 items in y: launch in slices.
    for (int first = 0; first < n_items; first += 65535) {
      const int count = std::min(65535, n_items - first);
      if (!Check(LaunchAttend(items_dev + first, count, max_splits, max_tiles, max_group, present,
                              reinterpret_cast<float*>(dev_ + at_logits), reinterpret_cast<float*>(dev_ + at_parts),
                              reinterpret_cast<float*>(dev_ + at_sketch), stream_),
                 "attend")) {
        return;
      }
    }
    Finish("attend");
  }

  void SketchUpdate(std::span<const SketchUpdateParams> items) override {
    if (items.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (!Begin()) return;
    const int n_items = static_cast<int>(items.size());
    Layout up;
    const int64_t at_items = up.Add(sizeof(SketchUpdateParams) * n_items);
    std::vector<int64_t> at_ids(n_items, -1), at_rows(n_items, -1), at_buckets(n_items, -1);
    for (int i = 0; i < n_items; ++i) {
      const SketchUpdateParams& p = items[i];
      if (p.n <= 0) continue;
      if (p.ids != nullptr) at_ids[i] = up.Add(4LL * p.n);
      if (p.rows_index != nullptr) at_rows[i] = up.Add(4LL * p.n);
      if (p.buckets != nullptr) at_buckets[i] = up.Add(4LL * p.n * p.sketch.rows);
    }
    if (!Reserve(up.size(), up.size())) return;
    std::vector<SketchUpdateParams>& dev = update_items_;
    dev.assign(items.begin(), items.end());
    for (int i = 0; i < n_items; ++i) {
      const SketchUpdateParams& p = items[i];
      if (at_ids[i] >= 0) dev[i].ids = Stage<uint32_t>(at_ids[i], p.ids, p.n);
      if (at_rows[i] >= 0) dev[i].rows_index = Stage<int32_t>(at_rows[i], p.rows_index, p.n);
      if (at_buckets[i] >= 0) dev[i].buckets = Stage<uint32_t>(at_buckets[i], p.buckets, int64_t{p.n} * p.sketch.rows);
    }
    std::memcpy(pinned_ + at_items, dev.data(), sizeof(SketchUpdateParams) * n_items);
    if (!Check(cudaMemcpyAsync(dev_, pinned_, up.size(), cudaMemcpyHostToDevice, stream_), "sketch update: upload"))
      return;
    KVTIER_LAUNCH(n_items, kThreads, 0, stream_, SketchUpdateKernel)
    (reinterpret_cast<const SketchUpdateParams*>(dev_ + at_items));
    if (!Check(cudaGetLastError(), "sketch update")) return;
    // Buckets written on insert come back to the host.
    for (int i = 0; i < n_items; ++i) {
      if (at_buckets[i] >= 0 && items[i].sign > 0) {
        const int64_t bytes = 4LL * items[i].n * items[i].sketch.rows;
        if (!Check(cudaMemcpyAsync(pinned_ + at_buckets[i], dev_ + at_buckets[i], bytes, cudaMemcpyDeviceToHost, stream_),
                   "sketch update: buckets"))
          return;
      }
    }
    if (!Finish("sketch update")) return;
    for (int i = 0; i < n_items; ++i) {
      if (at_buckets[i] >= 0 && items[i].sign > 0) {
        std::memcpy(items[i].buckets, pinned_ + at_buckets[i], 4LL * items[i].n * items[i].sketch.rows);
      }
    }
  }

  void SketchEstimate(const SketchEstimateParams& p) override {
    if (p.n <= 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (!Begin()) return;
    const int d = p.sketch.head_dim;
    Layout up;
    const int64_t at_ids = p.ids != nullptr ? up.Add(4LL * p.n) : -1;
    const int64_t at_buckets = p.buckets != nullptr ? up.Add(4LL * p.n * p.sketch.rows) : -1;
    const int64_t uploaded = up.size();
    const int64_t at_keys = up.Add(4LL * p.n * d);
    const int64_t at_values = up.Add(4LL * p.n * d);
    if (!Reserve(up.size(), up.size())) return;
    SketchEstimateParams dp = p;
    if (at_ids >= 0) dp.ids = Stage<uint32_t>(at_ids, p.ids, p.n);
    if (at_buckets >= 0) dp.buckets = Stage<uint32_t>(at_buckets, p.buckets, int64_t{p.n} * p.sketch.rows);
    dp.keys = reinterpret_cast<float*>(dev_ + at_keys);
    dp.values = reinterpret_cast<float*>(dev_ + at_values);
    if (uploaded > 0 &&
        !Check(cudaMemcpyAsync(dev_, pinned_, uploaded, cudaMemcpyHostToDevice, stream_), "sketch estimate: upload"))
      return;
    KVTIER_LAUNCH(p.n, kThreads, 0, stream_, SketchEstimateKernel)(dp);
    if (!Check(cudaGetLastError(), "sketch estimate")) return;
    if (!Check(cudaMemcpyAsync(pinned_ + at_keys, dev_ + at_keys, up.size() - at_keys, cudaMemcpyDeviceToHost, stream_),
               "sketch estimate: download"))
      return;
    if (!Finish("sketch estimate")) return;
    std::memcpy(p.keys, pinned_ + at_keys, 4LL * p.n * d);
    std::memcpy(p.values, pinned_ + at_values, 4LL * p.n * d);
  }

  // Every item's host arrays in one upload, its kernels queued behind it,
  // every item's scores in one download: one wait for the whole batch.
  void SketchScores(std::span<const SketchScoreParams> items) override {
    const size_t n_items = items.size();
    std::lock_guard<std::mutex> lock(mu_);
    if (n_items == 0 || !Begin()) return;
    Layout up;
    std::vector<int64_t> at_ids(n_items, -1), at_buckets(n_items, -1), at_scores(n_items), at_proj(n_items),
        at_qmu(n_items);
    for (size_t i = 0; i < n_items; ++i) {
      const SketchScoreParams& p = items[i];
      if (p.n <= 0) continue;
      if (p.ids != nullptr) at_ids[i] = up.Add(4LL * p.n);
      if (p.buckets != nullptr) at_buckets[i] = up.Add(4LL * p.n * p.sketch.rows);
    }
    const int64_t uploaded = up.size();
    for (size_t i = 0; i < n_items; ++i) at_scores[i] = up.Add(4LL * std::max(items[i].n, 0));
    const int64_t scores_end = up.size();
    for (size_t i = 0; i < n_items; ++i) {
      const SketchScoreParams& p = items[i];
      if (p.n <= 0) continue;
      at_proj[i] = up.Add(4LL * p.group * p.sketch.rows * p.sketch.width);
      at_qmu[i] = up.Add(4LL * p.group);
    }
    if (scores_end == uploaded || !Reserve(up.size(), up.size())) return;
    std::vector<SketchScoreParams> dev(items.begin(), items.end());
    for (size_t i = 0; i < n_items; ++i) {
      if (items[i].n <= 0) continue;
      if (at_ids[i] >= 0) dev[i].ids = Stage<uint32_t>(at_ids[i], items[i].ids, items[i].n);
      if (at_buckets[i] >= 0) {
        dev[i].buckets = Stage<uint32_t>(at_buckets[i], items[i].buckets, int64_t{items[i].n} * items[i].sketch.rows);
      }
    }
    if (uploaded > 0 &&
        !Check(cudaMemcpyAsync(dev_, pinned_, uploaded, cudaMemcpyHostToDevice, stream_), "sketch scores: upload"))
      return;
    for (size_t i = 0; i < n_items; ++i) {
      const SketchScoreParams& dp = dev[i];
      if (dp.n <= 0) continue;
      const int64_t B = static_cast<int64_t>(dp.sketch.rows) * dp.sketch.width;
      float* proj = reinterpret_cast<float*>(dev_ + at_proj[i]);
      float* qmu = reinterpret_cast<float*>(dev_ + at_qmu[i]);
      float* scores = reinterpret_cast<float*>(dev_ + at_scores[i]);
      const int proj_blocks = static_cast<int>(std::clamp<int64_t>((B + 3) / 4, 1, 1024));
      KVTIER_LAUNCH(proj_blocks, kThreads, 0, stream_, ScoreProjKernel)(dp, proj, qmu);
      KVTIER_LAUNCH((dp.n + kThreads - 1) / kThreads, kThreads, 0, stream_, ScoreTokensKernel)(dp, proj, qmu, scores);
      if (!Check(cudaGetLastError(), "sketch scores")) return;
    }
    if (!Check(cudaMemcpyAsync(pinned_ + uploaded, dev_ + uploaded, scores_end - uploaded, cudaMemcpyDeviceToHost,
                               stream_),
               "sketch scores: download"))
      return;
    if (!Finish("sketch scores")) return;
    for (size_t i = 0; i < n_items; ++i) {
      if (items[i].n > 0) std::memcpy(items[i].scores, pinned_ + at_scores[i], 4LL * items[i].n);
    }
  }

  void BoundScores(std::span<const BoundScoreParams> items) override {
    const size_t n_items = items.size();
    std::lock_guard<std::mutex> lock(mu_);
    if (n_items == 0 || !Begin()) return;
    Layout up;
    std::vector<int64_t> at_scores(n_items);
    for (size_t i = 0; i < n_items; ++i) at_scores[i] = up.Add(4LL * std::max(items[i].n, 0));
    if (up.size() == 0 || !Reserve(up.size(), up.size())) return;
    for (size_t i = 0; i < n_items; ++i) {
      const BoundScoreParams& p = items[i];
      if (p.n <= 0) continue;
      const int64_t threads = int64_t{p.n} * kWarp;
      const unsigned blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
      KVTIER_LAUNCH(blocks, kThreads, 0, stream_, BoundScoresKernel)(p, reinterpret_cast<float*>(dev_ + at_scores[i]));
      if (!Check(cudaGetLastError(), "bound scores")) return;
    }
    if (!Check(cudaMemcpyAsync(pinned_, dev_, up.size(), cudaMemcpyDeviceToHost, stream_), "bound scores: download"))
      return;
    if (!Finish("bound scores")) return;
    for (size_t i = 0; i < n_items; ++i) {
      if (items[i].n > 0) std::memcpy(items[i].scores, pinned_ + at_scores[i], 4LL * items[i].n);
    }
  }

  void CopyRows(std::span<const RowCopyParams> items) override {
    if (items.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (!Begin()) return;
    const int n_items = static_cast<int>(items.size());
    Layout up;
    const int64_t at_items = up.Add(sizeof(RowCopyParams) * n_items);
    std::vector<int64_t> at_rows(n_items);
    int max_rows = 0;
    for (int i = 0; i < n_items; ++i) {
      at_rows[i] = up.Add(8LL * std::max(items[i].n, 0));
      max_rows = std::max(max_rows, items[i].n);
    }
    if (max_rows <= 0) return;
    if (!Reserve(up.size(), up.size())) return;
    std::vector<RowCopyParams>& dev = copy_items_;
    dev.assign(items.begin(), items.end());
    for (int i = 0; i < n_items; ++i) {
      const int n = std::max(items[i].n, 0);
      dev[i].dst_rows = Stage<int32_t>(at_rows[i], items[i].dst_rows, n);
      dev[i].src_rows = Stage<int32_t>(at_rows[i] + 4LL * n, items[i].src_rows, n);
    }
    std::memcpy(pinned_ + at_items, dev.data(), sizeof(RowCopyParams) * n_items);
    if (!Check(cudaMemcpyAsync(dev_, pinned_, up.size(), cudaMemcpyHostToDevice, stream_), "copy rows: upload")) return;
    for (int first = 0; first < n_items; first += 65535) {
      const dim3 grid(max_rows, std::min(65535, n_items - first));
      KVTIER_LAUNCH(grid, kThreads, 0, stream_, CopyRowsKernel)
      (reinterpret_cast<const RowCopyParams*>(dev_ + at_items) + first);
      if (!Check(cudaGetLastError(), "copy rows")) return;
    }
    Finish("copy rows");
  }

  int64_t CountNonFinite(const void* data, int64_t n, DType dtype) override {
    if (n <= 0) return 0;
    std::lock_guard<std::mutex> lock(mu_);
    if (!Begin()) return 0;
    if (!Reserve(256, 256)) return 0;
    auto* counter = reinterpret_cast<unsigned long long*>(dev_);
    if (!Check(cudaMemsetAsync(counter, 0, sizeof(*counter), stream_), "count non-finite")) return 0;
    const int blocks = static_cast<int>(std::clamp<int64_t>((n + 255) / 256, 1, 1024));
    KVTIER_LAUNCH(blocks, 256, 0, stream_, CountNonFiniteKernel)(data, n, dtype, counter);
    if (!Check(cudaGetLastError(), "count non-finite")) return 0;
    if (!Check(cudaMemcpyAsync(pinned_, counter, sizeof(*counter), cudaMemcpyDeviceToHost, stream_),
               "count non-finite: download"))
      return 0;
    if (!Finish("count non-finite")) return 0;
    unsigned long long bad;
    std::memcpy(&bad, pinned_, sizeof(bad));
    return static_cast<int64_t>(bad);
  }

 private:
  // Under mu_: false once an error was met (every later call is a no-op).
  bool Begin() {
    if (!error_.ok()) return false;
    return Check(cudaSetDevice(device_), "set device");
  }

  bool Check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return true;
    error_.Update(absl::InternalError(  // keeps the first error
        absl::StrFormat("CUDA kernels, %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e))));
    return false;
  }

  bool Finish(const char* what) { return Check(cudaStreamSynchronize(stream_), what); }

  // Grows the device scratch and the pinned upload buffer. The stream is idle
  // here (every call waits for it), so the old buffers can go at once.
  bool Reserve(int64_t device_bytes, int64_t pinned_bytes) {
    if (device_bytes > dev_bytes_) {
      const int64_t want = std::max(device_bytes, dev_bytes_ * 2);
      cudaFree(dev_);
      dev_ = nullptr;
      dev_bytes_ = 0;
      if (!Check(cudaMalloc(reinterpret_cast<void**>(&dev_), want), "scratch")) return false;
      dev_bytes_ = want;
    }
    if (pinned_bytes > pinned_bytes_) {
      const int64_t want = std::max(pinned_bytes, pinned_bytes_ * 2);
      cudaFreeHost(pinned_);
      pinned_ = nullptr;
      pinned_bytes_ = 0;
      if (!Check(cudaHostAlloc(reinterpret_cast<void**>(&pinned_), want, cudaHostAllocDefault), "pinned scratch"))
        return false;
      pinned_bytes_ = want;
    }
    return true;
  }

  // Copies n elements of a host array into the pinned upload at `at` and
  // returns where they will be on the device.
  template <typename T>
  T* Stage(int64_t at, const T* host, int64_t n) {
    if (host == nullptr) return nullptr;
    std::memcpy(pinned_ + at, host, sizeof(T) * n);
    return reinterpret_cast<T*>(dev_ + at);
  }

  const int device_;
  const cudaStream_t stream_;
  mutable std::mutex mu_;
  absl::Status error_;
  char* dev_ = nullptr;
  int64_t dev_bytes_ = 0;
  char* pinned_ = nullptr;
  int64_t pinned_bytes_ = 0;
  std::vector<AttendItemDev> attend_items_;
  std::vector<SketchUpdateParams> update_items_;
  std::vector<RowCopyParams> copy_items_;
};

}  // namespace
}  // namespace cuda

absl::StatusOr<std::unique_ptr<KernelSet>> MakeCudaKernelSet(int device) {
  cudaStream_t stream;
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
    return absl::UnavailableError(absl::StrFormat("CUDA kernels: cannot create a stream: %s", cudaGetErrorString(e)));
  }
  return std::unique_ptr<KernelSet>(std::make_unique<cuda::CudaKernelSet>(device, stream));
}

}  // namespace kvtier::kernels
