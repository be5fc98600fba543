// The CPU backend (kvtier/backend.h): capabilities, aligned allocations,
// copies, zeroing, streams and events, CreateBackend's kinds, and the two
// kernels of the kernel set the runtime's input checks and slot moves rely on
// (CountNonFinite, CopyRows).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/backend.h"
#include "kvtier/kernels/convert.h"
#include "kvtier/kernels/kernel_set.h"
#include "test_util.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Backend> Cpu() {
  absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kCpu);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

// Deterministic byte pattern, distinct per (seed, index).
std::vector<unsigned char> Pattern(size_t n, uint32_t seed) {
  std::vector<unsigned char> v(n);
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    v[i] = static_cast<unsigned char>(x >> 24);
  }
  return v;
}

TEST(BackendTest, CpuNameAndCaps) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->name(), "cpu");
  const BackendCaps caps = b->caps();
  EXPECT_TRUE(caps.device_memory_host_accessible);
  EXPECT_FALSE(caps.async_streams);
  EXPECT_FALSE(caps.pinned_host_memory);
  EXPECT_EQ(b->kernels().name(), "cpu");
}

TEST(BackendTest, CreateBackendKinds) {
  absl::StatusOr<std::unique_ptr<Backend>> cpu = CreateBackend(BackendKind::kCpu);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->name(), "cpu");

  // kCuda works where this build has the CUDA backend and a device can be
  // used; otherwise it says why (NotFound: not built in; Unavailable: no
  // device or driver) and auto falls back to the CPU.
  absl::StatusOr<std::unique_ptr<Backend>> cuda = CreateBackend(BackendKind::kCuda);
  absl::StatusOr<std::unique_ptr<Backend>> autob = CreateBackend(BackendKind::kAuto);
  ASSERT_TRUE(autob.ok()) << autob.status();
  if (cuda.ok()) {
    EXPECT_EQ((*cuda)->name(), "cuda");
    EXPECT_EQ((*autob)->name(), "cuda");
  } else {
    EXPECT_TRUE(cuda.status().code() == absl::StatusCode::kNotFound ||
                cuda.status().code() == absl::StatusCode::kUnavailable)
        << cuda.status();
    EXPECT_THAT(cuda.status().message(), HasSubstr("CUDA"));
    EXPECT_EQ((*autob)->name(), "cpu");
  }

  absl::StatusOr<std::unique_ptr<Backend>> bogus = CreateBackend(static_cast<BackendKind>(9));
  ASSERT_FALSE(bogus.ok());
  EXPECT_EQ(bogus.status().code(), absl::StatusCode::kInvalidArgument) << bogus.status();
  EXPECT_THAT(bogus.status().message(), HasSubstr("9"));
}

TEST(BackendTest, AllocateDeviceIs256AlignedAndWritable) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  // Sizes below, at and above the alignment, including 0 (a valid, freeable pointer).
  for (int64_t bytes : {int64_t{0}, int64_t{1}, int64_t{255}, int64_t{256}, int64_t{257}, int64_t{4096 + 3},
                        int64_t{1} << 20}) {
    absl::StatusOr<void*> p = b->AllocateDevice(bytes);
    ASSERT_TRUE(p.ok()) << bytes << ": " << p.status();
    ASSERT_NE(*p, nullptr) << bytes;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(*p) % 256, 0u) << bytes;
    if (bytes > 0) {
      // Host-accessible on the CPU backend: every byte can be written and read back.
      const std::vector<unsigned char> pat = Pattern(static_cast<size_t>(bytes), 7);
      std::memcpy(*p, pat.data(), pat.size());
      EXPECT_EQ(std::memcmp(*p, pat.data(), pat.size()), 0) << bytes;
    }
    b->FreeDevice(*p);
  }
}

TEST(BackendTest, AllocateHostIs4096Aligned) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  std::vector<void*> ptrs;
  for (int64_t bytes : {int64_t{0}, int64_t{1}, int64_t{4095}, int64_t{4096}, int64_t{4097}, int64_t{3} << 16}) {
    absl::StatusOr<void*> p = b->AllocateHost(bytes);
    ASSERT_TRUE(p.ok()) << bytes << ": " << p.status();
    ASSERT_NE(*p, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(*p) % 4096, 0u) << bytes;
    if (bytes > 0) {
      std::memset(*p, 0xab, static_cast<size_t>(bytes));
      EXPECT_EQ(static_cast<unsigned char*>(*p)[bytes - 1], 0xab);
    }
    ptrs.push_back(*p);
  }
  // Distinct live allocations.
  for (size_t i = 0; i < ptrs.size(); ++i) {
    for (size_t j = i + 1; j < ptrs.size(); ++j) EXPECT_NE(ptrs[i], ptrs[j]);
  }
  for (void* p : ptrs) b->FreeHost(p);
}

TEST(BackendTest, NegativeSizesAreInvalidArgument) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  absl::StatusOr<void*> d = b->AllocateDevice(-1);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
  EXPECT_THAT(d.status().message(), HasSubstr("-1"));

  absl::StatusOr<void*> h = b->AllocateHost(-4096);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument) << h.status();
  EXPECT_THAT(h.status().message(), HasSubstr("-4096"));

  unsigned char src[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  unsigned char dst[8] = {0};
  absl::Status c = b->Copy(dst, src, -3, CopyKind::kHostToDevice);
  EXPECT_EQ(c.code(), absl::StatusCode::kInvalidArgument) << c;
  EXPECT_THAT(c.message(), HasSubstr("-3"));
  for (unsigned char x : dst) EXPECT_EQ(x, 0) << "a rejected copy wrote";

  absl::Status z = b->ZeroDevice(src, -8);
  EXPECT_EQ(z.code(), absl::StatusCode::kInvalidArgument) << z;
  EXPECT_THAT(z.message(), HasSubstr("-8"));
  EXPECT_EQ(src[0], 1) << "a rejected zero wrote";
  EXPECT_EQ(src[7], 8);
}

TEST(BackendTest, CopyEveryKindMovesExactBytes) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  constexpr int64_t kBytes = 10007;  // odd, not a multiple of any vector width
  absl::StatusOr<void*> dev_a = b->AllocateDevice(kBytes + 64);
  absl::StatusOr<void*> dev_b = b->AllocateDevice(kBytes + 64);
  absl::StatusOr<void*> host = b->AllocateHost(kBytes + 64);
  ASSERT_TRUE(dev_a.ok() && dev_b.ok() && host.ok());
  auto* da = static_cast<unsigned char*>(*dev_a);
  auto* db = static_cast<unsigned char*>(*dev_b);
  auto* hb = static_cast<unsigned char*>(*host);
  // Guard bytes after the copied range must not change.
  std::memset(da, 0x11, kBytes + 64);
  std::memset(db, 0x22, kBytes + 64);
  std::memset(hb, 0x33, kBytes + 64);

  const std::vector<unsigned char> src = Pattern(kBytes, 1);
  absl::StatusOr<std::unique_ptr<Stream>> stream = b->CreateStream();
  ASSERT_TRUE(stream.ok());

  // Host -> device, without a stream.
  KVTIER_ASSERT_OK(b->Copy(da, src.data(), kBytes, CopyKind::kHostToDevice));
  EXPECT_EQ(std::memcmp(da, src.data(), kBytes), 0);
  EXPECT_EQ(da[kBytes], 0x11);
  EXPECT_EQ(da[kBytes + 63], 0x11);

  // Device -> device, on a stream (complete once synchronised; on the CPU at once).
  KVTIER_ASSERT_OK(b->Copy(db, da, kBytes, CopyKind::kDeviceToDevice, stream->get()));
  KVTIER_ASSERT_OK((*stream)->Synchronize());
  EXPECT_EQ(std::memcmp(db, src.data(), kBytes), 0);
  EXPECT_EQ(db[kBytes], 0x22);

  // Device -> host.
  KVTIER_ASSERT_OK(b->Copy(hb, db, kBytes, CopyKind::kDeviceToHost, stream->get()));
  KVTIER_ASSERT_OK((*stream)->Synchronize());
  EXPECT_EQ(std::memcmp(hb, src.data(), kBytes), 0);
  EXPECT_EQ(hb[kBytes], 0x33);
  EXPECT_EQ(hb[kBytes + 63], 0x33);

  // A zero-byte copy is a no-op.
  KVTIER_ASSERT_OK(b->Copy(hb, da + 1, 0, CopyKind::kDeviceToHost));
  EXPECT_EQ(std::memcmp(hb, src.data(), kBytes), 0);

  // Partial copy at an offset touches exactly [offset, offset + n).
  const std::vector<unsigned char> src2 = Pattern(100, 2);
  KVTIER_ASSERT_OK(b->Copy(da + 17, src2.data(), 100, CopyKind::kHostToDevice));
  EXPECT_EQ(std::memcmp(da, src.data(), 17), 0);
  EXPECT_EQ(std::memcmp(da + 17, src2.data(), 100), 0);
  EXPECT_EQ(std::memcmp(da + 117, src.data() + 117, kBytes - 117), 0);

  b->FreeDevice(*dev_a);
  b->FreeDevice(*dev_b);
  b->FreeHost(*host);
}

TEST(BackendTest, ZeroDeviceZeroesExactRange) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  absl::StatusOr<void*> dev = b->AllocateDevice(1024);
  ASSERT_TRUE(dev.ok());
  auto* d = static_cast<unsigned char*>(*dev);
  std::memset(d, 0xff, 1024);
  KVTIER_ASSERT_OK(b->ZeroDevice(d + 3, 999));
  for (int i = 0; i < 1024; ++i) {
    const bool inside = i >= 3 && i < 1002;
    ASSERT_EQ(d[i], inside ? 0 : 0xff) << "byte " << i;
  }
  KVTIER_ASSERT_OK(b->ZeroDevice(d, 0));  // no-op
  EXPECT_EQ(d[0], 0xff);
  b->FreeDevice(*dev);
}

TEST(BackendTest, StreamsAndEvents) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  absl::StatusOr<std::unique_ptr<Stream>> s1 = b->CreateStream();
  absl::StatusOr<std::unique_ptr<Stream>> s2 = b->CreateStream();
  ASSERT_TRUE(s1.ok() && s2.ok());
  EXPECT_NE(s1->get(), s2->get());
  KVTIER_EXPECT_OK((*s1)->Synchronize());

  absl::StatusOr<std::unique_ptr<Event>> ev = b->CreateEvent();
  ASSERT_TRUE(ev.ok());
  EXPECT_TRUE((*ev)->Query()) << "a never-recorded event is complete";
  KVTIER_EXPECT_OK((*ev)->Synchronize());

  // Work then record: complete on the CPU by the time Record returns.
  std::vector<unsigned char> src = Pattern(512, 3), dst(512, 0);
  KVTIER_ASSERT_OK(b->Copy(dst.data(), src.data(), 512, CopyKind::kHostToDevice, s1->get()));
  KVTIER_ASSERT_OK((*ev)->Record(**s1));
  EXPECT_TRUE((*ev)->Query());
  KVTIER_EXPECT_OK((*ev)->Synchronize());
  EXPECT_EQ(dst, src);
  // Re-recording on another stream.
  KVTIER_ASSERT_OK((*ev)->Record(**s2));
  EXPECT_TRUE((*ev)->Query());
  KVTIER_EXPECT_OK((*s2)->Synchronize());
}

// ---------------------------------------------------------------- Kernels

TEST(BackendTest, CountNonFiniteF32) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // 37 values: not a multiple of a vector width, so the tail is exercised.
  std::vector<float> v(37, 1.5f);
  v[1] = std::numeric_limits<float>::max();
  v[2] = -std::numeric_limits<float>::max();
  v[3] = std::numeric_limits<float>::denorm_min();
  v[4] = -0.0f;
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 37, DType::kF32), 0);
  v[0] = nan;
  v[10] = inf;
  v[20] = -inf;
  v[36] = -nan;  // the last element (tail)
  float signaling;
  const uint32_t snan = 0x7f800001u;
  std::memcpy(&signaling, &snan, 4);
  v[30] = signaling;
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 37, DType::kF32), 5);
  // n limits the scan.
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 36, DType::kF32), 4);
  EXPECT_EQ(b->kernels().CountNonFinite(v.data() + 1, 9, DType::kF32), 0);
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 0, DType::kF32), 0);
}

TEST(BackendTest, CountNonFiniteF16) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  std::vector<uint16_t> v(41, kernels::FloatToHalf(0.25f));
  v[1] = 0x7bffu;  // 65504, the largest finite half
  v[2] = 0xfbffu;  // -65504
  v[3] = 0x0001u;  // smallest subnormal
  v[4] = 0x8000u;  // -0
  ASSERT_EQ(kernels::HalfToFloat(0x7bffu), 65504.0f);
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 41, DType::kF16), 0);
  v[0] = 0x7e00u;   // NaN
  v[5] = 0x7c00u;   // +inf
  v[6] = 0xfc00u;   // -inf
  v[7] = 0x7c01u;   // signaling NaN
  v[40] = 0xfe00u;  // -NaN, the tail
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 41, DType::kF16), 5);
  EXPECT_EQ(b->kernels().CountNonFinite(v.data() + 1, 4, DType::kF16), 0);
  // Conversion of a float that overflows the half range gives infinity, which is counted.
  v[8] = kernels::FloatToHalf(70000.0f);
  EXPECT_EQ(v[8], 0x7c00u);
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 41, DType::kF16), 6);
}

TEST(BackendTest, CountNonFiniteBf16) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  std::vector<uint16_t> v(33, kernels::FloatToBf16(-3.0f));
  v[1] = 0x7f7fu;  // the largest finite bf16 (~3.39e38)
  v[2] = 0xff7fu;
  v[3] = 0x0001u;
  ASSERT_TRUE(std::isfinite(kernels::Bf16ToFloat(0x7f7fu)));
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 33, DType::kBF16), 0);
  v[0] = 0x7fc0u;   // NaN
  v[9] = 0x7f80u;   // +inf
  v[17] = 0xff80u;  // -inf
  v[32] = 0x7f81u;  // signaling NaN, the tail
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 33, DType::kBF16), 4);
  EXPECT_EQ(b->kernels().CountNonFinite(v.data(), 32, DType::kBF16), 3);
}

TEST(BackendTest, CopyRowsMovesTheNamedRows) {
  std::unique_ptr<Backend> b = Cpu();
  ASSERT_NE(b, nullptr);
  constexpr int64_t kRowBytes = 24;
  constexpr int64_t kSrcStride = 40;  // rows padded in the source
  constexpr int64_t kDstStride = 32;
  constexpr int kSrcRows = 10, kDstRows = 12;
  const std::vector<unsigned char> src = Pattern(kSrcStride * kSrcRows, 11);
  const std::vector<unsigned char> src2 = Pattern(kSrcStride * kSrcRows, 12);
  std::vector<unsigned char> dst(kDstStride * kDstRows, 0xee), dst2(kDstStride * kDstRows, 0xdd);

  const int32_t dst_rows[] = {11, 0, 5, 3};
  const int32_t src_rows[] = {2, 9, 0, 2};  // a source row may be copied twice
  const int32_t dst_rows2[] = {7};
  const int32_t src_rows2[] = {4};
  const kernels::RowCopyParams items[2] = {
      {dst.data(), src.data(), kRowBytes, kDstStride, kSrcStride, 4, dst_rows, src_rows},
      {dst2.data(), src2.data(), kRowBytes, kDstStride, kSrcStride, 1, dst_rows2, src_rows2}};
  b->kernels().CopyRows(items);

  auto expect_rows = [&](const std::vector<unsigned char>& d, const std::vector<unsigned char>& s,
                         std::vector<std::pair<int, int>> moved, unsigned char fill) {
    for (int r = 0; r < kDstRows; ++r) {
      int from = -1;
      for (auto [dr, sr] : moved) {
        if (dr == r) from = sr;
      }
      for (int64_t byte = 0; byte < kDstStride; ++byte) {
        const unsigned char want =
            (from >= 0 && byte < kRowBytes) ? s[from * kSrcStride + byte] : fill;  // padding untouched
        ASSERT_EQ(d[r * kDstStride + byte], want) << "row " << r << " byte " << byte;
      }
    }
  };
  expect_rows(dst, src, {{11, 2}, {0, 9}, {5, 0}, {3, 2}}, 0xee);
  expect_rows(dst2, src2, {{7, 4}}, 0xdd);

  // One item alone (the single-item path) and n = 0 (nothing moves).
  std::vector<unsigned char> dst3(kDstStride * kDstRows, 0x00);
  const int32_t d3[] = {1}, s3[] = {8};
  const kernels::RowCopyParams one{dst3.data(), src.data(), kRowBytes, kDstStride, kSrcStride, 1, d3, s3};
  b->kernels().CopyRows({&one, 1});
  EXPECT_EQ(std::memcmp(dst3.data() + kDstStride, src.data() + 8 * kSrcStride, kRowBytes), 0);
  EXPECT_EQ(dst3[0], 0);
  EXPECT_EQ(dst3[kDstStride + kRowBytes], 0);
  const kernels::RowCopyParams none{dst3.data(), src2.data(), kRowBytes, kDstStride, kSrcStride, 0, d3, s3};
  b->kernels().CopyRows({&none, 1});
  EXPECT_EQ(std::memcmp(dst3.data() + kDstStride, src.data() + 8 * kSrcStride, kRowBytes), 0);
}

}  // namespace
}  // namespace kvtier
