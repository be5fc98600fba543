// CpuKernelSet: runs the CPU kernels, items in parallel on oneTBB, each
// thread with its own Workspace.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.h"
#include "cpu_math.h"
#include "kvtier/kernels/kernel_set.h"
#include "oneapi/tbb/enumerable_thread_specific.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvtier::kernels {
namespace {

class CpuKernelSet final : public KernelSet {
 public:
  std::string_view name() const override { return "cpu"; }

  void Attend(std::span<const AttendParams> items) override {
    ForEach(items.size(), [&](size_t i, cpu::Workspace& ws) {
      cpu::AttendHead(items[i], ws.Floats(cpu::AttendWorkspaceFloats(items[i])));
    });
  }

  void SketchUpdate(std::span<const SketchUpdateParams> items) override {
    ForEach(items.size(), [&](size_t i, cpu::Workspace& ws) {
      cpu::SketchUpdateOne(items[i], ws.Floats(3LL * items[i].sketch.head_dim + 16));
    });
  }

  void SketchEstimate(const SketchEstimateParams& p) override {
    cpu::SketchEstimateAll(p, workspaces_.local().Floats(2LL * p.sketch.head_dim + 16));
  }

  // Ranking items are small (a query group against class representatives
  // or key-bound groups): one after another, not worth a task each.
  void SketchScores(std::span<const SketchScoreParams> items) override {
    cpu::Workspace& ws = workspaces_.local();
    for (const SketchScoreParams& p : items) {
      cpu::SketchScoresAll(p, ws.Floats(cpu::SketchWorkspaceFloats(p.sketch, p.group)));
    }
  }

  void BoundScores(std::span<const BoundScoreParams> items) override {
    cpu::Workspace& ws = workspaces_.local();
    for (const BoundScoreParams& p : items) BoundScoresOne(p, ws.Floats(3LL * p.group * p.head_dim + 16));
  }

  void CopyRows(std::span<const RowCopyParams> items) override {
    ForEach(items.size(), [&](size_t i, cpu::Workspace&) {
      const RowCopyParams& c = items[i];
      for (int32_t r = 0; r < c.n; ++r) {
        std::memcpy(static_cast<char*>(c.dst) + c.dst_rows[r] * c.dst_stride,
                    static_cast<const char*>(c.src) + c.src_rows[r] * c.src_stride, c.row_bytes);
      }
    });
  }

  int64_t CountNonFinite(const void* data, int64_t n, DType dtype) override {
    int64_t bad = 0;
    switch (dtype) {
      case DType::kF32: {
        const uint32_t* u = static_cast<const uint32_t*>(data);
#pragma omp simd reduction(+ : bad)
        for (int64_t i = 0; i < n; ++i) bad += (u[i] & 0x7f800000u) == 0x7f800000u;
        break;
      }
      case DType::kF16: {
        const uint16_t* u = static_cast<const uint16_t*>(data);
#pragma omp simd reduction(+ : bad)
        for (int64_t i = 0; i < n; ++i) bad += (u[i] & 0x7c00u) == 0x7c00u;
        break;
      }
      case DType::kBF16: {
        const uint16_t* u = static_cast<const uint16_t*>(data);
#pragma omp simd reduction(+ : bad)
        for (int64_t i = 0; i < n; ++i) bad += (u[i] & 0x7f80u) == 0x7f80u;
        break;
      }
    }
    return bad;
  }

 private:
  static void BoundScoresOne(const BoundScoreParams& p, float* ws) {
    float* q = ws;                               // [group][d]
    float* lo = ws + p.group * p.head_dim;       // [d]
    float* hi = lo + p.head_dim;                 // [d]
    for (int g = 0; g < p.group; ++g) {
      cpu::LoadF32(cpu::RowPtr(p.q, p.dtype, g, p.head_dim), p.dtype, p.head_dim, q + g * p.head_dim);
    }
    for (int32_t i = 0; i < p.n; ++i) {
      cpu::LoadF32(cpu::RowPtr(p.bounds, p.dtype, 2LL * i, p.head_dim), p.dtype, p.head_dim, lo);
      cpu::LoadF32(cpu::RowPtr(p.bounds, p.dtype, 2LL * i + 1, p.head_dim), p.dtype, p.head_dim, hi);
      float best = -INFINITY;
      for (int g = 0; g < p.group; ++g) {
        const float* qg = q + g * p.head_dim;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < p.head_dim; ++j) s += std::max(qg[j] * lo[j], qg[j] * hi[j]);
        best = std::max(best, s);
      }
      p.scores[i] = p.scale * best;
    }
  }

  template <typename F>
  void ForEach(size_t n, const F& f) {
    if (n == 1) {
      f(0, workspaces_.local());
      return;
    }
    tbb::parallel_for(size_t{0}, n, [&](size_t i) { f(i, workspaces_.local()); });
  }

  tbb::enumerable_thread_specific<cpu::Workspace> workspaces_;
};

}  // namespace

std::unique_ptr<KernelSet> MakeCpuKernelSet() { return std::make_unique<CpuKernelSet>(); }

}  // namespace kvtier::kernels
