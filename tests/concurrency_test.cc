// Concurrency: many sequences appended, attended and recalled from several
// threads at once, sequences added and removed while others are in use, and
// a sequence removed while calls on it are in flight. The suite also runs
// under TSan.
//
// Per-sequence work is deterministic (every kernel item depends only on its
// own sequence's data), so each concurrent run is compared bit for bit with a
// single-threaded replay of the same per-sequence operations on a fresh
// runtime: attention outputs, recall counts, token regions and statistics.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/runtime.h"
#include "test_util.h"
#include "workload/tensor.h"

namespace kvtier {
namespace {

using testing::RandomNormal;

constexpr int kLayers = 2, kQHeads = 4, kKvHeads = 2, kDim = 64;
constexpr DType kDtype = DType::kF16;
constexpr int64_t kRowBytes = kDim * 2;  // one K (or V) row of one head, f16

Options BaseOptions(SketchKind kind) {
  Options o;
  o.shape = {.layers = kLayers, .q_heads = kQHeads, .kv_heads = kKvHeads, .head_dim = kDim, .dtype = kDtype};
  o.max_context = 384;
  o.max_sequences = 8;
  // 20% of the full cache: sink 4 + recent 16 + candidates 11 + staging 10
  // per head and a 16-bucket sketch; most of a ~100-token sequence is vague.
  o.device_budget_fraction = 0.2;
  o.sketch_kind = kind;
  o.score_decay = 0.95;
  o.backend = BackendKind::kCpu;
  // Recalls of one step always land before the next attend: outputs do not
  // depend on the transfer thread's timing, so replays are bit-identical.
  o.recall_wait_us = 10'000'000;
  return o;
}

std::unique_ptr<Runtime> MakeRuntime(const Options& o) {
  absl::StatusOr<std::unique_ptr<Runtime>> rt = Runtime::Create(o);
  EXPECT_TRUE(rt.ok()) << rt.status();
  return rt.ok() ? std::move(*rt) : nullptr;
}

workload::Tensor MakeTensor(int64_t elems, uint64_t seed, float offset = 0.0f) {
  workload::Tensor t(kDtype, 0);
  const std::vector<float> v = RandomNormal(elems, seed, 1.0f, offset);
  t.Assign(v.data(), elems);
  return t;
}

// Every input of one sequence, generated before any thread starts.
struct SeqInputs {
  // [layer]: prefill K/V ([prefill][kv_heads][head_dim]), then one token per step.
  std::vector<workload::Tensor> prefill_k, prefill_v;
  std::vector<float> prefill_scores;  // [prefill][kv_heads]
  std::vector<std::vector<workload::Tensor>> step_k, step_v, step_q;  // [layer][step]
  int64_t prefill = 0;

  // The exact bytes of token `pos` of (layer, kv_head): K then V.
  const char* KRow(int layer, int64_t pos, int h) const {
    if (pos < prefill) return static_cast<const char*>(prefill_k[layer].data()) + (pos * kKvHeads + h) * kRowBytes;
    return static_cast<const char*>(step_k[layer][pos - prefill].data()) + h * kRowBytes;
  }
  const char* VRow(int layer, int64_t pos, int h) const {
    if (pos < prefill) return static_cast<const char*>(prefill_v[layer].data()) + (pos * kKvHeads + h) * kRowBytes;
    return static_cast<const char*>(step_v[layer][pos - prefill].data()) + h * kRowBytes;
  }
};

SeqInputs MakeInputs(SequenceId id, int64_t prefill, int steps) {
  SeqInputs in;
  in.prefill = prefill;
  const uint64_t base = id * 1000003ull;
  for (int l = 0; l < kLayers; ++l) {
    in.prefill_k.push_back(MakeTensor(prefill * kKvHeads * kDim, base + 10 * l + 1, 0.2f));
    in.prefill_v.push_back(MakeTensor(prefill * kKvHeads * kDim, base + 10 * l + 2));
    in.step_k.emplace_back();
    in.step_v.emplace_back();
    in.step_q.emplace_back();
    for (int s = 0; s < steps; ++s) {
      const uint64_t seed = base + 100000ull * (l + 1) + 10ull * s;
      in.step_k[l].push_back(MakeTensor(kKvHeads * kDim, seed + 1, 0.2f));
      in.step_v[l].push_back(MakeTensor(kKvHeads * kDim, seed + 2));
      in.step_q[l].push_back(MakeTensor(kQHeads * kDim, seed + 3));
    }
  }
  in.prefill_scores.resize(prefill * kKvHeads);
  for (size_t i = 0; i < in.prefill_scores.size(); ++i) {
    in.prefill_scores[i] = static_cast<float>((i * 7 + id) % 13) * 0.05f;
  }
  return in;
}

// What one sequence's operations returned, in order.
struct SeqLog {
  std::vector<std::vector<float>> outputs;  // f32 attention outputs
  std::vector<int64_t> numbers;             // recall counts, attend counts
  std::vector<std::string> errors;          // any unexpected status
};

std::vector<float> NewOut() { return std::vector<float>(kQHeads * kDim, -1.0f); }

AttendOptions F32Out() {
  AttendOptions ao;
  ao.out_dtype = DType::kF32;
  return ao;
}

void Check(const absl::Status& st, SeqLog& log, const std::string& what) {
  if (!st.ok()) log.errors.push_back(what + ": " + st.ToString());
}

// The operations of one owner of two sequences: prefill every layer, then
// decode steps that append to both, attend them one by one or as a batch, and
// recall the top vague tokens every few steps. Used by the concurrent run and
// the single-threaded replay alike.
void RunOwner(Runtime& rt, SequenceId a, SequenceId b, const SeqInputs& ia, const SeqInputs& ib, int steps,
              SeqLog& la, SeqLog& lb) {
  const SequenceId ids[2] = {a, b};
  const SeqInputs* ins[2] = {&ia, &ib};
  SeqLog* logs[2] = {&la, &lb};
  for (int i = 0; i < 2; ++i) {
    for (int l = 0; l < kLayers; ++l) {
      AppendOptions ao;
      if (ids[i] % 2 == 1) ao.scores = ins[i]->prefill_scores.data();
      Check(rt.Append(ids[i], l, ins[i]->prefill_k[l].data(), ins[i]->prefill_v[l].data(), ins[i]->prefill, ao),
            *logs[i], "prefill");
    }
  }
  for (int s = 0; s < steps; ++s) {
    for (int l = 0; l < kLayers; ++l) {
      for (int i = 0; i < 2; ++i) {
        Check(rt.Append(ids[i], l, ins[i]->step_k[l][s].data(), ins[i]->step_v[l][s].data(), 1), *logs[i],
              "append");
      }
      if (s % 2 == 0) {
        for (int i = 0; i < 2; ++i) {
          std::vector<float> out = NewOut();
          absl::StatusOr<AttendCounts> c = rt.Attend(ids[i], l, ins[i]->step_q[l][s].data(), out.data(), F32Out());
          Check(c.status(), *logs[i], "attend");
          logs[i]->outputs.push_back(std::move(out));
          logs[i]->numbers.push_back(c.ok() ? c->exact * 1000000 + c->from_sketch * 1000 + c->dropped : -1);
        }
      } else {
        std::vector<float> out0 = NewOut(), out1 = NewOut();
        const AttendItem items[2] = {{b, ib.step_q[l][s].data(), out1.data()},  // not in id order on purpose
                                     {a, ia.step_q[l][s].data(), out0.data()}};
        absl::StatusOr<AttendCounts> c = rt.AttendBatch(l, items, F32Out());
        Check(c.status(), la, "attend batch");
        la.outputs.push_back(std::move(out0));
        lb.outputs.push_back(std::move(out1));
        la.numbers.push_back(c.ok() ? c->exact * 1000000 + c->from_sketch * 1000 + c->dropped : -1);
      }
      if (s % 8 == 7) {
        for (int i = 0; i < 2; ++i) {
          absl::StatusOr<int64_t> n = rt.RecallTop(ids[i], l, ins[i]->step_q[l][s].data(), 2);
          Check(n.status(), *logs[i], "recall");
          logs[i]->numbers.push_back(n.value_or(-1));
        }
      }
    }
  }
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void ExpectSameLog(const SeqLog& got, const SeqLog& want, SequenceId id) {
  EXPECT_TRUE(got.errors.empty()) << "sequence " << id << ": " << got.errors.front();
  ASSERT_EQ(got.outputs.size(), want.outputs.size()) << "sequence " << id;
  for (size_t i = 0; i < got.outputs.size(); ++i) {
    ASSERT_TRUE(SameBits(got.outputs[i], want.outputs[i]))
        << "sequence " << id << ": attend #" << i << " differs from the single-threaded replay";
  }
  EXPECT_EQ(got.numbers, want.numbers) << "sequence " << id << ": counts differ from the replay";
}

std::vector<uint8_t> TokenRegions(const Runtime& rt, SequenceId id) {
  std::vector<uint8_t> out;
  for (int l = 0; l < kLayers; ++l) {
    const int64_t len = rt.Length(id, l).value_or(-1);
    out.push_back(static_cast<uint8_t>(len & 0xff));
    for (int h = 0; h < kKvHeads; ++h) {
      for (int64_t p = 0; p < len; ++p) out.push_back(static_cast<uint8_t>(rt.TokenRegion(id, l, h, p).value_or(Region::kSink)));
    }
  }
  return out;
}

// Every token of every layer and head reads back exactly as appended.
int64_t CountBadReads(const Runtime& rt, SequenceId id, const SeqInputs& in) {
  int64_t bad = 0;
  std::vector<char> k(kRowBytes), v(kRowBytes);
  for (int l = 0; l < kLayers; ++l) {
    const int64_t len = rt.Length(id, l).value_or(0);
    for (int h = 0; h < kKvHeads; ++h) {
      for (int64_t p = 0; p < len; ++p) {
        if (!rt.ReadToken(id, l, h, p, k.data(), v.data()).ok() ||
            std::memcmp(k.data(), in.KRow(l, p, h), kRowBytes) != 0 ||
            std::memcmp(v.data(), in.VRow(l, p, h), kRowBytes) != 0) {
          ++bad;
        }
      }
    }
  }
  return bad;
}

class ConcurrencyTest : public ::testing::TestWithParam<SketchKind> {};

// 4 owner threads x 2 sequences each (8 = max_sequences) run prefill and 40
// decode steps of Append / Attend / AttendBatch / RecallTop on every layer,
// while an observer thread reads Stats, Regions, Length and exact tokens.
TEST_P(ConcurrencyTest, OwnersMatchSingleThreadedReplay) {
  constexpr int kOwners = 4, kSteps = 40;
  constexpr int64_t kPrefill = 64;
  const Options o = BaseOptions(GetParam());
  std::unique_ptr<Runtime> rt = MakeRuntime(o);
  ASSERT_NE(rt, nullptr);
  ASSERT_TRUE(rt->plan().compressed);
  ASSERT_GT(rt->plan().staging_tokens, 0);
  if (GetParam() == SketchKind::kCentroid) {
    ASSERT_GT(rt->plan().shared_bytes, 0);
  }

  std::map<SequenceId, SeqInputs> inputs;
  for (SequenceId id = 1; id <= 2 * kOwners; ++id) {
    inputs.emplace(id, MakeInputs(id, kPrefill, kSteps));
    KVTIER_ASSERT_OK(rt->AddSequence(id));
  }
  const RuntimeStats empty = rt->Stats();
  EXPECT_EQ(empty.sequences, 8);
  EXPECT_EQ(empty.device_reserved.total(), rt->plan().total_bytes) << "8 sequences reserve the whole plan";

  std::map<SequenceId, SeqLog> logs;
  for (SequenceId id = 1; id <= 2 * kOwners; ++id) logs[id];

  std::atomic<bool> done{false};
  std::atomic<int64_t> observer_failures{0}, observer_reads{0}, observer_rounds{0};
  std::string first_observer_failure;
  std::thread observer([&] {
    int64_t last_appended = 0, last_attends = 0, last_total = 0;
    std::map<SequenceId, int64_t> last_len;
    auto fail = [&](const std::string& why) {
      if (observer_failures.fetch_add(1) == 0) first_observer_failure = why;
    };
    std::vector<char> k(kRowBytes), v(kRowBytes);
    for (int64_t round = 0; !done.load() || round < 3; ++round) {
      const RuntimeStats s = rt->Stats();
      if (s.sequences != 8) fail("sequences " + std::to_string(s.sequences));
      if (s.appended_tokens < last_appended) fail("appended_tokens went down");
      if (s.attends < last_attends) fail("attends went down");
      if (s.regions.total() < last_total) fail("token count went down");
      // Tokens seen in regions were appended (and counted) before.
      if (s.regions.total() > s.appended_tokens * kKvHeads) fail("more token-heads than appended tokens");
      if (s.host_tier.bytes_in_use != s.host_tier.blocks_in_use * s.host_tier.block_bytes) fail("tier bytes");
      if (s.device_reserved.total() != rt->plan().total_bytes) fail("device bytes changed");
      last_appended = s.appended_tokens;
      last_attends = s.attends;
      last_total = s.regions.total();
      // One sequence per round: its regions add up to its lengths, and a token
      // reads back exactly whichever region it is in right now.
      const SequenceId id = 1 + round % (2 * kOwners);
      absl::StatusOr<RegionCounts> rc = rt->Regions(id);
      if (!rc.ok()) fail(rc.status().ToString());
      for (int l = 0; l < kLayers; ++l) {
        absl::StatusOr<int64_t> len = rt->Length(id, l);
        if (!len.ok()) {
          fail(len.status().ToString());
          continue;
        }
        const int64_t key = static_cast<int64_t>(id) * 10 + l;
        if (*len < last_len[key]) fail("length went down");
        last_len[key] = *len;
        if (*len == 0) continue;
        const int64_t p = (round * 37) % *len;
        const int h = static_cast<int>(round % kKvHeads);
        const SeqInputs& in = inputs.at(id);
        absl::Status st = rt->ReadToken(id, l, h, p, k.data(), v.data());
        if (!st.ok()) {
          fail(st.ToString());
        } else if (std::memcmp(k.data(), in.KRow(l, p, h), kRowBytes) != 0 ||
                   std::memcmp(v.data(), in.VRow(l, p, h), kRowBytes) != 0) {
          fail("token " + std::to_string(p) + " of sequence " + std::to_string(id) + " read back wrong");
        }
        observer_reads++;
      }
      observer_rounds++;
      std::this_thread::yield();
    }
  });

  std::vector<std::thread> owners;
  for (int t = 0; t < kOwners; ++t) {
    const SequenceId a = 2 * t + 1, b = 2 * t + 2;
    SeqLog& la = logs[a];
    SeqLog& lb = logs[b];
    owners.emplace_back([&, a, b] { RunOwner(*rt, a, b, inputs.at(a), inputs.at(b), kSteps, la, lb); });
  }
  for (std::thread& th : owners) th.join();
  done = true;
  observer.join();
  EXPECT_EQ(observer_failures.load(), 0) << first_observer_failure;
  EXPECT_GT(observer_reads.load(), 0);

  // The single-threaded replay on a fresh runtime.
  std::unique_ptr<Runtime> replay = MakeRuntime(o);
  ASSERT_NE(replay, nullptr);
  std::map<SequenceId, SeqLog> want;
  for (SequenceId id = 1; id <= 2 * kOwners; ++id) KVTIER_ASSERT_OK(replay->AddSequence(id));
  for (int t = 0; t < kOwners; ++t) {
    const SequenceId a = 2 * t + 1, b = 2 * t + 2;
    RunOwner(*replay, a, b, inputs.at(a), inputs.at(b), kSteps, want[a], want[b]);
  }
  for (SequenceId id = 1; id <= 2 * kOwners; ++id) {
    ASSERT_TRUE(want[id].errors.empty()) << want[id].errors.front();
    ExpectSameLog(logs[id], want[id], id);
    EXPECT_EQ(TokenRegions(*rt, id), TokenRegions(*replay, id)) << "sequence " << id;
    EXPECT_EQ(CountBadReads(*rt, id, inputs.at(id)), 0) << "sequence " << id;
  }

  KVTIER_EXPECT_OK(rt->CheckInvariants());
  const RuntimeStats s = rt->Stats(), r = replay->Stats();
  EXPECT_EQ(s.appended_tokens, 8 * kLayers * (kPrefill + kSteps));
  EXPECT_EQ(s.attends, 8 * kLayers * kSteps) << "a batch counts each item";
  EXPECT_EQ(s.served.exact, r.served.exact);
  EXPECT_EQ(s.served.from_sketch, r.served.from_sketch);
  EXPECT_EQ(s.served.dropped, r.served.dropped);
  EXPECT_EQ(s.recalled_tokens, r.recalled_tokens);
  EXPECT_GT(s.recalled_tokens, 0) << "the test must exercise recall";
  EXPECT_EQ(s.regions.vague, r.regions.vague);
  EXPECT_EQ(s.regions.recalled, r.regions.recalled);
  EXPECT_EQ(s.regions.candidate, r.regions.candidate);
  EXPECT_GT(s.regions.vague, 0);
  EXPECT_EQ(s.regions.total(), 8 * kLayers * kKvHeads * (kPrefill + kSteps));
  EXPECT_EQ(s.host_tier.blocks_in_use, r.host_tier.blocks_in_use);
  EXPECT_GT(s.host_tier.blocks_in_use, 0);
  EXPECT_EQ(s.peak_device_bytes, rt->plan().total_bytes);
  EXPECT_LE(s.peak_device_bytes, s.device_budget_bytes);

  // Remove every sequence, from the owner threads at once.
  std::vector<std::thread> removers;
  std::atomic<int> remove_failures{0};
  for (int t = 0; t < kOwners; ++t) {
    removers.emplace_back([&, t] {
      for (SequenceId id : {SequenceId(2 * t + 1), SequenceId(2 * t + 2)}) {
        if (!rt->RemoveSequence(id).ok()) remove_failures++;
      }
    });
  }
  for (std::thread& th : removers) th.join();
  EXPECT_EQ(remove_failures.load(), 0);
  const RuntimeStats after = rt->Stats();
  EXPECT_EQ(after.sequences, 0);
  EXPECT_EQ(after.regions.total(), 0);
  EXPECT_EQ(after.host_tier.bytes_in_use, 0);
  EXPECT_EQ(after.host_tier.blocks_in_use, 0);
  EXPECT_EQ(after.device_reserved.total(), rt->plan().shared_bytes);
  EXPECT_EQ(after.device_reserved.metadata, rt->plan().shared_bytes);
  EXPECT_EQ(after.appended_tokens, s.appended_tokens) << "cumulative counters stay";
  KVTIER_EXPECT_OK(rt->CheckInvariants());
  // Every slot is free again.
  for (SequenceId id = 100; id < 108; ++id) KVTIER_EXPECT_OK(rt->AddSequence(id));
  EXPECT_EQ(rt->AddSequence(108).code(), absl::StatusCode::kResourceExhausted);
}

INSTANTIATE_TEST_SUITE_P(Concurrency, ConcurrencyTest,
                         ::testing::Values(SketchKind::kCountSketch, SketchKind::kCentroid),
                         [](const ::testing::TestParamInfo<SketchKind>& info) {
                           return info.param == SketchKind::kCentroid ? std::string("centroid")
                                                                      : std::string("count_sketch");
                         });

// A stable sequence's decode loop (Append + Attend on every layer), logged.
void RunStable(Runtime& rt, SequenceId id, const SeqInputs& in, int steps, SeqLog& log) {
  for (int l = 0; l < kLayers; ++l) {
    Check(rt.Append(id, l, in.prefill_k[l].data(), in.prefill_v[l].data(), in.prefill), log, "prefill");
  }
  for (int s = 0; s < steps; ++s) {
    for (int l = 0; l < kLayers; ++l) {
      Check(rt.Append(id, l, in.step_k[l][s].data(), in.step_v[l][s].data(), 1), log, "append");
      std::vector<float> out = NewOut();
      absl::StatusOr<AttendCounts> c = rt.Attend(id, l, in.step_q[l][s].data(), out.data(), F32Out());
      Check(c.status(), log, "attend");
      log.outputs.push_back(std::move(out));
      if (s % 10 == 9) {
        absl::StatusOr<int64_t> n = rt.RecallTop(id, l, in.step_q[l][s].data(), 3);
        Check(n.status(), log, "recall");
        log.numbers.push_back(n.value_or(-1));
      }
    }
  }
}

// Two threads each cycle through short-lived sequences (add, prefill, attend,
// check, remove) while two others decode their own long-lived sequence. The
// long-lived ones must match a replay without the churn, and the churn must
// return every host block and device chunk.
TEST(ConcurrencyChurnTest, AddRemoveWhileOthersAttend) {
  constexpr int kSteps = 40, kChurn = 10;
  constexpr int64_t kPrefill = 48, kChurnPrefill = 40;
  const Options o = BaseOptions(SketchKind::kCountSketch);
  std::unique_ptr<Runtime> rt = MakeRuntime(o);
  ASSERT_NE(rt, nullptr);
  std::map<SequenceId, SeqInputs> inputs;
  for (SequenceId id : {SequenceId{1}, SequenceId{2}}) {
    inputs.emplace(id, MakeInputs(id, kPrefill, kSteps));
    KVTIER_ASSERT_OK(rt->AddSequence(id));
  }
  std::map<SequenceId, SeqInputs> churn_inputs;
  for (int c = 0; c < 2; ++c) {
    for (int i = 0; i < kChurn; ++i) {
      const SequenceId id = 100 * (c + 1) + i;
      churn_inputs.emplace(id, MakeInputs(id, kChurnPrefill, 1));
    }
  }

  std::map<SequenceId, SeqLog> logs;
  logs[1];
  logs[2];
  std::atomic<int> churn_failures{0};
  std::atomic<bool> done{false};
  std::atomic<int> bad_counts{0};
  std::mutex msg_mu;
  std::string first_failure;
  auto fail = [&](const std::string& why) {
    std::lock_guard<std::mutex> lock(msg_mu);
    if (churn_failures.fetch_add(1) == 0) first_failure = why;
  };

  std::vector<std::thread> threads;
  for (SequenceId id : {SequenceId{1}, SequenceId{2}}) {
    SeqLog& log = logs[id];
    threads.emplace_back([&, id] { RunStable(*rt, id, inputs.at(id), kSteps, log); });
  }
  for (int c = 0; c < 2; ++c) {
    threads.emplace_back([&, c] {
      std::vector<float> out = NewOut();
      for (int i = 0; i < kChurn; ++i) {
        const SequenceId id = 100 * (c + 1) + i;
        const SeqInputs& in = churn_inputs.at(id);
        if (absl::Status st = rt->AddSequence(id); !st.ok()) {
          fail("add " + st.ToString());
          continue;
        }
        for (int l = 0; l < kLayers; ++l) {
          if (absl::Status st = rt->Append(id, l, in.prefill_k[l].data(), in.prefill_v[l].data(), kChurnPrefill);
              !st.ok())
            fail("append " + st.ToString());
          absl::StatusOr<AttendCounts> a = rt->Attend(id, l, in.step_q[l][0].data(), out.data(), F32Out());
          if (!a.ok()) fail("attend " + a.status().ToString());
          else if (a->exact + a->from_sketch + a->dropped != kKvHeads * kChurnPrefill) fail("attend counts");
        }
        absl::StatusOr<RegionCounts> rc = rt->Regions(id);
        if (!rc.ok() || rc->total() != kLayers * kKvHeads * kChurnPrefill || rc->vague == 0) fail("regions");
        if (CountBadReads(*rt, id, in) != 0) fail("churn sequence read back wrong");
        if (absl::Status st = rt->RemoveSequence(id); !st.ok()) fail("remove " + st.ToString());
        if (rt->Length(id, 0).status().code() != absl::StatusCode::kNotFound) fail("removed sequence still found");
      }
    });
  }
  std::thread stats([&] {
    for (int round = 0; !done.load() || round < 3; ++round) {
      const RuntimeStats s = rt->Stats();
      // The two stable sequences plus at most one per churn thread.
      if (s.sequences < 2 || s.sequences > 4) bad_counts++;
      if (s.host_tier.bytes_in_use != s.host_tier.blocks_in_use * s.host_tier.block_bytes) bad_counts++;
      if (s.device_reserved.total() > s.device_budget_bytes) bad_counts++;
      std::this_thread::yield();
    }
  });
  for (std::thread& th : threads) th.join();
  done = true;
  stats.join();
  EXPECT_EQ(churn_failures.load(), 0) << first_failure;
  EXPECT_EQ(bad_counts.load(), 0);

  std::unique_ptr<Runtime> replay = MakeRuntime(o);
  ASSERT_NE(replay, nullptr);
  std::map<SequenceId, SeqLog> want;
  for (SequenceId id : {SequenceId{1}, SequenceId{2}}) {
    KVTIER_ASSERT_OK(replay->AddSequence(id));
    RunStable(*replay, id, inputs.at(id), kSteps, want[id]);
    ExpectSameLog(logs[id], want[id], id);
    EXPECT_EQ(TokenRegions(*rt, id), TokenRegions(*replay, id)) << "sequence " << id;
    EXPECT_EQ(CountBadReads(*rt, id, inputs.at(id)), 0) << "sequence " << id;
  }
  KVTIER_EXPECT_OK(rt->CheckInvariants());
  const RuntimeStats s = rt->Stats(), r = replay->Stats();
  EXPECT_EQ(s.sequences, 2);
  EXPECT_EQ(s.host_tier.blocks_in_use, r.host_tier.blocks_in_use) << "the churn returned every block";
  EXPECT_EQ(s.appended_tokens, r.appended_tokens + 2 * kChurn * kLayers * kChurnPrefill);
  EXPECT_EQ(s.attends, r.attends + 2 * kChurn * kLayers);
  EXPECT_EQ(s.device_reserved.total(), r.device_reserved.total());
  for (SequenceId id : {SequenceId{1}, SequenceId{2}}) KVTIER_ASSERT_OK(rt->RemoveSequence(id));
  const RuntimeStats after = rt->Stats();
  EXPECT_EQ(after.host_tier.bytes_in_use, 0);
  EXPECT_EQ(after.device_reserved.total(), rt->plan().shared_bytes);
  KVTIER_EXPECT_OK(rt->CheckInvariants());
}

// A sequence removed while another thread appends to and attends it: every
// call returns OK or NotFound, NotFound is final, a batch naming the removed
// sequence does not run for the live one, and the counters add up to the
// calls that succeeded.
TEST(ConcurrencyChurnTest, RemoveWhileCallsAreInFlight) {
  const Options o = BaseOptions(SketchKind::kCountSketch);
  std::unique_ptr<Runtime> rt = MakeRuntime(o);
  ASSERT_NE(rt, nullptr);
  constexpr int64_t kPrefill = 60;
  const SeqInputs in1 = MakeInputs(1, kPrefill, 300), in2 = MakeInputs(2, kPrefill, 1);
  KVTIER_ASSERT_OK(rt->AddSequence(1));
  KVTIER_ASSERT_OK(rt->AddSequence(2));
  for (int l = 0; l < kLayers; ++l) {
    KVTIER_ASSERT_OK(rt->Append(1, l, in1.prefill_k[l].data(), in1.prefill_v[l].data(), kPrefill));
    KVTIER_ASSERT_OK(rt->Append(2, l, in2.prefill_k[l].data(), in2.prefill_v[l].data(), kPrefill));
  }
  const RuntimeStats start = rt->Stats();

  std::atomic<int> iterations{0};
  std::atomic<int> unexpected{0};
  std::atomic<int64_t> ok_appends{0}, ok_attends{0};
  std::atomic<bool> gone{false};
  std::thread worker([&] {
    std::vector<float> out1 = NewOut(), out2 = NewOut();
    bool seen_not_found = false;
    int after_not_found = 0;
    // Runs until the removal has been seen a few times (bounded for safety);
    // appends stop at 300 tokens to stay within max_context.
    for (int i = 0; i < 200000 && after_not_found < 5; ++i) {
      iterations = i + 1;
      auto check = [&](const absl::Status& st) {
        if (st.ok()) {
          if (seen_not_found) unexpected++;  // NotFound is final
          return true;
        }
        if (st.code() != absl::StatusCode::kNotFound) {
          unexpected++;
          return false;
        }
        seen_not_found = true;
        return false;
      };
      const int step = i % 300;
      if (i < 300 && check(rt->Append(1, 0, in1.step_k[0][step].data(), in1.step_v[0][step].data(), 1))) {
        ok_appends++;
      }
      if (check(rt->Attend(1, 0, in1.step_q[0][step].data(), out1.data(), F32Out()).status())) ok_attends++;
      const AttendItem items[2] = {{1, in1.step_q[0][step].data(), out1.data()},
                                   {2, in1.step_q[1][step].data(), out2.data()}};
      if (check(rt->AttendBatch(0, items, F32Out()).status())) ok_attends += 2;
      if (seen_not_found) ++after_not_found;
    }
    if (!seen_not_found) unexpected += 1000;
  });
  std::thread remover([&] {
    while (iterations.load() < 20) std::this_thread::yield();
    if (!rt->RemoveSequence(1).ok()) unexpected += 100;
    gone = true;
  });
  std::thread observer([&] {
    while (!gone.load()) {
      const absl::StatusCode c1 = rt->Regions(1).status().code();
      const absl::StatusCode c2 = rt->Length(1, 0).status().code();
      if (c1 != absl::StatusCode::kOk && c1 != absl::StatusCode::kNotFound) unexpected++;
      if (c2 != absl::StatusCode::kOk && c2 != absl::StatusCode::kNotFound) unexpected++;
      const RuntimeStats s = rt->Stats();
      if (s.sequences < 1 || s.sequences > 2) unexpected++;
      std::this_thread::yield();
    }
  });
  worker.join();
  remover.join();
  observer.join();
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_GE(ok_appends.load(), 19) << "the removal waits for 20 iterations";

  const RuntimeStats s = rt->Stats();
  EXPECT_EQ(s.sequences, 1);
  EXPECT_EQ(s.appended_tokens, start.appended_tokens + ok_appends.load());
  EXPECT_EQ(s.attends, start.attends + ok_attends.load());
  EXPECT_EQ(rt->Length(1, 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*rt->Length(2, 0), kPrefill) << "the live sequence is untouched";
  KVTIER_EXPECT_OK(rt->CheckInvariants());
  EXPECT_EQ(CountBadReads(*rt, 2, in2), 0);
  KVTIER_ASSERT_OK(rt->RemoveSequence(2));
  EXPECT_EQ(rt->Stats().host_tier.bytes_in_use, 0);
  EXPECT_EQ(rt->Stats().device_reserved.total(), rt->plan().shared_bytes);
}

}  // namespace
}  // namespace kvtier
