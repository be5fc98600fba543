// Sorting packed 64-bit keys by their upper 32 bits. Internal to the runtime.
#ifndef KVTIER_RUNTIME_SRC_RADIX_SORT_H_
#define KVTIER_RUNTIME_SRC_RADIX_SORT_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace kvtier {

// Sorts keys by their upper 32 bits, stably (keys equal there keep their
// order), all below `max_upper` there, through `scratch`.
// - Keys that come as at most kMaxRuns runs, each rising or strictly
//   falling in the upper halves, are merged: the falling runs reversed (no
//   two of their keys are equal there, so this keeps stability), then
//   merged pairwise, left before right on ties. A recall's targets come so
//   (a few weight classes, each most recent first), and a scan and a merge
//   or two cost a few instructions a key.
// - Else, from 128 keys, a least-significant-digit radix sort, one counting
//   pass per 8-bit digit that max_upper has.
// - Else a comparison sort over the whole key, where the passes' 256
//   counters cost more than the comparisons: the same order when the lower
//   bits rise in input order among keys equal above (as in (value, index)
//   keys).
inline void SortByUpper32(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, uint32_t max_upper) {
  constexpr int kMaxRuns = 4;
  const size_t n = keys.size();
  auto upper = [](uint64_t k) { return static_cast<uint32_t>(k >> 32); };
  // The runs' ends, as long as there are few.
  std::array<size_t, kMaxRuns> run_end{};
  int runs = 0;
  for (size_t i = 0; i < n && runs <= kMaxRuns;) {
    size_t j = i + 1;
    if (j < n && upper(keys[j]) < upper(keys[i])) {
      while (j < n && upper(keys[j]) < upper(keys[j - 1])) ++j;
    } else {
      while (j < n && upper(keys[j]) >= upper(keys[j - 1])) ++j;
    }
    if (runs < kMaxRuns) run_end[runs] = j;
    ++runs;
    i = j;
  }
  if (runs <= kMaxRuns) {
    for (size_t r = 0, begin = 0; r < static_cast<size_t>(runs); begin = run_end[r++]) {
      if (run_end[r] - begin > 1 && upper(keys[begin + 1]) < upper(keys[begin])) {
        std::reverse(keys.begin() + begin, keys.begin() + static_cast<std::ptrdiff_t>(run_end[r]));
      }
    }
    auto by_upper = [&](uint64_t a, uint64_t b) { return upper(a) < upper(b); };
    scratch.resize(n);
    while (runs > 1) {  // one pass merges neighbouring runs, keys -> scratch
      int merged = 0;
      for (int r = 0; r < runs; r += 2) {
        const size_t begin = r == 0 ? 0 : run_end[r - 1];
        if (r + 1 == runs) {  // the odd one out is copied
          std::copy(keys.begin() + begin, keys.begin() + run_end[r], scratch.begin() + begin);
        } else {
          std::merge(keys.begin() + begin, keys.begin() + run_end[r], keys.begin() + run_end[r],
                     keys.begin() + run_end[r + 1], scratch.begin() + begin, by_upper);
        }
        run_end[merged++] = run_end[std::min(r + 1, runs - 1)];
      }
      runs = merged;
      keys.swap(scratch);
    }
    return;
  }
  if (n < 128) {
    std::sort(keys.begin(), keys.end());
    return;
  }
  scratch.resize(n);
  for (int shift = 32; shift < 64 && (uint64_t{max_upper} << 32 >> shift) != 0; shift += 8) {
    std::array<uint32_t, 257> start{};  // start[d + 1] counts digit d, then prefix sums
    for (const uint64_t k : keys) ++start[((k >> shift) & 0xff) + 1];
    for (int d = 1; d < 257; ++d) start[d] += start[d - 1];
    for (const uint64_t k : keys) scratch[start[(k >> shift) & 0xff]++] = k;
    keys.swap(scratch);
  }
}

}  // namespace kvtier

#endif  // KVTIER_RUNTIME_SRC_RADIX_SORT_H_
