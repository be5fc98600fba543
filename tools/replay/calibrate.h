// kvtier-replay --calibrate: measures this machine's memory copies and the
// disk tier, and fills the hardware profile's transfer keys with the result.
//
// With the CPU backend the "device" is host memory, so a recall or a demotion
// off the device is a memcpy: h2d_gbps and d2h_gbps are the measured memcpy
// bandwidth, device_gbps the measured memory read bandwidth, and
// h2d_latency_us the time of one small copy. The disk keys come from the
// runtime's own NvmeTier (O_DIRECT where the filesystem allows it) on a file
// in the given directory, at the tier's block size: nvme_read_gbps and
// nvme_write_gbps are sequential bandwidth at the tier's queue depth,
// nvme_latency_us is a queue-depth-1 random block read less the block's
// transfer time at that bandwidth (the clock charges both per block read).
// Model compute (step_base_us, prefill_token_us) and capacities are not
// measured; they keep the base profile's values.
#ifndef KVTIER_TOOLS_REPLAY_CALIBRATE_H_
#define KVTIER_TOOLS_REPLAY_CALIBRATE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "replay/profile.h"

namespace kvtier::replay {

struct CalibrateOptions {
  std::string nvme_dir;             // empty: no disk measurement (the disk keys keep the base values)
  int64_t block_bytes = 1 << 16;    // disk transfer size: a multiple of 4096
  int64_t memcpy_bytes = 128 << 20; // per copy buffer (two of them)
  int64_t disk_bytes = 64 << 20;    // the disk test file (whole blocks, at least 4), written once; the timed
                                    // passes cover as much of it as the time allows
  double seconds = 3;               // rough total time; every figure is the median of at least 3 reps
  int queue_depth = 32;             // of the NvmeTier, as the runtime's default
};

struct Calibration {
  HardwareProfile profile;  // the base with the measured keys replaced
  double memcpy_gbps = 0, read_gbps = 0, small_copy_us = 0;
  bool disk = false;       // a disk directory was measured
  bool direct_io = false;  // ... with O_DIRECT (else through the page cache: the figures are not the disk's)
  int64_t block_bytes = 0;
  double seq_read_gbps = 0, seq_write_gbps = 0, rand_read_gbps = 0, rand_write_gbps = 0;
  double read_qd1_us = 0, write_qd1_us = 0;  // one random block, queue depth 1 (median)
  double seconds = 0;                        // wall time the measurement took
};

// InvalidArgument for bad options; the disk tier's errors.
absl::StatusOr<Calibration> Calibrate(const CalibrateOptions& options, const HardwareProfile& base = {});

// The profile as a `key = value` file ParseProfile reads back, led by '#'
// comments with the raw measurements.
std::string CalibrationToString(const Calibration& c);

}  // namespace kvtier::replay

#endif  // KVTIER_TOOLS_REPLAY_CALIBRATE_H_
