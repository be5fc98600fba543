// The CPU kernels behind CpuKernelSet: one function per operation on one item.
// None allocates; scratch comes from the caller's Workspace. Internal.
#ifndef KVTIER_KERNELS_CPU_CPU_KERNELS_H_
#define KVTIER_KERNELS_CPU_CPU_KERNELS_H_

#include <cstdint>
#include <vector>

#include "kvtier/kernels/params.h"

namespace kvtier::kernels::cpu {

// Per-thread scratch, grown by the kernel-set driver before a kernel runs.
class Workspace {
 public:
  float* Floats(int64_t n) {
    if (static_cast<int64_t>(buf_.size()) < n) buf_.resize(n);
    return buf_.data();
  }

 private:
  std::vector<float> buf_;
};

// Floats of Workspace each kernel needs.
int64_t AttendWorkspaceFloats(const AttendParams& p);
int64_t SketchWorkspaceFloats(const SketchState& s, int group);

void AttendHead(const AttendParams& p, float* ws);
void SketchUpdateOne(const SketchUpdateParams& p, float* ws);
void SketchEstimateAll(const SketchEstimateParams& p, float* ws);
void SketchScoresAll(const SketchScoreParams& p, float* ws);

// Sketch helpers shared by the attention and scoring kernels.
// Mean key and value of the sketched tokens (zero when empty); returns n.
float SketchMeans(const SketchState& s, float* mu_k, float* mu_v);
// The shrinkage factor of `policy` for n sketched tokens.
float SketchAlpha(const SketchState& s, VaguePolicy policy, float n);

}  // namespace kvtier::kernels::cpu

#endif  // KVTIER_KERNELS_CPU_CPU_KERNELS_H_
