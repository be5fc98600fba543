// kvtier/stats.h — what the runtime holds and what it served: tokens per
// region, device bytes by purpose, host-tier bytes, exact vs sketch counts.
//
// Plain value types, filled by Runtime::Stats() and returned by Attend.
// Token counts are token-heads: one token in one layer and KV head counts once.
#ifndef KVTIER_STATS_H_
#define KVTIER_STATS_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace kvtier {

// Where one token of one (layer, KV head) is. Every token is in exactly one.
enum class Region : uint8_t {
  kSink = 0,       // the first sink_tokens tokens; on the device
  kRecent = 1,     // the last recent_tokens tokens (a ring); on the device
  kCandidate = 2,  // older heavy hitters by accumulated attention; on the device
  kRecalled = 3,   // vague tokens whose exact K/V were brought back; on the device
  kVague = 4,      // in the sketch on the device; exact K/V in the host tier
};
inline constexpr int kNumRegions = 5;
std::string_view RegionName(Region r);

struct RegionCounts {
  int64_t sink = 0;
  int64_t recent = 0;
  int64_t candidate = 0;
  int64_t recalled = 0;
  int64_t vague = 0;
  int64_t total() const { return sink + recent + candidate + recalled + vague; }
  int64_t resident() const { return sink + recent + candidate + recalled; }
  RegionCounts& operator+=(const RegionCounts& o);
};

// Device bytes by purpose.
struct DeviceBytes {
  int64_t sink = 0;       // sink slots (K, V)
  int64_t recent = 0;     // recent ring slots
  int64_t candidate = 0;  // heavy-hitter slots
  int64_t staging = 0;    // recalled-token slots
  int64_t sketch = 0;     // sketch buckets and running sums
  int64_t summary = 0;    // key bounds per group of vague tokens (RecallProxy::kBlockBounds)
  int64_t metadata = 0;   // per-slot scores, vague-token lists, SimHash planes
  int64_t total() const { return sink + recent + candidate + staging + sketch + summary + metadata; }
  DeviceBytes& operator+=(const DeviceBytes& o);
  DeviceBytes operator*(int64_t k) const;
  std::string ToString() const;
};

// How the tokens of one or more attention steps were served, in token-heads.
struct AttendCounts {
  int64_t exact = 0;        // resident: exact K/V
  int64_t from_sketch = 0;  // vague, reconstructed from the sketch
  int64_t dropped = 0;      // vague, left out (policy kDrop or no sketch)
  AttendCounts& operator+=(const AttendCounts& o);
};

struct TierStats {
  int64_t block_bytes = 0;
  int64_t blocks_in_use = 0;
  int64_t bytes_in_use = 0;        // blocks_in_use * block_bytes
  int64_t bytes_reserved = 0;      // memory or file space held from the system
  int64_t peak_bytes_in_use = 0;
  int64_t capacity_bytes = 0;      // whole blocks within the cap; 0 = no cap
  int64_t bytes_written = 0;       // by completed writes
  int64_t bytes_read = 0;          // by completed reads
  int64_t writes = 0;              // completed write transfers
  int64_t reads = 0;               // completed read transfers
  int64_t write_errors = 0;        // transfers that ended in an error
  int64_t read_errors = 0;
  int64_t in_flight = 0;           // transfers submitted and not done
  // Disk tiers: transfers that ran buffered because O_DIRECT was refused.
  int64_t buffered_fallbacks = 0;
  // Host tiers: bytes locked in memory (pinned or mlock'ed), and the NUMA
  // node the memory is bound to (-1: not bound).
  int64_t pinned_bytes = 0;
  int numa_node = -1;
};

// Asynchronous recall, in token-heads.
struct RecallStats {
  int64_t requested = 0;          // tokens requested from the tiers
  int64_t exact_hits = 0;         // installed in time for the attend that needed them
  int64_t sketch_fallbacks = 0;   // not there in time: that attend used the sketch
  int64_t late_arrivals = 0;      // installed after the attend that needed them
  int64_t wasted_prefetches = 0;  // installed, then evicted before any attend used them
  int64_t failed = 0;             // transfer failed (read error, lost block): stayed vague
  int64_t waits = 0;              // attends that waited for recalls in flight
  RecallStats& operator+=(const RecallStats& o);
};

// The block store under the tiers: blocks, bytes by direction, faults.
struct StoreStats {
  int64_t blocks = 0;                // live logical blocks
  int64_t host_blocks = 0;           // of which resident in the host tier
  int64_t disk_blocks = 0;           // of which only on disk
  int64_t lost_blocks = 0;           // became unreadable (checksum mismatch twice), cumulative
  int64_t bytes_device_to_host = 0;  // token K/V written into host blocks
  int64_t bytes_host_to_device = 0;  // rows recalled to the device
  int64_t bytes_host_to_disk = 0;    // demotion writes completed
  int64_t bytes_disk_to_host = 0;    // reads from disk completed
  int64_t demotions = 0;
  int64_t promotions = 0;
  int64_t checksum_failures = 0;
  int64_t disk_read_errors = 0;
  int64_t disk_write_errors = 0;
  int64_t host_waits = 0;            // block creations that waited for demotion
};

struct RuntimeStats {
  int64_t sequences = 0;
  RegionCounts regions;             // over all sequences, layers and KV heads
  int64_t device_budget_bytes = 0;
  DeviceBytes device_reserved;      // bytes reserved by live sequences and shared state
  int64_t peak_device_bytes = 0;
  TierStats host_tier;
  TierStats disk_tier;              // all zero without a disk tier
  StoreStats store;
  RecallStats recall;
  int64_t attends = 0;              // Attend calls (a batch counts each item)
  AttendCounts served;              // cumulative over all attends
  int64_t appended_tokens = 0;      // token-layers appended
  int64_t recalled_tokens = 0;      // token-heads installed in staging (automatic and Recall): exact_hits + late_arrivals
  std::string ToString() const;
};

}  // namespace kvtier

#endif  // KVTIER_STATS_H_
