// Sorting packed 64-bit keys by their upper 32 bits. Internal to the runtime.
#ifndef KVTIER_RUNTIME_SRC_RADIX_SORT_H_
#define KVTIER_RUNTIME_SRC_RADIX_SORT_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace kvtier {

// Sorts keys by their upper 32 bits, stably (keys equal there keep their
// order), all below `max_upper` there: a least-significant-digit radix sort,
// one counting pass per 8-bit digit that max_upper has, through `scratch`.
// Below 128 keys a comparison sort over the whole key, where the passes' 256
// counters cost more than the comparisons: the same order when the lower bits
// rise in input order among keys equal above (as in (value, index) keys).
inline void SortByUpper32(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch, uint32_t max_upper) {
  if (keys.size() < 128) {
    std::sort(keys.begin(), keys.end());
    return;
  }
  scratch.resize(keys.size());
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
