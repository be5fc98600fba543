// Backend conformance of the kernel set (kvtier/kernels/kernel_set.h): every
// backend's kernels, run on that backend's own device memory, against the CPU
// kernels run on host memory as the reference.
//
// Inputs are seeded and built on the host; the backend under test gets them
// through Backend::Copy only (its device memory need not be host-accessible),
// and its results come back the same way. On the CPU backend the kernels are
// the reference code itself, so every result must be bit-identical. Other
// backends accumulate in fp32 in another order (and may use another exp), so
// they are held to the tolerances stated at each comparison; counts,
// integer results, centroid buckets and byte copies are exact everywhere.
// Backends a build or machine lacks are skipped with the reason.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kvtier/backend.h"
#include "kvtier/kernels/convert.h"
#include "kvtier/kernels/hash.h"
#include "kvtier/kernels/kernel_set.h"
#include "cuda_emu/emulated_kernel_set.h"
#include "test_util.h"
#include "workload/synthetic_kv.h"

namespace kvtier {
namespace {

using kernels::FloatBits;
using kernels::SketchState;
using testing::UpdateSketchF32;
using testing::RandomNormal;

// ---------------------------------------------------------------------------
// Device memory and data helpers.

// Device memory of a backend, freed on destruction; moved with Copy only.
// Allocation and copy errors are test failures.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend& b, int64_t bytes) : b_(&b), bytes_(bytes) {
    absl::StatusOr<void*> p = b.AllocateDevice(std::max<int64_t>(bytes, 1));
    if (p.ok()) {
      ptr_ = *p;
    } else {
      ADD_FAILURE() << "AllocateDevice(" << bytes << "): " << p.status();
    }
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : b_(o.b_), ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      b_ = o.b_;
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  int64_t bytes() const { return bytes_; }

  void Upload(const void* src, int64_t bytes, int64_t offset = 0) {
    if (bytes == 0 || ptr_ == nullptr) return;
    ASSERT_LE(offset + bytes, bytes_);
    const absl::Status st = b_->Copy(static_cast<char*>(ptr_) + offset, src, bytes, CopyKind::kHostToDevice);
    EXPECT_TRUE(st.ok()) << "Copy host to device: " << st;
  }
  void Download(void* dst, int64_t bytes, int64_t offset = 0) const {
    if (bytes == 0 || ptr_ == nullptr) return;
    ASSERT_LE(offset + bytes, bytes_);
    const absl::Status st = b_->Copy(dst, static_cast<const char*>(ptr_) + offset, bytes, CopyKind::kDeviceToHost);
    EXPECT_TRUE(st.ok()) << "Copy device to host: " << st;
  }
  template <typename T>
  void Upload(const std::vector<T>& v) {
    Upload(v.data(), static_cast<int64_t>(v.size() * sizeof(T)));
  }
  template <typename T>
  std::vector<T> DownloadAs() const {
    std::vector<T> v(bytes_ / sizeof(T));
    Download(v.data(), static_cast<int64_t>(v.size() * sizeof(T)));
    return v;
  }

 private:
  void Reset() {
    if (ptr_ != nullptr) b_->FreeDevice(ptr_);
    ptr_ = nullptr;
  }

  Backend* b_ = nullptr;
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

template <typename T>
DeviceBuffer ToDevice(Backend& b, const std::vector<T>& v) {
  DeviceBuffer d(b, static_cast<int64_t>(v.size() * sizeof(T)));
  d.Upload(v);
  return d;
}

// fp32 values stored as dtype t (round to nearest even), as raw bytes.
std::vector<uint8_t> Encode(const std::vector<float>& x, DType t) {
  std::vector<uint8_t> out(x.size() * DTypeSize(t));
  kernels::FloatToRow(x.data(), t, static_cast<int>(x.size()), out.data());
  return out;
}

std::vector<float> Decode(const void* src, DType t, int64_t n) {
  std::vector<float> out(n);
  kernels::RowToFloat(src, t, static_cast<int>(n), out.data());
  return out;
}

// The values as the kernels see them: rounded to dtype t.
std::vector<float> RoundTo(const std::vector<float>& x, DType t) {
  const std::vector<uint8_t> e = Encode(x, t);
  return Decode(e.data(), t, static_cast<int64_t>(x.size()));
}

// One unit in the last place of dtype t relative to a value: two roundings of
// fp32 values that differ by less than the fp32 tolerance can land one unit
// apart. fp32 outputs are not rounded again, so no term.
double OutputUlp(DType t) { return t == DType::kF32 ? 0.0 : (t == DType::kF16 ? 0x1p-10 : 0x1p-7); }

double MaxAbs(const std::vector<float>& x) {
  double m = 0;
  for (float f : x) m = std::max(m, std::abs(double(f)));
  return m;
}

// Compares `got` with the reference `want`: bitwise when bit_exact, else
// |got - want| <= tol(i) (a NaN reference needs a NaN). Reports the first few
// mismatches and their count.
template <typename Tol>
void CompareFloats(const float* got, const float* want, int64_t n, bool bit_exact, const Tol& tol,
                   const std::string& what) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bool ok;
    if (bit_exact) {
      ok = FloatBits(got[i]) == FloatBits(want[i]);
    } else if (std::isnan(want[i])) {
      ok = std::isnan(got[i]);
    } else {
      ok = std::abs(double(got[i]) - double(want[i])) <= tol(i);  // false for a NaN got
    }
    if (!ok && ++bad <= 5) {
      ::testing::Message m;
      m << what << "[" << i << "]: got " << got[i] << " want " << want[i];
      if (bit_exact) {
        m << " (bit-identical required)";
      } else {
        m << " tolerance " << tol(i);
      }
      ADD_FAILURE() << m;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << n << " elements differ";
}

// ---------------------------------------------------------------------------
// Sketches.

int Bits(int width) { return std::countr_zero(static_cast<unsigned>(width)); }

// Points a SketchState's arrays into one block of SketchStateFloats floats.
SketchState BindSketch(SketchKind kind, int rows, int width, int d, uint32_t seed, float* mem, const float* planes) {
  const int64_t cells = static_cast<int64_t>(rows) * width;
  SketchState s;
  s.kind = kind;
  s.rows = rows;
  s.width = width;
  s.head_dim = d;
  s.seed = seed;
  s.key_sums = mem;
  s.value_sums = mem + cells * d;
  s.counts = mem + 2 * cells * d;
  s.totals = s.counts + 2 * cells;
  s.planes = planes;
  return s;
}

// A sketch in host memory (the reference's), empty, with SimHash planes for
// the centroid kind.
struct HostSketch {
  HostSketch(SketchKind kind, int rows, int width, int d, uint32_t seed) {
    mem.assign(kernels::SketchStateFloats(rows, width, d), 0.0f);
    if (kind == SketchKind::kCentroid) {
      planes = RandomNormal(static_cast<int64_t>(rows) * Bits(width) * d, seed + 99);
    }
    s = BindSketch(kind, rows, width, d, seed, mem.data(), planes.empty() ? nullptr : planes.data());
  }
  std::vector<float> mem, planes;
  SketchState s;
};

// A copy of a HostSketch's arrays and planes in the device memory of a backend.
struct DeviceSketch {
  DeviceSketch(Backend& b, const HostSketch& h) : mem(ToDevice(b, h.mem)) {
    if (!h.planes.empty()) planes = ToDevice(b, h.planes);
    s = BindSketch(h.s.kind, h.s.rows, h.s.width, h.s.head_dim, h.s.seed, mem.as<float>(),
                   h.planes.empty() ? nullptr : planes.as<float>());
  }
  std::vector<float> Download() const { return mem.DownloadAs<float>(); }
  DeviceBuffer mem, planes;
  SketchState s;
};

// Bucket (row-major index into [rows][width]) of token i in row r.
int64_t CellOf(const SketchState& s, int r, uint32_t id, const uint32_t* buckets, int64_t i) {
  if (s.kind == SketchKind::kCountSketch) {
    return static_cast<int64_t>(r) * s.width + kernels::Bucket(kernels::TokenHash(kernels::RowSeed(s.seed, r), id), s.width);
  }
  return static_cast<int64_t>(r) * s.width + buckets[i * s.rows + r];
}

// Per element of a token's reconstruction (SketchEstimate, keys when
// `values` is false): the sum of the magnitudes of the terms it adds, the
// scale fp32 rounding errors are relative to.
std::vector<double> EstimateMagnitude(const SketchState& s, VaguePolicy policy, uint32_t id, const uint32_t* buckets,
                                      int64_t i, bool values) {
  const int d = s.head_dim;
  const float n = s.totals[2 * d];
  const double inv = n > 0.5f ? 1.0 / n : 0.0;
  const double alpha = s.kind == SketchKind::kCountSketch && policy == VaguePolicy::kShrink
                           ? double(s.rows) * s.width / (double(s.rows) * s.width + std::max(n - 1.0, 0.0))
                           : 1.0;
  const float* sums = values ? s.value_sums : s.key_sums;
  std::vector<double> mag(d, 0.0);
  for (int r = 0; r < s.rows; ++r) {
    const int64_t bb = CellOf(s, r, id, buckets, i);
    for (int j = 0; j < d; ++j) {
      const double mu = std::abs(s.totals[(values ? d : 0) + j] * inv);
      if (s.kind == SketchKind::kCountSketch) {
        const double sigma = std::abs(s.counts[2 * bb] - s.counts[2 * bb + 1]);
        mag[j] += alpha / s.rows * (std::abs(sums[bb * d + j]) + sigma * mu) + mu / s.rows;
      } else {
        const float cnt = s.counts[2 * bb];
        mag[j] += cnt > 0.5f ? std::abs(sums[bb * d + j]) / (cnt * s.rows) : 0.0;
      }
    }
  }
  return mag;
}

// Adds to `mag` (one double per float of the sketch's arrays) the magnitude
// of every term n tokens add to (or take from) key/value sums and totals.
// key(j), value(j): token j's fp32 key and value; buckets [n][rows] (centroid).
template <typename KeyFn, typename ValueFn>
void AddMagnitude(const SketchState& s, std::vector<double>& mag, int64_t n, const uint32_t* ids,
                  const uint32_t* buckets, const KeyFn& key, const ValueFn& value) {
  const int d = s.head_dim;
  const int64_t cells = int64_t{s.rows} * s.width;
  for (int64_t j = 0; j < n; ++j) {
    const float* k = key(j);
    const float* v = value(j);
    for (int r = 0; r < s.rows; ++r) {
      const int64_t bb = CellOf(s, r, ids[j], buckets, j);
      for (int e = 0; e < d; ++e) {
        mag[bb * d + e] += std::abs(k[e]);
        mag[(cells + bb) * d + e] += std::abs(v[e]);
      }
    }
    for (int e = 0; e < d; ++e) {
      mag[2 * cells * d + 2 * cells + e] += std::abs(k[e]);
      mag[2 * cells * d + 2 * cells + d + e] += std::abs(v[e]);
    }
  }
}

// Compares a sketch's arrays (SketchStateFloats floats) with the reference's.
// Sums: fp32 sums of the same terms in another order, error below 1e-5 of
// the sum of their magnitudes (`mag`, from AddMagnitude). Counts (and the
// token count in totals) are sums of +-1: exact. A bucket or the totals that
// emptied are cleared to exactly 0 on every backend (the reference checks
// count <= 0.5 after each token).
void CompareSketchArrays(const std::vector<float>& got, const std::vector<float>& want, const std::vector<double>& mag,
                         const SketchState& s, bool bit_exact, const std::string& what) {
  const int d = s.head_dim;
  const int64_t cells = int64_t{s.rows} * s.width;
  const int64_t counts_at = 2 * cells * d, totals_at = counts_at + 2 * cells;
  ASSERT_EQ(got.size(), want.size()) << what;
  CompareFloats(got.data(), want.data(), static_cast<int64_t>(want.size()), bit_exact,
                [&](int64_t e) -> double {
                  if (e >= counts_at && e < totals_at) return 0.0;
                  if (e >= totals_at + 2 * d) return 0.0;
                  if (e < counts_at) {
                    const int64_t bb = (e / d) % cells;
                    if (want[counts_at + 2 * bb] == 0.0f && want[counts_at + 2 * bb + 1] == 0.0f) return 0.0;
                  }
                  if (e >= totals_at && want[totals_at + 2 * d] == 0.0f) return 0.0;
                  return 1e-5 * mag[e];
                },
                what + " sketch arrays");
}

// Tolerances of SketchScores: score = scale * max_g q_g . k_hat is a fp32
// dot product of q with the reconstruction's terms, in another order: error
// below 1e-5 of scale * max_g sum_j |q_gj| * (sum of |terms| of k_hat_j).
std::vector<double> ScoreTolerances(const SketchState& s, VaguePolicy policy, const std::vector<uint32_t>& ids,
                                    const uint32_t* buckets, const std::vector<float>& qf, int group, float scale) {
  const int d = s.head_dim;
  std::vector<double> tol(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::vector<double> m = EstimateMagnitude(s, policy, ids[i], buckets, static_cast<int64_t>(i), false);
    double best = 0;
    for (int g = 0; g < group; ++g) {
      double sum = 0;
      for (int j = 0; j < d; ++j) sum += std::abs(qf[int64_t{g} * d + j]) * m[j];
      best = std::max(best, sum);
    }
    tol[i] = 1e-5 * scale * best + 1e-7;
  }
  return tol;
}

// Rows of d elements of `es` bytes with their coordinates permuted:
// out[r][j] = in[r][perm[j]], or the inverse, out[r][perm[j]] = in[r][j].
template <typename T>
std::vector<T> PermuteCoords(const std::vector<T>& in, int d, size_t es, const std::vector<int>& perm,
                             bool inverse = false) {
  std::vector<T> out(in.size());
  const size_t row = d * es / sizeof(T);
  const size_t rows = in.size() / row;
  const auto* src = reinterpret_cast<const uint8_t*>(in.data());
  auto* dst = reinterpret_cast<uint8_t*>(out.data());
  for (size_t r = 0; r < rows; ++r) {
    for (int j = 0; j < d; ++j) {
      const size_t to = (r * d + (inverse ? perm[j] : j)) * es, from = (r * d + (inverse ? j : perm[j])) * es;
      std::memcpy(dst + to, src + from, es);
    }
  }
  return out;
}

// A sketch's arrays with the coordinates of every key/value sum and of the
// totals permuted (counts and the token count stay).
std::vector<float> PermuteSketch(const std::vector<float>& mem, const SketchState& s, const std::vector<int>& perm) {
  const int d = s.head_dim;
  const int64_t sums = 2LL * s.rows * s.width * d, totals_at = sums + 2LL * s.rows * s.width;
  std::vector<float> out = mem;
  const std::vector<float> a = PermuteCoords(std::vector<float>(mem.begin(), mem.begin() + sums), d, 4, perm);
  const std::vector<float> t =
      PermuteCoords(std::vector<float>(mem.begin() + totals_at, mem.begin() + totals_at + 2 * d), d, 4, perm);
  std::copy(a.begin(), a.end(), out.begin());
  std::copy(t.begin(), t.end(), out.begin() + totals_at);
  return out;
}

std::vector<int> Shuffled(int d, uint32_t seed) {
  std::vector<int> perm(d);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(seed));
  return perm;
}

// ---------------------------------------------------------------------------
// The fixture: one backend kind per instantiation.

// The backends under test: the CPU (the reference code: bit-exact), CUDA
// (skipped without a device) and the CUDA kernels on the CPU emulation of
// CUDA (tests/cuda_emu), which runs everywhere.
enum class Under { kCpu, kCuda, kCudaEmulated };

std::string UnderName(Under u) {
  switch (u) {
    case Under::kCpu: return "cpu";
    case Under::kCuda: return "cuda";
    case Under::kCudaEmulated: return "cuda_emulated";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackendUnderTest(Under u) {
  switch (u) {
    case Under::kCpu: return CreateBackend(BackendKind::kCpu);
    case Under::kCuda: return CreateBackend(BackendKind::kCuda);
    case Under::kCudaEmulated: return MakeEmulatedCudaBackend();
  }
  return absl::InvalidArgumentError("unknown backend under test");
}

class KernelConformance : public ::testing::TestWithParam<Under> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> b = MakeBackendUnderTest(GetParam());
    if (!b.ok()) GTEST_SKIP() << "no " << UnderName(GetParam()) << " backend: " << b.status();
    backend_ = std::move(*b);
    // The CPU backend runs the reference code: nothing may differ.
    bit_exact_ = backend_->kernels().name() == "cpu";
  }

  Backend& backend() { return *backend_; }
  kernels::KernelSet& dev() { return backend_->kernels(); }

  std::unique_ptr<kernels::KernelSet> ref_ = kernels::MakeCpuKernelSet();
  std::unique_ptr<Backend> backend_;
  bool bit_exact_ = false;
};

// ---------------------------------------------------------------------------
// 1. Attend.

struct AttendCase {
  DType dtype;
  int d;
  int group;
  SketchKind kind;
  int rows;
  VaguePolicy policy;
  bool probs;        // with slot_probs
  bool out_storage;  // out in the storage dtype (else fp32)
  int layout;        // resident ranges: see Ranges()
  int vague;         // sketched tokens (0: an empty sketch)
};

constexpr int kCapacity = 128;

// Resident slots of a capacity-128 slot array: 0 none, 2-4 ranges with gaps
// (sinks, ring, candidates; layout 4 has an empty range too).
std::vector<kernels::SlotRange> Ranges(int layout) {
  switch (layout) {
    case 0: return {{5, 0}};
    case 2: return {{0, 4}, {20, 60}};
    case 3: return {{0, 4}, {12, 40}, {70, 24}};
    default: return {{0, 4}, {9, 0}, {16, 48}, {80, 30}};
  }
}

std::string AttendCaseName(const AttendCase& c) {
  // Appends, not a chain of operator+ (GCC 12 warns falsely on long chains).
  std::string s(DTypeName(c.dtype));
  s += "_d";
  s += std::to_string(c.d);
  s += "_g";
  s += std::to_string(c.group);
  s += "_";
  s += SketchKindName(c.kind);
  if (c.kind != SketchKind::kNone) {
    s += "x";
    s += std::to_string(c.rows);
  }
  s += "_";
  s += VaguePolicyName(c.policy);
  if (c.probs) s += "_probs";
  s += "_out";
  s += c.out_storage ? DTypeName(c.dtype) : DTypeName(DType::kF32);
  s += "_ranges";
  s += std::to_string(c.layout);
  s += "_vague";
  s += std::to_string(c.vague);
  return s;
}

// One Attend item: host inputs, the reference result and the device buffers.
struct AttendItemData {
  AttendCase c;
  std::vector<kernels::SlotRange> ranges;
  std::vector<uint8_t> q, k, v;
  std::vector<uint32_t> vague_ids;
  std::unique_ptr<HostSketch> sketch;
  kernels::AttendParams host;  // reference params on host memory
  std::vector<uint8_t> ref_out;
  std::vector<float> ref_probs;
  double vmax = 0;  // largest |value| attention mixes (resident, vague, reconstructions)

  DeviceBuffer dq, dk, dv, dout, dprobs, dids;
  std::unique_ptr<DeviceSketch> dsketch;
  kernels::AttendParams devp;
};

constexpr float kProbSentinel = -7.0f;  // slots outside the ranges keep it

std::unique_ptr<AttendItemData> MakeAttendItem(const AttendCase& c, uint64_t seed, kernels::KernelSet& ref,
                                               Backend& b) {
  auto it = std::make_unique<AttendItemData>();
  it->c = c;
  it->ranges = Ranges(c.layout);
  const int d = c.d;
  const DType out_t = c.out_storage ? c.dtype : DType::kF32;
  // Keys share an offset (as real keys do), values do not.
  it->q = Encode(RandomNormal(int64_t{c.group} * d, seed, 0.5f), c.dtype);
  const std::vector<float> kf = RoundTo(RandomNormal(int64_t{kCapacity} * d, seed + 1, 1.0f, 0.3f), c.dtype);
  const std::vector<float> vf = RoundTo(RandomNormal(int64_t{kCapacity} * d, seed + 2), c.dtype);
  it->k = Encode(kf, c.dtype);
  it->v = Encode(vf, c.dtype);
  for (const kernels::SlotRange& r : it->ranges) {
    for (int j = 0; j < r.count * d; ++j) it->vmax = std::max(it->vmax, std::abs(double(vf[r.begin * d + j])));
  }

  kernels::AttendParams& p = it->host;
  p.head_dim = d;
  p.group = c.group;
  p.dtype = c.dtype;
  p.out_dtype = out_t;
  p.scale = 1.0f / std::sqrt(float(d));
  p.policy = c.policy;
  p.ranges = it->ranges.data();
  p.num_ranges = static_cast<int32_t>(it->ranges.size());

  if (c.kind != SketchKind::kNone) {
    const int width = 64;
    it->sketch = std::make_unique<HostSketch>(c.kind, c.rows, width, d, static_cast<uint32_t>(seed * 7 + 3));
    if (c.vague > 0) {
      // Two inserted chunks (the mean moves between them), then every 5th
      // token removed again: buckets that empty are cleared, others shrink.
      const int n1 = c.vague / 2 + 5, n2 = c.vague - c.vague / 2 + 5;
      std::vector<uint32_t> ids1(n1), ids2(n2), b1, b2;
      for (int i = 0; i < n1; ++i) ids1[i] = 1000 + 3 * i;
      for (int i = 0; i < n2; ++i) ids2[i] = 1001 + 3 * i;
      const std::vector<float> k1 = RandomNormal(int64_t{n1} * d, seed + 3, 1.0f, 0.3f),
                               v1 = RandomNormal(int64_t{n1} * d, seed + 4);
      const std::vector<float> k2 = RandomNormal(int64_t{n2} * d, seed + 5, 1.0f, 0.3f),
                               v2 = RandomNormal(int64_t{n2} * d, seed + 6);
      UpdateSketchF32(ref, it->sketch->s, 1.0f, k1, v1, ids1, &b1);
      UpdateSketchF32(ref, it->sketch->s, 1.0f, k2, v2, ids2, &b2);
      it->vmax = std::max({it->vmax, MaxAbs(v1), MaxAbs(v2)});
      // Remove 5 + 5 tokens (every 5th of each chunk, with their buckets).
      for (int chunk = 0; chunk < 2; ++chunk) {
        const std::vector<uint32_t>& ids = chunk == 0 ? ids1 : ids2;
        const std::vector<float>& kk = chunk == 0 ? k1 : k2;
        const std::vector<float>& vv = chunk == 0 ? v1 : v2;
        const std::vector<uint32_t>& bk = chunk == 0 ? b1 : b2;
        std::vector<uint32_t> rid, rb;
        std::vector<float> rk, rv;
        for (int i = 0, m = 0; i < static_cast<int>(ids.size()); ++i) {
          const bool remove = i % 5 == 0 && m < 5;
          if (remove) {
            ++m;
            rid.push_back(ids[i]);
            rk.insert(rk.end(), kk.begin() + int64_t{i} * d, kk.begin() + int64_t{i + 1} * d);
            rv.insert(rv.end(), vv.begin() + int64_t{i} * d, vv.begin() + int64_t{i + 1} * d);
            if (!bk.empty()) rb.insert(rb.end(), bk.begin() + int64_t{i} * c.rows, bk.begin() + int64_t{i + 1} * c.rows);
          } else {
            it->vague_ids.push_back(ids[i]);
          }
        }
        UpdateSketchF32(ref, it->sketch->s, -1.0f, rk, rv, rid, &rb);
      }
      EXPECT_EQ(it->sketch->s.totals[2 * d], static_cast<float>(c.vague));
      // The data must reach the paths a backend can get wrong: empty buckets
      // (skipped: no log(0), no 0/0) and, for Count-Sketch, buckets with
      // tokens of one sign only and of both.
      int empty = 0, one_sign = 0, both = 0;
      for (int64_t bb = 0; bb < int64_t{c.rows} * width; ++bb) {
        const float cp = it->sketch->s.counts[2 * bb], cn = it->sketch->s.counts[2 * bb + 1];
        empty += cp == 0.0f && cn == 0.0f;
        one_sign += (cp == 0.0f) != (cn == 0.0f);
        both += cp > 0.0f && cn > 0.0f;
      }
      EXPECT_GT(empty, 0) << AttendCaseName(c);
      if (c.kind == SketchKind::kCountSketch) {
        EXPECT_GT(one_sign, 0) << AttendCaseName(c);
        EXPECT_GT(both, 0) << AttendCaseName(c);
      }
      if (c.kind == SketchKind::kCountSketch) {
        // Count-Sketch mixes reconstructed values, which can exceed any
        // token's value: include them in the value scale.
        std::vector<float> ke(it->vague_ids.size() * d), ve(it->vague_ids.size() * d);
        kernels::SketchEstimateParams e;
        e.sketch = it->sketch->s;
        e.policy = c.policy == VaguePolicy::kDrop ? VaguePolicy::kEstimate : c.policy;
        e.n = static_cast<int32_t>(it->vague_ids.size());
        e.ids = it->vague_ids.data();
        e.keys = ke.data();
        e.values = ve.data();
        ref.SketchEstimate(e);
        it->vmax = std::max(it->vmax, MaxAbs(ve));
      }
    }
    p.sketch = it->sketch->s;
    if (c.kind == SketchKind::kCountSketch && c.rows >= 2) {
      p.vague_ids = it->vague_ids.data();
      p.num_vague = static_cast<int32_t>(it->vague_ids.size());
    }
  }

  // Reference on host memory.
  it->ref_out.assign(int64_t{c.group} * d * DTypeSize(out_t), 0xAB);
  it->ref_probs.assign(kCapacity, kProbSentinel);
  p.q = it->q.data();
  p.k_slots = it->k.data();
  p.v_slots = it->v.data();
  p.out = it->ref_out.data();
  p.slot_probs = c.probs ? it->ref_probs.data() : nullptr;
  ref.Attend({&p, 1});

  // The same on the device (outputs are (re)set by ResetDeviceOutputs).
  it->dq = ToDevice(b, it->q);
  it->dk = ToDevice(b, it->k);
  it->dv = ToDevice(b, it->v);
  it->dout = DeviceBuffer(b, static_cast<int64_t>(it->ref_out.size()));
  it->dprobs = DeviceBuffer(b, kCapacity * sizeof(float));
  kernels::AttendParams& dp = it->devp;
  dp = p;
  dp.q = it->dq.get();
  dp.k_slots = it->dk.get();
  dp.v_slots = it->dv.get();
  dp.out = it->dout.get();
  dp.slot_probs = c.probs ? it->dprobs.as<float>() : nullptr;
  if (it->sketch) {
    it->dsketch = std::make_unique<DeviceSketch>(b, *it->sketch);
    dp.sketch = it->dsketch->s;
  }
  if (p.vague_ids != nullptr) {
    it->dids = ToDevice(b, it->vague_ids);
    dp.vague_ids = it->dids.as<uint32_t>();
  }
  return it;
}

void ResetDeviceOutputs(AttendItemData& it) {
  const std::vector<uint8_t> junk(it.ref_out.size(), 0xCD);
  it.dout.Upload(junk);
  it.dprobs.Upload(std::vector<float>(kCapacity, kProbSentinel));
}

// Compares an Attend output (raw, in the item's out dtype) and slot_probs
// with the item's reference.
void CompareAttendOutputs(const AttendItemData& it, const std::vector<uint8_t>& got_raw,
                          const std::vector<float>& probs, bool bit_exact, const std::string& what) {
  const AttendCase& c = it.c;
  const DType out_t = it.host.out_dtype;
  const int64_t n = int64_t{c.group} * c.d;
  const std::vector<float> got = Decode(got_raw.data(), out_t, n), want = Decode(it.ref_out.data(), out_t, n);
  // Outputs are convex mixes of values (resident, bucket means, or Count-
  // Sketch reconstructions), computed in fp32 over at most a few hundred
  // terms in another order, with exp errors of a few ulp: the error stays
  // below ~sqrt(n) 2^-24 per term, which 2e-5 * max|value| covers with room
  // (it also covers logit errors: a relative error e of a probability moves
  // the output by at most e * max|value|). A 16-bit output then rounds once
  // more: one unit in its last place.
  const double ulp = OutputUlp(out_t);
  CompareFloats(got.data(), want.data(), n, bit_exact,
                [&](int64_t i) { return 2e-5 * it.vmax + ulp * std::abs(double(want[i])); }, what + " out");
  if (c.probs) {
    // Slot probabilities (sums over the group of softmax probabilities) carry
    // the relative error of their logits' exp: 2e-5 relative, with a 1e-7
    // floor per query head for probabilities too small to matter. Slots
    // outside the ranges must keep the sentinel on every backend.
    CompareFloats(probs.data(), it.ref_probs.data(), kCapacity, bit_exact,
                  [&](int64_t i) {
                    return it.ref_probs[i] == kProbSentinel ? 0.0 : 2e-5 * std::abs(it.ref_probs[i]) + 1e-7 * c.group;
                  },
                  what + " slot_probs");
  }
}

void CompareAttend(const AttendItemData& it, bool bit_exact, const std::string& what) {
  CompareAttendOutputs(it, it.dout.DownloadAs<uint8_t>(), it.dprobs.DownloadAs<float>(), bit_exact, what);
}

std::vector<AttendCase> AttendCases() {
  using enum SketchKind;
  using enum VaguePolicy;
  const DType f32 = DType::kF32, f16 = DType::kF16, bf16 = DType::kBF16;
  // Every dtype, head_dim, group, sketch kind and row count, policy, output
  // dtype, range layout and slot_probs on/off appears; plus the edge cases:
  // a dropped sketch, an empty sketch, no resident slot (sketch only), and
  // nothing at all (all-zero output).
  return {
      {f32, 64, 1, kNone, 0, kDrop, true, false, 2, 0},
      {f16, 128, 4, kCentroid, 1, kEstimate, true, true, 3, 150},
      {bf16, 64, 8, kCentroid, 2, kShrink, false, false, 4, 120},
      {f32, 128, 8, kCountSketch, 1, kShrink, true, false, 3, 130},
      {f16, 64, 1, kCountSketch, 1, kEstimate, false, true, 4, 90},
      {bf16, 128, 4, kCountSketch, 2, kEstimate, true, true, 2, 110},
      {f16, 64, 8, kCountSketch, 3, kShrink, true, false, 3, 80},
      {f32, 64, 4, kCentroid, 1, kDrop, true, false, 2, 60},
      {bf16, 64, 1, kCentroid, 1, kEstimate, false, true, 0, 70},
      {f16, 128, 1, kNone, 0, kDrop, true, true, 0, 0},
      {f32, 64, 4, kCountSketch, 2, kShrink, true, false, 3, 0},
      {bf16, 128, 8, kCentroid, 1, kShrink, true, false, 3, 100},
      {f32, 128, 1, kCountSketch, 2, kShrink, false, true, 0, 50},
  };
}

TEST_P(KernelConformance, AttendMatchesReference) {
  const std::vector<AttendCase> cases = AttendCases();
  std::vector<std::unique_ptr<AttendItemData>> items;
  for (size_t i = 0; i < cases.size(); ++i) items.push_back(MakeAttendItem(cases[i], 100 + 10 * i, *ref_, backend()));
  ASSERT_FALSE(HasFailure());

  // The reference outputs are what the cases are meant to test.
  for (const auto& it : items) {
    const std::vector<float> out =
        Decode(it->ref_out.data(), it->host.out_dtype, int64_t{it->c.group} * it->c.d);
    const bool nothing = it->c.layout == 0 && (it->c.kind == SketchKind::kNone || it->c.vague == 0);
    for (float f : out) {
      ASSERT_TRUE(std::isfinite(f)) << AttendCaseName(it->c);
      if (nothing) {
        ASSERT_EQ(FloatBits(f), 0u) << "no token at all attends to +0: " << AttendCaseName(it->c);
      }
    }
    if (!nothing) {
      EXPECT_GT(MaxAbs(out), 0.0) << AttendCaseName(it->c);
    }
  }

  // Each item alone.
  for (const auto& it : items) {
    ResetDeviceOutputs(*it);
    dev().Attend({&it->devp, 1});
    CompareAttend(*it, bit_exact_, "alone " + AttendCaseName(it->c));
  }
  // All items in one batched call.
  std::vector<kernels::AttendParams> batch;
  for (const auto& it : items) {
    ResetDeviceOutputs(*it);
    batch.push_back(it->devp);
  }
  dev().Attend(batch);
  for (const auto& it : items) CompareAttend(*it, bit_exact_, "batched " + AttendCaseName(it->c));
}

// The sketch's contribution is really in the output: the same item with
// kDrop differs (guards against a backend ignoring the sketch and against the
// comparison above passing vacuously on sketch cases).
TEST_P(KernelConformance, AttendSketchPolicyChangesOutput) {
  AttendCase c{DType::kF32, 64, 4, SketchKind::kCentroid, 1, VaguePolicy::kEstimate, false, false, 2, 100};
  std::unique_ptr<AttendItemData> est = MakeAttendItem(c, 7, *ref_, backend());
  c.policy = VaguePolicy::kDrop;
  std::unique_ptr<AttendItemData> drop = MakeAttendItem(c, 7, *ref_, backend());
  ASSERT_FALSE(HasFailure());
  for (AttendItemData* it : {est.get(), drop.get()}) {
    ResetDeviceOutputs(*it);
    dev().Attend({&it->devp, 1});
  }
  const std::vector<float> a = est->dout.DownloadAs<float>(), b = drop->dout.DownloadAs<float>();
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, std::abs(double(a[i]) - b[i]));
  EXPECT_GT(diff, 1e-3);
  CompareAttend(*est, bit_exact_, "estimate");
  CompareAttend(*drop, bit_exact_, "drop");
}

// ---------------------------------------------------------------------------
// 2. SketchUpdate.

struct UpdateConfig {
  SketchKind kind;
  int rows, width, d;
  DType dtype;
};

// A batch of tokens in one key/value array, as the runtime hands them over:
// rows `rows_index` (or 0..n-1) of a [rows][stride] array in `dtype`.
struct TokenBatch {
  std::vector<uint32_t> ids;
  std::vector<int32_t> rows_index;  // empty: contiguous
  std::vector<uint8_t> k, v;        // encoded
  std::vector<float> kf, vf;        // decoded, [array rows][stride]
  int64_t stride = 0;
  const float* Key(int i) const {
    return kf.data() + (rows_index.empty() ? i : rows_index[i]) * stride;
  }
  const float* Value(int i) const {
    return vf.data() + (rows_index.empty() ? i : rows_index[i]) * stride;
  }
};

// Per sketch: the reference's sketch, the device's copy, the centroid
// buckets each side wrote, and the magnitude mirror.
struct UpdateItem {
  UpdateConfig cfg;
  std::unique_ptr<HostSketch> host;
  std::unique_ptr<DeviceSketch> dev;
  std::vector<double> mag;  // per key/value_sums and totals float: sum of |terms| so far
};

TEST_P(KernelConformance, SketchUpdateMatchesReference) {
  const std::vector<UpdateConfig> configs = {
      {SketchKind::kCountSketch, 1, 64, 64, DType::kF32},  {SketchKind::kCountSketch, 1, 64, 64, DType::kF16},
      {SketchKind::kCountSketch, 3, 32, 128, DType::kF32}, {SketchKind::kCountSketch, 3, 32, 128, DType::kF16},
      {SketchKind::kCentroid, 1, 16, 64, DType::kF32},     {SketchKind::kCentroid, 1, 16, 64, DType::kF16},
      {SketchKind::kCentroid, 2, 32, 128, DType::kF32},    {SketchKind::kCentroid, 2, 32, 128, DType::kF16},
  };
  std::vector<UpdateItem> items(configs.size());
  for (size_t i = 0; i < configs.size(); ++i) {
    const UpdateConfig& c = configs[i];
    items[i].cfg = c;
    items[i].host = std::make_unique<HostSketch>(c.kind, c.rows, c.width, c.d, 0x5eed0000u + static_cast<uint32_t>(i));
    items[i].dev = std::make_unique<DeviceSketch>(backend(), *items[i].host);
    items[i].mag.assign(items[i].host->mem.size(), 0.0);
  }
  ASSERT_FALSE(HasFailure());

  // Makes item i's batch for a step: scattered rows of a padded array
  // (rows_index) or a contiguous one.
  auto make_batch = [&](const UpdateConfig& c, uint64_t seed, int n, bool scattered, uint32_t first_id) {
    TokenBatch t;
    const int array_rows = scattered ? n + 23 : n;
    t.stride = scattered ? c.d + 8 : c.d;
    t.kf = RoundTo(RandomNormal(array_rows * t.stride, seed, 1.0f, 0.3f), c.dtype);
    t.vf = RoundTo(RandomNormal(array_rows * t.stride, seed + 1), c.dtype);
    t.k = Encode(t.kf, c.dtype);
    t.v = Encode(t.vf, c.dtype);
    for (int i = 0; i < n; ++i) t.ids.push_back(first_id + 2 * i);
    if (scattered) {
      std::vector<int32_t> perm(array_rows);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), std::mt19937(static_cast<uint32_t>(seed)));
      t.rows_index.assign(perm.begin(), perm.begin() + n);
    }
    return t;
  };
  // The tokens of `t` selected by `pick`, as a new batch on the same arrays.
  auto subset = [](const TokenBatch& t, const std::vector<int>& pick) {
    TokenBatch s = t;
    s.ids.clear();
    s.rows_index.clear();
    for (int i : pick) {
      s.ids.push_back(t.ids[i]);
      s.rows_index.push_back(t.rows_index.empty() ? i : t.rows_index[i]);
    }
    return s;
  };

  // Runs one step (the same batch kind on every sketch) on both sides and
  // compares. ref_buckets/dev_buckets: per item, centroid buckets written on
  // insert or read on remove.
  std::vector<std::vector<DeviceBuffer>> keep(items.size());
  auto step = [&](const std::string& what, float sign, std::vector<TokenBatch>& batches,
                  std::vector<std::vector<uint32_t>>& ref_buckets, std::vector<std::vector<uint32_t>>& dev_buckets) {
    std::vector<kernels::SketchUpdateParams> rp(items.size()), dp(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      const TokenBatch& t = batches[i];
      const SketchState& s = items[i].host->s;
      kernels::SketchUpdateParams p;
      p.sign = sign;
      p.n = static_cast<int32_t>(t.ids.size());
      p.ids = t.ids.data();
      p.stride = t.stride;
      p.rows_index = t.rows_index.empty() ? nullptr : t.rows_index.data();
      p.dtype = items[i].cfg.dtype;
      if (s.kind == SketchKind::kCentroid && sign > 0) {
        ref_buckets[i].assign(t.ids.size() * s.rows, 0xFFFFFFFFu);
        dev_buckets[i].assign(t.ids.size() * s.rows, 0xFFFFFFFFu);
      }
      rp[i] = p;
      rp[i].sketch = s;
      rp[i].keys = t.k.data();
      rp[i].values = t.v.data();
      rp[i].buckets = s.kind == SketchKind::kCentroid ? ref_buckets[i].data() : nullptr;
      dp[i] = p;
      dp[i].sketch = items[i].dev->s;
      keep[i].push_back(ToDevice(backend(), t.k));
      dp[i].keys = keep[i].back().get();
      keep[i].push_back(ToDevice(backend(), t.v));
      dp[i].values = keep[i].back().get();
      dp[i].buckets = s.kind == SketchKind::kCentroid ? dev_buckets[i].data() : nullptr;
    }
    ref_->SketchUpdate(rp);
    dev().SketchUpdate(dp);

    for (size_t i = 0; i < items.size(); ++i) {
      UpdateItem& it = items[i];
      const SketchState& s = it.host->s;
      const int d = s.head_dim;
      const TokenBatch& t = batches[i];
      const std::string name = what + " " + std::string(SketchKindName(s.kind)) + "x" + std::to_string(s.rows) + " " +
                               std::string(DTypeName(it.cfg.dtype));
      if (s.kind == SketchKind::kCentroid && sign > 0) {
        // SimHash codes are exact on every backend unless a centred key lies
        // within rounding of a plane. Check the inputs keep every key far
        // from every plane (|cos| >= 1e-5, ~20x the fp32 error of a
        // 128-term dot product in any order), so a bucket mismatch is a bug.
        const int bits = Bits(s.width);
        const float cnt = s.totals[2 * d];
        double worst = 1;
        for (size_t j = 0; j < t.ids.size(); ++j) {
          std::vector<double> x(d);
          double xx = 0;
          for (int e = 0; e < d; ++e) {
            x[e] = double(t.Key(j)[e]) - double(s.totals[e]) / cnt;
            xx += x[e] * x[e];
          }
          for (int pl = 0; pl < s.rows * bits; ++pl) {
            double dot = 0, pp = 0;
            for (int e = 0; e < d; ++e) {
              dot += s.planes[pl * d + e] * x[e];
              pp += double(s.planes[pl * d + e]) * s.planes[pl * d + e];
            }
            worst = std::min(worst, std::abs(dot) / std::sqrt(pp * xx));
          }
        }
        ASSERT_GE(worst, 1e-5) << name << ": test input too close to a SimHash plane; change the seed";
        EXPECT_EQ(dev_buckets[i], ref_buckets[i]) << name << ": centroid buckets";
        for (uint32_t b : ref_buckets[i]) ASSERT_LT(b, static_cast<uint32_t>(s.width)) << name;
      }
      AddMagnitude(
          s, it.mag, static_cast<int64_t>(t.ids.size()), t.ids.data(), ref_buckets[i].data(),
          [&](int64_t j) { return t.Key(static_cast<int>(j)); }, [&](int64_t j) { return t.Value(static_cast<int>(j)); });
      CompareSketchArrays(it.dev->Download(), it.host->mem, it.mag, s, bit_exact_, name);
    }
  };

  const int n = static_cast<int>(items.size());
  std::vector<std::vector<uint32_t>> ref_a(n), dev_a(n), ref_b(n), dev_b(n);
  std::vector<TokenBatch> a(n), b(n);
  for (int i = 0; i < n; ++i) {
    a[i] = make_batch(configs[i], 1000 + 10 * i, 40, /*scattered=*/true, 0);
    b[i] = make_batch(configs[i], 2000 + 10 * i, 25, /*scattered=*/false, 1);
  }
  // Insert into the empty sketches, then more (the centroid mean moves).
  step("insert 40", 1.0f, a, ref_a, dev_a);
  ASSERT_FALSE(HasFatalFailure());
  step("insert 25 more", 1.0f, b, ref_b, dev_b);
  ASSERT_FALSE(HasFatalFailure());
  // Remove every third token of the first batch, with its buckets (read, not
  // written: the runtime keeps them). The same buckets on both sides (equal
  // when the comparison above passed).
  std::vector<TokenBatch> rm(n);
  std::vector<std::vector<uint32_t>> ref_rm(n), dev_rm(n);
  for (int i = 0; i < n; ++i) {
    std::vector<int> pick;
    for (int j = 0; j < 40; j += 3) pick.push_back(j);
    rm[i] = subset(a[i], pick);
    for (int j : pick) {
      for (int r = 0; r < configs[i].rows; ++r) {
        if (configs[i].kind != SketchKind::kCentroid) continue;
        ref_rm[i].push_back(ref_a[i][j * configs[i].rows + r]);
        dev_rm[i].push_back(dev_a[i][j * configs[i].rows + r]);
      }
    }
  }
  step("remove 14", -1.0f, rm, ref_rm, dev_rm);
  // Some buckets must have emptied (been cleared) for the step to test that.
  int emptied = 0;
  for (const UpdateItem& it : items) {
    const SketchState& s = it.host->s;
    const int64_t cells = int64_t{s.rows} * s.width;
    for (int64_t bb = 0; bb < cells; ++bb) {
      emptied += it.mag[bb * s.head_dim] > 0 && s.counts[2 * bb] == 0.0f && s.counts[2 * bb + 1] == 0.0f;
    }
  }
  EXPECT_GT(emptied, 0);
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(items[i].host->s.totals[2 * configs[i].d], 51.0f) << i;
  }
}

// Removing every inserted token leaves an all-zero sketch, exactly, on every
// backend (buckets and totals are cleared when their count reaches 0).
TEST_P(KernelConformance, SketchUpdateRemovingEveryTokenClearsExactly) {
  for (SketchKind kind : {SketchKind::kCountSketch, SketchKind::kCentroid}) {
    const int d = 64, n = 30;
    HostSketch h(kind, 2, 16, d, 77);
    DeviceSketch ds(backend(), h);
    const std::vector<float> k = RandomNormal(n * d, 5, 1.0f, 0.3f), v = RandomNormal(n * d, 6);
    std::vector<uint32_t> ids(n), buckets(kind == SketchKind::kCentroid ? n * 2 : 0);
    std::iota(ids.begin(), ids.end(), 40u);
    DeviceBuffer dk = ToDevice(backend(), k), dv = ToDevice(backend(), v);
    ASSERT_FALSE(HasFailure());
    for (float sign : {1.0f, -1.0f}) {
      kernels::SketchUpdateParams p;
      p.sketch = ds.s;
      p.sign = sign;
      p.n = n;
      p.ids = ids.data();
      p.keys = dk.get();
      p.values = dv.get();
      p.stride = d;
      p.buckets = buckets.empty() ? nullptr : buckets.data();
      dev().SketchUpdate({&p, 1});
      if (sign > 0) {
        const std::vector<float> mid = ds.Download();
        EXPECT_EQ(mid[mid.size() - 2], float(n)) << SketchKindName(kind);
      }
    }
    const std::vector<float> got = ds.Download();
    int64_t nonzero = 0;
    for (float f : got) nonzero += FloatBits(f) != 0u;
    EXPECT_EQ(nonzero, 0) << SketchKindName(kind) << ": every float must be +0 after removing every token";
  }
}

// The first token into an empty centroid sketch is its own mean: the centred
// key is exactly 0, every SimHash dot product is 0 and "dot >= 0" sets every
// bit, so its bucket is width - 1 in every row on every backend. (The
// runtime does this for the first vague token of every head.)
TEST_P(KernelConformance, SketchUpdateLoneCentroidTokenGoesToTheLastBucket) {
  const int d = 64, rows = 2, width = 16;
  HostSketch h(SketchKind::kCentroid, rows, width, d, 5);
  DeviceSketch ds(backend(), h);
  const std::vector<float> k = RandomNormal(d, 8, 1.0f, 0.3f), v = RandomNormal(d, 9);
  DeviceBuffer dk = ToDevice(backend(), k), dv = ToDevice(backend(), v);
  ASSERT_FALSE(HasFailure());
  const uint32_t id = 3;
  std::vector<uint32_t> want, got(rows, 0);
  UpdateSketchF32(*ref_, h.s, 1.0f, k, v, {id}, &want);
  ASSERT_EQ(want, std::vector<uint32_t>(rows, width - 1)) << "reference";
  kernels::SketchUpdateParams p;
  p.sketch = ds.s;
  p.n = 1;
  p.ids = &id;
  p.keys = dk.get();
  p.values = dv.get();
  p.stride = d;
  p.buckets = got.data();
  dev().SketchUpdate({&p, 1});
  EXPECT_EQ(got, want);
  // Inserting is exact here (one term per float): the arrays are bit-equal.
  const std::vector<float> arrays = ds.Download();
  CompareFloats(arrays.data(), h.mem.data(), static_cast<int64_t>(h.mem.size()), true, [](int64_t) { return 0.0; },
                "lone token sketch");
}

// ---------------------------------------------------------------------------
// 3. SketchEstimate and SketchScores.

struct FilledSketch {
  std::unique_ptr<HostSketch> host;
  std::unique_ptr<DeviceSketch> dev;
  std::vector<uint32_t> ids, buckets;  // live tokens and their centroid buckets
};

FilledSketch Fill(kernels::KernelSet& ref, Backend& b, SketchKind kind, int rows, int width, int d, uint64_t seed) {
  FilledSketch f;
  f.host = std::make_unique<HostSketch>(kind, rows, width, d, static_cast<uint32_t>(seed));
  const int n = 120;
  std::vector<uint32_t> ids(n), buckets;
  for (int i = 0; i < n; ++i) ids[i] = 5 * i + 2;
  const std::vector<float> k = RandomNormal(int64_t{n} * d, seed, 1.0f, 0.3f), v = RandomNormal(int64_t{n} * d, seed + 1);
  UpdateSketchF32(ref, f.host->s, 1.0f, k, v, ids, &buckets);
  // Remove the last 20 so some buckets empty.
  const int keep = 100;
  std::vector<uint32_t> rid(ids.begin() + keep, ids.end()), rb;
  if (!buckets.empty()) rb.assign(buckets.begin() + int64_t{keep} * rows, buckets.end());
  UpdateSketchF32(ref, f.host->s, -1.0f, std::vector<float>(k.begin() + int64_t{keep} * d, k.end()),
             std::vector<float>(v.begin() + int64_t{keep} * d, v.end()), rid, &rb);
  f.ids.assign(ids.begin(), ids.begin() + keep);
  if (!buckets.empty()) f.buckets.assign(buckets.begin(), buckets.begin() + int64_t{keep} * rows);
  f.dev = std::make_unique<DeviceSketch>(b, *f.host);
  return f;
}

struct SketchCfg {
  SketchKind kind;
  int rows, width, d;
};

const std::vector<SketchCfg>& SketchCfgs() {
  static const std::vector<SketchCfg> cfgs = {{SketchKind::kCountSketch, 1, 32, 64},
                                              {SketchKind::kCountSketch, 3, 32, 128},
                                              {SketchKind::kCentroid, 1, 16, 64},
                                              {SketchKind::kCentroid, 2, 16, 128}};
  return cfgs;
}

TEST_P(KernelConformance, SketchEstimateMatchesReference) {
  int idx = 0;
  for (const SketchCfg& c : SketchCfgs()) {
    FilledSketch f = Fill(*ref_, backend(), c.kind, c.rows, c.width, c.d, 300 + idx++);
    ASSERT_FALSE(HasFailure());
    for (VaguePolicy policy : {VaguePolicy::kEstimate, VaguePolicy::kShrink}) {
      const int n = static_cast<int>(f.ids.size());
      std::vector<float> rk(int64_t{n} * c.d), rv(rk.size()), gk(rk.size(), 123.0f), gv(rk.size(), 123.0f);
      kernels::SketchEstimateParams p;
      p.policy = policy;
      p.n = n;
      p.ids = f.ids.data();
      p.buckets = f.buckets.empty() ? nullptr : f.buckets.data();
      p.sketch = f.host->s;
      p.keys = rk.data();
      p.values = rv.data();
      ref_->SketchEstimate(p);
      p.sketch = f.dev->s;
      p.keys = gk.data();
      p.values = gv.data();
      dev().SketchEstimate(p);
      const std::string name = std::string(SketchKindName(c.kind)) + "x" + std::to_string(c.rows) + " " +
                               std::string(VaguePolicyName(policy));
      EXPECT_GT(MaxAbs(rk), 0.1) << name;
      // Each element is a short fp32 sum (per row: bucket sum, centring
      // term, mean); another order errs below 1e-5 of the summed magnitudes.
      for (bool values : {false, true}) {
        std::vector<double> tol(rk.size());
        for (int i = 0; i < n; ++i) {
          const std::vector<double> m = EstimateMagnitude(f.host->s, policy, f.ids[i], f.buckets.data(), i, values);
          for (int j = 0; j < c.d; ++j) tol[int64_t{i} * c.d + j] = 1e-5 * m[j] + 1e-7;
        }
        CompareFloats(values ? gv.data() : gk.data(), values ? rv.data() : rk.data(), static_cast<int64_t>(rk.size()),
                      bit_exact_, [&](int64_t e) { return tol[e]; }, name + (values ? " values" : " keys"));
      }
    }
  }
}

TEST_P(KernelConformance, SketchScoresMatchReference) {
  int idx = 0;
  for (const SketchCfg& c : SketchCfgs()) {
    FilledSketch f = Fill(*ref_, backend(), c.kind, c.rows, c.width, c.d, 400 + idx++);
    ASSERT_FALSE(HasFailure());
    for (VaguePolicy policy : {VaguePolicy::kEstimate, VaguePolicy::kShrink}) {
      for (int group : {1, 4}) {
        const DType qt = group == 1 ? DType::kF32 : DType::kF16;
        const std::vector<float> qf = RoundTo(RandomNormal(int64_t{group} * c.d, 500 + idx + group, 0.5f), qt);
        const std::vector<uint8_t> q = Encode(qf, qt);
        DeviceBuffer dq = ToDevice(backend(), q);
        // Ids never inserted too (Count-Sketch scores any id); the centroid
        // needs buckets, so only live tokens there.
        std::vector<uint32_t> ids = f.ids;
        if (c.kind == SketchKind::kCountSketch) {
          for (uint32_t x = 0; x < 17; ++x) ids.push_back(100000 + 31 * x);
        }
        const int n = static_cast<int>(ids.size());
        std::vector<float> want(n), got(n, 123.0f);
        kernels::SketchScoreParams p;
        p.policy = policy;
        p.group = group;
        p.dtype = qt;
        p.scale = 1.0f / std::sqrt(float(c.d));
        p.n = n;
        p.ids = ids.data();
        p.buckets = f.buckets.empty() ? nullptr : f.buckets.data();
        p.sketch = f.host->s;
        p.q = q.data();
        p.scores = want.data();
        ref_->SketchScores({&p, 1});
        p.sketch = f.dev->s;
        p.q = dq.get();
        p.scores = got.data();
        dev().SketchScores({&p, 1});
        const std::string name = std::string(SketchKindName(c.kind)) + "x" + std::to_string(c.rows) + " " +
                                 std::string(VaguePolicyName(policy)) + " group " + std::to_string(group);
        const std::vector<double> tol =
            ScoreTolerances(f.host->s, policy, ids, f.buckets.data(), qf, group, p.scale);
        double spread = 0;
        for (int i = 1; i < n; ++i) spread = std::max(spread, std::abs(double(want[i]) - want[0]));
        EXPECT_GT(spread, 1e-3) << name << ": scores should differ between tokens";
        CompareFloats(got.data(), want.data(), n, bit_exact_, [&](int64_t i) { return tol[i]; }, name);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 4. BoundScores.

TEST_P(KernelConformance, BoundScoresMatchReference) {
  const int n = 37;
  uint64_t seed = 600;
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int group : {1, 8}) {
      for (int d : {64, 128}) {
        ++seed;
        const std::vector<float> qf = RoundTo(RandomNormal(int64_t{group} * d, seed, 0.5f), dt);
        // Bounds of groups of 8 keys: per coordinate min, then max.
        const std::vector<float> keys = RandomNormal(int64_t{n} * 8 * d, seed + 1, 1.0f, 0.3f);
        std::vector<float> bounds(int64_t{n} * 2 * d);
        for (int i = 0; i < n; ++i) {
          for (int j = 0; j < d; ++j) {
            float lo = INFINITY, hi = -INFINITY;
            for (int t = 0; t < 8; ++t) {
              lo = std::min(lo, keys[(int64_t{i} * 8 + t) * d + j]);
              hi = std::max(hi, keys[(int64_t{i} * 8 + t) * d + j]);
            }
            bounds[(2 * int64_t{i}) * d + j] = lo;
            bounds[(2 * int64_t{i} + 1) * d + j] = hi;
          }
        }
        const std::vector<uint8_t> q = Encode(qf, dt), bb = Encode(bounds, dt);
        DeviceBuffer dq = ToDevice(backend(), q), db = ToDevice(backend(), bb);
        ASSERT_FALSE(HasFailure());
        std::vector<float> want(n), got(n, 123.0f), mag(n);
        kernels::BoundScoreParams p;
        p.head_dim = d;
        p.group = group;
        p.dtype = dt;
        p.scale = 1.0f / std::sqrt(float(d));
        p.n = n;
        p.q = q.data();
        p.bounds = bb.data();
        p.scores = want.data();
        ref_->BoundScores({&p, 1});
        // The magnitude of each score's terms: the reference on |q|, |bounds|
        // (max(|q lo|, |q hi|) >= |max(q lo, q hi)|).
        std::vector<float> qa = RoundTo(qf, dt), ba = RoundTo(bounds, dt);
        for (float& x : qa) x = std::abs(x);
        for (float& x : ba) x = std::abs(x);
        const std::vector<uint8_t> qae = Encode(qa, dt), bae = Encode(ba, dt);
        p.q = qae.data();
        p.bounds = bae.data();
        p.scores = mag.data();
        ref_->BoundScores({&p, 1});
        p.q = dq.get();
        p.bounds = db.get();
        p.scores = got.data();
        dev().BoundScores({&p, 1});
        // A fp32 sum of d terms in another order: error below 1e-5 of the
        // sum of the terms' magnitudes.
        CompareFloats(got.data(), want.data(), n, bit_exact_, [&](int64_t i) { return 1e-5 * mag[i]; },
                      std::string(DTypeName(dt)) + " group " + std::to_string(group) + " d " + std::to_string(d));
        // The bound holds for every key of the group (checks the reference
        // computes what the tests compare).
        const std::vector<float> keys_r = RoundTo(keys, dt);  // bounds round monotonically with them
        for (int i = 0; i < n; ++i) {
          for (int t = 0; t < 8; ++t) {
            for (int g = 0; g < group; ++g) {
              double logit = 0;
              for (int j = 0; j < d; ++j) {
                logit += double(qf[int64_t{g} * d + j]) * keys_r[(int64_t{i} * 8 + t) * d + j];
              }
              logit *= p.scale;
              ASSERT_LE(logit, want[i] + 1e-4) << i;
            }
          }
        }
      }
    }
  }
}

// A batch of ranking items in one call gives each item what a call of its
// own gives: the same kernels on the same inputs, bit for bit (the batch
// only packs uploads and downloads together); an item with n = 0 is skipped.
TEST_P(KernelConformance, RankingScoresBatchMatchOneCallEach) {
  std::vector<FilledSketch> sketches;
  std::vector<DeviceBuffer> queries;
  std::vector<kernels::SketchScoreParams> items;
  std::vector<std::vector<float>> alone, batched;
  int idx = 0;
  for (const SketchCfg& c : SketchCfgs()) {
    sketches.push_back(Fill(*ref_, backend(), c.kind, c.rows, c.width, c.d, 700 + idx));
    ASSERT_FALSE(HasFailure());
    const FilledSketch& f = sketches.back();
    const int group = 1 + idx % 4;
    queries.push_back(ToDevice(backend(), Encode(RandomNormal(int64_t{group} * c.d, 800 + idx, 0.5f), DType::kF16)));
    kernels::SketchScoreParams p;
    p.policy = VaguePolicy::kShrink;
    p.group = group;
    p.dtype = DType::kF16;
    p.scale = 0.125f;
    p.n = idx == 1 ? 0 : static_cast<int>(f.ids.size());
    p.ids = f.ids.data();
    p.buckets = f.buckets.empty() ? nullptr : f.buckets.data();
    p.sketch = f.dev->s;
    p.q = queries.back().get();
    items.push_back(p);
    ++idx;
  }
  alone.resize(items.size());
  batched.resize(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    alone[i].assign(std::max(items[i].n, 1), 123.0f);
    batched[i].assign(std::max(items[i].n, 1), 456.0f);
    kernels::SketchScoreParams p = items[i];
    p.scores = alone[i].data();
    dev().SketchScores({&p, 1});
    items[i].scores = batched[i].data();
  }
  dev().SketchScores(items);
  KVTIER_ASSERT_OK(dev().error());
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].n == 0) {
      EXPECT_EQ(batched[i][0], 456.0f) << "an empty item writes nothing";
      continue;
    }
    EXPECT_EQ(batched[i], alone[i]) << "sketch scores, item " << i;
  }

  // Key-bound scores: three heads of different sizes, one of them empty.
  const int d = 64;
  std::vector<DeviceBuffer> bufs;
  std::vector<kernels::BoundScoreParams> bound_items;
  std::vector<std::vector<float>> b_alone(3), b_batched(3);
  for (int i = 0; i < 3; ++i) {
    const int n = i == 1 ? 0 : 20 + 9 * i, group = 2 + i;
    bufs.push_back(ToDevice(backend(), Encode(RandomNormal(int64_t{group} * d, 900 + i, 0.5f), DType::kBF16)));
    const void* q = bufs.back().get();
    bufs.push_back(ToDevice(backend(), Encode(RandomNormal(int64_t{std::max(n, 1)} * 2 * d, 950 + i, 1.0f),
                                              DType::kBF16)));
    kernels::BoundScoreParams p;
    p.head_dim = d;
    p.group = group;
    p.dtype = DType::kBF16;
    p.scale = 0.125f;
    p.n = n;
    p.q = q;
    p.bounds = bufs.back().get();
    b_alone[i].assign(std::max(n, 1), 123.0f);
    b_batched[i].assign(std::max(n, 1), 456.0f);
    p.scores = b_alone[i].data();
    dev().BoundScores({&p, 1});
    p.scores = b_batched[i].data();
    bound_items.push_back(p);
  }
  dev().BoundScores(bound_items);
  KVTIER_ASSERT_OK(dev().error());
  for (int i = 0; i < 3; ++i) {
    if (bound_items[i].n == 0) {
      EXPECT_EQ(b_batched[i][0], 456.0f) << "an empty item writes nothing";
      continue;
    }
    EXPECT_EQ(b_batched[i], b_alone[i]) << "bound scores, item " << i;
  }
}

// ---------------------------------------------------------------------------
// 5. CopyRows.

TEST_P(KernelConformance, CopyRowsMatchesReference) {
  struct Spec {
    int64_t row_bytes, src_stride, dst_stride;
    int src_rows, dst_rows, n;
  };
  // row_bytes not multiples of 16 (or of 4), strides wider than rows, and
  // an item with no rows.
  const std::vector<Spec> specs = {{52, 64, 100, 20, 15, 9}, {3, 3, 7, 5, 9, 1}, {130, 130, 144, 40, 30, 17},
                                   {20, 20, 20, 4, 4, 0}};
  std::mt19937 rng(42);
  std::vector<std::vector<uint8_t>> src(specs.size()), dst(specs.size()), want(specs.size());
  std::vector<std::vector<int32_t>> srows(specs.size()), drows(specs.size());
  std::vector<DeviceBuffer> dsrc, ddst;
  std::vector<kernels::RowCopyParams> hp(specs.size()), dp(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const Spec& s = specs[i];
    src[i].resize(s.src_rows * s.src_stride);
    dst[i].resize(s.dst_rows * s.dst_stride);
    for (uint8_t& x : src[i]) x = static_cast<uint8_t>(rng());
    for (uint8_t& x : dst[i]) x = static_cast<uint8_t>(rng());
    std::vector<int32_t> sp(s.src_rows), dpm(s.dst_rows);
    std::iota(sp.begin(), sp.end(), 0);
    std::iota(dpm.begin(), dpm.end(), 0);
    std::shuffle(sp.begin(), sp.end(), rng);
    std::shuffle(dpm.begin(), dpm.end(), rng);
    srows[i].assign(sp.begin(), sp.begin() + s.n);
    drows[i].assign(dpm.begin(), dpm.begin() + s.n);
    if (s.n > 2) srows[i][1] = srows[i][0];  // a source row read twice
    // Expected: by hand.
    want[i] = dst[i];
    for (int r = 0; r < s.n; ++r) {
      std::memcpy(want[i].data() + drows[i][r] * s.dst_stride, src[i].data() + srows[i][r] * s.src_stride, s.row_bytes);
    }
    dsrc.push_back(ToDevice(backend(), src[i]));
    ddst.push_back(ToDevice(backend(), dst[i]));
    kernels::RowCopyParams p;
    p.row_bytes = s.row_bytes;
    p.dst_stride = s.dst_stride;
    p.src_stride = s.src_stride;
    p.n = s.n;
    p.dst_rows = drows[i].data();
    p.src_rows = srows[i].data();
    hp[i] = p;
    hp[i].src = src[i].data();
    hp[i].dst = dst[i].data();
    dp[i] = p;
    dp[i].src = dsrc.back().get();
    dp[i].dst = ddst.back().get();
  }
  ASSERT_FALSE(HasFailure());
  ref_->CopyRows(hp);
  dev().CopyRows(dp);
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(dst[i], want[i]) << "reference, item " << i;
    // Bytes are bytes: exact everywhere, rows not named untouched.
    EXPECT_EQ(ddst[i].DownloadAs<uint8_t>(), want[i]) << "item " << i;
    EXPECT_EQ(dsrc[i].DownloadAs<uint8_t>(), src[i]) << "source changed, item " << i;
  }
  // One item alone (the single-item path).
  const std::vector<uint8_t> fresh(ddst[2].bytes(), 0);
  ddst[2].Upload(fresh);
  dev().CopyRows({&dp[2], 1});
  std::vector<uint8_t> alone = fresh;
  for (int r = 0; r < specs[2].n; ++r) {
    std::memcpy(alone.data() + drows[2][r] * specs[2].dst_stride, src[2].data() + srows[2][r] * specs[2].src_stride,
                specs[2].row_bytes);
  }
  EXPECT_EQ(ddst[2].DownloadAs<uint8_t>(), alone);
}

// ---------------------------------------------------------------------------
// 6. CountNonFinite.

TEST_P(KernelConformance, CountNonFiniteCountsPlantedValues) {
  const int64_t N = 1100;
  const std::vector<int64_t> planted = {0, 1, 7, 8, 15, 16, 31, 32, 33, 63, 64, 511, 1000, 1098, 1099};
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    const int size = static_cast<int>(DTypeSize(dt));
    // Random finite bit patterns (normals, subnormals, zeros of both signs),
    // the extreme finite values, then NaN and infinity patterns of every
    // kind at the planted positions.
    std::mt19937 rng(static_cast<uint32_t>(dt) + 1);
    std::vector<uint8_t> data(N * size);
    const uint32_t exp_mask = dt == DType::kF32 ? 0x7f800000u : (dt == DType::kF16 ? 0x7c00u : 0x7f80u);
    auto put = [&](int64_t i, uint32_t bits) {
      if (size == 4) {
        std::memcpy(&data[i * 4], &bits, 4);
      } else {
        const uint16_t h = static_cast<uint16_t>(bits);
        std::memcpy(&data[i * 2], &h, 2);
      }
    };
    for (int64_t i = 0; i < N; ++i) {
      uint32_t bits;
      do {
        bits = size == 4 ? static_cast<uint32_t>(rng()) : static_cast<uint32_t>(rng() & 0xffffu);
      } while ((bits & exp_mask) == exp_mask);
      put(i, bits);
    }
    const std::vector<uint32_t> finite_edges =
        dt == DType::kF32 ? std::vector<uint32_t>{0x7f7fffffu, 0xff7fffffu, 0x00000001u, 0x80000000u, 0u, 0x807fffffu}
        : dt == DType::kF16 ? std::vector<uint32_t>{0x7bffu, 0xfbffu, 0x0001u, 0x8000u, 0u, 0x83ffu}
                            : std::vector<uint32_t>{0x7f7fu, 0xff7fu, 0x0001u, 0x8000u, 0u, 0x807fu};
    for (size_t e = 0; e < finite_edges.size(); ++e) put(100 + 3 * e, finite_edges[e]);
    const std::vector<uint32_t> bad =
        dt == DType::kF32 ? std::vector<uint32_t>{0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffffffffu,
                                                  0x7fbfffffu}
        : dt == DType::kF16 ? std::vector<uint32_t>{0x7c00u, 0xfc00u, 0x7e00u, 0x7c01u, 0xffffu, 0x7dffu}
                            : std::vector<uint32_t>{0x7f80u, 0xff80u, 0x7fc0u, 0x7f81u, 0xffffu, 0x7fbfu};
    for (size_t e = 0; e < planted.size(); ++e) put(planted[e], bad[e % bad.size()]);

    DeviceBuffer dd = ToDevice(backend(), data);
    ASSERT_FALSE(HasFailure());
    // Start offsets that misalign the data, and lengths around vector widths.
    for (int64_t off : {0, 1, 3}) {
      for (int64_t n : {0, 1, 2, 7, 8, 9, 16, 31, 33, 64, 65, 255, 1000, 1097}) {
        int64_t expect = 0;
        for (int64_t p : planted) expect += p >= off && p < off + n;
        const int64_t want = ref_->CountNonFinite(data.data() + off * size, n, dt);
        const int64_t got = dev().CountNonFinite(static_cast<const uint8_t*>(dd.get()) + off * size, n, dt);
        EXPECT_EQ(want, expect) << "reference " << DTypeName(dt) << " off " << off << " n " << n;
        EXPECT_EQ(got, expect) << DTypeName(dt) << " off " << off << " n " << n;
      }
    }
    EXPECT_EQ(dev().CountNonFinite(dd.get(), N, dt), static_cast<int64_t>(planted.size())) << DTypeName(dt);
  }
}

// ---------------------------------------------------------------------------
// 7. The runtime on each backend, on one seeded synthetic workload.

struct RuntimeRun {
  std::vector<std::vector<float>> outs;  // per attend: [q_heads][head_dim] fp32
  std::vector<AttendCounts> counts;
  double vmax = 0;
};

// Prefill then decode on one sequence; k, v, q and out are device memory of
// `mem` (a backend of the runtime's kind). Every call gets buffers of its own,
// kept until the runtime is gone, and outputs are read after that: the test
// assumes nothing about when the runtime's device work on them completes.
void DriveRuntime(const Options& o, Under under, Backend& mem, RuntimeRun* run) {
  std::vector<DeviceBuffer> inputs, outs;  // outlive the runtime
  absl::StatusOr<std::unique_ptr<Backend>> made = MakeBackendUnderTest(under);
  ASSERT_TRUE(made.ok()) << made.status();
  absl::StatusOr<std::unique_ptr<Runtime>> rt = Runtime::Create(o, std::move(*made));
  ASSERT_TRUE(rt.ok()) << rt.status();
  KVTIER_ASSERT_OK((*rt)->AddSequence(1));
  const ModelShape& sh = o.shape;
  const int H = sh.kv_heads, d = sh.head_dim;
  workload::SyntheticKvOptions wo;
  wo.seed = 11;
  wo.topic_tokens = 64;
  const workload::SyntheticKv kv(sh, wo);
  const int prefill = 300, steps = 12, chunk = 100;
  auto upload = [&](const std::vector<float>& x) {
    inputs.push_back(ToDevice(mem, Encode(x, sh.dtype)));
    return inputs.back().get();
  };
  auto append = [&](int layer, int64_t first, int n) {
    std::vector<float> k(int64_t{n} * H * d), v(k.size());
    kv.KeysValues(layer, first, n, k.data(), v.data());
    run->vmax = std::max(run->vmax, MaxAbs(RoundTo(v, sh.dtype)));
    const void* dk = upload(k);
    const void* dv = upload(v);
    return (*rt)->Append(1, layer, dk, dv, n);
  };
  for (int layer = 0; layer < sh.layers; ++layer) {
    for (int first = 0; first < prefill; first += chunk) KVTIER_ASSERT_OK(append(layer, first, chunk));
  }
  AttendOptions f32;
  f32.out_dtype = DType::kF32;
  for (int step = 0; step < steps; ++step) {
    const int64_t pos = prefill + step;
    for (int layer = 0; layer < sh.layers; ++layer) {
      KVTIER_ASSERT_OK(append(layer, pos, 1));
      std::vector<float> q(int64_t{sh.q_heads} * d);
      kv.Query(layer, pos, q.data());
      const void* dq = upload(q);
      outs.emplace_back(mem, int64_t{sh.q_heads} * d * 4);
      absl::StatusOr<AttendCounts> c = (*rt)->Attend(1, layer, dq, outs.back().get(), f32);
      ASSERT_TRUE(c.ok()) << c.status();
      run->counts.push_back(*c);
    }
  }
  KVTIER_EXPECT_OK((*rt)->CheckInvariants());
  rt->reset();
  for (const DeviceBuffer& out : outs) run->outs.push_back(out.DownloadAs<float>());
}

TEST_P(KernelConformance, RuntimeAttendMatchesCpuBackend) {
  struct Variant {
    SketchKind kind;
    int rows;
  };
  for (Variant var : {Variant{SketchKind::kCentroid, 1}, Variant{SketchKind::kCountSketch, 2}}) {
    Options o;
    o.shape = {.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .dtype = DType::kF16};
    o.max_context = 400;
    o.device_budget_fraction = 0.5;
    o.sink_tokens = 4;
    o.recent_tokens = 32;
    // Region membership must not depend on the backend's rounding: no
    // heavy-hitter candidates (chosen from slot probabilities) and no
    // recall (asynchronous, ranked by scores). What remains is sink + ring
    // exact and the rest through the sketch: every kernel but CopyRows and
    // the scores.
    o.candidate_tokens = 0;
    o.staging_tokens = 0;
    o.recall_proxy = RecallProxy::kNone;
    o.sketch_kind = var.kind;
    o.sketch_rows = var.rows;
    o.sketch_width = 32;
    o.vague_policy = VaguePolicy::kShrink;

    RuntimeRun want, got;
    o.backend = BackendKind::kCpu;
    {
      absl::StatusOr<std::unique_ptr<Backend>> cpu = CreateBackend(BackendKind::kCpu);
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      DriveRuntime(o, Under::kCpu, **cpu, &want);
    }
    ASSERT_FALSE(HasFatalFailure());
    DriveRuntime(o, GetParam(), backend(), &got);
    ASSERT_FALSE(HasFatalFailure());
    ASSERT_EQ(got.outs.size(), want.outs.size());
    ASSERT_GT(want.counts.back().from_sketch, 0) << "the workload must reach the sketch";
    for (size_t i = 0; i < want.outs.size(); ++i) {
      EXPECT_EQ(got.counts[i].exact, want.counts[i].exact) << i;
      EXPECT_EQ(got.counts[i].from_sketch, want.counts[i].from_sketch) << i;
      EXPECT_EQ(got.counts[i].dropped, want.counts[i].dropped) << i;
      // The kernel bound (2e-5 of the value scale) times 5: the sketch
      // state here is accumulated over ~300 inserts, each rounding in
      // another order, before the attention kernel adds its own error.
      CompareFloats(got.outs[i].data(), want.outs[i].data(), static_cast<int64_t>(want.outs[i].size()), bit_exact_,
                    [&](int64_t) { return 1e-4 * want.vmax; },
                    std::string(SketchKindName(var.kind)) + " attend " + std::to_string(i));
    }
  }
}

// ---------------------------------------------------------------------------
// The tolerances admit what they are meant to: the reference computed in
// another, mathematically equal order (resident ranges reversed, head_dim
// coordinates permuted, tokens inserted in reverse) stays within them, while
// changing results. Runs on the CPU only; a failure here means a tolerance
// above is too tight for a legitimate reordering, not a backend bug.

TEST(KernelConformanceTolerance, AttendAdmitsReorderedReference) {
  absl::StatusOr<std::unique_ptr<Backend>> cpu = CreateBackend(BackendKind::kCpu);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  std::unique_ptr<kernels::KernelSet> ref = kernels::MakeCpuKernelSet();
  const std::vector<AttendCase> cases = AttendCases();
  int changed = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    std::unique_ptr<AttendItemData> it = MakeAttendItem(cases[i], 100 + 10 * i, *ref, **cpu);
    ASSERT_FALSE(HasFailure());
    const AttendCase& c = it->c;
    const size_t es = DTypeSize(c.dtype), out_es = DTypeSize(it->host.out_dtype);
    const std::vector<int> perm = Shuffled(c.d, static_cast<uint32_t>(i) + 1);
    const std::vector<uint8_t> q = PermuteCoords(it->q, c.d, es, perm), k = PermuteCoords(it->k, c.d, es, perm),
                               v = PermuteCoords(it->v, c.d, es, perm);
    const std::vector<kernels::SlotRange> ranges(it->ranges.rbegin(), it->ranges.rend());
    std::vector<float> mem;
    kernels::AttendParams p = it->host;
    if (it->sketch) {
      mem = PermuteSketch(it->sketch->mem, it->sketch->s, perm);
      const SketchState& hs = it->sketch->s;
      p.sketch = BindSketch(hs.kind, hs.rows, hs.width, hs.head_dim, hs.seed, mem.data(), hs.planes);
    }
    std::vector<uint8_t> out(it->ref_out.size(), 0xCD);
    std::vector<float> probs(kCapacity, kProbSentinel);
    p.q = q.data();
    p.k_slots = k.data();
    p.v_slots = v.data();
    p.ranges = ranges.data();
    p.out = out.data();
    p.slot_probs = c.probs ? probs.data() : nullptr;
    ref->Attend({&p, 1});
    const std::vector<uint8_t> back = PermuteCoords(out, c.d, out_es, perm, /*inverse=*/true);
    changed += back != it->ref_out || probs != it->ref_probs;
    CompareAttendOutputs(*it, back, probs, /*bit_exact=*/false, "reordered " + AttendCaseName(c));
  }
  EXPECT_GE(changed, static_cast<int>(cases.size()) / 2) << "reordering should change most results";
}

TEST(KernelConformanceTolerance, SketchUpdateAdmitsReorderedInsertion) {
  std::unique_ptr<kernels::KernelSet> ref = kernels::MakeCpuKernelSet();
  int changed = 0;
  for (SketchCfg c : {SketchCfg{SketchKind::kCountSketch, 1, 64, 64}, SketchCfg{SketchKind::kCountSketch, 3, 32, 128},
                      SketchCfg{SketchKind::kCentroid, 1, 16, 64}, SketchCfg{SketchKind::kCentroid, 2, 32, 128}}) {
    const int n = 65, d = c.d;
    HostSketch fwd(c.kind, c.rows, c.width, d, 91), rev(c.kind, c.rows, c.width, d, 91);
    const std::vector<float> k = RandomNormal(int64_t{n} * d, 31, 1.0f, 0.3f), v = RandomNormal(int64_t{n} * d, 32);
    std::vector<uint32_t> ids(n), fb, rb;
    std::iota(ids.begin(), ids.end(), 7u);
    UpdateSketchF32(*ref, fwd.s, 1.0f, k, v, ids, &fb);
    std::vector<float> kr, vr;
    std::vector<uint32_t> idr(ids.rbegin(), ids.rend());
    for (int i = n - 1; i >= 0; --i) {
      kr.insert(kr.end(), k.begin() + int64_t{i} * d, k.begin() + int64_t{i + 1} * d);
      vr.insert(vr.end(), v.begin() + int64_t{i} * d, v.begin() + int64_t{i + 1} * d);
    }
    UpdateSketchF32(*ref, rev.s, 1.0f, kr, vr, idr, &rb);
    for (int i = 0; i < n && c.kind == SketchKind::kCentroid; ++i) {
      for (int r = 0; r < c.rows; ++r) ASSERT_EQ(rb[int64_t{n - 1 - i} * c.rows + r], fb[int64_t{i} * c.rows + r]);
    }
    std::vector<double> mag(fwd.mem.size(), 0.0);
    AddMagnitude(
        fwd.s, mag, n, ids.data(), fb.data(), [&](int64_t j) { return k.data() + j * d; },
        [&](int64_t j) { return v.data() + j * d; });
    changed += rev.mem != fwd.mem;
    CompareSketchArrays(rev.mem, fwd.mem, mag, fwd.s, /*bit_exact=*/false,
                        "reversed " + std::string(SketchKindName(c.kind)) + "x" + std::to_string(c.rows));
  }
  EXPECT_GE(changed, 3);
}

TEST(KernelConformanceTolerance, ScoresAdmitPermutedCoordinates) {
  absl::StatusOr<std::unique_ptr<Backend>> cpu = CreateBackend(BackendKind::kCpu);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  std::unique_ptr<kernels::KernelSet> ref = kernels::MakeCpuKernelSet();
  int changed = 0, idx = 0;
  for (const SketchCfg& c : SketchCfgs()) {
    FilledSketch f = Fill(*ref, **cpu, c.kind, c.rows, c.width, c.d, 400 + idx++);
    const std::vector<int> perm = Shuffled(c.d, 17);
    std::vector<float> mem = PermuteSketch(f.host->mem, f.host->s, perm);
    const SketchState& hs = f.host->s;
    const SketchState ps = BindSketch(hs.kind, hs.rows, hs.width, hs.head_dim, hs.seed, mem.data(), hs.planes);
    const int group = 4;
    const std::vector<float> qf = RandomNormal(int64_t{group} * c.d, 900 + idx, 0.5f);
    const std::vector<float> qp = PermuteCoords(qf, c.d, 4, perm);
    for (VaguePolicy policy : {VaguePolicy::kEstimate, VaguePolicy::kShrink}) {
      const int n = static_cast<int>(f.ids.size());
      std::vector<float> want(n), got(n);
      kernels::SketchScoreParams p;
      p.policy = policy;
      p.group = group;
      p.scale = 1.0f / std::sqrt(float(c.d));
      p.n = n;
      p.ids = f.ids.data();
      p.buckets = f.buckets.empty() ? nullptr : f.buckets.data();
      p.sketch = hs;
      p.q = qf.data();
      p.scores = want.data();
      ref->SketchScores({&p, 1});
      p.sketch = ps;
      p.q = qp.data();
      p.scores = got.data();
      ref->SketchScores({&p, 1});
      changed += got != want;
      const std::vector<double> tol = ScoreTolerances(hs, policy, f.ids, f.buckets.data(), qf, group, p.scale);
      CompareFloats(got.data(), want.data(), n, /*bit_exact=*/false, [&](int64_t i) { return tol[i]; },
                    "permuted " + std::string(SketchKindName(c.kind)) + "x" + std::to_string(c.rows));
    }
  }
  EXPECT_GE(changed, 4);
}

INSTANTIATE_TEST_SUITE_P(Backends, KernelConformance,
                         ::testing::Values(Under::kCpu, Under::kCuda, Under::kCudaEmulated),
                         [](const ::testing::TestParamInfo<Under>& info) {
                           return UnderName(info.param);
                         });

}  // namespace
}  // namespace kvtier
