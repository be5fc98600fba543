#include "replay/calibrate.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvtier/offload/nvme_tier.h"

namespace kvtier::replay {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct AlignedFree {
  void operator()(char* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char[], AlignedFree>;

Buffer AlignedBuffer(int64_t bytes) {
  const size_t rounded = (static_cast<size_t>(bytes) + 4095) / 4096 * 4096;
  Buffer b(static_cast<char*>(std::aligned_alloc(4096, rounded)));
  if (b != nullptr) {
    // Touch every page (and give the disk incompressible-looking bytes).
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i + 8 <= rounded; i += 8) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      std::memcpy(b.get() + i, &x, 8);
    }
  }
  return b;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs `rep` (which returns the seconds one repetition took) at least
// `min_reps` times and then while `budget` seconds last, at most `max_reps`;
// the median.
template <typename F>
double MedianSeconds(F&& rep, double budget, int min_reps = 3, int max_reps = 15) {
  std::vector<double> t;
  const Clock::time_point t0 = Clock::now();
  while (static_cast<int>(t.size()) < min_reps || (static_cast<int>(t.size()) < max_reps && Since(t0) < budget)) {
    t.push_back(rep());
  }
  return Median(std::move(t));
}

std::atomic<uint64_t> g_sink{0};

absl::Status MeasureDisk(const CalibrateOptions& o, double budget, Calibration& c) {
  const int64_t blocks = o.disk_bytes / o.block_bytes;
  absl::StatusOr<std::unique_ptr<NvmeTier>> tier = NvmeTier::Create({.directory = o.nvme_dir,
                                                                      .capacity_bytes = blocks * o.block_bytes,
                                                                      .block_bytes = o.block_bytes,
                                                                      .queue_depth = o.queue_depth});
  if (!tier.ok()) return tier.status();
  NvmeTier& t = **tier;
  c.disk = true;
  c.direct_io = t.direct_io();
  c.block_bytes = o.block_bytes;
  std::vector<BlockId> ids(blocks);
  for (BlockId& id : ids) {
    absl::StatusOr<BlockId> b = t.Allocate();
    if (!b.ok()) return b.status();
    id = *b;
  }
  std::sort(ids.begin(), ids.end());  // file order: sequential
  std::vector<BlockId> shuffled = ids;
  std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937_64(1));
  Buffer buf = AlignedBuffer(blocks * o.block_bytes);
  if (buf == nullptr) return absl::ResourceExhaustedError("calibrate: cannot allocate the disk buffer");

  std::mutex mu;
  absl::Status failed;
  auto done = [&](absl::Status st) {
    if (st.ok()) return;
    std::lock_guard lock(mu);
    if (failed.ok()) failed = std::move(st);
  };
  // The first `n` blocks of `order`, queue depth as the tier allows; seconds.
  auto pass = [&](bool write, const std::vector<BlockId>& order, int64_t n) {
    const Clock::time_point t0 = Clock::now();
    for (int64_t i = 0; i < n; ++i) {
      char* p = buf.get() + i * o.block_bytes;
      if (write) {
        t.Write(order[i], p, done);
      } else {
        t.Read(order[i], p, done);
      }
    }
    t.Drain();
    return Since(t0);
  };
  // One random block at a time; seconds.
  size_t next = 0;
  auto one = [&](bool write) {
    const BlockId id = shuffled[next++ % shuffled.size()];
    const Clock::time_point t0 = Clock::now();
    if (write) {
      t.Write(id, buf.get(), done);
    } else {
      t.Read(id, buf.get(), done);
    }
    t.Drain();
    return Since(t0);
  };
  // Write the whole file once (reading blocks never written would read
  // holes); its rate sizes the timed passes: 12 of them (4 patterns, 3 reps)
  // in 70% of the budget.
  const Clock::time_point t0 = Clock::now();
  const double fill = pass(true, ids, blocks);
  const double per_block = fill / static_cast<double>(blocks);
  const int64_t n = std::clamp<int64_t>(static_cast<int64_t>(0.7 * (budget - Since(t0)) / 12 / per_block),
                                        std::min<int64_t>(blocks, 4 * o.queue_depth), blocks);
  const double bytes = static_cast<double>(n * o.block_bytes);
  c.seq_write_gbps = bytes / MedianSeconds([&] { return pass(true, ids, n); }, 0.15 * budget) / 1e9;
  c.seq_read_gbps = bytes / MedianSeconds([&] { return pass(false, ids, n); }, 0.15 * budget) / 1e9;
  c.rand_write_gbps = bytes / MedianSeconds([&] { return pass(true, shuffled, n); }, 0.1 * budget) / 1e9;
  c.rand_read_gbps = bytes / MedianSeconds([&] { return pass(false, shuffled, n); }, 0.1 * budget) / 1e9;
  c.read_qd1_us = 1e6 * MedianSeconds([&] { return one(false); }, 0.1 * budget, 5, 2000);
  c.write_qd1_us = 1e6 * MedianSeconds([&] { return one(true); }, 0.1 * budget, 5, 2000);
  for (BlockId id : ids) {
    if (absl::Status st = t.Free(id); !st.ok()) return st;
  }
  return failed;
}

}  // namespace

absl::StatusOr<Calibration> Calibrate(const CalibrateOptions& o, const HardwareProfile& base) {
  if (o.block_bytes <= 0 || o.block_bytes % 4096 != 0 || o.block_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibrate: block bytes must be a positive multiple of 4096 up to 1 GiB, got ", o.block_bytes));
  }
  if (o.memcpy_bytes < 4096 || o.memcpy_bytes > (int64_t{1} << 34)) {
    return absl::InvalidArgumentError(absl::StrCat("calibrate: copy buffer must be 4 KiB to 16 GiB, got ", o.memcpy_bytes));
  }
  if (!o.nvme_dir.empty() && (o.disk_bytes / o.block_bytes < 4 || o.disk_bytes > (int64_t{1} << 40))) {
    return absl::InvalidArgumentError(absl::StrCat("calibrate: the disk file must hold at least 4 blocks of ",
                                                   o.block_bytes, " bytes and at most 1 TiB, got ", o.disk_bytes));
  }
  if (!(o.seconds > 0) || !std::isfinite(o.seconds)) {
    return absl::InvalidArgumentError(absl::StrCat("calibrate: seconds must be > 0, got ", o.seconds));
  }
  const Clock::time_point start = Clock::now();
  Calibration c;
  const double mem_budget = o.nvme_dir.empty() ? o.seconds : 0.3 * o.seconds;
  {
    Buffer a = AlignedBuffer(o.memcpy_bytes), b = AlignedBuffer(o.memcpy_bytes);
    if (a == nullptr || b == nullptr) return absl::ResourceExhaustedError("calibrate: cannot allocate copy buffers");
    const double n = static_cast<double>(o.memcpy_bytes);
    c.memcpy_gbps = n / MedianSeconds(
                            [&] {
                              const Clock::time_point t0 = Clock::now();
                              std::memcpy(b.get(), a.get(), o.memcpy_bytes);
                              const double s = Since(t0);
                              g_sink.fetch_add(static_cast<uint8_t>(b[o.memcpy_bytes / 2]), std::memory_order_relaxed);
                              return s;
                            },
                            0.45 * mem_budget) /
                    1e9;
    c.read_gbps = n / MedianSeconds(
                          [&] {
                            const Clock::time_point t0 = Clock::now();
                            const uint64_t* w = reinterpret_cast<const uint64_t*>(a.get());
                            uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                            const int64_t words = o.memcpy_bytes / 8;
                            int64_t i = 0;
                            for (; i + 4 <= words; i += 4) s0 += w[i], s1 += w[i + 1], s2 += w[i + 2], s3 += w[i + 3];
                            for (; i < words; ++i) s0 += w[i];
                            const double s = Since(t0);
                            g_sink.fetch_add(s0 + s1 + s2 + s3, std::memory_order_relaxed);
                            return s;
                          },
                          0.45 * mem_budget) /
                  1e9;
    // One small copy (a 4 KiB row block), averaged over a batch per sample.
    constexpr int kBatch = 1000;
    c.small_copy_us = 1e6 / kBatch *
                      MedianSeconds(
                          [&] {
                            const Clock::time_point t0 = Clock::now();
                            for (int i = 0; i < kBatch; ++i) {
                              const int64_t off = (static_cast<int64_t>(i) * 4096 * 17) % (o.memcpy_bytes - 4095);
                              std::memcpy(b.get() + off, a.get() + off, 4096);
                            }
                            const double s = Since(t0);
                            g_sink.fetch_add(static_cast<uint8_t>(b[0]), std::memory_order_relaxed);
                            return s;
                          },
                          0.1 * mem_budget, 5, 50);
  }
  if (!o.nvme_dir.empty()) {
    if (absl::Status st = MeasureDisk(o, o.seconds - Since(start), c); !st.ok()) return st;
  }
  HardwareProfile& p = c.profile;
  p = base;
  p.h2d_gbps = c.memcpy_gbps;
  p.d2h_gbps = c.memcpy_gbps;
  p.device_gbps = c.read_gbps;
  p.h2d_latency_us = c.small_copy_us;
  if (c.disk) {
    p.nvme_read_gbps = c.seq_read_gbps;
    p.nvme_write_gbps = c.seq_write_gbps;
    p.nvme_latency_us = std::max(0.0, c.read_qd1_us - static_cast<double>(c.block_bytes) / (c.seq_read_gbps * 1e3));
  }
  c.seconds = Since(start);
  return c;
}

std::string CalibrationToString(const Calibration& c) {
  std::string out = absl::StrFormat(
      "# kvtier-replay --calibrate (%.1f s)\n"
      "# memory: memcpy %.2f GB/s, read %.2f GB/s, 4 KiB copy %.3f us (CPU backend: device = host memory)\n",
      c.seconds, c.memcpy_gbps, c.read_gbps, c.small_copy_us);
  if (c.disk) {
    absl::StrAppendFormat(&out,
                          "# disk: %d-byte blocks, %s\n"
                          "#   sequential read %.3f GB/s, write %.3f GB/s\n"
                          "#   random read %.3f GB/s, write %.3f GB/s\n"
                          "#   one random block, queue depth 1: read %.1f us, write %.1f us\n",
                          c.block_bytes,
                          c.direct_io ? "O_DIRECT" : "BUFFERED (O_DIRECT refused: page-cache figures, not the disk's)",
                          c.seq_read_gbps, c.seq_write_gbps, c.rand_read_gbps, c.rand_write_gbps, c.read_qd1_us,
                          c.write_qd1_us);
  } else {
    out += "# disk: not measured (no --nvme-dir); nvme_* keep the base values\n";
  }
  out += "# not measured: step_base_us, prefill_token_us and the capacities (base values)\n";
  out += ProfileToString(c.profile);
  return out;
}

}  // namespace kvtier::replay
