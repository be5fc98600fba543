// Request traces for kvtier-replay and kvtier-plan: Mooncake JSONL and a
// plain CSV, parsed strictly with the line number in every error.
//
// Mooncake JSONL (one JSON object per line):
//   {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}
//   timestamp     arrival in milliseconds from the trace start (number >= 0)
//   input_length  prompt tokens (integer >= 1)
//   output_length generated tokens (integer >= 0)
//   hash_ids      ids of the prompt's 512-token blocks (array of integers >= 0;
//                 optional, default empty). Equal ids mean a shared prefix.
//   Other keys (any JSON value, nested arrays and objects included) are
//   ignored; a repeated key is an error.
// CSV (one request per line): arrival_ms,prompt_tokens,output_tokens
//   An optional first line that does not start with a digit is a header;
//   lines starting with '#' are comments.
// Blank lines are skipped in both formats. Requests keep their trace order
// among equal arrival times; the parsed trace is sorted by arrival.
#ifndef KVTIER_TOOLS_REPLAY_TRACE_H_
#define KVTIER_TOOLS_REPLAY_TRACE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvtier::replay {

// Tokens per Mooncake hash block.
inline constexpr int kTraceBlockTokens = 512;
// Largest prompt or output length accepted (keeps all arithmetic in range).
inline constexpr int64_t kMaxTraceTokens = int64_t{1} << 30;

struct Request {
  int64_t line = 0;          // 1-based line in the source
  double arrival_ms = 0.0;
  int64_t input_tokens = 0;
  int64_t output_tokens = 0;
  std::vector<int64_t> hash_ids;  // one per 512-token prompt block (may be empty)
};

enum class TraceFormat { kAuto, kMooncake, kCsv };

struct TraceOptions {
  TraceFormat format = TraceFormat::kAuto;  // kAuto: by extension (.csv), else by the first line
  // false (default): the first malformed line is an error naming its line.
  // true: malformed lines are skipped and counted.
  bool lenient = false;
};

struct Trace {
  std::vector<Request> requests;  // sorted by arrival (stable)
  int64_t skipped = 0;            // malformed lines skipped (lenient only)
  std::string first_skip;         // the first skipped line's error
};

// One line of either format. InvalidArgument "line N: ..." on malformed input.
absl::StatusOr<Request> ParseMooncakeLine(absl::string_view line, int64_t line_no);
absl::StatusOr<Request> ParseCsvLine(absl::string_view line, int64_t line_no);

// A whole trace held in memory; `name` picks the format for kAuto (".csv").
absl::StatusOr<Trace> ParseTrace(absl::string_view text, const TraceOptions& options, absl::string_view name = "");
// Reads and parses a file. NotFound / InvalidArgument with the path.
absl::StatusOr<Trace> ReadTrace(const std::string& path, const TraceOptions& options);

absl::string_view TraceFormatName(TraceFormat f);

}  // namespace kvtier::replay

#endif  // KVTIER_TOOLS_REPLAY_TRACE_H_
