#include "kvtier/stats.h"

#include "absl/strings/str_format.h"

namespace kvtier {

std::string_view RegionName(Region r) {
  switch (r) {
    case Region::kSink: return "sink";
    case Region::kRecent: return "recent";
    case Region::kCandidate: return "candidate";
    case Region::kRecalled: return "recalled";
    case Region::kVague: return "vague";
  }
  return "?";
}

RegionCounts& RegionCounts::operator+=(const RegionCounts& o) {
  sink += o.sink;
  recent += o.recent;
  candidate += o.candidate;
  recalled += o.recalled;
  vague += o.vague;
  return *this;
}

DeviceBytes& DeviceBytes::operator+=(const DeviceBytes& o) {
  sink += o.sink;
  recent += o.recent;
  candidate += o.candidate;
  staging += o.staging;
  sketch += o.sketch;
  summary += o.summary;
  metadata += o.metadata;
  return *this;
}

DeviceBytes DeviceBytes::operator*(int64_t k) const {
  return DeviceBytes{sink * k, recent * k, candidate * k, staging * k, sketch * k, summary * k, metadata * k};
}

std::string DeviceBytes::ToString() const {
  return absl::StrFormat("sink %d, recent %d, candidate %d, staging %d, sketch %d, summary %d, metadata %d = %d bytes",
                         sink, recent, candidate, staging, sketch, summary, metadata, total());
}

AttendCounts& AttendCounts::operator+=(const AttendCounts& o) {
  exact += o.exact;
  from_sketch += o.from_sketch;
  dropped += o.dropped;
  return *this;
}

RecallStats& RecallStats::operator+=(const RecallStats& o) {
  requested += o.requested;
  exact_hits += o.exact_hits;
  sketch_fallbacks += o.sketch_fallbacks;
  late_arrivals += o.late_arrivals;
  wasted_prefetches += o.wasted_prefetches;
  failed += o.failed;
  waits += o.waits;
  return *this;
}

std::string RuntimeStats::ToString() const {
  return absl::StrFormat(
      "sequences %d; token-heads: sink %d, recent %d, candidate %d, recalled %d, vague %d; device %d of %d "
      "bytes (peak %d); host tier %d bytes in %d blocks; attends %d: exact %d, sketch %d, dropped %d",
      sequences, regions.sink, regions.recent, regions.candidate, regions.recalled, regions.vague,
      device_reserved.total(), device_budget_bytes, peak_device_bytes, host_tier.bytes_in_use,
      host_tier.blocks_in_use, attends, served.exact, served.from_sketch, served.dropped);
}

}  // namespace kvtier
