// kvtier-replay --calibrate: the printed profile reads back as a profile of
// positive, finite transfer figures.
#include <cmath>
#include <string>

#include "gtest/gtest.h"
#include "replay/calibrate.h"
#include "replay/profile.h"

namespace kvtier::replay {
namespace {

CalibrateOptions Small() {
  CalibrateOptions o;
  o.block_bytes = 16384;
  o.memcpy_bytes = 4 << 20;
  o.disk_bytes = 1 << 20;
  o.seconds = 0.3;
  return o;
}

void ExpectPositive(double x, const char* what) {
  EXPECT_TRUE(std::isfinite(x) && x > 0) << what << " = " << x;
}

TEST(ReplayCalibrate, PrintedProfileParsesBackWithTheMeasuredFigures) {
  CalibrateOptions o = Small();
  o.nvme_dir = ::testing::TempDir() + "kvtier_calibrate";
  HardwareProfile base;
  base.step_base_us = 1234;  // not measured: kept
  absl::StatusOr<Calibration> c = Calibrate(o, base);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->disk);
  const std::string text = CalibrationToString(*c);
  absl::StatusOr<HardwareProfile> p = ParseProfile(text);
  ASSERT_TRUE(p.ok()) << p.status() << "\n" << text;
  ExpectPositive(p->device_gbps, "device_gbps");
  ExpectPositive(p->h2d_gbps, "h2d_gbps");
  ExpectPositive(p->d2h_gbps, "d2h_gbps");
  ExpectPositive(p->h2d_latency_us, "h2d_latency_us");
  ExpectPositive(p->nvme_read_gbps, "nvme_read_gbps");
  ExpectPositive(p->nvme_write_gbps, "nvme_write_gbps");
  EXPECT_TRUE(std::isfinite(p->nvme_latency_us) && p->nvme_latency_us >= 0) << p->nvme_latency_us;
  for (double x : {c->rand_read_gbps, c->rand_write_gbps, c->read_qd1_us, c->write_qd1_us}) ExpectPositive(x, "disk");
  // %g keeps six digits: the file holds what was measured, to that precision.
  EXPECT_NEAR(p->h2d_gbps, c->memcpy_gbps, 1e-5 * c->memcpy_gbps);
  EXPECT_NEAR(p->nvme_read_gbps, c->seq_read_gbps, 1e-5 * c->seq_read_gbps);
  EXPECT_EQ(p->step_base_us, 1234);
  EXPECT_EQ(p->prefill_token_us, HardwareProfile{}.prefill_token_us);
}

TEST(ReplayCalibrate, WithoutADiskTheDiskKeysKeepTheBase) {
  absl::StatusOr<Calibration> c = Calibrate(Small());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->disk);
  absl::StatusOr<HardwareProfile> p = ParseProfile(CalibrationToString(*c));
  ASSERT_TRUE(p.ok()) << p.status();
  ExpectPositive(p->h2d_gbps, "h2d_gbps");
  EXPECT_EQ(p->nvme_read_gbps, HardwareProfile{}.nvme_read_gbps);
  EXPECT_EQ(p->nvme_latency_us, HardwareProfile{}.nvme_latency_us);
}

TEST(ReplayCalibrate, RejectsBadOptions) {
  CalibrateOptions o = Small();
  o.block_bytes = 5000;
  EXPECT_FALSE(Calibrate(o).ok());
  o = Small();
  o.seconds = 0;
  EXPECT_FALSE(Calibrate(o).ok());
  o = Small();
  o.nvme_dir = ::testing::TempDir() + "kvtier_calibrate_small";
  o.disk_bytes = 2 * o.block_bytes;
  EXPECT_FALSE(Calibrate(o).ok());
}

}  // namespace
}  // namespace kvtier::replay
