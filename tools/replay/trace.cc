#include "replay/trace.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "replay/json_reader.h"

namespace kvtier::replay {
namespace {

absl::Status LineError(int64_t line_no, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("line ", line_no, ": ", what));
}

using JsonLine = internal::JsonReader;

absl::Status CheckRequest(const Request& r, int64_t line_no) {
  if (!(r.arrival_ms >= 0) || r.arrival_ms > 1e15) {
    return LineError(line_no, absl::StrFormat("arrival %g ms must be in [0, 1e15]", r.arrival_ms));
  }
  if (r.input_tokens < 1 || r.input_tokens > kMaxTraceTokens) {
    return LineError(line_no, absl::StrFormat("prompt tokens %d must be in [1, %d]", r.input_tokens, kMaxTraceTokens));
  }
  if (r.output_tokens < 0 || r.output_tokens > kMaxTraceTokens) {
    return LineError(line_no,
                     absl::StrFormat("output tokens %d must be in [0, %d]", r.output_tokens, kMaxTraceTokens));
  }
  const int64_t max_blocks = (r.input_tokens + kTraceBlockTokens - 1) / kTraceBlockTokens;
  if (static_cast<int64_t>(r.hash_ids.size()) > max_blocks) {
    return LineError(line_no, absl::StrFormat("%d hash_ids for %d prompt tokens (at most %d blocks of %d)",
                                              r.hash_ids.size(), r.input_tokens, max_blocks, kTraceBlockTokens));
  }
  for (int64_t id : r.hash_ids) {
    if (id < 0) return LineError(line_no, absl::StrFormat("hash id %d is negative", id));
  }
  return absl::OkStatus();
}

bool Blank(absl::string_view line) { return absl::StripAsciiWhitespace(line).empty(); }

}  // namespace

absl::string_view TraceFormatName(TraceFormat f) {
  switch (f) {
    case TraceFormat::kAuto: return "auto";
    case TraceFormat::kMooncake: return "mooncake";
    case TraceFormat::kCsv: return "csv";
  }
  return "?";
}

absl::StatusOr<Request> ParseMooncakeLine(absl::string_view line, int64_t line_no) {
  JsonLine j(line, line_no);
  Request r;
  r.line = line_no;
  bool seen_ts = false, seen_in = false, seen_out = false, seen_hash = false;
  if (!j.Consume('{')) return j.Error("expected '{'");
  if (!j.Consume('}')) {
    std::vector<std::string> keys;
    do {
      absl::StatusOr<absl::string_view> key = j.String();
      if (!key.ok()) return key.status();
      if (std::find(keys.begin(), keys.end(), *key) != keys.end()) {
        return LineError(line_no, absl::StrCat("key \"", *key, "\" appears twice"));
      }
      keys.emplace_back(*key);
      if (!j.Consume(':')) return j.Error("expected ':'");
      if (*key == "timestamp") {
        absl::StatusOr<double> x = j.Double(*key);
        if (!x.ok()) return x.status();
        r.arrival_ms = *x;
        seen_ts = true;
      } else if (*key == "input_length" || *key == "output_length") {
        absl::StatusOr<int64_t> x = j.Integer(*key);
        if (!x.ok()) return x.status();
        (*key == "input_length" ? r.input_tokens : r.output_tokens) = *x;
        (*key == "input_length" ? seen_in : seen_out) = true;
      } else if (*key == "hash_ids") {
        absl::StatusOr<std::vector<int64_t>> ids = j.IntArray(*key);
        if (!ids.ok()) return ids.status();
        r.hash_ids = std::move(*ids);
        seen_hash = true;
      } else if (absl::Status st = j.SkipValue(0); !st.ok()) {
        return st;
      }
    } while (j.Consume(','));
    if (!j.Consume('}')) return j.Error("expected ',' or '}'");
  }
  if (!j.AtEnd()) return j.Error("trailing characters after the object");
  (void)seen_hash;
  for (auto [seen, name] : {std::pair{seen_ts, "timestamp"}, {seen_in, "input_length"}, {seen_out, "output_length"}}) {
    if (!seen) return LineError(line_no, absl::StrCat("missing \"", name, "\""));
  }
  if (absl::Status st = CheckRequest(r, line_no); !st.ok()) return st;
  return r;
}

absl::StatusOr<Request> ParseCsvLine(absl::string_view line, int64_t line_no) {
  std::vector<absl::string_view> f = absl::StrSplit(line, ',');
  if (f.size() != 3) {
    return LineError(line_no, absl::StrFormat("expected 3 fields (arrival_ms,prompt_tokens,output_tokens), got %d",
                                              f.size()));
  }
  Request r;
  r.line = line_no;
  const absl::string_view a = absl::StripAsciiWhitespace(f[0]);
  const absl::string_view in = absl::StripAsciiWhitespace(f[1]);
  const absl::string_view out = absl::StripAsciiWhitespace(f[2]);
  if (!absl::SimpleAtod(a, &r.arrival_ms) || !std::isfinite(r.arrival_ms)) {
    return LineError(line_no, absl::StrCat("arrival \"", a, "\" is not a finite number"));
  }
  if (!absl::SimpleAtoi(in, &r.input_tokens)) {
    return LineError(line_no, absl::StrCat("prompt tokens \"", in, "\" is not an integer"));
  }
  if (!absl::SimpleAtoi(out, &r.output_tokens)) {
    return LineError(line_no, absl::StrCat("output tokens \"", out, "\" is not an integer"));
  }
  if (absl::Status st = CheckRequest(r, line_no); !st.ok()) return st;
  return r;
}

absl::StatusOr<Trace> ParseTrace(absl::string_view text, const TraceOptions& options, absl::string_view name) {
  TraceFormat format = options.format;
  if (format == TraceFormat::kAuto) {
    if (name.size() >= 4 && absl::AsciiStrToLower(name.substr(name.size() - 4)) == ".csv") {
      format = TraceFormat::kCsv;
    } else {
      // By the first non-blank line: JSON objects start with '{'.
      format = TraceFormat::kCsv;
      for (absl::string_view line : absl::StrSplit(text, '\n')) {
        if (Blank(line)) continue;
        if (absl::StripLeadingAsciiWhitespace(line).front() == '{') format = TraceFormat::kMooncake;
        break;
      }
    }
  }
  Trace trace;
  int64_t line_no = 0;
  bool first = true;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    if (Blank(line)) continue;
    absl::StatusOr<Request> r;
    if (format == TraceFormat::kCsv) {
      const absl::string_view s = absl::StripLeadingAsciiWhitespace(line);
      if (s.front() == '#') continue;
      const bool header = first && !absl::ascii_isdigit(static_cast<unsigned char>(s.front())) && s.front() != '.';
      first = false;
      if (header) continue;
      r = ParseCsvLine(line, line_no);
    } else {
      first = false;
      r = ParseMooncakeLine(line, line_no);
    }
    if (!r.ok()) {
      if (!options.lenient) return r.status();
      if (trace.skipped++ == 0) trace.first_skip = std::string(r.status().message());
      continue;
    }
    trace.requests.push_back(std::move(*r));
  }
  std::stable_sort(trace.requests.begin(), trace.requests.end(),
                   [](const Request& a, const Request& b) { return a.arrival_ms < b.arrival_ms; });
  return trace;
}

absl::StatusOr<Trace> ReadTrace(const std::string& path, const TraceOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open trace ", path));
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading trace ", path));
  absl::StatusOr<Trace> t = ParseTrace(buf.str(), options, path);
  if (!t.ok()) return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  return t;
}

}  // namespace kvtier::replay
