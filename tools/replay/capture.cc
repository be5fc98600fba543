#include "replay/capture.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <tuple>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvtier/kernels/convert.h"
#include "replay/json_reader.h"

namespace kvtier::replay {
namespace {

constexpr int64_t kMaxCaptureTokens = int64_t{1} << 24;

struct LayerFiles {
  std::string q, k, v;
};

struct Manifest {
  std::string format, model, dtype, byte_order;
  int64_t version = -1, model_layers = -1, q_heads = -1, kv_heads = -1, head_dim = -1, tokens = -1;
  std::vector<int64_t> layers;
  std::map<int64_t, LayerFiles> files;
};

// A plain file name inside the capture directory.
bool PlainName(absl::string_view s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == absl::string_view::npos &&
         s.find('\\') == absl::string_view::npos;
}

absl::StatusOr<Manifest> ParseManifest(absl::string_view text, const std::string& path) {
  internal::JsonReader j(text, path);
  Manifest m;
  absl::flat_hash_set<std::string> seen;
  if (!j.Consume('{')) return j.Error("expected a JSON object");
  auto integer = [&](absl::string_view key, int64_t& out) -> absl::Status {
    absl::StatusOr<int64_t> x = j.Integer(key);
    if (!x.ok()) return x.status();
    out = *x;
    return absl::OkStatus();
  };
  auto string = [&](std::string& out) -> absl::Status {
    absl::StatusOr<absl::string_view> s = j.String();
    if (!s.ok()) return s.status();
    out = std::string(*s);
    return absl::OkStatus();
  };
  if (!j.Consume('}')) {
    do {
      absl::StatusOr<absl::string_view> key = j.String();
      if (!key.ok()) return key.status();
      if (!j.Consume(':')) return j.Error("expected ':'");
      if (!seen.insert(std::string(*key)).second) return j.Fail(absl::StrCat("key \"", *key, "\" appears twice"));
      absl::Status st;
      if (*key == "format") {
        st = string(m.format);
      } else if (*key == "model") {
        st = string(m.model);
      } else if (*key == "dtype") {
        st = string(m.dtype);
      } else if (*key == "byte_order") {
        st = string(m.byte_order);
      } else if (*key == "version") {
        st = integer(*key, m.version);
      } else if (*key == "model_layers") {
        st = integer(*key, m.model_layers);
      } else if (*key == "q_heads") {
        st = integer(*key, m.q_heads);
      } else if (*key == "kv_heads") {
        st = integer(*key, m.kv_heads);
      } else if (*key == "head_dim") {
        st = integer(*key, m.head_dim);
      } else if (*key == "tokens") {
        st = integer(*key, m.tokens);
      } else if (*key == "layers") {
        absl::StatusOr<std::vector<int64_t>> a = j.IntArray(*key);
        if (a.ok()) m.layers = *std::move(a);
        st = a.status();
      } else if (*key == "files") {  // {"L": {"q": name, "k": name, "v": name}}
        if (!j.Consume('{')) return j.Error("\"files\" must be an object");
        if (!j.Consume('}')) {
          do {
            absl::StatusOr<absl::string_view> l = j.String();
            if (!l.ok()) return l.status();
            int64_t layer;
            if (!absl::SimpleAtoi(*l, &layer) || layer < 0) {
              return j.Fail(absl::StrCat("\"files\" key \"", *l, "\" is not a layer index"));
            }
            if (m.files.contains(layer)) return j.Fail(absl::StrCat("\"files\" has layer ", layer, " twice"));
            LayerFiles& f = m.files[layer];
            if (!j.Consume(':') || !j.Consume('{')) return j.Error("expected ': {'");
            if (!j.Consume('}')) {
              do {
                absl::StatusOr<absl::string_view> which = j.String();
                if (!which.ok()) return which.status();
                if (!j.Consume(':')) return j.Error("expected ':'");
                std::string* to = *which == "q" ? &f.q : *which == "k" ? &f.k : *which == "v" ? &f.v : nullptr;
                if (to == nullptr) {
                  st = j.SkipValue(0);
                } else {
                  st = string(*to);
                  if (st.ok() && !PlainName(*to)) {
                    st = j.Fail(absl::StrCat("file \"", *to, "\" of layer ", layer, " is not a plain file name"));
                  }
                }
                if (!st.ok()) return st;
              } while (j.Consume(','));
              if (!j.Consume('}')) return j.Error("expected ',' or '}'");
            }
          } while (j.Consume(','));
          if (!j.Consume('}')) return j.Error("expected ',' or '}'");
        }
      } else {
        st = j.SkipValue(0);
      }
      if (!st.ok()) return st;
    } while (j.Consume(','));
    if (!j.Consume('}')) return j.Error("expected ',' or '}'");
  }
  if (!j.AtEnd()) return j.Error("trailing characters after the object");
  for (const char* key : {"format", "version", "q_heads", "kv_heads", "head_dim", "dtype", "byte_order", "tokens",
                          "layers", "files"}) {
    if (!seen.contains(key)) return j.Fail(absl::StrCat("missing \"", key, "\""));
  }
  return m;
}

absl::Status ReadFile(const std::string& path, int64_t expect, std::vector<char>& out) {
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat(path, ": ", ec.message()));
  if (size != static_cast<uintmax_t>(expect)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s holds %d bytes, expected %d (tokens x heads x head_dim x 2)", path, size, expect));
  }
  out.resize(static_cast<size_t>(expect));
  std::ifstream f(path, std::ios::binary);
  if (!f || !f.read(out.data(), expect) || f.gcount() != expect) {
    return absl::DataLossError(absl::StrCat(path, ": cannot read ", expect, " bytes"));
  }
  return absl::OkStatus();
}

// Little-endian binary16 to the model dtype, in place of a copy.
std::vector<char> Convert(const std::vector<char>& f16, DType dtype) {
  const size_t n = f16.size() / 2;
  std::vector<char> out(n * DTypeSize(dtype));
  for (size_t i = 0; i < n; ++i) {
    const uint16_t h = static_cast<uint16_t>(static_cast<unsigned char>(f16[2 * i]) |
                                             (static_cast<unsigned char>(f16[2 * i + 1]) << 8));
    switch (dtype) {
      case DType::kF16: std::memcpy(out.data() + 2 * i, &h, 2); break;
      case DType::kBF16: {
        const uint16_t b = kernels::FloatToBf16(kernels::HalfToFloat(h));
        std::memcpy(out.data() + 2 * i, &b, 2);
        break;
      }
      case DType::kF32: {
        const float x = kernels::HalfToFloat(h);
        std::memcpy(out.data() + 4 * i, &x, 4);
        break;
      }
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<Capture> Capture::Load(const std::string& dir, const ModelShape& shape) {
  if (absl::Status st = shape.Validate(); !st.ok()) return st;
  const std::string path = (std::filesystem::path(dir) / "manifest.json").string();
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open capture manifest ", path));
  std::stringstream text;
  text << f.rdbuf();
  absl::StatusOr<Manifest> parsed = ParseManifest(text.str(), path);
  if (!parsed.ok()) return parsed.status();
  const Manifest& m = *parsed;
  auto bad = [&](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat(path, ": ", what)); };
  if (m.format != "kvtier-capture") return bad(absl::StrCat("format \"", m.format, "\" is not \"kvtier-capture\""));
  if (m.version != 1) return bad(absl::StrCat("version ", m.version, " is not supported (1 is)"));
  if (m.dtype != "f16") return bad(absl::StrCat("dtype \"", m.dtype, "\" is not \"f16\""));
  if (m.byte_order != "little") return bad(absl::StrCat("byte_order \"", m.byte_order, "\" is not \"little\""));
  if (m.q_heads != shape.q_heads || m.kv_heads != shape.kv_heads || m.head_dim != shape.head_dim) {
    return bad(absl::StrFormat(
        "captured shape q_heads %d, kv_heads %d, head_dim %d does not match the replay's q_heads %d, kv_heads %d, "
        "head_dim %d",
        m.q_heads, m.kv_heads, m.head_dim, shape.q_heads, shape.kv_heads, shape.head_dim));
  }
  if (m.tokens < 1 || m.tokens > kMaxCaptureTokens) {
    return bad(absl::StrFormat("tokens %d must be in [1, %d]", m.tokens, kMaxCaptureTokens));
  }
  if (m.layers.empty()) return bad("no captured layers");
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const int64_t l = m.layers[i];
    if (l < 0 || l > (1 << 20) || (i > 0 && l <= m.layers[i - 1])) {
      return bad(absl::StrFormat("layers must be ascending indices >= 0, got %d at position %d", l, i));
    }
    if (m.model_layers >= 0 && l >= m.model_layers) {
      return bad(absl::StrFormat("captured layer %d >= model_layers %d", l, m.model_layers));
    }
    auto it = m.files.find(l);
    if (it == m.files.end() || it->second.q.empty() || it->second.k.empty() || it->second.v.empty()) {
      return bad(absl::StrFormat("\"files\" lacks q, k and v of layer %d", l));
    }
  }

  Capture c;
  c.dir_ = dir;
  c.model_ = m.model;
  c.q_heads_ = shape.q_heads;
  c.kv_heads_ = shape.kv_heads;
  c.head_dim_ = shape.head_dim;
  c.dtype_ = shape.dtype;
  c.tokens_ = m.tokens;
  const int64_t q_bytes = m.tokens * shape.q_heads * shape.head_dim * 2;
  const int64_t kv_bytes = m.tokens * shape.kv_heads * shape.head_dim * 2;
  std::vector<char> raw;
  for (const int64_t l : m.layers) {
    const LayerFiles& lf = m.files.at(l);
    c.layers_.push_back(static_cast<int>(l));
    for (auto [name, bytes, to] : {std::tuple{&lf.q, q_bytes, &c.q_}, std::tuple{&lf.k, kv_bytes, &c.k_},
                                   std::tuple{&lf.v, kv_bytes, &c.v_}}) {
      if (absl::Status st = ReadFile((std::filesystem::path(dir) / *name).string(), bytes, raw); !st.ok()) return st;
      to->push_back(Convert(raw, shape.dtype));
    }
  }
  return c;
}

absl::Status Capture::Check(const ModelShape& shape) const {
  if (shape.q_heads != q_heads_ || shape.kv_heads != kv_heads_ || shape.head_dim != head_dim_ ||
      shape.dtype != dtype_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "capture %s was loaded for q_heads %d, kv_heads %d, head_dim %d, dtype %s; the replay has %d, %d, %d, %s",
        dir_, q_heads_, kv_heads_, head_dim_, DTypeName(dtype_), shape.q_heads, shape.kv_heads, shape.head_dim,
        DTypeName(shape.dtype)));
  }
  return absl::OkStatus();
}

void Capture::KeysValues(int layer, int64_t first, int64_t n, void* k, void* v) const {
  const int src = SourceOf(layer);
  const size_t row = static_cast<size_t>(kv_heads_) * head_dim_ * DTypeSize(dtype_);
  char* kp = static_cast<char*>(k);
  char* vp = static_cast<char*>(v);
  for (int64_t i = 0; i < n; ++i) {
    const size_t at = static_cast<size_t>((first + i) % tokens_) * row;
    std::memcpy(kp + i * row, k_[src].data() + at, row);
    std::memcpy(vp + i * row, v_[src].data() + at, row);
  }
}

void Capture::Query(int layer, int64_t pos, void* q) const {
  const size_t row = static_cast<size_t>(q_heads_) * head_dim_ * DTypeSize(dtype_);
  std::memcpy(q, q_[SourceOf(layer)].data() + static_cast<size_t>(pos % tokens_) * row, row);
}

}  // namespace kvtier::replay
