#include "replay/profile.h"

#include <cmath>
#include <fstream>
#include <iterator>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace kvtier::replay {
namespace {

struct Preset {
  const char* name;
  ModelShape shape;
};

const Preset kPresets[] = {
    {"smollm2-135m", {.layers = 30, .q_heads = 9, .kv_heads = 3, .head_dim = 64, .dtype = DType::kF16}},
    {"llama-3.1-8b", {.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128, .dtype = DType::kF16}},
    {"qwen2.5-7b", {.layers = 28, .q_heads = 28, .kv_heads = 4, .head_dim = 128, .dtype = DType::kF16}},
    {"llama-3.1-70b", {.layers = 80, .q_heads = 64, .kv_heads = 8, .head_dim = 128, .dtype = DType::kF16}},
};

// key = value lines; the callback returns an error for unknown keys or values.
template <typename F>
absl::Status ForEachKeyValue(absl::string_view text, F&& f) {
  int64_t line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line.substr(0, line.find('#')));
    if (line.empty()) continue;
    const size_t eq = line.find('=');
    if (eq == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("line ", line_no, ": expected key = value, got \"", line, "\""));
    }
    const absl::string_view key = absl::StripAsciiWhitespace(line.substr(0, eq));
    const absl::string_view value = absl::StripAsciiWhitespace(line.substr(eq + 1));
    if (absl::Status st = f(key, value); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("line ", line_no, ": ", st.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelShape> ModelPreset(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  for (const Preset& p : kPresets) {
    if (lower == p.name) return p.shape;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown model \"", name, "\"; presets: ", absl::StrJoin(ModelPresetNames(), ", ")));
}

std::vector<std::string> ModelPresetNames() {
  std::vector<std::string> out;
  for (const Preset& p : kPresets) out.emplace_back(p.name);
  return out;
}

absl::StatusOr<ModelShape> ParseShapeFile(absl::string_view text) {
  ModelShape s;
  absl::Status st = ForEachKeyValue(text, [&](absl::string_view key, absl::string_view value) -> absl::Status {
    if (key == "dtype") {
      if (value == "f32") s.dtype = DType::kF32;
      else if (value == "f16") s.dtype = DType::kF16;
      else if (value == "bf16") s.dtype = DType::kBF16;
      else return absl::InvalidArgumentError(absl::StrCat("dtype \"", value, "\" is not f32, f16 or bf16"));
      return absl::OkStatus();
    }
    int* field = key == "layers"     ? &s.layers
                 : key == "q_heads"  ? &s.q_heads
                 : key == "kv_heads" ? &s.kv_heads
                 : key == "head_dim" ? &s.head_dim
                                     : nullptr;
    if (field == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown shape key \"", key, "\""));
    if (!absl::SimpleAtoi(value, field)) {
      return absl::InvalidArgumentError(absl::StrCat(key, " = \"", value, "\" is not an integer"));
    }
    return absl::OkStatus();
  });
  if (!st.ok()) return st;
  if (absl::Status v = s.Validate(); !v.ok()) return v;
  return s;
}

namespace {
std::pair<const char*, double HardwareProfile::*> kProfileFields[] = {
    {"device_gbps", &HardwareProfile::device_gbps},
    {"h2d_gbps", &HardwareProfile::h2d_gbps},
    {"d2h_gbps", &HardwareProfile::d2h_gbps},
    {"h2d_latency_us", &HardwareProfile::h2d_latency_us},
    {"nvme_read_gbps", &HardwareProfile::nvme_read_gbps},
    {"nvme_write_gbps", &HardwareProfile::nvme_write_gbps},
    {"nvme_latency_us", &HardwareProfile::nvme_latency_us},
    {"step_base_us", &HardwareProfile::step_base_us},
    {"prefill_token_us", &HardwareProfile::prefill_token_us},
    {"device_kv_bytes", &HardwareProfile::device_kv_bytes},
    {"host_bytes", &HardwareProfile::host_bytes},
    {"nvme_bytes", &HardwareProfile::nvme_bytes},
};
}  // namespace

absl::StatusOr<HardwareProfile> ParseProfile(absl::string_view text, HardwareProfile base) {
  absl::Status st = ForEachKeyValue(text, [&](absl::string_view key, absl::string_view value) -> absl::Status {
    for (const auto& [name, field] : kProfileFields) {
      if (key != name) continue;
      double x;
      if (!absl::SimpleAtod(value, &x) || !std::isfinite(x) || x < 0) {
        return absl::InvalidArgumentError(absl::StrCat(key, " = \"", value, "\" must be a finite number >= 0"));
      }
      if (x == 0 && absl::EndsWith(key, "gbps")) {
        return absl::InvalidArgumentError(absl::StrCat(key, " must be > 0"));
      }
      base.*field = x;
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat("unknown profile key \"", key, "\""));
  });
  if (!st.ok()) return st;
  return base;
}

std::string ProfileToString(const HardwareProfile& p) {
  std::string out;
  for (const auto& [name, field] : kProfileFields) absl::StrAppendFormat(&out, "%s = %g\n", name, p.*field);
  return out;
}

absl::StatusOr<int64_t> ParseBytes(absl::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  double mult = 1;
  for (auto [suffix, m] : {std::pair{"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0},
                           {"TiB", 1099511627776.0}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1.0}}) {
    if (absl::EndsWith(s, suffix)) {
      s = absl::StripAsciiWhitespace(s.substr(0, s.size() - absl::string_view(suffix).size()));
      mult = m;
      break;
    }
  }
  double x;
  if (!absl::SimpleAtod(s, &x) || !std::isfinite(x) || x < 0 || x * mult > 9e18) {
    return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is not a byte count (e.g. 4096, 1.5e9, 2GiB)"));
  }
  return static_cast<int64_t>(std::llround(x * mult));
}

namespace {

bool ReadWholeFile(const std::string& path, std::string& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  out.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  return true;
}

}  // namespace

absl::StatusOr<ModelShape> LoadShape(const std::string& shape_file, absl::string_view preset, std::string* name) {
  if (shape_file.empty()) {
    absl::StatusOr<ModelShape> s = ModelPreset(preset);
    if (s.ok()) *name = std::string(preset);
    return s;
  }
  std::string text;
  if (!ReadWholeFile(shape_file, text)) return absl::NotFoundError("cannot open shape file " + shape_file);
  absl::StatusOr<ModelShape> s = ParseShapeFile(text);
  if (!s.ok()) return absl::Status(s.status().code(), shape_file + ": " + std::string(s.status().message()));
  *name = shape_file;
  return s;
}

absl::StatusOr<HardwareProfile> LoadProfile(const std::string& path) {
  std::string text;
  if (!ReadWholeFile(path, text)) return absl::NotFoundError("cannot open profile " + path);
  absl::StatusOr<HardwareProfile> p = ParseProfile(text);
  if (!p.ok()) return absl::Status(p.status().code(), path + ": " + std::string(p.status().message()));
  return p;
}

}  // namespace kvtier::replay
