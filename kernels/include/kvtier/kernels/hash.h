// kvtier/kernels/hash.h — the hash math of the sketches, shared by host and
// device code so the CPU tests exercise exactly what the GPU runs.
//
// Count-Sketch: token t goes to bucket Bucket(h, width) of row r with sign
// Sign(h), h = TokenHash(RowSeed(seed, r), t). The bucket takes the high bits
// of h and the sign its lowest bit. Centroid sketch: the bucket of a centred
// key x in row r is its SimHash code: bit j is set when plane_j . x >= 0.
// Stateless, thread-safe.
#ifndef KVTIER_KERNELS_HASH_H_
#define KVTIER_KERNELS_HASH_H_

#include <cstdint>

#include "kvtier/kernels/hd.h"

namespace kvtier::kernels {

// MurmurHash3's 32-bit finalizer: a bijection with full avalanche.
KVTIER_HD uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// Seed of one (layer, KV head): every head hashes independently.
KVTIER_HD uint32_t HeadSeed(uint64_t seed, uint32_t layer, uint32_t kv_head) {
  return Mix32(static_cast<uint32_t>(seed) ^ Mix32(static_cast<uint32_t>(seed >> 32) + layer * 0x9e3779b9u) ^
               (kv_head * 0x85ebca77u + 0x27d4eb2fu));
}

// Seed of one hash row of a head's sketch.
KVTIER_HD uint32_t RowSeed(uint32_t head_seed, uint32_t row) { return Mix32(head_seed ^ ((row + 1u) * 0x9e3779b9u)); }

KVTIER_HD uint32_t TokenHash(uint32_t row_seed, uint32_t token) { return Mix32(token * 0x9e3779b1u + row_seed); }

// Bucket in [0, width): the high 32 bits of h * width (Lemire's reduction).
KVTIER_HD uint32_t Bucket(uint32_t h, uint32_t width) {
  return static_cast<uint32_t>((static_cast<uint64_t>(h) * width) >> 32);
}

KVTIER_HD float Sign(uint32_t h) { return (h & 1u) ? -1.0f : 1.0f; }

// SimHash code of x (length dim) against `bits` planes of length dim, stored
// row-major; bit j of the result is plane_j . x >= 0.
KVTIER_HD uint32_t SimHash(const float* x, const float* planes, int bits, int dim) {
  uint32_t code = 0;
  for (int j = 0; j < bits; ++j) {
    const float* p = planes + static_cast<int64_t>(j) * dim;
    float dot = 0.0f;
    for (int i = 0; i < dim; ++i) dot += p[i] * x[i];
    code |= (dot >= 0.0f ? 1u : 0u) << j;
  }
  return code;
}

}  // namespace kvtier::kernels

#endif  // KVTIER_KERNELS_HASH_H_
