// kvtier/kernels/kernel_set.h — the one kernel interface every backend
// implements (CPU now, CUDA later), over the plain structs of params.h.
//
// Batched calls take independent items (distinct outputs); an implementation
// may run them in parallel. A KernelSet is thread-safe: concurrent calls on
// disjoint data are allowed.
#ifndef KVTIER_KERNELS_KERNEL_SET_H_
#define KVTIER_KERNELS_KERNEL_SET_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "absl/status/status.h"
#include "kvtier/kernels/params.h"

namespace kvtier::kernels {

class KernelSet {
 public:
  virtual ~KernelSet() = default;
  virtual std::string_view name() const = 0;

  // Decode attention for each item (one per sequence and KV head).
  virtual void Attend(std::span<const AttendParams> items) = 0;
  // Sketch inserts/removes; items must touch distinct sketches.
  virtual void SketchUpdate(std::span<const SketchUpdateParams> items) = 0;
  virtual void SketchEstimate(const SketchEstimateParams& p) = 0;
  // Recall-ranking scores, one item per head being ranked: a batch of heads
  // shares one call (on a GPU, one wait for all of them).
  virtual void SketchScores(std::span<const SketchScoreParams> items) = 0;
  virtual void BoundScores(std::span<const BoundScoreParams> items) = 0;
  virtual void CopyRows(std::span<const RowCopyParams> items) = 0;
  // Elements of data[0, n) that are NaN or infinite. data is [device].
  virtual int64_t CountNonFinite(const void* data, int64_t n, DType dtype) = 0;

  // InvalidArgument naming the limit when this kernel set cannot run a model
  // with this head_dim and query group (query heads per KV head).
  virtual absl::Status Supports(int head_dim, int group) const { return absl::OkStatus(); }
  // The first failure of a call, kept: the calls return nothing, so a caller
  // checks this after running kernels. A device error makes every later call
  // a no-op. Always OK on the CPU.
  virtual absl::Status error() const { return absl::OkStatus(); }
};

// The CPU implementation: oneTBB across items, vectorised inner loops.
std::unique_ptr<KernelSet> MakeCpuKernelSet();

}  // namespace kvtier::kernels

#endif  // KVTIER_KERNELS_KERNEL_SET_H_
