// Bad input: invalid Options, an impossible budget, unknown sequences, layers
// and KV heads out of range, non-positive token counts, null pointers,
// non-finite values, bad initial scores, appends beyond max_context or the
// host-tier cap, attends on empty layers, duplicate batch items and positions
// out of range. Every rejected call must return the documented code with a
// message that names the offending value, and leave the runtime unchanged:
//   - Length of every layer, Regions, the region of every token, Stats and
//     CheckInvariants are identical before and after;
//   - a valid Attend after the bad call returns bit-identical output to the
//     one taken before it (f32 output);
//   - a twin runtime that received the same valid calls but never the bad
//     ones stays bit-identical through further appends, attends and recalls
//     (checked after every test), so hidden state such as heavy-hitter
//     scores was not touched either.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/runtime.h"
#include "test_util.h"
#include "workload/tensor.h"

namespace kvtier {
namespace {

using ::testing::HasSubstr;
using testing::RandomNormal;

constexpr int kLayers = 2, kQHeads = 4, kKvHeads = 2, kDim = 64;
constexpr int64_t kMaxContext = 256;

Options BaseOptions(DType dtype) {
  Options o;
  o.shape = {.layers = kLayers, .q_heads = kQHeads, .kv_heads = kKvHeads, .head_dim = kDim, .dtype = dtype};
  o.max_context = kMaxContext;
  o.max_sequences = 2;
  // 30% of the full cache: recent ~16, candidates ~11-24, staging 10, a
  // 16-bucket Count-Sketch per head; tokens beyond ~45 per head go vague.
  o.device_budget_fraction = 0.3;
  // Decayed scores keep heavy-hitter competition live, so a rejected call
  // that touched the accumulated scores would change later evictions.
  o.score_decay = 0.9;
  // No automatic recall: an attend then changes no later output (only
  // scores), so a reference attend can be repeated bit for bit.
  o.recall_proxy = RecallProxy::kNone;
  o.backend = BackendKind::kCpu;
  return o;
}

absl::Status ToStatus(const absl::Status& s) { return s; }
template <typename T>
absl::Status ToStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

// ---------------------------------------------------------------- Options

struct OptionsCase {
  const char* label;
  std::function<void(Options&)> mutate;
  std::vector<std::string> expect;  // substrings of the message: the field and the value
};

TEST(BadInputOptionsTest, EveryValidatedFieldIsInvalidArgumentNamingFieldAndValue) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<OptionsCase> cases = {
      {"zero layers", [](Options& o) { o.shape.layers = 0; }, {"shape.layers", "got 0"}},
      {"too many layers", [](Options& o) { o.shape.layers = 5000; }, {"shape.layers", "got 5000"}},
      {"zero kv heads", [](Options& o) { o.shape.kv_heads = 0; }, {"shape.kv_heads", "got 0"}},
      {"q heads not a multiple", [](Options& o) { o.shape.q_heads = 6, o.shape.kv_heads = 4; },
       {"shape.q_heads", "kv_heads (4)", "got 6"}},
      {"zero q heads", [](Options& o) { o.shape.q_heads = 0; }, {"shape.q_heads", "got 0"}},
      {"head_dim not a multiple of 8", [](Options& o) { o.shape.head_dim = 60; }, {"shape.head_dim", "got 60"}},
      {"head_dim above 256", [](Options& o) { o.shape.head_dim = 264; }, {"shape.head_dim", "got 264"}},
      {"head_dim 0", [](Options& o) { o.shape.head_dim = 0; }, {"shape.head_dim", "got 0"}},
      {"bad dtype", [](Options& o) { o.shape.dtype = static_cast<DType>(7); }, {"shape.dtype", "7"}},
      {"negative budget bytes", [](Options& o) { o.device_budget_bytes = -5; },
       {"device_budget_bytes", "got -5"}},
      {"fraction 0", [](Options& o) { o.device_budget_fraction = 0.0; }, {"device_budget_fraction", "got 0"}},
      {"fraction above 1", [](Options& o) { o.device_budget_fraction = 1.5; },
       {"device_budget_fraction", "got 1.5"}},
      {"fraction negative", [](Options& o) { o.device_budget_fraction = -0.25; },
       {"device_budget_fraction", "got -0.25"}},
      {"fraction NaN", [nan](Options& o) { o.device_budget_fraction = nan; }, {"device_budget_fraction", "got nan"}},
      {"fraction inf", [inf](Options& o) { o.device_budget_fraction = inf; }, {"device_budget_fraction", "got inf"}},
      {"max_context 0", [](Options& o) { o.max_context = 0; }, {"max_context", "got 0"}},
      {"max_context above 2^30", [](Options& o) { o.max_context = (int64_t{1} << 30) + 1; },
       {"max_context", "got 1073741825"}},
      {"max_sequences 0", [](Options& o) { o.max_sequences = 0; }, {"max_sequences", "got 0"}},
      {"max_sequences above 65536", [](Options& o) { o.max_sequences = 65537; }, {"max_sequences", "got 65537"}},
      {"sink negative", [](Options& o) { o.sink_tokens = -1; }, {"sink_tokens", "got -1"}},
      {"sink above 1024", [](Options& o) { o.sink_tokens = 1025; }, {"sink_tokens", "got 1025"}},
      {"recent below the minimum", [](Options& o) { o.recent_tokens = kMinRecentTokens - 1; },
       {"recent_tokens", absl::StrCat("got ", kMinRecentTokens - 1), absl::StrCat(kMinRecentTokens)}},
      {"recent above max_context", [](Options& o) { o.recent_tokens = kMaxContext + 1; },
       {"recent_tokens", absl::StrCat("got ", kMaxContext + 1)}},
      {"candidates below -1", [](Options& o) { o.candidate_tokens = -2; }, {"candidate_tokens", "got -2"}},
      {"candidates above max_context", [](Options& o) { o.candidate_tokens = kMaxContext + 1; },
       {"candidate_tokens", "got 257"}},
      {"staging below -1", [](Options& o) { o.staging_tokens = -2; }, {"staging_tokens", "got -2"}},
      {"staging above max_context", [](Options& o) { o.staging_tokens = kMaxContext + 7; },
       {"staging_tokens", "got 263"}},
      {"recent_share negative", [](Options& o) { o.recent_share = -0.5; }, {"recent_share", "got -0.5"}},
      {"candidate_share above 1", [](Options& o) { o.candidate_share = 1.5; }, {"candidate_share", "got 1.5"}},
      {"staging_share NaN", [nan](Options& o) { o.staging_share = nan; }, {"staging_share", "got nan"}},
      {"sketch_share above 1", [](Options& o) { o.sketch_share = 2.0; }, {"sketch_share", "got 2"}},
      {"score_decay 0", [](Options& o) { o.score_decay = 0.0; }, {"score_decay", "got 0"}},
      {"score_decay above 1", [](Options& o) { o.score_decay = 1.25; }, {"score_decay", "got 1.25"}},
      {"score_decay NaN", [nan](Options& o) { o.score_decay = nan; }, {"score_decay", "got nan"}},
      {"bad sketch kind", [](Options& o) { o.sketch_kind = static_cast<SketchKind>(7); }, {"sketch_kind", "got 7"}},
      {"bad policy", [](Options& o) { o.vague_policy = static_cast<VaguePolicy>(9); }, {"vague_policy", "got 9"}},
      {"no sketch with shrink",
       [](Options& o) {
         o.sketch_kind = SketchKind::kNone;
         o.vague_policy = VaguePolicy::kShrink;
       },
       {"vague_policy", "sketch_kind is none", "got shrink"}},
      {"no sketch with estimate",
       [](Options& o) {
         o.sketch_kind = SketchKind::kNone;
         o.vague_policy = VaguePolicy::kEstimate;
       },
       {"vague_policy", "sketch_kind is none", "got estimate"}},
      {"sketch rows negative", [](Options& o) { o.sketch_rows = -1; }, {"sketch_rows", "got -1"}},
      {"sketch rows above the max", [](Options& o) { o.sketch_rows = kMaxSketchRows + 1; },
       {"sketch_rows", absl::StrCat("got ", kMaxSketchRows + 1)}},
      {"sketch width below the min", [](Options& o) { o.sketch_width = kMinSketchBuckets - 1; },
       {"sketch_width", absl::StrCat("got ", kMinSketchBuckets - 1)}},
      {"sketch width above 65536", [](Options& o) { o.sketch_width = 65537; }, {"sketch_width", "got 65537"}},
      {"centroid width not a power of two",
       [](Options& o) {
         o.sketch_kind = SketchKind::kCentroid;
         o.sketch_width = 24;
       },
       {"sketch_width", "power of two", "got 24"}},
      {"attention_scale negative", [](Options& o) { o.attention_scale = -1.0; }, {"attention_scale", "got -1"}},
      {"attention_scale NaN", [nan](Options& o) { o.attention_scale = nan; }, {"attention_scale", "got nan"}},
      {"block_tokens negative", [](Options& o) { o.block_tokens = -1; }, {"block_tokens", "got -1"}},
      {"block_tokens above 65536", [](Options& o) { o.block_tokens = 65537 * 16; }, {"block_tokens", "got 1048592"}},
      {"block_tokens not a 4 KiB block", [](Options& o) { o.block_tokens = 3; }, {"block_tokens", "got 3"}},
      {"host_tier_bytes negative", [](Options& o) { o.host_tier_bytes = -1; }, {"host_tier_bytes", "got -1"}},
      {"bad backend", [](Options& o) { o.backend = static_cast<BackendKind>(5); }, {"backend", "got 5"}},
  };
  const Options base = BaseOptions(DType::kF16);
  {
    absl::StatusOr<std::unique_ptr<Runtime>> ok = Runtime::Create(base);
    ASSERT_TRUE(ok.ok()) << "the base options must be valid: " << ok.status();
  }
  for (const OptionsCase& c : cases) {
    SCOPED_TRACE(c.label);
    Options o = base;
    c.mutate(o);
    const absl::Status v = o.Validate();
    EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument) << v;
    absl::StatusOr<std::unique_ptr<Runtime>> rt = Runtime::Create(o);
    ASSERT_FALSE(rt.ok());
    EXPECT_EQ(rt.status().code(), absl::StatusCode::kInvalidArgument) << rt.status();
    for (const std::string& s : c.expect) EXPECT_THAT(rt.status().message(), HasSubstr(s));
    EXPECT_EQ(rt.status().message(), v.message()) << "Create reports what Validate reports";
  }
}

TEST(BadInputOptionsTest, FieldsThatAreIgnoredOrAtTheirLimitsAreAccepted) {
  // The fraction is only read when device_budget_bytes is 0.
  Options o = BaseOptions(DType::kF32);
  o.device_budget_fraction = std::numeric_limits<double>::quiet_NaN();
  o.device_budget_bytes = int64_t{1} << 20;
  absl::StatusOr<std::unique_ptr<Runtime>> a = Runtime::Create(o);
  EXPECT_TRUE(a.ok()) << a.status();
  // Boundary values of the validated ranges.
  o = BaseOptions(DType::kF32);
  o.recent_tokens = kMinRecentTokens;
  o.block_tokens = 4096 / static_cast<int>(o.shape.HeadTokenBytes());
  o.sketch_kind = SketchKind::kCentroid;
  o.sketch_width = 16;
  o.device_budget_fraction = 1.0;
  absl::StatusOr<std::unique_ptr<Runtime>> b = Runtime::Create(o);
  EXPECT_TRUE(b.ok()) << b.status();
  o = BaseOptions(DType::kF32);
  o.sketch_kind = SketchKind::kNone;
  o.vague_policy = VaguePolicy::kDrop;
  absl::StatusOr<std::unique_ptr<Runtime>> c = Runtime::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
}

TEST(BadInputOptionsTest, ImpossibleBudgetNamesTheNumbersAndTheNeedIsExact) {
  Options o = BaseOptions(DType::kF16);
  o.max_context = 8192;  // so that the budget, not the context, is what limits
  o.device_budget_bytes = 1000;
  absl::StatusOr<std::unique_ptr<Runtime>> rt = Runtime::Create(o);
  ASSERT_FALSE(rt.ok());
  EXPECT_EQ(rt.status().code(), absl::StatusCode::kInvalidArgument) << rt.status();
  const std::string msg(rt.status().message());
  EXPECT_THAT(msg, HasSubstr("1000 bytes"));
  EXPECT_THAT(msg, HasSubstr("2 sequence(s) x 2 layers x 2 KV heads"));
  EXPECT_THAT(msg, HasSubstr("max_sequences (2)"));
  EXPECT_THAT(msg, HasSubstr("max_context (8192)"));
  // The message states the smallest budget that works: it must be exact.
  const std::string key = "needs at least ";
  const size_t at = msg.find(key);
  ASSERT_NE(at, std::string::npos) << msg;
  const int64_t need = std::stoll(msg.substr(at + key.size()));
  ASSERT_GT(need, 1000);
  o.device_budget_bytes = need;
  absl::StatusOr<std::unique_ptr<Runtime>> fits = Runtime::Create(o);
  ASSERT_TRUE(fits.ok()) << "a budget of the stated need must work: " << fits.status();
  EXPECT_LE((*fits)->plan().total_bytes, need);
  EXPECT_EQ((*fits)->plan().recent_tokens, kMinRecentTokens);
  o.device_budget_bytes = need - 1;
  absl::StatusOr<std::unique_ptr<Runtime>> short_by_one = Runtime::Create(o);
  ASSERT_FALSE(short_by_one.ok()) << "one byte less than the stated need must fail";
  EXPECT_EQ(short_by_one.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(short_by_one.status().message(), HasSubstr(absl::StrCat(need - 1, " bytes")));
  EXPECT_THAT(short_by_one.status().message(), HasSubstr(absl::StrCat("needs at least ", need)));
}

// ---------------------------------------------------------------- Runtime calls

// What must not change across a rejected call.
struct Snapshot {
  RuntimeStats stats;
  std::map<SequenceId, std::vector<int64_t>> lengths;  // [layer]
  std::map<SequenceId, RegionCounts> regions;
  std::map<SequenceId, std::vector<uint8_t>> token_regions;  // [layer][kv_head][position]
};

void ExpectStatsEqual(const RuntimeStats& a, const RuntimeStats& b, const std::string& what) {
  EXPECT_EQ(a.sequences, b.sequences) << what;
  EXPECT_EQ(a.regions.sink, b.regions.sink) << what;
  EXPECT_EQ(a.regions.recent, b.regions.recent) << what;
  EXPECT_EQ(a.regions.candidate, b.regions.candidate) << what;
  EXPECT_EQ(a.regions.recalled, b.regions.recalled) << what;
  EXPECT_EQ(a.regions.vague, b.regions.vague) << what;
  EXPECT_EQ(a.device_budget_bytes, b.device_budget_bytes) << what;
  EXPECT_EQ(a.device_reserved.total(), b.device_reserved.total()) << what;
  EXPECT_EQ(a.peak_device_bytes, b.peak_device_bytes) << what;
  EXPECT_EQ(a.host_tier.blocks_in_use, b.host_tier.blocks_in_use) << what;
  EXPECT_EQ(a.host_tier.bytes_in_use, b.host_tier.bytes_in_use) << what;
  EXPECT_EQ(a.host_tier.bytes_reserved, b.host_tier.bytes_reserved) << what;
  EXPECT_EQ(a.host_tier.peak_bytes_in_use, b.host_tier.peak_bytes_in_use) << what;
  EXPECT_EQ(a.host_tier.bytes_written, b.host_tier.bytes_written) << what;
  EXPECT_EQ(a.host_tier.bytes_read, b.host_tier.bytes_read) << what;
  EXPECT_EQ(a.attends, b.attends) << what;
  EXPECT_EQ(a.served.exact, b.served.exact) << what;
  EXPECT_EQ(a.served.from_sketch, b.served.from_sketch) << what;
  EXPECT_EQ(a.served.dropped, b.served.dropped) << what;
  EXPECT_EQ(a.appended_tokens, b.appended_tokens) << what;
  EXPECT_EQ(a.recalled_tokens, b.recalled_tokens) << what;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class BadInputTest : public ::testing::TestWithParam<DType> {
 protected:
  static constexpr uint64_t kQuerySeed = 4242;

  void SetUp() override { Init(BaseOptions(GetParam()), /*populate=*/true); }


  // Two identical runtimes with sequences 1 and 2. Populated: sequence 1 has
  // 90 tokens in layer 0 (a prefill chunk with initial scores, then decode
  // steps with attends and a recall) and 50 in layer 1; sequence 2 has 20
  // tokens in layer 0 and none in layer 1.
  void Init(const Options& o, bool populate) {
    opts_ = o;
    for (std::unique_ptr<Runtime>* r : {&rt_, &twin_}) {
      absl::StatusOr<std::unique_ptr<Runtime>> created = Runtime::Create(o);
      ASSERT_TRUE(created.ok()) << created.status();
      *r = std::move(*created);
      KVTIER_ASSERT_OK((*r)->AddSequence(1));
      KVTIER_ASSERT_OK((*r)->AddSequence(2));
    }
    points_ = {{1, 0}, {1, 1}, {2, 0}};
    if (!populate) return;
    ASSERT_TRUE(rt_->plan().compressed);
    ASSERT_GT(rt_->plan().staging_tokens, 0);
    std::vector<float> scores(60 * kKvHeads);
    for (size_t i = 0; i < scores.size(); ++i) scores[i] = static_cast<float>((i * 37) % 11) * 0.1f;
    ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 0, 60, 100, scores.data()));
    for (int step = 0; step < 30; ++step) {
      ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 0, 1, 200 + step));
      ASSERT_NO_FATAL_FAILURE(AttendBoth(1, 0, 300 + step));
    }
    ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 1, 50, 400));
    ASSERT_NO_FATAL_FAILURE(AppendBoth(2, 0, 20, 500));
    workload::Tensor q = Query(600);
    absl::StatusOr<int64_t> r1 = rt_->RecallTop(1, 0, q.data(), 2);
    absl::StatusOr<int64_t> r2 = twin_->RecallTop(1, 0, q.data(), 2);
    ASSERT_TRUE(r1.ok() && r2.ok()) << r1.status() << r2.status();
    ASSERT_EQ(*r1, *r2);
    absl::StatusOr<RegionCounts> rc = rt_->Regions(1);
    ASSERT_TRUE(rc.ok());
    // The populated state covers every region, so a change anywhere shows.
    ASSERT_GT(rc->sink, 0);
    ASSERT_GT(rc->recent, 0);
    ASSERT_GT(rc->candidate, 0);
    ASSERT_GT(rc->recalled, 0);
    ASSERT_GT(rc->vague, 0);
    ASSERT_GT(rt_->Stats().host_tier.blocks_in_use, 0);
    ASSERT_NO_FATAL_FAILURE(TakeReference());
  }

  // After every test: the twin never saw the bad calls, so further valid work
  // must give bit-identical results on both.
  void TearDown() override {
    if (HasFailure() || rt_ == nullptr) return;
    KVTIER_EXPECT_OK(rt_->CheckInvariants());
    for (auto [seq, layer] : points_) {
      absl::StatusOr<int64_t> len = rt_->Length(seq, layer);
      ASSERT_TRUE(len.ok());
      const int64_t steps = std::min<int64_t>(24, opts_.max_context - *len);
      for (int64_t s = 0; s < steps; ++s) {
        ASSERT_NO_FATAL_FAILURE(AppendBoth(seq, layer, 1, 10000 + 100 * seq + 10 * layer + s));
        ASSERT_NO_FATAL_FAILURE(AttendBoth(seq, layer, 20000 + s));
      }
      workload::Tensor q = Query(30000 + seq);
      absl::StatusOr<int64_t> a = rt_->RecallTop(seq, layer, q.data(), 3);
      absl::StatusOr<int64_t> b = twin_->RecallTop(seq, layer, q.data(), 3);
      ASSERT_EQ(a.ok(), b.ok());
      if (a.ok()) {
        EXPECT_EQ(*a, *b);
      }
      ASSERT_NO_FATAL_FAILURE(AttendBoth(seq, layer, 40000));
    }
    const Snapshot x = Capture(*rt_), y = Capture(*twin_);
    ExpectStatsEqual(x.stats, y.stats, "runtime vs twin after further work");
    EXPECT_EQ(x.token_regions, y.token_regions) << "runtime vs twin: token regions";
    KVTIER_EXPECT_OK(rt_->CheckInvariants());
  }

  DType dtype() const { return opts_.shape.dtype; }

  // [n][kv_heads][head_dim] of the model dtype.
  workload::Tensor Tokens(int64_t n, uint64_t seed) const {
    workload::Tensor t(dtype(), 0);
    const std::vector<float> v = RandomNormal(n * kKvHeads * kDim, seed, 1.0f, 0.1f);
    t.Assign(v.data(), static_cast<int64_t>(v.size()));
    return t;
  }
  workload::Tensor Query(uint64_t seed) const {
    workload::Tensor t(dtype(), 0);
    const std::vector<float> v = RandomNormal(kQHeads * kDim, seed, 1.0f);
    t.Assign(v.data(), static_cast<int64_t>(v.size()));
    return t;
  }

  void AppendBoth(SequenceId seq, int layer, int64_t n, uint64_t seed, const float* scores = nullptr) {
    const workload::Tensor k = Tokens(n, seed), v = Tokens(n, seed + 7777);
    AppendOptions ao;
    ao.scores = scores;
    KVTIER_ASSERT_OK(rt_->Append(seq, layer, k.data(), v.data(), n, ao));
    KVTIER_ASSERT_OK(twin_->Append(seq, layer, k.data(), v.data(), n, ao));
  }

  std::vector<float> AttendF32(Runtime& rt, SequenceId seq, int layer, const workload::Tensor& q) {
    std::vector<float> out(kQHeads * kDim, std::numeric_limits<float>::quiet_NaN());
    AttendOptions ao;
    ao.out_dtype = DType::kF32;
    absl::StatusOr<AttendCounts> c = rt.Attend(seq, layer, q.data(), out.data(), ao);
    EXPECT_TRUE(c.ok()) << c.status();
    return out;
  }

  // Attends on both runtimes; the outputs must be bit-identical.
  std::vector<float> AttendBoth(SequenceId seq, int layer, uint64_t qseed) {
    const workload::Tensor q = Query(qseed);
    std::vector<float> a = AttendF32(*rt_, seq, layer, q);
    std::vector<float> b = AttendF32(*twin_, seq, layer, q);
    EXPECT_TRUE(SameBits(a, b)) << "runtime and twin differ: seq " << seq << " layer " << layer;
    for (float x : a) {
      if (!std::isfinite(x)) {
        ADD_FAILURE() << "non-finite attention output, seq " << seq << " layer " << layer;
        break;
      }
    }
    return a;
  }

  // The outputs, for the fixed query, of every populated (sequence, layer).
  void TakeReference() {
    reference_.clear();
    for (auto p : points_) reference_[p] = AttendBoth(p.first, p.second, kQuerySeed);
  }

  Snapshot Capture(const Runtime& rt) const {
    Snapshot s;
    s.stats = rt.Stats();
    for (SequenceId id : {SequenceId{1}, SequenceId{2}, SequenceId{3}}) {
      absl::StatusOr<RegionCounts> rc = rt.Regions(id);
      if (!rc.ok()) continue;
      s.regions[id] = *rc;
      for (int l = 0; l < kLayers; ++l) {
        absl::StatusOr<int64_t> len = rt.Length(id, l);
        EXPECT_TRUE(len.ok()) << len.status();
        s.lengths[id].push_back(len.value_or(-1));
        for (int h = 0; h < kKvHeads; ++h) {
          for (int64_t p = 0; p < len.value_or(0); ++p) {
            absl::StatusOr<Region> r = rt.TokenRegion(id, l, h, p);
            EXPECT_TRUE(r.ok()) << r.status();
            s.token_regions[id].push_back(static_cast<uint8_t>(r.value_or(Region::kSink)));
          }
        }
      }
    }
    return s;
  }

  void ExpectUnchanged(const Snapshot& before, const std::string& what) {
    const Snapshot after = Capture(*rt_);
    ExpectStatsEqual(before.stats, after.stats, what);
    EXPECT_EQ(before.lengths, after.lengths) << what;
    for (const auto& [id, rc] : before.regions) {
      ASSERT_TRUE(after.regions.contains(id)) << what;
      const RegionCounts& ra = after.regions.at(id);
      EXPECT_TRUE(rc.sink == ra.sink && rc.recent == ra.recent && rc.candidate == ra.candidate &&
                  rc.recalled == ra.recalled && rc.vague == ra.vague)
          << what << ": regions of sequence " << id << " changed";
    }
    EXPECT_EQ(before.regions.size(), after.regions.size()) << what;
    EXPECT_EQ(before.token_regions, after.token_regions) << what << ": a token changed region";
    KVTIER_EXPECT_OK(rt_->CheckInvariants());
    // The same attention output as before the bad call, and as the twin's.
    for (auto p : points_) {
      const std::vector<float> now = AttendBoth(p.first, p.second, kQuerySeed);
      EXPECT_TRUE(SameBits(now, reference_[p]))
          << what << ": attention of sequence " << p.first << " layer " << p.second << " changed";
    }
  }

  // Runs a call that must be rejected with `code` and a message holding every
  // one of `expect`, and checks that it changed nothing.
  template <typename F>
  void Reject(const std::string& what, absl::StatusCode code, const std::vector<std::string>& expect, F&& call) {
    SCOPED_TRACE(what);
    const Snapshot before = Capture(*rt_);
    const absl::Status st = ToStatus(call());
    EXPECT_EQ(st.code(), code) << what << ": " << st;
    for (const std::string& s : expect) EXPECT_THAT(st.message(), HasSubstr(s)) << what;
    ExpectUnchanged(before, what);
  }

  // A position of (sequence 1, layer 0, KV head 0) in `region`.
  int64_t FindPosition(Region region) const {
    absl::StatusOr<int64_t> len = rt_->Length(1, 0);
    for (int64_t p = 0; p < len.value_or(0); ++p) {
      absl::StatusOr<Region> r = rt_->TokenRegion(1, 0, 0, p);
      if (r.ok() && *r == region) return p;
    }
    return -1;
  }

  Options opts_;
  std::unique_ptr<Runtime> rt_, twin_;
  std::vector<std::pair<SequenceId, int>> points_;
  std::map<std::pair<SequenceId, int>, std::vector<float>> reference_;
};

TEST_P(BadInputTest, UnknownSequenceIsNotFound) {
  const workload::Tensor k = Tokens(1, 1), v = Tokens(1, 2), q = Query(3);
  std::vector<float> out(kQHeads * kDim);
  std::vector<char> kb(kDim * 4), vb(kDim * 4);
  std::vector<float> ek(kDim), ev(kDim);
  const std::vector<std::string> msg = {"sequence 99"};
  const auto nf = absl::StatusCode::kNotFound;
  Reject("Append", nf, msg, [&] { return rt_->Append(99, 0, k.data(), v.data(), 1); });
  Reject("Attend", nf, msg, [&] { return rt_->Attend(99, 0, q.data(), out.data()); });
  Reject("AttendBatch", nf, msg, [&] {
    const AttendItem items[] = {{1, q.data(), out.data()}, {99, q.data(), out.data()}};
    return rt_->AttendBatch(0, items);
  });
  Reject("Recall", nf, msg, [&] { return rt_->Recall(99, 0, 0, {int64_t{0}}); });
  Reject("RankVague", nf, msg, [&] { return rt_->RankVague(99, 0, 0, q.data(), 4); });
  Reject("RecallTop", nf, msg, [&] { return rt_->RecallTop(99, 0, q.data(), 2); });
  Reject("Length", nf, msg, [&] { return rt_->Length(99, 0); });
  Reject("TokenRegion", nf, msg, [&] { return rt_->TokenRegion(99, 0, 0, 0); });
  Reject("ReadToken", nf, msg, [&] { return rt_->ReadToken(99, 0, 0, 0, kb.data(), vb.data()); });
  Reject("EstimateToken", nf, msg, [&] { return rt_->EstimateToken(99, 0, 0, 0, ek.data(), ev.data()); });
  Reject("RemoveSequence", nf, msg, [&] { return rt_->RemoveSequence(99); });
  Reject("Regions", nf, msg, [&] { return rt_->Regions(99); });

  // A removed sequence is unknown from then on, and its host blocks are back.
  const int64_t blocks_before = rt_->Stats().host_tier.blocks_in_use;
  KVTIER_ASSERT_OK(rt_->RemoveSequence(2));
  KVTIER_ASSERT_OK(twin_->RemoveSequence(2));
  points_ = {{1, 0}, {1, 1}};
  EXPECT_LE(rt_->Stats().host_tier.blocks_in_use, blocks_before);
  EXPECT_EQ(rt_->Stats().sequences, 1);
  const std::vector<std::string> msg2 = {"sequence 2"};
  Reject("Append to removed", nf, msg2, [&] { return rt_->Append(2, 0, k.data(), v.data(), 1); });
  Reject("Attend removed", nf, msg2, [&] { return rt_->Attend(2, 0, q.data(), out.data()); });
  Reject("Length removed", nf, msg2, [&] { return rt_->Length(2, 0); });
  Reject("Remove removed", nf, msg2, [&] { return rt_->RemoveSequence(2); });
}

TEST_P(BadInputTest, AddSequenceTwiceOrBeyondMaxSequences) {
  Reject("AddSequence twice", absl::StatusCode::kAlreadyExists, {"sequence 1", "already exists"},
         [&] { return rt_->AddSequence(1); });
  Reject("AddSequence beyond max_sequences", absl::StatusCode::kResourceExhausted, {"sequence 3", "max_sequences = 2"},
         [&] { return rt_->AddSequence(3); });
  // Removing one frees its slot for another id.
  KVTIER_ASSERT_OK(rt_->RemoveSequence(2));
  KVTIER_ASSERT_OK(twin_->RemoveSequence(2));
  KVTIER_ASSERT_OK(rt_->AddSequence(3));
  KVTIER_ASSERT_OK(twin_->AddSequence(3));
  ASSERT_NO_FATAL_FAILURE(AppendBoth(3, 1, 40, 900));
  points_ = {{1, 0}, {1, 1}, {3, 1}};
  TakeReference();
  EXPECT_EQ(rt_->Stats().sequences, 2);
  Reject("AddSequence beyond max_sequences again", absl::StatusCode::kResourceExhausted, {"max_sequences = 2"},
         [&] { return rt_->AddSequence(2); });
  Reject("AddSequence of the new id twice", absl::StatusCode::kAlreadyExists, {"sequence 3"},
         [&] { return rt_->AddSequence(3); });
}

TEST_P(BadInputTest, LayerOutOfRange) {
  const workload::Tensor k = Tokens(2, 1), v = Tokens(2, 2), q = Query(3);
  std::vector<float> out(kQHeads * kDim);
  std::vector<char> kb(kDim * 4), vb(kDim * 4);
  std::vector<float> ek(kDim), ev(kDim);
  const auto ia = absl::StatusCode::kInvalidArgument;
  for (int layer : {-1, kLayers, 1000}) {
    const std::vector<std::string> msg = {absl::StrCat("layer ", layer), "[0, 2)"};
    const std::string l = absl::StrCat(" layer ", layer);
    Reject("Append" + l, ia, msg, [&] { return rt_->Append(1, layer, k.data(), v.data(), 2); });
    Reject("Attend" + l, ia, msg, [&] { return rt_->Attend(1, layer, q.data(), out.data()); });
    Reject("AttendBatch" + l, ia, msg, [&] {
      const AttendItem items[] = {{1, q.data(), out.data()}, {2, q.data(), out.data()}};
      return rt_->AttendBatch(layer, items);
    });
    Reject("Length" + l, ia, msg, [&] { return rt_->Length(1, layer); });
    Reject("Recall" + l, ia, msg, [&] { return rt_->Recall(1, layer, 0, {int64_t{50}}); });
    Reject("RankVague" + l, ia, msg, [&] { return rt_->RankVague(1, layer, 0, q.data(), 4); });
    Reject("RecallTop" + l, ia, msg, [&] { return rt_->RecallTop(1, layer, q.data(), 2); });
    Reject("TokenRegion" + l, ia, msg, [&] { return rt_->TokenRegion(1, layer, 0, 0); });
    Reject("ReadToken" + l, ia, msg, [&] { return rt_->ReadToken(1, layer, 0, 0, kb.data(), vb.data()); });
    Reject("EstimateToken" + l, ia, msg, [&] { return rt_->EstimateToken(1, layer, 0, 50, ek.data(), ev.data()); });
  }
}

TEST_P(BadInputTest, KvHeadOutOfRange) {
  const workload::Tensor q = Query(3);
  std::vector<char> kb(kDim * 4), vb(kDim * 4);
  std::vector<float> ek(kDim), ev(kDim);
  const auto ia = absl::StatusCode::kInvalidArgument;
  const int64_t vague = FindPosition(Region::kVague);
  ASSERT_GE(vague, 0);
  for (int h : {-1, kKvHeads, 77}) {
    const std::vector<std::string> msg = {absl::StrCat("KV head ", h), "[0, 2)"};
    const std::string l = absl::StrCat(" kv_head ", h);
    Reject("Recall" + l, ia, msg, [&] { return rt_->Recall(1, 0, h, {vague}); });
    Reject("RankVague" + l, ia, msg, [&] { return rt_->RankVague(1, 0, h, q.data(), 4); });
    Reject("TokenRegion" + l, ia, msg, [&] { return rt_->TokenRegion(1, 0, h, 0); });
    Reject("ReadToken" + l, ia, msg, [&] { return rt_->ReadToken(1, 0, h, 0, kb.data(), vb.data()); });
    Reject("EstimateToken" + l, ia, msg, [&] { return rt_->EstimateToken(1, 0, h, vague, ek.data(), ev.data()); });
  }
}

TEST_P(BadInputTest, ZeroOrNegativeTokenCount) {
  const workload::Tensor k = Tokens(1, 1), v = Tokens(1, 2);
  for (int64_t n : {int64_t{0}, int64_t{-1}, int64_t{-100}}) {
    Reject(absl::StrCat("Append n=", n), absl::StatusCode::kInvalidArgument,
           {absl::StrCat("append of ", n, " tokens"), "n must be >= 1"},
           [&] { return rt_->Append(1, 0, k.data(), v.data(), n); });
  }
}

TEST_P(BadInputTest, NullPointers) {
  const workload::Tensor k = Tokens(1, 1), v = Tokens(1, 2), q = Query(3);
  std::vector<float> out(kQHeads * kDim);
  std::vector<char> buf(kDim * 4);
  std::vector<float> fbuf(kDim);
  const auto ia = absl::StatusCode::kInvalidArgument;
  const std::vector<std::string> msg = {"must not be null"};
  Reject("Append null k", ia, msg, [&] { return rt_->Append(1, 0, nullptr, v.data(), 1); });
  Reject("Append null v", ia, msg, [&] { return rt_->Append(1, 0, k.data(), nullptr, 1); });
  Reject("Attend null q", ia, msg, [&] { return rt_->Attend(1, 0, nullptr, out.data()); });
  Reject("Attend null out", ia, msg, [&] { return rt_->Attend(1, 0, q.data(), nullptr); });
  Reject("AttendBatch second item null", ia, {"must not be null", "sequence 2"}, [&] {
    const AttendItem items[] = {{1, q.data(), out.data()}, {2, q.data(), nullptr}};
    return rt_->AttendBatch(0, items);
  });
  Reject("ReadToken null k", ia, msg, [&] { return rt_->ReadToken(1, 0, 0, 0, nullptr, buf.data()); });
  Reject("ReadToken null v", ia, msg, [&] { return rt_->ReadToken(1, 0, 0, 0, buf.data(), nullptr); });
  Reject("EstimateToken null k", ia, msg, [&] { return rt_->EstimateToken(1, 0, 0, 50, nullptr, fbuf.data()); });
  Reject("EstimateToken null v", ia, msg, [&] { return rt_->EstimateToken(1, 0, 0, 50, fbuf.data(), nullptr); });
  Reject("RankVague null q", ia, msg, [&] { return rt_->RankVague(1, 0, 0, nullptr, 4); });
  Reject("RecallTop null q", ia, msg, [&] { return rt_->RecallTop(1, 0, nullptr, 2); });
}

TEST_P(BadInputTest, NonFiniteValues) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const auto ia = absl::StatusCode::kInvalidArgument;
  constexpr int64_t kN = 5;
  const int64_t elems = kN * kKvHeads * kDim;
  struct Bad {
    const char* name;
    float value;
  };
  const Bad bads[] = {{"NaN", nan}, {"+inf", inf}, {"-inf", -inf}};
  for (const Bad& bad : bads) {
    // In k and in v, at the first element, in the middle and at the very last
    // element of a 5-token chunk: the whole chunk is refused.
    for (int64_t at : {int64_t{0}, elems / 2 + 3, elems - 1}) {
      workload::Tensor k = Tokens(kN, 11), v = Tokens(kN, 12);
      k.Set(at, bad.value);
      Reject(absl::StrCat("k ", bad.name, " at ", at), ia, {"k holds 1 non-finite", "among 640"},
             [&] { return rt_->Append(1, 0, k.data(), v.data(), kN); });
      k = Tokens(kN, 11);
      v.Set(at, bad.value);
      Reject(absl::StrCat("v ", bad.name, " at ", at), ia, {"v holds 1 non-finite"},
             [&] { return rt_->Append(1, 1, k.data(), v.data(), kN); });
    }
    // In q: Attend, a batch whose second query is bad (the first must not run
    // either), RankVague and RecallTop.
    workload::Tensor q = Query(21), good = Query(22);
    q.Set(kQHeads * kDim - 1, bad.value);
    std::vector<float> out(kQHeads * kDim), out2(kQHeads * kDim);
    const std::vector<std::string> msg = {"q holds 1 non-finite"};
    Reject(absl::StrCat("Attend q ", bad.name), ia, msg, [&] { return rt_->Attend(1, 0, q.data(), out.data()); });
    Reject(absl::StrCat("AttendBatch q ", bad.name), ia, msg, [&] {
      const AttendItem items[] = {{2, good.data(), out.data()}, {1, q.data(), out2.data()}};
      return rt_->AttendBatch(0, items);
    });
    Reject(absl::StrCat("RankVague q ", bad.name), ia, msg, [&] { return rt_->RankVague(1, 0, 1, q.data(), 4); });
    Reject(absl::StrCat("RecallTop q ", bad.name), ia, msg, [&] { return rt_->RecallTop(1, 0, q.data(), 2); });
  }
  // Several at once: the count is reported.
  workload::Tensor k = Tokens(kN, 11), v = Tokens(kN, 12);
  k.Set(1, nan);
  k.Set(100, inf);
  k.Set(600, -inf);
  Reject("k with three non-finite", ia, {"k holds 3 non-finite"},
         [&] { return rt_->Append(1, 0, k.data(), v.data(), kN); });
}

TEST_P(BadInputTest, BadInitialScores) {
  constexpr int64_t kN = 4;
  const workload::Tensor k = Tokens(kN, 1), v = Tokens(kN, 2);
  struct Case {
    int index;
    float value;
    const char* expect;
  };
  const Case cases[] = {{3, -1.0f, "scores[3] = -1"},
                        {0, std::numeric_limits<float>::quiet_NaN(), "scores[0] = nan"},
                        {7, std::numeric_limits<float>::infinity(), "scores[7] = inf"},
                        {5, -0.001f, "scores[5]"}};
  for (const Case& c : cases) {
    std::vector<float> scores(kN * kKvHeads, 0.5f);
    scores[c.index] = c.value;
    AppendOptions ao;
    ao.scores = scores.data();
    Reject(c.expect, absl::StatusCode::kInvalidArgument, {c.expect, "finite and >= 0"},
           [&] { return rt_->Append(1, 0, k.data(), v.data(), kN, ao); });
  }
}

TEST_P(BadInputTest, AppendBeyondMaxContext) {
  // Layer 0 of sequence 1 holds 90 tokens; 167 more would make 257 > 256.
  const int64_t len = *rt_->Length(1, 0);
  ASSERT_EQ(len, 90);
  const int64_t over = kMaxContext - len + 1;
  const workload::Tensor k = Tokens(over, 1), v = Tokens(over, 2);
  Reject("one chunk past max_context", absl::StatusCode::kResourceExhausted,
         {"max_context 256", "length 90", absl::StrCat("appending ", over, " tokens")},
         [&] { return rt_->Append(1, 0, k.data(), v.data(), over); });
  // Exactly up to max_context works; one more token does not.
  ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 0, over - 1, 77));
  EXPECT_EQ(*rt_->Length(1, 0), kMaxContext);
  TakeReference();
  const workload::Tensor k1 = Tokens(1, 3), v1 = Tokens(1, 4);
  Reject("one token past a full layer", absl::StatusCode::kResourceExhausted, {"max_context 256", "length 256"},
         [&] { return rt_->Append(1, 0, k1.data(), v1.data(), 1); });
  // The other layer is independent.
  ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 1, 1, 78));
}

TEST_P(BadInputTest, AttendOnEmptyLayerIsFailedPrecondition) {
  const workload::Tensor q = Query(5);
  std::vector<float> out(kQHeads * kDim, 123.0f), out2(kQHeads * kDim, 456.0f);
  Reject("Attend on an empty layer", absl::StatusCode::kFailedPrecondition, {"sequence 2", "layer 1"},
         [&] { return rt_->Attend(2, 1, q.data(), out.data()); });
  for (float x : out) ASSERT_EQ(x, 123.0f) << "a refused attend wrote its output";
  // In a batch, the non-empty sequence 1 must not be attended either.
  Reject("AttendBatch with an empty layer", absl::StatusCode::kFailedPrecondition, {"sequence 2", "layer 1"}, [&] {
    const AttendItem items[] = {{1, q.data(), out.data()}, {2, q.data(), out2.data()}};
    return rt_->AttendBatch(1, items);
  });
  for (float x : out2) ASSERT_EQ(x, 456.0f);
  // An empty layer has no positions.
  Reject("TokenRegion of an empty layer", absl::StatusCode::kInvalidArgument, {"position 0", "[0, 0)"},
         [&] { return rt_->TokenRegion(2, 1, 0, 0); });
}

TEST_P(BadInputTest, AttendBatchNamingASequenceTwice) {
  const workload::Tensor q = Query(5);
  std::vector<float> a(kQHeads * kDim), b(kQHeads * kDim), c(kQHeads * kDim);
  Reject("batch with a duplicate", absl::StatusCode::kInvalidArgument, {"sequence 1 twice"}, [&] {
    const AttendItem items[] = {{1, q.data(), a.data()}, {2, q.data(), b.data()}, {1, q.data(), c.data()}};
    return rt_->AttendBatch(0, items);
  });
  AttendOptions bad_dtype;
  bad_dtype.out_dtype = static_cast<DType>(9);
  Reject("unknown out_dtype", absl::StatusCode::kInvalidArgument, {"out_dtype 9"},
         [&] { return rt_->Attend(1, 0, q.data(), a.data(), bad_dtype); });
  // An empty batch is a no-op that succeeds.
  const Snapshot before = Capture(*rt_);
  absl::StatusOr<AttendCounts> none = rt_->AttendBatch(0, {});
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->exact + none->from_sketch + none->dropped, 0);
  ExpectUnchanged(before, "empty batch");
}

TEST_P(BadInputTest, PositionOutOfRange) {
  const int64_t len = *rt_->Length(1, 0);
  const int64_t vague = FindPosition(Region::kVague);
  ASSERT_GE(vague, 0);
  std::vector<char> kb(kDim * 4), vb(kDim * 4);
  std::vector<float> ek(kDim), ev(kDim);
  const auto ia = absl::StatusCode::kInvalidArgument;
  for (int64_t p : {int64_t{-1}, len, len + 1000}) {
    const std::vector<std::string> msg = {absl::StrCat("position ", p), absl::StrCat("[0, ", len, ")")};
    Reject(absl::StrCat("Recall ", p), ia, msg, [&] { return rt_->Recall(1, 0, 0, {p}); });
    // A valid vague position before the bad one must not be recalled either.
    Reject(absl::StrCat("Recall vague + ", p), ia, msg, [&] { return rt_->Recall(1, 0, 0, {vague, p}); });
    Reject(absl::StrCat("TokenRegion ", p), ia, msg, [&] { return rt_->TokenRegion(1, 0, 0, p); });
    Reject(absl::StrCat("ReadToken ", p), ia, msg, [&] { return rt_->ReadToken(1, 0, 0, p, kb.data(), vb.data()); });
    Reject(absl::StrCat("EstimateToken ", p), ia, msg,
           [&] { return rt_->EstimateToken(1, 0, 0, p, ek.data(), ev.data()); });
  }
  // Estimating a resident token is a precondition failure, not a crash.
  Reject("EstimateToken of a sink token", absl::StatusCode::kFailedPrecondition, {"not vague"},
         [&] { return rt_->EstimateToken(1, 0, 0, 0, ek.data(), ev.data()); });
}

TEST_P(BadInputTest, AppendBeyondTheHostTierCap) {
  // Cap the host tier at exactly the blocks a 90-token prefill of layer 0
  // needs: that one fits, then any append that needs one more block fails.
  Options o = BaseOptions(GetParam());
  absl::StatusOr<BudgetPlan> plan = PlanBudget(o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const int64_t prefill = 90;
  const int64_t vague_per_head = prefill - plan->sink_tokens - plan->recent_tokens - plan->candidate_tokens;
  ASSERT_GT(vague_per_head, 0);
  const int64_t blocks_per_head = (vague_per_head + plan->block_tokens - 1) / plan->block_tokens;
  const int64_t block_bytes = plan->block_tokens * o.shape.HeadTokenBytes();
  o.host_tier_bytes = blocks_per_head * kKvHeads * block_bytes;
  ASSERT_NO_FATAL_FAILURE(Init(o, /*populate=*/false));
  ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 0, prefill, 1));
  ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 1, 10, 2));
  ASSERT_NO_FATAL_FAILURE(AppendBoth(2, 0, 10, 3));
  points_ = {{1, 0}, {1, 1}, {2, 0}};
  TakeReference();
  EXPECT_EQ(rt_->Stats().host_tier.bytes_in_use, o.host_tier_bytes) << "filled exactly to the cap";

  // Layer 1 of sequence 1 needs a host block for its first vague token.
  const int64_t need = plan->sink_tokens + plan->recent_tokens + plan->candidate_tokens + 1 - 10;
  const workload::Tensor k = Tokens(need, 5), v = Tokens(need, 6);
  Reject("append past the host-tier cap", absl::StatusCode::kResourceExhausted,
         {"host-tier blocks", "host pool is full", absl::StrCat("cap of ", o.host_tier_bytes, " bytes")},
         [&] { return rt_->Append(1, 1, k.data(), v.data(), need); });
  // One token fewer stays on the device and fits.
  ASSERT_NO_FATAL_FAILURE(AppendBoth(1, 1, need - 1, 7));
  TakeReference();
  const workload::Tensor k1 = Tokens(1, 8), v1 = Tokens(1, 9);
  Reject("one more token past the host-tier cap", absl::StatusCode::kResourceExhausted, {"host pool is full"},
         [&] { return rt_->Append(1, 1, k1.data(), v1.data(), 1); });
  EXPECT_EQ(rt_->Stats().host_tier.blocks_in_use, blocks_per_head * kKvHeads);
  // The TearDown appends would hit the cap: check only attends there.
  points_ = {{1, 0}, {2, 0}};
  opts_.max_context = 0;  // TearDown: no further appends
}

INSTANTIATE_TEST_SUITE_P(BadInput, BadInputTest, ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(DTypeName(info.param));
                         });

}  // namespace
}  // namespace kvtier
