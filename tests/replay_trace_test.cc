// Trace parsers of kvtier-replay: the Mooncake JSONL and CSV formats, strict
// errors with line numbers, lenient skipping, and the profile/shape files.
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "replay/profile.h"
#include "replay/trace.h"

namespace kvtier::replay {
namespace {

using ::testing::HasSubstr;

TEST(ReplayTrace, ParsesMooncakeLine) {
  absl::StatusOr<Request> r = ParseMooncakeLine(
      R"({"timestamp": 1500, "input_length": 1030, "output_length": 7, "hash_ids": [4, 5, 6]})", 3);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->line, 3);
  EXPECT_EQ(r->arrival_ms, 1500);
  EXPECT_EQ(r->input_tokens, 1030);
  EXPECT_EQ(r->output_tokens, 7);
  EXPECT_THAT(r->hash_ids, ::testing::ElementsAre(4, 5, 6));
}

TEST(ReplayTrace, IgnoresUnknownKeysOfAnyShape) {
  absl::StatusOr<Request> r = ParseMooncakeLine(
      R"({"model": "kimi\"x\u00e9", "timestamp": 2.5, "extra": [[1, [2]], {"a": null, "b": [true, false]}],)"
      R"( "input_length": 10, "output_length": 0, "score": -1.5e3})",
      1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->arrival_ms, 2.5);
  EXPECT_TRUE(r->hash_ids.empty());
}

TEST(ReplayTrace, MalformedMooncakeLinesNameTheLineAndProblem) {
  const struct {
    const char* line;
    const char* want;
  } cases[] = {
      {R"({"timestamp": 0, "input_length": 10})", "missing \"output_length\""},
      {R"({"timestamp": 0, "input_length": 10, "output_length": 1)", "expected ',' or '}'"},
      {R"({"timestamp": 0, "input_length": 10.5, "output_length": 1})", "not an integer"},
      {R"({"timestamp": 0, "input_length": 0, "output_length": 1})", "prompt tokens 0"},
      {R"({"timestamp": -1, "input_length": 5, "output_length": 1})", "arrival -1"},
      {R"({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, "x"]})", "hash_ids"},
      {R"({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, 2]})", "2 hash_ids for 5"},
      {R"({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [-3]})", "negative"},
      {R"({"timestamp": 0, "timestamp": 1, "input_length": 5, "output_length": 1})", "appears twice"},
      {R"({"timestamp": 0, "input_length": 5, "output_length": 1} x)", "trailing"},
      {R"({"timestamp": 01, "input_length": 5, "output_length": 1})", "expected ',' or '}'"},
      {R"({"timestamp": 0, "input_length": 99999999999999999999, "output_length": 1})", "not an integer in range"},
      {R"({"timestamp": 0, "input_length": 5, "output_length": 1, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})",
       "nesting too deep"},
      {R"([1, 2])", "expected '{'"},
      {R"({"timestamp": 0, "input_length": 5, "output_length": 1, "s": "a\qb"})", "bad escape"},
  };
  for (const auto& c : cases) {
    const std::string text = std::string("\n") + c.line + "\n";  // the bad line is line 2
    absl::StatusOr<Trace> t = ParseTrace(text, {.format = TraceFormat::kMooncake});
    ASSERT_FALSE(t.ok()) << c.line;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(t.status().message(), HasSubstr("line 2: ")) << c.line;
    EXPECT_THAT(t.status().message(), HasSubstr(c.want)) << c.line;
  }
}

TEST(ReplayTrace, LenientSkipsAndCounts) {
  const std::string text =
      "{\"timestamp\": 5, \"input_length\": 10, \"output_length\": 2}\n"
      "not json\n"
      "\n"
      "{\"timestamp\": 1, \"input_length\": 20, \"output_length\": 3}\n"
      "{\"timestamp\": 2, \"input_length\": -4, \"output_length\": 3}\n";
  absl::StatusOr<Trace> strict = ParseTrace(text, {});
  ASSERT_FALSE(strict.ok());
  EXPECT_THAT(strict.status().message(), HasSubstr("line 2: "));
  absl::StatusOr<Trace> t = ParseTrace(text, {.lenient = true});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->skipped, 2);
  EXPECT_THAT(t->first_skip, HasSubstr("line 2: "));
  ASSERT_EQ(t->requests.size(), 2u);
  EXPECT_EQ(t->requests[0].arrival_ms, 1);  // sorted by arrival
  EXPECT_EQ(t->requests[0].line, 4);
  EXPECT_EQ(t->requests[1].line, 1);
}

TEST(ReplayTrace, ParsesCsvWithHeaderAndComments) {
  const std::string text = "arrival_ms,prompt_tokens,output_tokens\r\n# a comment\n0,100,10\r\n 12.5 , 200 , 0\n";
  absl::StatusOr<Trace> t = ParseTrace(text, {}, "x.csv");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->requests.size(), 2u);
  EXPECT_EQ(t->requests[1].arrival_ms, 12.5);
  EXPECT_EQ(t->requests[1].input_tokens, 200);
  EXPECT_EQ(t->requests[1].output_tokens, 0);
  EXPECT_EQ(t->requests[1].line, 4);
}

TEST(ReplayTrace, MalformedCsvLines) {
  for (const auto& [line, want] : {std::pair{"1,2", "expected 3 fields"}, {"x,2,3", "arrival \"x\""},
                                   {"1,2.5,3", "prompt tokens \"2.5\""}, {"1,2,y", "output tokens \"y\""},
                                   {"1,0,3", "prompt tokens 0"}, {"inf,2,3", "arrival"}}) {
    absl::StatusOr<Trace> t = ParseTrace(std::string("0,1,1\n") + line + "\n", {.format = TraceFormat::kCsv});
    ASSERT_FALSE(t.ok()) << line;
    EXPECT_THAT(t.status().message(), HasSubstr("line 2: ")) << line;
    EXPECT_THAT(t.status().message(), HasSubstr(want)) << line;
  }
}

TEST(ReplayTrace, AutoDetectsTheFormat) {
  absl::StatusOr<Trace> j = ParseTrace("\n  {\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n", {});
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(j->requests.size(), 1u);
  absl::StatusOr<Trace> c = ParseTrace("0,1,1\n", {});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->requests.size(), 1u);
}

TEST(ReplayTrace, MissingFileIsNotFound) {
  absl::StatusOr<Trace> t = ReadTrace("/nonexistent/trace.jsonl", {});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
}

TEST(ReplayProfile, PresetsAndShapeFiles) {
  absl::StatusOr<ModelShape> s = ModelPreset("Llama-3.1-70B");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->layers, 80);
  EXPECT_EQ(s->kv_heads, 8);
  EXPECT_FALSE(ModelPreset("gpt-9").ok());
  absl::StatusOr<ModelShape> f = ParseShapeFile("layers = 2 # two\nq_heads=4\nkv_heads=2\nhead_dim=64\ndtype=bf16\n");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->dtype, DType::kBF16);
  absl::StatusOr<ModelShape> bad = ParseShapeFile("layers = 2\nheads = 4\n");
  EXPECT_THAT(bad.status().message(), HasSubstr("line 2: unknown shape key"));
}

// The tools' --shape / --model / --profile: files or presets, errors naming the file.
TEST(ReplayProfile, LoadShapeAndProfileFromFilesOrPresets) {
  const std::string dir = ::testing::TempDir();
  const std::string shape = dir + "/kvtier_load.shape", profile = dir + "/kvtier_load.profile";
  std::ofstream(shape) << "layers = 2\nq_heads = 4\nkv_heads = 2\nhead_dim = 64\ndtype = f16\n";
  std::ofstream(profile) << "h2d_gbps = 12.5\n";
  std::string name;
  absl::StatusOr<ModelShape> f = LoadShape(shape, "smollm2-135m", &name);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->layers, 2);
  EXPECT_EQ(name, shape);
  absl::StatusOr<ModelShape> p = LoadShape("", "smollm2-135m", &name);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->layers, 30);
  EXPECT_EQ(name, "smollm2-135m");
  EXPECT_EQ(LoadShape(dir + "/missing.shape", "", &name).status().message(),
            "cannot open shape file " + dir + "/missing.shape");
  EXPECT_THAT(LoadShape("", "no-such-model", &name).status().message(), HasSubstr("unknown model"));
  std::ofstream(shape) << "layers = 2\nheads = 4\n";
  EXPECT_THAT(LoadShape(shape, "", &name).status().message(), HasSubstr(shape + ": "));
  absl::StatusOr<HardwareProfile> hp = LoadProfile(profile);
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->h2d_gbps, 12.5);
  EXPECT_EQ(LoadProfile(dir + "/missing.profile").status().message(), "cannot open profile " + dir + "/missing.profile");
  std::ofstream(profile) << "a = 1\n";
  EXPECT_THAT(LoadProfile(profile).status().message(), HasSubstr(profile + ": line 1: unknown profile key"));
}

TEST(ReplayProfile, ProfileFileOverridesDefaults) {
  absl::StatusOr<HardwareProfile> p = ParseProfile("h2d_gbps = 12.5\n# x\nnvme_latency_us=100\n");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->h2d_gbps, 12.5);
  EXPECT_EQ(p->nvme_latency_us, 100);
  EXPECT_EQ(p->device_gbps, HardwareProfile{}.device_gbps);
  EXPECT_THAT(ParseProfile("h2d_gbps = 0\n").status().message(), HasSubstr("must be > 0"));
  EXPECT_THAT(ParseProfile("a = 1\n").status().message(), HasSubstr("line 1: unknown profile key"));
  absl::StatusOr<HardwareProfile> round = ParseProfile(ProfileToString(*p));
  ASSERT_TRUE(round.ok());
  EXPECT_EQ(round->h2d_gbps, 12.5);
}

TEST(ReplayProfile, Bytes) {
  EXPECT_EQ(*ParseBytes("4096"), 4096);
  EXPECT_EQ(*ParseBytes("2GiB"), int64_t{2} << 30);
  EXPECT_EQ(*ParseBytes("1.5e9"), 1500000000);
  EXPECT_EQ(*ParseBytes("512 MB"), 512000000);
  EXPECT_FALSE(ParseBytes("-1").ok());
  EXPECT_FALSE(ParseBytes("lots").ok());
}

}  // namespace
}  // namespace kvtier::replay
