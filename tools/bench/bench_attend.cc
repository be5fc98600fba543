// bench_attend: decode attention of kvtier against exact attention over the
// same tokens, on the same CPU, in the same process run.
//
// Shape: one layer, 32 query heads over 8 KV heads (4:1 GQA), head_dim 128,
// f16 K/V/Q (synthetic, tools/workload/synthetic_kv.h), T = 4096 and 32768
// tokens, a device budget of 10% of the full cache.
//
// Two comparisons, each like with like:
//   attend/T=<T>/...   Runtime::Attend, one decode step of all 32 query heads
//                      (the 10% runtimes include their recall work: installing
//                      what arrived, ranking, requesting the next tokens).
//     kvtier_cs_10pct        budget 0.10, the one-row Count-Sketch, otherwise
//                            the defaults
//     kvtier_centroid_10pct  budget 0.10, the defaults (centroid sketch,
//                            key-bounds recall proxy)
//     exact_full_100pct      budget 1.00: every token resident, so the same
//                            runtime and kernels run exact full attention
//   vague/T=<T>/...    KernelSet::Attend on the 8 KV heads as one batch, over
//                      the vague tokens of the 10% Count-Sketch runtime (the
//                      T minus resident tokens of its plan), nothing else:
//     sketch_cs_r1           the plan's sketch (1 row x plan width), no
//                            resident slots: only the sketch contribution
//     sketch_cs_r2           2 rows, width from the same budget planned with
//                            sketch_rows = 2 (per-token path over vague_ids;
//                            information)
//     exact_slots            the same tokens as resident f16 slots, no sketch
//
// After the run a table prints exact time / kvtier time (medians of the
// repetitions) next to the goals of the issue:
//   sketch over the vague tokens >= 10x faster than exact over those tokens;
//   the whole attend >= 3x faster than exact full attention at T = 32k (both
//   sketches).
// Every fixture is built once, outside the timed loops, and checked once: the
// exact paths against a double-precision reference (so they do the real
// work), the sketch paths against the per-token reconstruction of
// SketchEstimate. A failed check makes the exit status 1; a missed goal does
// not.
//
// Usage: bench_attend [--benchmark_filter=REGEX] [--benchmark_repetitions=N]
//                     [--benchmark_min_time=S] [--benchmark_out=FILE] ...
// Unless given on the command line: min time 0.3 s, 5 repetitions reported as
// aggregates only, and random interleaving of the repetitions (the machine
// may be shared; interleaving lets both sides of a ratio see the same load).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "benchmark/benchmark.h"
#include "kvtier/backend.h"
#include "kvtier/budget.h"
#include "kvtier/kernels/hash.h"
#include "kvtier/kernels/kernel_set.h"
#include "kvtier/kernels/params.h"
#include "kvtier/runtime.h"
#include "workload/reference.h"
#include "workload/synthetic_kv.h"
#include "workload/tensor.h"

namespace kvtier {
namespace {

using workload::Tensor;

constexpr int kLayers = 1, kQHeads = 32, kKvHeads = 8, kHeadDim = 128;
constexpr int kGroup = kQHeads / kKvHeads;
constexpr double kBudget = 0.10;
constexpr int64_t kContexts[] = {4096, 32768};
constexpr SequenceId kSeq = 1;
// Largest relative error an exact path may show against the double reference
// (the f16 output rounding alone gives ~2e-4).
constexpr double kExactTolerance = 5e-3;
// Largest relative error of a sketch kernel against the softmax over its own
// per-token reconstruction (f16 output rounding and fp32 summation order).
constexpr double kEstimateTolerance = 5e-3;

ModelShape Shape() { return ModelShape{kLayers, kQHeads, kKvHeads, kHeadDim, DType::kF16}; }

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "bench_attend: %s\n", what.c_str());
  std::exit(2);
}

// Lines printed after the run (plans, sizes, correctness checks), by
// context length, in the order the fixtures were built for each.
std::map<int64_t, std::vector<std::string>>& Notes() {
  static std::map<int64_t, std::vector<std::string>> notes;
  return notes;
}
void Note(int64_t T, const std::string& line) { Notes()[T].push_back(line); }
bool g_check_failed = false;

void Check(int64_t T, const std::string& what, double err, double tolerance) {
  const bool ok = err <= tolerance;
  if (!ok) g_check_failed = true;
  char line[256];
  std::snprintf(line, sizeof line, "check %-52s rel err %.2e (<= %.0e) %s", what.c_str(), err, tolerance,
                ok ? "ok" : "FAILED");
  Note(T, line);
}

// ---------------------------------------------------------------- data

// K/V of T tokens ([T][kv_heads][head_dim] f16), the decode query ([q_heads]
// [head_dim] f16) and its exact attention over all T tokens.
struct Data {
  int64_t T = 0;
  Tensor k{DType::kF16, 0}, v{DType::kF16, 0}, q{DType::kF16, 0};
  std::vector<float> qf;         // q as fp32 (after rounding)
  std::vector<double> ref_full;  // [q_heads][head_dim]

  const uint16_t* KRow(int64_t pos, int h) const {
    return static_cast<const uint16_t*>(k.data()) + (pos * kKvHeads + h) * kHeadDim;
  }
  const uint16_t* VRow(int64_t pos, int h) const {
    return static_cast<const uint16_t*>(v.data()) + (pos * kKvHeads + h) * kHeadDim;
  }
};

// Exact attention (double) of the query heads of KV head h over the given
// rows ([n][head_dim] fp32 keys and values); out is [group][head_dim].
void GroupReference(const Data& data, int h, const std::vector<float>& keys, const std::vector<float>& values,
                    double* out) {
  const int64_t n = static_cast<int64_t>(keys.size()) / kHeadDim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  for (int g = 0; g < kGroup; ++g) {
    const int qh = h * kGroup + g;
    workload::ExactAttention(data.qf.data() + qh * kHeadDim, keys.data(), values.data(), n, kHeadDim, kHeadDim,
                             scale, nullptr, out + g * kHeadDim);
  }
}

void ToF32(const uint16_t* src, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = kernels::HalfToFloat(src[i]);
}

const Data& GetData(int64_t T) {
  static std::map<int64_t, std::unique_ptr<Data>> cache;
  std::unique_ptr<Data>& slot = cache[T];
  if (slot) return *slot;
  auto d = std::make_unique<Data>();
  d->T = T;
  const workload::SyntheticKv gen(Shape(), workload::SyntheticKvOptions{});
  const int64_t row = static_cast<int64_t>(kKvHeads) * kHeadDim;
  d->k.Resize(T * row);
  d->v.Resize(T * row);
  constexpr int64_t kChunk = 1024;
  std::vector<float> kf(kChunk * row), vf(kChunk * row);
  for (int64_t first = 0; first < T; first += kChunk) {
    const int64_t n = std::min(kChunk, T - first);
    gen.KeysValues(0, first, n, kf.data(), vf.data());
    for (int64_t i = 0; i < n * row; ++i) {
      d->k.Set(first * row + i, kf[i]);
      d->v.Set(first * row + i, vf[i]);
    }
  }
  std::vector<float> q(kQHeads * kHeadDim);
  gen.Query(0, T - 1, q.data());
  d->q.Assign(q.data(), q.size());
  d->qf = d->q.ToFloat();

  d->ref_full.resize(kQHeads * kHeadDim);
  std::vector<float> keys(T * kHeadDim), values(T * kHeadDim);
  for (int h = 0; h < kKvHeads; ++h) {
    for (int64_t p = 0; p < T; ++p) {
      ToF32(d->KRow(p, h), kHeadDim, keys.data() + p * kHeadDim);
      ToF32(d->VRow(p, h), kHeadDim, values.data() + p * kHeadDim);
    }
    GroupReference(*d, h, keys, values, d->ref_full.data() + h * kGroup * kHeadDim);
  }
  slot = std::move(d);
  return *slot;
}

// ---------------------------------------------------------------- runtimes

enum class RtKind { kCountSketch10, kCentroid10, kExactFull };

const char* RtName(RtKind k) {
  switch (k) {
    case RtKind::kCountSketch10: return "kvtier_cs_10pct";
    case RtKind::kCentroid10: return "kvtier_centroid_10pct";
    case RtKind::kExactFull: return "exact_full_100pct";
  }
  return "?";
}

Options RtOptions(int64_t T, RtKind kind) {
  Options o;
  o.shape = Shape();
  o.max_context = T;
  o.device_budget_fraction = kind == RtKind::kExactFull ? 1.0 : kBudget;
  o.sketch_kind = kind == RtKind::kCentroid10 ? SketchKind::kCentroid : SketchKind::kCountSketch;
  o.backend = BackendKind::kCpu;  // the same CPU as the exact baseline, whatever else is built in
  return o;
}

struct RtFixture {
  std::unique_ptr<Runtime> rt;
  Tensor out{DType::kF16, kQHeads * kHeadDim};
  RegionCounts regions;
  double rel_err = 0;  // vs exact attention over all T tokens
};

double RelErr(const Tensor& out, const double* ref, int n) {
  const std::vector<float> f = out.ToFloat();
  return workload::RelativeError(f.data(), ref, n);
}

// A runtime holding the T tokens of GetData(T), not yet attended.
std::unique_ptr<Runtime> Filled(int64_t T, RtKind kind) {
  const Data& data = GetData(T);
  absl::StatusOr<std::unique_ptr<Runtime>> rt = Runtime::Create(RtOptions(T, kind));
  if (!rt.ok()) Die(std::string("Runtime::Create: ") + std::string(rt.status().message()));
  if (absl::Status st = (*rt)->AddSequence(kSeq); !st.ok()) Die(std::string(st.message()));
  if (absl::Status st = (*rt)->Append(kSeq, 0, data.k.data(), data.v.data(), T); !st.ok()) {
    Die(std::string("Append: ") + std::string(st.message()));
  }
  return std::move(*rt);
}

const RtFixture& GetRuntime(int64_t T, RtKind kind) {
  static std::map<std::pair<int64_t, RtKind>, std::unique_ptr<RtFixture>> cache;
  std::unique_ptr<RtFixture>& slot = cache[{T, kind}];
  if (slot) return *slot;
  const Data& data = GetData(T);
  auto f = std::make_unique<RtFixture>();
  f->rt = Filled(T, kind);
  absl::StatusOr<RegionCounts> regions = f->rt->Regions(kSeq);
  if (!regions.ok()) Die(std::string(regions.status().message()));
  f->regions = *regions;  // summed over the 8 KV heads
  absl::StatusOr<AttendCounts> c = f->rt->Attend(kSeq, 0, data.q.data(), f->out.data());
  if (!c.ok()) Die(std::string("Attend: ") + std::string(c.status().message()));
  f->rel_err = RelErr(f->out, data.ref_full.data(), kQHeads * kHeadDim);

  const std::string name = "attend/T=" + std::to_string(T) + "/" + RtName(kind);
  Note(T, name + ": " + f->rt->plan().Explain());
  char line[256];
  std::snprintf(line, sizeof line, "%s: per KV head %lld resident + %lld vague tokens; rel err vs exact %.3e",
                name.c_str(), static_cast<long long>(f->regions.resident() / kKvHeads),
                static_cast<long long>(f->regions.vague / kKvHeads), f->rel_err);
  Note(T, line);
  if (kind == RtKind::kExactFull) {
    if (f->regions.vague != 0) {
      g_check_failed = true;
      Note(T, name + ": FAILED: budget 1.0 left vague tokens, this is not exact attention");
    }
    Check(T, name + " vs exact (double)", f->rel_err, kExactTolerance);
  }
  slot = std::move(f);
  return *slot;
}

void BM_RuntimeAttend(benchmark::State& state, int64_t T, RtKind kind) {
  const Data& data = GetData(T);
  const RtFixture& f = GetRuntime(T, kind);
  Runtime& rt = *f.rt;
  void* out = const_cast<Tensor&>(f.out).data();
  for (auto _ : state) {
    absl::StatusOr<AttendCounts> c = rt.Attend(kSeq, 0, data.q.data(), out);
    benchmark::DoNotOptimize(c);
    benchmark::ClobberMemory();
    if (!c.ok()) {
      state.SkipWithError("Runtime::Attend failed");
      break;
    }
  }
  state.counters["exact_tok"] = static_cast<double>(f.regions.resident() / kKvHeads);
  state.counters["sketch_tok"] = static_cast<double>(f.regions.vague / kKvHeads);
  state.counters["rel_err"] = f.rel_err;
}

// ---------------------------------------------------------------- kernels

// One sketch per KV head in our own memory, over the vague tokens.
struct SketchSet {
  int rows = 0, width = 0;
  std::vector<std::vector<float>> mem;  // [head] SketchStateFloats
  std::vector<kernels::SketchState> state;
  std::vector<kernels::AttendParams> params;  // [head]
  Tensor out{DType::kF16, kQHeads * kHeadDim};
  double est_err = 0;    // vs softmax over the per-token reconstruction
  double exact_err = 0;  // vs exact attention over the vague tokens
};

struct VagueFixture {
  int64_t T = 0;
  int n_vague = 0;
  uint64_t seed = 0;
  std::vector<std::vector<uint32_t>> ids;           // [head][n_vague] positions
  std::vector<std::vector<uint16_t>> kslot, vslot;  // [head][n_vague][head_dim] f16
  std::vector<double> ref_vague;                    // [q_heads][head_dim]
  std::vector<kernels::AttendParams> exact;         // [head]
  kernels::SlotRange exact_range;                   // every slot
  Tensor exact_out{DType::kF16, kQHeads * kHeadDim};
  double exact_err = 0;
  SketchSet r1, r2;
};

kernels::KernelSet& Kernels() {
  static std::unique_ptr<Backend> backend = [] {
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(BackendKind::kCpu);
    if (!b.ok()) Die(std::string("CreateBackend: ") + std::string(b.status().message()));
    return std::move(*b);
  }();
  return backend->kernels();
}

kernels::AttendParams BaseParams(const Data& data, int h, void* out) {
  kernels::AttendParams p;
  p.head_dim = kHeadDim;
  p.group = kGroup;
  p.dtype = DType::kF16;
  p.out_dtype = DType::kF16;
  p.scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));  // the runtime's default
  p.q = static_cast<const uint16_t*>(data.q.data()) + static_cast<int64_t>(h) * kGroup * kHeadDim;
  p.out = static_cast<uint16_t*>(out) + static_cast<int64_t>(h) * kGroup * kHeadDim;
  return p;
}

void BuildSketch(const Data& data, VagueFixture& vf, int rows, int width, SketchSet& s) {
  const int n = vf.n_vague;
  s.rows = rows;
  s.width = width;
  s.mem.resize(kKvHeads);
  s.state.resize(kKvHeads);
  std::vector<kernels::SketchUpdateParams> updates(kKvHeads);
  for (int h = 0; h < kKvHeads; ++h) {
    s.mem[h].assign(kernels::SketchStateFloats(rows, width, kHeadDim), 0.0f);
    kernels::SketchState& st = s.state[h];
    st.kind = SketchKind::kCountSketch;
    st.rows = rows;
    st.width = width;
    st.head_dim = kHeadDim;
    st.seed = kernels::HeadSeed(vf.seed, 0, h);  // as the runtime hashes this head
    float* m = s.mem[h].data();
    st.key_sums = m;
    st.value_sums = st.key_sums + static_cast<int64_t>(rows) * width * kHeadDim;
    st.counts = st.value_sums + static_cast<int64_t>(rows) * width * kHeadDim;
    st.totals = st.counts + 2LL * rows * width;
    kernels::SketchUpdateParams& u = updates[h];
    u.sketch = st;
    u.sign = 1.0f;
    u.n = n;
    u.ids = vf.ids[h].data();
    u.keys = vf.kslot[h].data();
    u.values = vf.vslot[h].data();
    u.stride = kHeadDim;
    u.dtype = DType::kF16;
  }
  Kernels().SketchUpdate(updates);

  s.params.resize(kKvHeads);
  for (int h = 0; h < kKvHeads; ++h) {
    kernels::AttendParams p = BaseParams(data, h, s.out.data());
    p.num_ranges = 0;  // only the sketch contribution
    p.sketch = s.state[h];
    p.policy = VaguePolicy::kShrink;
    p.num_vague = n;
    p.vague_ids = rows >= 2 ? vf.ids[h].data() : nullptr;
    s.params[h] = p;
  }
  Kernels().Attend(s.params);
  s.exact_err = RelErr(s.out, vf.ref_vague.data(), kQHeads * kHeadDim);

  // Reference: exact softmax over every vague token's kShrink reconstruction.
  std::vector<double> ref(kQHeads * kHeadDim);
  std::vector<float> keys(static_cast<size_t>(n) * kHeadDim), values(static_cast<size_t>(n) * kHeadDim);
  for (int h = 0; h < kKvHeads; ++h) {
    kernels::SketchEstimateParams e;
    e.sketch = s.state[h];
    e.policy = VaguePolicy::kShrink;
    e.n = n;
    e.ids = vf.ids[h].data();
    e.keys = keys.data();
    e.values = values.data();
    Kernels().SketchEstimate(e);
    GroupReference(data, h, keys, values, ref.data() + h * kGroup * kHeadDim);
  }
  s.est_err = RelErr(s.out, ref.data(), kQHeads * kHeadDim);
}

const VagueFixture& GetVague(int64_t T) {
  static std::map<int64_t, std::unique_ptr<VagueFixture>> cache;
  std::unique_ptr<VagueFixture>& slot = cache[T];
  if (slot) return *slot;
  const Data& data = GetData(T);
  // Its own runtime: the attend benchmark's has recalled tokens into staging
  // once it ran, and the benchmarks run in random order.
  const std::unique_ptr<Runtime> filled = Filled(T, RtKind::kCountSketch10);
  const Runtime& rt = *filled;
  const BudgetPlan& plan = rt.plan();
  auto vf = std::make_unique<VagueFixture>();
  vf->T = T;
  vf->seed = rt.options().seed;
  // Vague tokens per KV head: T minus the plan's resident slots (staging is
  // empty without recalls).
  const int64_t resident = plan.sink_tokens + plan.recent_tokens + plan.candidate_tokens;
  vf->n_vague = static_cast<int>(T - resident);
  if (!plan.compressed || vf->n_vague <= 0) Die("the 10% plan leaves no vague tokens");

  vf->ids.resize(kKvHeads);
  vf->kslot.resize(kKvHeads);
  vf->vslot.resize(kKvHeads);
  for (int h = 0; h < kKvHeads; ++h) {
    std::vector<uint32_t>& ids = vf->ids[h];
    for (int64_t p = 0; p < T; ++p) {
      absl::StatusOr<Region> r = rt.TokenRegion(kSeq, 0, h, p);
      if (!r.ok()) Die(std::string(r.status().message()));
      if (*r == Region::kVague) ids.push_back(static_cast<uint32_t>(p));
    }
    if (static_cast<int64_t>(ids.size()) != vf->n_vague) {
      Die("KV head " + std::to_string(h) + " holds " + std::to_string(ids.size()) + " vague tokens, the plan says " +
          std::to_string(vf->n_vague));
    }
    vf->kslot[h].resize(static_cast<size_t>(vf->n_vague) * kHeadDim);
    vf->vslot[h].resize(static_cast<size_t>(vf->n_vague) * kHeadDim);
    for (int i = 0; i < vf->n_vague; ++i) {
      std::copy_n(data.KRow(ids[i], h), kHeadDim, vf->kslot[h].data() + static_cast<int64_t>(i) * kHeadDim);
      std::copy_n(data.VRow(ids[i], h), kHeadDim, vf->vslot[h].data() + static_cast<int64_t>(i) * kHeadDim);
    }
  }

  // Exact attention over the vague tokens, double precision.
  vf->ref_vague.resize(kQHeads * kHeadDim);
  {
    std::vector<float> keys(static_cast<size_t>(vf->n_vague) * kHeadDim), values(keys.size());
    for (int h = 0; h < kKvHeads; ++h) {
      ToF32(vf->kslot[h].data(), static_cast<int>(keys.size()), keys.data());
      ToF32(vf->vslot[h].data(), static_cast<int>(values.size()), values.data());
      GroupReference(data, h, keys, values, vf->ref_vague.data() + h * kGroup * kHeadDim);
    }
  }

  // The same tokens as resident slots: exact attention through the kernel.
  vf->exact_range = kernels::SlotRange{0, vf->n_vague};
  vf->exact.resize(kKvHeads);
  for (int h = 0; h < kKvHeads; ++h) {
    kernels::AttendParams p = BaseParams(data, h, vf->exact_out.data());
    p.k_slots = vf->kslot[h].data();
    p.v_slots = vf->vslot[h].data();
    p.ranges = &vf->exact_range;
    p.num_ranges = 1;
    vf->exact[h] = p;  // sketch kind kNone, policy kDrop: no vague side
  }
  Kernels().Attend(vf->exact);
  vf->exact_err = RelErr(vf->exact_out, vf->ref_vague.data(), kQHeads * kHeadDim);

  // The plan's sketch (1 row), and 2 rows at the same sketch bytes.
  BuildSketch(data, *vf, plan.sketch_rows, plan.sketch_width, vf->r1);
  Options o2 = rt.options();
  o2.sketch_rows = 2;
  absl::StatusOr<BudgetPlan> plan2 = PlanBudget(o2);
  if (!plan2.ok()) Die(std::string("PlanBudget (2 rows): ") + std::string(plan2.status().message()));
  BuildSketch(data, *vf, plan2->sketch_rows, plan2->sketch_width, vf->r2);

  const std::string name = "vague/T=" + std::to_string(T);
  char line[256];
  std::snprintf(line, sizeof line, "%s: %d vague tokens per KV head; sketch r1 %dx%d, r2 %dx%d", name.c_str(),
                vf->n_vague, vf->r1.rows, vf->r1.width, vf->r2.rows, vf->r2.width);
  Note(T, line);
  Check(T, name + "/exact_slots vs exact (double)", vf->exact_err, kExactTolerance);
  Check(T, name + "/sketch_cs_r1 vs its per-token estimate", vf->r1.est_err, kEstimateTolerance);
  Check(T, name + "/sketch_cs_r2 vs its per-token estimate", vf->r2.est_err, kEstimateTolerance);
  std::snprintf(line, sizeof line, "%s: sketch approximation of exact attention over the vague tokens: r1 %.3f, r2 %.3f",
                name.c_str(), vf->r1.exact_err, vf->r2.exact_err);
  Note(T, line);
  slot = std::move(vf);
  return *slot;
}

enum class VagueKind { kSketchR1, kSketchR2, kExactSlots };

const char* VagueName(VagueKind k) {
  switch (k) {
    case VagueKind::kSketchR1: return "sketch_cs_r1";
    case VagueKind::kSketchR2: return "sketch_cs_r2";
    case VagueKind::kExactSlots: return "exact_slots";
  }
  return "?";
}

void BM_VagueAttend(benchmark::State& state, int64_t T, VagueKind kind) {
  const VagueFixture& vf = GetVague(T);
  const std::vector<kernels::AttendParams>& params =
      kind == VagueKind::kSketchR1 ? vf.r1.params : kind == VagueKind::kSketchR2 ? vf.r2.params : vf.exact;
  kernels::KernelSet& k = Kernels();
  for (auto _ : state) {
    k.Attend(params);
    benchmark::DoNotOptimize(params[0].out);
    benchmark::ClobberMemory();
  }
  const bool exact = kind == VagueKind::kExactSlots;
  state.counters["exact_tok"] = exact ? vf.n_vague : 0;
  state.counters["sketch_tok"] = exact ? 0 : vf.n_vague;
  state.counters["rel_err"] =
      kind == VagueKind::kSketchR1 ? vf.r1.exact_err : kind == VagueKind::kSketchR2 ? vf.r2.exact_err : vf.exact_err;
}

// ---------------------------------------------------------------- driver

std::string AttendName(int64_t T, RtKind k) { return "attend/T=" + std::to_string(T) + "/" + RtName(k); }
std::string VagueBenchName(int64_t T, VagueKind k) { return "vague/T=" + std::to_string(T) + "/" + VagueName(k); }

// Per-benchmark settings override Google Benchmark's flags, so the defaults
// below apply only where the command line does not set the flag.
struct FlagsGiven {
  bool min_time = false, repetitions = false, aggregates = false, interleaving = false;
};
FlagsGiven g_flags;

void Configure(benchmark::internal::Benchmark* b) {
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
  if (!g_flags.min_time) b->MinTime(0.3);
  if (!g_flags.repetitions) b->Repetitions(5);
  if (!g_flags.aggregates) b->ReportAggregatesOnly(true);
}

void RegisterAll(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto is = [&](const char* flag) { return a.rfind(flag, 0) == 0; };
    g_flags.min_time |= is("--benchmark_min_time");
    g_flags.repetitions |= is("--benchmark_repetitions");
    g_flags.aggregates |= is("--benchmark_report_aggregates_only") || is("--benchmark_display_aggregates_only");
    g_flags.interleaving |= is("--benchmark_enable_random_interleaving");
  }
  for (int64_t T : kContexts) {
    for (RtKind k : {RtKind::kCountSketch10, RtKind::kCentroid10, RtKind::kExactFull}) {
      Configure(benchmark::RegisterBenchmark(AttendName(T, k).c_str(), BM_RuntimeAttend, T, k));
    }
    for (VagueKind k : {VagueKind::kSketchR1, VagueKind::kSketchR2, VagueKind::kExactSlots}) {
      Configure(benchmark::RegisterBenchmark(VagueBenchName(T, k).c_str(), BM_VagueAttend, T, k));
    }
  }
}

// The console reporter, keeping the real time per iteration (seconds) of
// every run: the median aggregate where there is one, else the median of the
// repetitions it saw.
class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  using ConsoleReporter::ConsoleReporter;

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const std::string& name = r.run_name.function_name;
      const double s = r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
      if (r.run_type == Run::RT_Aggregate) {
        if (r.aggregate_name == "median") {
          median_[name] = s;
          repetitions_ = std::max(repetitions_, r.repetitions);
        }
      } else {
        reps_[name].push_back(s);
      }
    }
  }

  // Seconds, or < 0 when the benchmark did not run.
  int64_t repetitions() const { return repetitions_; }
  double Seconds(const std::string& name) const {
    if (auto it = median_.find(name); it != median_.end()) return it->second;
    auto it = reps_.find(name);
    if (it == reps_.end() || it->second.empty()) return -1;
    std::vector<double> v = it->second;
    std::sort(v.begin(), v.end());
    const size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
  }

 private:
  std::map<std::string, double> median_;
  std::map<std::string, std::vector<double>> reps_;
  int64_t repetitions_ = 1;
};

void PrintRatios(const RecordingReporter& rep) {
  struct Row {
    std::string what, exact, kvtier;
    double goal;  // 0: information only
  };
  std::vector<Row> rows;
  for (int64_t T : kContexts) {
    const std::string t = std::to_string(T);
    rows.push_back({"vague T=" + t + " sketch cs r1 vs exact", VagueBenchName(T, VagueKind::kExactSlots),
                    VagueBenchName(T, VagueKind::kSketchR1), 10.0});
    rows.push_back({"vague T=" + t + " sketch cs r2 vs exact", VagueBenchName(T, VagueKind::kExactSlots),
                    VagueBenchName(T, VagueKind::kSketchR2), 0.0});
    rows.push_back({"attend T=" + t + " count-sketch vs full", AttendName(T, RtKind::kExactFull),
                    AttendName(T, RtKind::kCountSketch10), T == 32768 ? 3.0 : 0.0});
    rows.push_back({"attend T=" + t + " centroid vs full", AttendName(T, RtKind::kExactFull),
                    AttendName(T, RtKind::kCentroid10), T == 32768 ? 3.0 : 0.0});
  }
  std::printf("\nkvtier attend vs exact attention, same process, same CPU; median of %lld repetitions of the real\n"
              "time per call\n", static_cast<long long>(rep.repetitions()));
  std::printf("(%d query / %d KV heads, head_dim %d, f16, budget %.0f%%; ratio = exact / kvtier)\n", kQHeads,
              kKvHeads, kHeadDim, 100 * kBudget);
  std::printf("%-40s %12s %12s %9s %8s  %s\n", "comparison", "exact us", "kvtier us", "ratio", "goal", "result");
  int missed = 0;
  for (const Row& r : rows) {
    const double e = rep.Seconds(r.exact), k = rep.Seconds(r.kvtier);
    if (e < 0 || k < 0) {
      auto us = [](double t) {
        char b[32] = "-";
        if (t >= 0) std::snprintf(b, sizeof b, "%.1f", t * 1e6);
        return std::string(b);
      };
      std::printf("%-40s %12s %12s %9s %8s  %s\n", r.what.c_str(), us(e).c_str(), us(k).c_str(), "-", "-",
                  "not run (filtered out)");
      continue;
    }
    const double ratio = e / k;
    char goal[16] = "info";
    const char* result = "-";
    if (r.goal > 0) {
      std::snprintf(goal, sizeof goal, ">=%.0fx", r.goal);
      result = ratio >= r.goal ? "PASS" : "MISS";
      missed += ratio < r.goal;
    }
    std::printf("%-40s %12.1f %12.1f %8.1fx %8s  %s\n", r.what.c_str(), e * 1e6, k * 1e6, ratio, goal, result);
  }
  std::printf(
      "\ncounters: exact_tok / sketch_tok = tokens per KV head served exactly / through the sketch; rel_err =\n"
      "relative L2 error of the output against exact attention (double) over the same tokens\n");
  for (const auto& [T, lines] : Notes()) {
    for (const std::string& n : lines) std::printf("%s\n", n.c_str());
  }
  if (missed > 0) std::printf("%d goal(s) missed\n", missed);
}

void PrintUsage() {
  std::printf(
      "bench_attend: kvtier decode attention (1 layer, 32 query / 8 KV heads, head_dim 128, f16, budget 10%%)\n"
      "against exact attention over the same tokens on the same CPU, at T = 4096 and 32768 tokens.\n"
      "Benchmarks: attend/T=<T>/{kvtier_cs_10pct,kvtier_centroid_10pct,exact_full_100pct} (Runtime::Attend)\n"
      "            vague/T=<T>/{sketch_cs_r1,sketch_cs_r2,exact_slots} (KernelSet::Attend over the vague tokens)\n"
      "After the run it prints the ratios exact/kvtier (medians) with the goals (sketch >= 10x over the vague\n"
      "tokens, whole attend >= 3x at 32k). Exit status 1 when a correctness check fails.\n"
      "Defaults unless given: --benchmark_min_time=0.3, --benchmark_repetitions=5 with aggregates only,\n"
      "--benchmark_enable_random_interleaving=true.\n\n"
      "Google Benchmark flags:\n");
  benchmark::PrintDefaultHelp();
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) {
  // Registration reads which benchmark flags are given, before Initialize
  // consumes them.
  kvtier::RegisterAll(argc, argv);
  // On a shared machine, load drifts over the run: interleave the
  // repetitions of all benchmarks (unless the flag is given) so both sides
  // of each ratio see the same conditions.
  std::vector<char*> args(argv, argv + argc);
  char interleave[] = "--benchmark_enable_random_interleaving=true";
  if (!kvtier::g_flags.interleaving) args.insert(args.begin() + 1, interleave);
  args.push_back(nullptr);
  int nargs = static_cast<int>(args.size()) - 1;
  benchmark::Initialize(&nargs, args.data(), kvtier::PrintUsage);
  if (benchmark::ReportUnrecognizedArguments(nargs, args.data())) return 1;
  const bool tty = isatty(STDOUT_FILENO) != 0;
  kvtier::RecordingReporter reporter(tty ? benchmark::ConsoleReporter::OO_ColorTabular
                                         : benchmark::ConsoleReporter::OO_Tabular);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  kvtier::PrintRatios(reporter);
  benchmark::Shutdown();
  return kvtier::g_check_failed ? 1 : 0;
}
