// libFuzzer target for the trace parsers (tools/run-fuzz builds and runs it).
// Any input must parse or fail with InvalidArgument naming a line; a parsed
// request always satisfies the documented limits.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "replay/trace.h"

namespace {

void Check(bool ok) {
  if (!ok) std::abort();
}

void CheckTrace(const absl::StatusOr<kvtier::replay::Trace>& t) {
  if (!t.ok()) {
    Check(t.status().code() == absl::StatusCode::kInvalidArgument);
    Check(t.status().message().rfind("line ", 0) == 0);
    return;
  }
  double last = 0;
  for (const kvtier::replay::Request& r : t->requests) {
    Check(r.arrival_ms >= last);
    last = r.arrival_ms;
    Check(r.input_tokens >= 1 && r.input_tokens <= kvtier::replay::kMaxTraceTokens);
    Check(r.output_tokens >= 0 && r.output_tokens <= kvtier::replay::kMaxTraceTokens);
    Check(static_cast<int64_t>(r.hash_ids.size()) <= (r.input_tokens + 511) / 512);
    Check(r.line >= 1);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvtier::replay;
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  for (TraceFormat f : {TraceFormat::kAuto, TraceFormat::kMooncake, TraceFormat::kCsv}) {
    CheckTrace(ParseTrace(text, {.format = f, .lenient = false}));
    absl::StatusOr<Trace> lenient = ParseTrace(text, {.format = f, .lenient = true});
    Check(lenient.ok());
    CheckTrace(lenient);
  }
  return 0;
}
