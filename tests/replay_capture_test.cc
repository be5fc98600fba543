// kvtier-replay --capture: loading a captured Q/K/V directory and replaying
// it in place of the content model.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtier/kernels/convert.h"
#include "replay/capture.h"
#include "replay/driver.h"
#include "replay/trace.h"

namespace kvtier::replay {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int kQHeads = 4, kKvHeads = 2, kHeadDim = 64, kTokens = 64;
const std::vector<int> kLayers = {0, 3};

ModelShape Shape() {
  return ModelShape{.layers = 2, .q_heads = kQHeads, .kv_heads = kKvHeads, .head_dim = kHeadDim,
                    .dtype = DType::kF16};
}

// The captured value of (tensor, layer, token, head, dim): distinct per row.
uint16_t Value(char tensor, int layer, int64_t t, int h, int d) {
  const int x = (tensor * 13 + layer * 31 + static_cast<int>(t) * 7 + h * 5 + d) % 251;
  return kernels::FloatToHalf(static_cast<float>(x) / 32.0f - 3.0f);
}

std::string Manifest(int64_t tokens, int q_heads, const std::string& format = "kvtier-capture", int version = 1) {
  std::string files;
  for (int l : kLayers) {
    absl::StrAppend(&files, files.empty() ? "" : ",\n", "  \"", l, "\": {\"q\": \"layer", l, ".q.f16\", \"k\": \"layer",
                    l, ".k.f16\", \"v\": \"layer", l, ".v.f16\"}");
  }
  return absl::StrCat("{\n \"format\": \"", format, "\",\n \"version\": ", version,
                      ",\n \"model\": \"test\",\n \"model_layers\": 4,\n \"q_heads\": ", q_heads,
                      ",\n \"kv_heads\": 2,\n \"head_dim\": 64,\n \"dtype\": \"f16\",\n \"byte_order\": \"little\",\n"
                      " \"tokens\": ",
                      tokens, ",\n \"prefill_tokens\": 60,\n \"layers\": [0, 3],\n \"files\": {\n", files,
                      "\n },\n \"rope\": \"none\",\n \"token_ids\": [1, 2, 3]\n}\n");
}

// A capture of kTokens tokens, layers 0 and 3, in a fresh directory.
std::string WriteCapture(const std::string& name) {
  const std::string dir = ::testing::TempDir() + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/manifest.json") << Manifest(kTokens, kQHeads);
  for (int l : kLayers) {
    for (char tensor : {'q', 'k', 'v'}) {
      const int heads = tensor == 'q' ? kQHeads : kKvHeads;
      std::string bytes;
      for (int64_t t = 0; t < kTokens; ++t) {
        for (int h = 0; h < heads; ++h) {
          for (int d = 0; d < kHeadDim; ++d) {
            const uint16_t v = Value(tensor, l, t, h, d);
            bytes += static_cast<char>(v & 0xff);  // little-endian
            bytes += static_cast<char>(v >> 8);
          }
        }
      }
      std::ofstream(absl::StrCat(dir, "/layer", l, ".", std::string(1, tensor), ".f16"), std::ios::binary) << bytes;
    }
  }
  return dir;
}

TEST(Capture, LoadsRowsAndWrapsPositions) {
  const std::string dir = WriteCapture("kvtier_capture_rows");
  absl::StatusOr<Capture> c = Capture::Load(dir, Shape());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->tokens(), kTokens);
  EXPECT_EQ(c->layers(), kLayers);
  EXPECT_EQ(c->SourceOf(0), 0);
  EXPECT_EQ(c->SourceOf(1), 1);
  EXPECT_EQ(c->SourceOf(2), 0);  // captured layers cycle over the model's
  std::vector<uint16_t> k(2 * kKvHeads * kHeadDim), v(k.size()), q(kQHeads * kHeadDim);
  c->KeysValues(1, kTokens - 1, 2, k.data(), v.data());  // rows 63, then 0 (wrapped)
  for (int h = 0; h < kKvHeads; ++h) {
    for (int d = 0; d < kHeadDim; ++d) {
      EXPECT_EQ(k[h * kHeadDim + d], Value('k', 3, kTokens - 1, h, d));
      EXPECT_EQ(v[(kKvHeads + h) * kHeadDim + d], Value('v', 3, 0, h, d));
    }
  }
  c->Query(2, kTokens + 5, q.data());
  for (int h = 0; h < kQHeads; ++h) {
    for (int d = 0; d < kHeadDim; ++d) ASSERT_EQ(q[h * kHeadDim + d], Value('q', 0, 5, h, d));
  }
}

TEST(Capture, ReplayHoldsTheCapturedKeysAndValues) {
  const std::string dir = WriteCapture("kvtier_capture_replay");
  absl::StatusOr<Trace> t = ParseTrace(
      R"({"timestamp": 0, "input_length": 2000, "output_length": 20, "hash_ids": [0, 1, 2, 3]}
{"timestamp": 0, "input_length": 1500, "output_length": 10, "hash_ids": [0, 1, 4]}
{"timestamp": 30, "input_length": 700, "output_length": 30}
)",
      {});
  ASSERT_TRUE(t.ok()) << t.status();
  ReplayOptions o;
  o.shape = Shape();
  o.token_scale = 4;
  o.max_sequences = 2;
  o.device_budget_fraction = 0.2;
  o.prefill_chunk = 100;
  absl::StatusOr<Capture> c = Capture::Load(dir, o.shape);
  ASSERT_TRUE(c.ok()) << c.status();
  o.capture = std::make_shared<const Capture>(*std::move(c));
  const std::map<SequenceId, int64_t> prompt = {{0, 500}, {1, 375}, {2, 175}};
  int64_t checked = 0;
  o.after_prefill = [&](const Runtime& rt, SequenceId id) {
    const int64_t P = prompt.at(id);
    std::vector<uint16_t> k(kHeadDim), v(kHeadDim);
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < kKvHeads; ++h) {
        for (int64_t p : {int64_t{0}, int64_t{5}, int64_t{kTokens - 1}, int64_t{kTokens}, int64_t{130}, P - 1}) {
          ASSERT_TRUE(rt.ReadToken(id, l, h, p, k.data(), v.data()).ok());
          for (int d = 0; d < kHeadDim; ++d) {
            ASSERT_EQ(k[d], Value('k', kLayers[l], p % kTokens, h, d)) << id << " " << l << " " << h << " " << p;
            ASSERT_EQ(v[d], Value('v', kLayers[l], p % kTokens, h, d)) << id << " " << l << " " << h << " " << p;
          }
          ++checked;
        }
      }
    }
  };
  absl::StatusOr<ReplayResult> r = RunReplay(*t, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completed, 3);
  EXPECT_EQ(checked, 3 * 2 * kKvHeads * 6);
  EXPECT_THAT(ReplaySummary(*r, o), HasSubstr("captured " + dir));
  EXPECT_THAT(ReplayJson(*r, o), HasSubstr("\"capture\": \"" + dir + "\",\n"));
}

TEST(Capture, ErrorsNameTheProblem) {
  const std::string dir = WriteCapture("kvtier_capture_errors");
  ModelShape other = Shape();
  other.q_heads = 8;
  EXPECT_THAT(Capture::Load(dir, other).status().message(),
              AllOf(HasSubstr("q_heads 4, kv_heads 2, head_dim 64"), HasSubstr("q_heads 8, kv_heads 2, head_dim 64")));
  EXPECT_THAT(Capture::Load(dir + "/missing", Shape()).status().message(), HasSubstr("manifest.json"));

  // A truncated file: its name and both sizes.
  const std::string k3 = dir + "/layer3.k.f16";
  std::filesystem::resize_file(k3, kTokens * kKvHeads * kHeadDim * 2 - 2);
  EXPECT_THAT(Capture::Load(dir, Shape()).status().message(),
              AllOf(HasSubstr("layer3.k.f16"), HasSubstr("holds 16382 bytes, expected 16384")));
  std::filesystem::remove(k3);
  EXPECT_THAT(Capture::Load(dir, Shape()).status().message(), HasSubstr("layer3.k.f16"));

  auto with_manifest = [&](const std::string& text) {
    std::ofstream(dir + "/manifest.json", std::ios::trunc) << text;
    return std::string(Capture::Load(dir, Shape()).status().message());
  };
  EXPECT_THAT(with_manifest(Manifest(kTokens, kQHeads, "other")), HasSubstr("format \"other\""));
  EXPECT_THAT(with_manifest(Manifest(kTokens, kQHeads, "kvtier-capture", 2)), HasSubstr("version 2"));
  EXPECT_THAT(with_manifest(Manifest(0, kQHeads)), HasSubstr("tokens 0"));
  EXPECT_THAT(with_manifest("{\"format\": \"kvtier-capture\", \"version\": 1}"), HasSubstr("missing \"q_heads\""));
  EXPECT_THAT(with_manifest("{\"format\": \"kvtier-capture\", "), HasSubstr("manifest.json: expected a string"));
  EXPECT_THAT(with_manifest("[1, 2]"), HasSubstr("expected a JSON object"));
  std::string escape = Manifest(kTokens, kQHeads);
  escape.replace(escape.find("layer0.q.f16"), 12, "../x.f16");
  EXPECT_THAT(with_manifest(escape), HasSubstr("not a plain file name"));
}

TEST(Capture, DriverChecksTheCaptureAgainstItsOptions) {
  const std::string dir = WriteCapture("kvtier_capture_driver");
  absl::StatusOr<Trace> t = ParseTrace("{\"timestamp\": 0, \"input_length\": 100, \"output_length\": 2}\n", {});
  ASSERT_TRUE(t.ok()) << t.status();
  ReplayOptions o;
  o.shape = Shape();
  absl::StatusOr<Capture> c = Capture::Load(dir, o.shape);
  ASSERT_TRUE(c.ok()) << c.status();
  o.capture = std::make_shared<const Capture>(*std::move(c));
  o.content = ContentLevel::kNone;
  EXPECT_THAT(RunReplay(*t, o).status().message(), HasSubstr("needs content full"));
  o.content = ContentLevel::kFull;
  o.shape.dtype = DType::kF32;  // loaded for f16
  EXPECT_THAT(RunReplay(*t, o).status().message(), HasSubstr("dtype f16"));
}

}  // namespace
}  // namespace kvtier::replay
