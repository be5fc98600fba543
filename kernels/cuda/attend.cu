// The fused decode attention of the CUDA kernel set (attend.h): partial
// softmaxes over chunks of resident tokens and over the sketch, then one
// combine per item. The math per token and per bucket is the CPU kernel's
// (kernels/cpu/attend.cc); only the order of the sums differs.
#include <cfloat>

#include "attend.h"
#include "device_math.cuh"
#include "kvtier/kernels/hash.h"

namespace kvtier::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;
constexpr int kTile = kGroupTile;

// Shared memory of a partial block: per-warp maxima and sums, per-warp outputs.
template <int E>
struct PartialShared {
  float red[kWarps][kTile];
  float z[kWarps][kTile];
  float acc[kWarps][kTile][kWarp * E];
};

// This lane's elements j = lane * E + e of the row at base + offset (0 past
// head_dim d), as fp32.
template <int DT, int E>
__device__ __forceinline__ void LoadLane(const void* base, int64_t offset, int d, float (&out)[E]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = lane * E + e;
    out[e] = j < d ? LoadT<DT>(base, offset + j) : 0.0f;
  }
}
constexpr int kF32 = static_cast<int>(DType::kF32);

// The dot product of two rows spread over the warp's lanes, in every lane.
template <int E>
__device__ __forceinline__ float WarpDot(const float (&a)[E], const float (&b)[E]) {
  float dot = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) dot = fmaf(a[e], b[e], dot);
  return WarpSum(dot);
}

// A partial softmax before any token: max -inf, sums and outputs 0.
template <int E>
__device__ __forceinline__ void ClearPartial(float (&m)[kTile], float (&z)[kTile], float (&acc)[kTile][E]) {
#pragma unroll
  for (int g = 0; g < kTile; ++g) {
    m[g] = -INFINITY;
    z[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.0f;
  }
}

// Makes m[g] the block's maximum (lanes may hold different values).
template <int E>
__device__ void BlockMax(float (&m)[kTile], PartialShared<E>& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int g = 0; g < kTile; ++g) {
    const float x = WarpMax(m[g]);
    if (lane == 0) sh.red[warp][g] = x;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kTile; ++g) {
    float x = sh.red[0][g];
    for (int w = 1; w < kWarps; ++w) x = fmaxf(x, sh.red[w][g]);
    m[g] = x;
  }
  __syncthreads();
}

// Writes the block's partial: m (block-uniform), z (uniform within each warp:
// the warp's share) and acc (each lane its elements j = lane * E + e).
template <int E>
__device__ void WritePartial(float* part, int d, int gs, const float (&m)[kTile], const float (&z)[kTile],
                             const float (&acc)[kTile][E], PartialShared<E>& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int g = 0; g < kTile; ++g) {
    if (lane == 0) sh.z[warp][g] = z[g];
#pragma unroll
    for (int e = 0; e < E; ++e) sh.acc[warp][g][lane * E + e] = acc[g][e];
  }
  __syncthreads();
  for (int t = threadIdx.x; t < kTile * kWarp * E; t += kThreads) {
    const int g = t / (kWarp * E), j = t % (kWarp * E);
    if (g >= gs || j >= d) continue;
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += sh.acc[w][g][j];
    part[2 * kTile + g * d + j] = s;
  }
  if (threadIdx.x < kTile) {
    const int g = threadIdx.x;
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += sh.z[w][g];
    part[g] = g < gs ? m[g] : -INFINITY;
    part[kTile + g] = g < gs ? s : 0.0f;
  }
}

template <int DT, int E>
__device__ void ResidentSplit(const AttendItemDev& it, int s, int g0, int gs, const float (&q)[kTile][E],
                              float* logits, float* part, PartialShared<E>& sh) {
  const AttendParams& p = it.p;
  const int d = p.head_dim;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n = it.n_res;
  float* lg = logits + it.logit_base;
  const int64_t begin = static_cast<int64_t>(s) * kAttendChunk;
  const int64_t end = min(n, begin + kAttendChunk);
  float m[kTile], z[kTile], acc[kTile][E];
  ClearPartial(m, z, acc);
  // 1. Logits: a warp per token, lanes across the head dimension.
  for (int64_t idx = begin + warp; idx < end; idx += kWarps) {
    const int64_t slot = SlotOf(p.ranges, p.num_ranges, idx);
    float k[E];
    LoadLane<DT>(p.k_slots, slot * d, d, k);
#pragma unroll
    for (int g = 0; g < kTile; ++g) {
      if (g >= gs) break;
      const float dot = WarpDot(q[g], k);
      m[g] = fmaxf(m[g], dot);
      if (lane == 0) lg[static_cast<int64_t>(g0 + g) * n + idx] = dot;
    }
  }
  BlockMax(m, sh);
  // 2. Probabilities (against the block's max) and values.
  for (int64_t idx = begin + warp; idx < end; idx += kWarps) {
    const int64_t slot = SlotOf(p.ranges, p.num_ranges, idx);
    float v[E];
    LoadLane<DT>(p.v_slots, slot * d, d, v);
#pragma unroll
    for (int g = 0; g < kTile; ++g) {
      if (g >= gs) break;
      const float ex = expf(lg[static_cast<int64_t>(g0 + g) * n + idx] - m[g]);
      z[g] += ex;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] = fmaf(ex, v[e], acc[g][e]);
    }
  }
  WritePartial(part, d, gs, m, z, acc, sh);
}

// The sketch's pseudo-tokens (centroid buckets, Count-Sketch bucket classes
// or, with rows >= 2, every vague token by lookup).
template <int E>
__device__ void SketchSplit(const AttendItemDev& it, int g0, int gs, const float (&q)[kTile][E], float* scratch,
                            float* part, PartialShared<E>& sh) {
  const AttendParams& p = it.p;
  const SketchState& s = p.sketch;
  const int d = p.head_dim;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float m[kTile], z[kTile], acc[kTile][E];
  ClearPartial(m, z, acc);
  bool use = p.policy != VaguePolicy::kDrop && s.kind != SketchKind::kNone;
  const float n = use ? s.totals[2 * d] : 0.0f;
  use = use && n > 0.5f;
  if (!use) {
    WritePartial(part, d, 0, m, z, acc, sh);
    return;
  }
  const int64_t B = static_cast<int64_t>(s.rows) * s.width;
  if (s.kind == SketchKind::kCentroid) {
    const float inv_rows = 1.0f / s.rows;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t b = warp; b < B; b += kWarps) {
        const float cnt = s.counts[2 * b];
        if (cnt < 0.5f) continue;
        const float inv = 1.0f / cnt;
        const float bias = logf(cnt * inv_rows);
        float k[E], v[E] = {};
        LoadLane<kF32>(s.key_sums, b * d, d, k);
        if (pass == 1) LoadLane<kF32>(s.value_sums, b * d, d, v);
#pragma unroll
        for (int g = 0; g < kTile; ++g) {
          if (g >= gs) break;
          const float l = WarpDot(q[g], k) * inv + bias;
          if (pass == 0) {
            m[g] = fmaxf(m[g], l);
          } else {
            const float ex = expf(l - m[g]);
            z[g] += ex;
            const float w = ex / cnt;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[g][e] = fmaf(w, v[e], acc[g][e]);
          }
        }
      }
      if (pass == 0) BlockMax(m, sh);
    }
    WritePartial(part, d, gs, m, z, acc, sh);
    return;
  }

  // Count-Sketch: means, shrinkage, q . mu_k.
  float mu_k[E], mu_v[E], qmu[kTile], sig[kTile];
  const float inv_n = 1.0f / n;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = lane * E + e;
    mu_k[e] = j < d ? s.totals[j] * inv_n : 0.0f;
    mu_v[e] = j < d ? s.totals[d + j] * inv_n : 0.0f;
  }
  float alpha = 1.0f;
  if (p.policy == VaguePolicy::kShrink) {
    const float cells = static_cast<float>(s.rows) * static_cast<float>(s.width);
    alpha = cells / (cells + fmaxf(n - 1.0f, 0.0f));
  }
  const float c = alpha / s.rows;
#pragma unroll
  for (int g = 0; g < kTile; ++g) {
    qmu[g] = WarpDot(q[g], mu_k);
    sig[g] = 0.0f;
  }
  if (s.rows == 1) {
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t b = warp; b < B; b += kWarps) {
        const float cp = s.counts[2 * b], cn = s.counts[2 * b + 1];
        if (cp <= 0.5f && cn <= 0.5f) continue;
        const float sigma = cp - cn;
        float k[E], v[E] = {};
        LoadLane<kF32>(s.key_sums, b * d, d, k);
        if (pass == 1) LoadLane<kF32>(s.value_sums, b * d, d, v);
#pragma unroll
        for (int g = 0; g < kTile; ++g) {
          if (g >= gs) break;
          const float pr = alpha * (WarpDot(q[g], k) - sigma * qmu[g]);
          const float lp = qmu[g] + pr, ln = qmu[g] - pr;
          if (pass == 0) {
            if (cp > 0.5f) m[g] = fmaxf(m[g], lp);
            if (cn > 0.5f) m[g] = fmaxf(m[g], ln);
          } else {
            const float ep = cp > 0.5f ? cp * expf(lp - m[g]) : 0.0f;
            const float en = cn > 0.5f ? cn * expf(ln - m[g]) : 0.0f;
            z[g] += ep + en;
            const float a = ep - en;
            sig[g] += a * sigma;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[g][e] = fmaf(c * a, v[e], acc[g][e]);
          }
        }
      }
      if (pass == 0) BlockMax(m, sh);
    }
  } else {
    // rows >= 2: the projections of every bucket, then a thread per vague token.
    float* proj = scratch + it.sketch_base + static_cast<int64_t>(blockIdx.z) * 2 * kTile * B;  // [kTile][B]
    float* agg = proj + kTile * B;                                                             // [kTile][B]
    for (int64_t b = warp; b < B; b += kWarps) {
      const float sigma = s.counts[2 * b] - s.counts[2 * b + 1];
      float k[E];
      LoadLane<kF32>(s.key_sums, b * d, d, k);
#pragma unroll
      for (int g = 0; g < kTile; ++g) {
        if (g >= gs) break;
        const float pr = WarpDot(q[g], k) - sigma * qmu[g];
        if (lane == 0) proj[g * B + b] = pr;
      }
    }
    for (int64_t t = threadIdx.x; t < kTile * B; t += kThreads) agg[t] = 0.0f;
    __syncthreads();
    uint32_t row_seed[kMaxSketchRows];
    for (int r = 0; r < s.rows; ++r) row_seed[r] = RowSeed(s.seed, r);
    float zt[kTile];
#pragma unroll
    for (int g = 0; g < kTile; ++g) zt[g] = 0.0f;
    for (int pass = 0; pass < 2; ++pass) {
      for (int32_t i = threadIdx.x; i < p.num_vague; i += kThreads) {
        int64_t bucket[kMaxSketchRows];
        float sign[kMaxSketchRows];
        for (int r = 0; r < s.rows; ++r) {
          const uint32_t h = TokenHash(row_seed[r], p.vague_ids[i]);
          bucket[r] = static_cast<int64_t>(r) * s.width + Bucket(h, s.width);
          sign[r] = Sign(h);
        }
#pragma unroll
        for (int g = 0; g < kTile; ++g) {
          if (g >= gs) break;
          float a = 0.0f;
          for (int r = 0; r < s.rows; ++r) a += sign[r] * proj[g * B + bucket[r]];
          const float l = qmu[g] + c * a;
          if (pass == 0) {
            m[g] = fmaxf(m[g], l);
          } else {
            const float ex = expf(l - m[g]);
            zt[g] += ex;
            for (int r = 0; r < s.rows; ++r) atomicAdd(&agg[g * B + bucket[r]], sign[r] * ex);
          }
        }
      }
      if (pass == 0) BlockMax(m, sh);
    }
    __syncthreads();  // agg complete
#pragma unroll
    for (int g = 0; g < kTile; ++g) z[g] = WarpSum(zt[g]);
    for (int64_t b = warp; b < B; b += kWarps) {
      const float sigma = s.counts[2 * b] - s.counts[2 * b + 1];
#pragma unroll
      for (int g = 0; g < kTile; ++g) {
        if (g >= gs) break;
        const float a = agg[g * B + b];
        if (a == 0.0f) continue;
        sig[g] += a * sigma;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int j = lane * E + e;
          if (j < d) acc[g][e] = fmaf(c * a, s.value_sums[b * d + j], acc[g][e]);
        }
      }
    }
  }
  // The mean-value term, linear in each warp's share: (z - c * sigma_term) * mu_v.
#pragma unroll
  for (int g = 0; g < kTile; ++g) {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = fmaf(z[g] - c * sig[g], mu_v[e], acc[g][e]);
  }
  WritePartial(part, d, gs, m, z, acc, sh);
}

template <int DT, int E>
__global__ void __launch_bounds__(kThreads)
    AttendPartialKernel(const AttendItemDev* items, int variant, float* logits, float* parts, float* scratch) {
  const AttendItemDev& it = items[blockIdx.y];
  const int s = blockIdx.x;
  if (it.variant != variant || s > it.splits || static_cast<int>(blockIdx.z) >= it.tiles) return;
  __shared__ PartialShared<E> sh;
  const AttendParams& p = it.p;
  const int d = p.head_dim;
  const int g0 = blockIdx.z * kTile;
  const int gs = min(kTile, p.group - g0);
  const int lane = threadIdx.x % kWarp;
  float q[kTile][E];
#pragma unroll
  for (int g = 0; g < kTile; ++g) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int j = lane * E + e;
      q[g][e] = g < gs && j < d ? LoadT<DT>(p.q, static_cast<int64_t>(g0 + g) * d + j) * p.scale : 0.0f;
    }
  }
  float* part = parts + it.part_base + (static_cast<int64_t>(blockIdx.z) * (it.splits + 1) + s) * PartFloats(d);
  if (s < it.splits) {
    ResidentSplit<DT, E>(it, s, g0, gs, q, logits, part, sh);
  } else {
    SketchSplit<E>(it, g0, gs, q, scratch, part, sh);
  }
}

// One block per item: merges the partials into one softmax per query head,
// stores the output and the slot probabilities.
__global__ void AttendCombineKernel(const AttendItemDev* items, const float* logits, const float* parts) {
  const AttendItemDev& it = items[blockIdx.x];
  const AttendParams& p = it.p;
  const int G = p.group, d = p.head_dim;
  KVTIER_DYNAMIC_SHARED(float, sh);
  float* M = sh;         // [G]
  float* inv_z = sh + G; // [G]
  const int nsplit = it.splits + 1;
  const int64_t pf = PartFloats(d);
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    const float* base = parts + it.part_base + static_cast<int64_t>(g / kTile) * nsplit * pf;
    const int gi = g % kTile;
    float mx = -INFINITY;
    for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, base[s * pf + gi]);
    float Z = 0.0f;
    if (mx > -INFINITY) {
      for (int s = 0; s < nsplit; ++s) {
        const float ms = base[s * pf + gi];
        if (ms > -INFINITY) Z += base[s * pf + kTile + gi] * expf(ms - mx);
      }
    }
    M[g] = mx;
    inv_z[g] = Z > 0.0f ? 1.0f / Z : 0.0f;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < G * d; t += blockDim.x) {
    const int g = t / d, j = t % d;
    const float* base = parts + it.part_base + static_cast<int64_t>(g / kTile) * nsplit * pf;
    const int gi = g % kTile;
    float o = 0.0f;
    for (int s = 0; s < nsplit; ++s) {
      const float ms = base[s * pf + gi];
      if (ms > -INFINITY) o += base[s * pf + 2 * kTile + gi * d + j] * expf(ms - M[g]);
    }
    StoreAny(p.out, p.out_dtype, t, o * inv_z[g]);
  }
  if (p.slot_probs == nullptr) return;
  const float* lg = logits + it.logit_base;
  const int64_t n = it.n_res;
  for (int64_t idx = threadIdx.x; idx < n; idx += blockDim.x) {
    float sum = 0.0f;
    for (int g = 0; g < G; ++g) sum += expf(lg[g * n + idx] - M[g]) * inv_z[g];
    p.slot_probs[SlotOf(p.ranges, p.num_ranges, idx)] = sum;
  }
}

template <int DT, int E>
void LaunchPartial(dim3 grid, const AttendItemDev* items, int variant, float* logits, float* parts, float* scratch,
                   cudaStream_t stream) {
  KVTIER_LAUNCH(grid, kThreads, 0, stream, AttendPartialKernel<DT, E>)(items, variant, logits, parts, scratch);
}

}  // namespace

cudaError_t LaunchAttend(const AttendItemDev* items, int n_items, int max_splits, int max_tiles, int max_group,
                         uint32_t present, float* logits, float* parts, float* sketch_scratch, cudaStream_t stream) {
  const dim3 grid(max_splits + 1, n_items, max_tiles);
  constexpr int f32 = static_cast<int>(DType::kF32), f16 = static_cast<int>(DType::kF16),
                bf16 = static_cast<int>(DType::kBF16);
  for (int v = 0; v < kAttendVariants; ++v) {
    if (((present >> v) & 1u) == 0) continue;
    switch (v) {
      case 0: LaunchPartial<f32, 2>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 1: LaunchPartial<f32, 4>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 2: LaunchPartial<f32, 8>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 3: LaunchPartial<f16, 2>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 4: LaunchPartial<f16, 4>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 5: LaunchPartial<f16, 8>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 6: LaunchPartial<bf16, 2>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 7: LaunchPartial<bf16, 4>(grid, items, v, logits, parts, sketch_scratch, stream); break;
      case 8: LaunchPartial<bf16, 8>(grid, items, v, logits, parts, sketch_scratch, stream); break;
    }
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  KVTIER_LAUNCH(n_items, 256, 2 * max_group * sizeof(float), stream, AttendCombineKernel)(items, logits, parts);
  return cudaGetLastError();
}

}  // namespace kvtier::kernels::cuda
