// The strict, minimal JSON reader shared by the trace parser and the
// capture loader (internal to tools/replay).
#ifndef KVTIER_TOOLS_REPLAY_JSON_READER_H_
#define KVTIER_TOOLS_REPLAY_JSON_READER_H_

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace kvtier::replay::internal {

constexpr int kMaxJsonDepth = 32;  // nesting of skipped JSON values

// A strict, minimal JSON reader over one text (a trace line, a capture
// manifest): the caller walks objects with Consume/String; known values are
// numbers, strings and arrays of integers; any other value is validated and
// skipped.
class JsonReader {
 public:
  // Errors read "line N: ..." (a line of a trace) or "WHERE: ..." (a file).
  JsonReader(absl::string_view s, int64_t line_no) : s_(s), where_(absl::StrCat("line ", line_no)) {}
  JsonReader(absl::string_view s, std::string where) : s_(s), where_(std::move(where)) {}

  absl::Status Fail(absl::string_view what) const { return absl::InvalidArgumentError(absl::StrCat(where_, ": ", what)); }

  absl::Status Error(absl::string_view what) const {
    return Fail(absl::StrFormat("%s at column %d", what, pos_ + 1));
  }
  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\r' || s_[pos_] == '\n')) ++pos_;
  }
  bool AtEnd() {
    SkipSpace();
    return pos_ == s_.size();
  }
  bool Consume(char c) {
    SkipSpace();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  char Peek() {
    SkipSpace();
    return pos_ < s_.size() ? s_[pos_] : '\0';
  }

  // A string's raw contents (escapes validated, not decoded: keys we know
  // have none).
  absl::StatusOr<absl::string_view> String() {
    if (!Consume('"')) return Error("expected a string");
    const size_t begin = pos_;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      const unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c < 0x20) return Error("control character in a string");
      if (c == '\\') {
        ++pos_;
        if (pos_ >= s_.size()) break;
        const char e = s_[pos_];
        if (e == 'u') {
          for (int i = 1; i <= 4; ++i) {
            if (pos_ + i >= s_.size() || !absl::ascii_isxdigit(static_cast<unsigned char>(s_[pos_ + i])))
              return Error("bad \\u escape");
          }
          pos_ += 4;
        } else if (absl::string_view("\"\\/bfnrt").find(e) == absl::string_view::npos) {
          return Error("bad escape");
        }
      }
      ++pos_;
    }
    if (pos_ >= s_.size()) return Error("unterminated string");
    return s_.substr(begin, pos_++ - begin);
  }

  // The lexeme of a JSON number (grammar checked).
  absl::StatusOr<absl::string_view> Number() {
    SkipSpace();
    const size_t begin = pos_;
    auto digits = [&] {
      const size_t b = pos_;
      while (pos_ < s_.size() && absl::ascii_isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
      return pos_ - b;
    };
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '0') {
      ++pos_;
    } else if (digits() == 0) {
      return Error("expected a number");
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (digits() == 0) return Error("expected digits after '.'");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (digits() == 0) return Error("expected digits in the exponent");
    }
    return s_.substr(begin, pos_ - begin);
  }

  absl::StatusOr<double> Double(absl::string_view key) {
    absl::StatusOr<absl::string_view> lex = Number();
    if (!lex.ok()) return Error(absl::StrCat("\"", key, "\" must be a number"));
    double x;
    if (!absl::SimpleAtod(*lex, &x) || !std::isfinite(x)) {
      return Fail(absl::StrCat("\"", key, "\" = ", *lex, " is not a finite number"));
    }
    return x;
  }

  absl::StatusOr<int64_t> Integer(absl::string_view key) {
    absl::StatusOr<absl::string_view> lex = Number();
    if (!lex.ok()) return Error(absl::StrCat("\"", key, "\" must be an integer"));
    int64_t x;
    if (!absl::SimpleAtoi(*lex, &x)) {
      return Fail(absl::StrCat("\"", key, "\" = ", *lex, " is not an integer in range"));
    }
    return x;
  }

  absl::StatusOr<std::vector<int64_t>> IntArray(absl::string_view key) {
    std::vector<int64_t> out;
    if (!Consume('[')) return Error(absl::StrCat("\"", key, "\" must be an array of integers"));
    if (Consume(']')) return out;
    do {
      absl::StatusOr<int64_t> x = Integer(key);
      if (!x.ok()) return x.status();
      out.push_back(*x);
    } while (Consume(','));
    if (!Consume(']')) return Error("expected ',' or ']'");
    return out;
  }

  // Validates and skips any JSON value.
  absl::Status SkipValue(int depth) {
    if (depth > kMaxJsonDepth) return Error("nesting too deep");
    const char c = Peek();
    if (c == '"') return String().status();
    if (c == '[' || c == '{') {
      const bool object = c == '{';
      ++pos_;
      if (Consume(object ? '}' : ']')) return absl::OkStatus();
      do {
        if (object) {
          if (absl::Status st = String().status(); !st.ok()) return st;
          if (!Consume(':')) return Error("expected ':'");
        }
        if (absl::Status st = SkipValue(depth + 1); !st.ok()) return st;
      } while (Consume(','));
      if (!Consume(object ? '}' : ']')) return Error(object ? "expected ',' or '}'" : "expected ',' or ']'");
      return absl::OkStatus();
    }
    for (absl::string_view word : {"true", "false", "null"}) {
      if (s_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return absl::OkStatus();
      }
    }
    return Number().status();
  }

 private:
  absl::string_view s_;
  std::string where_;
  size_t pos_ = 0;
};

}  // namespace kvtier::replay::internal

#endif  // KVTIER_TOOLS_REPLAY_JSON_READER_H_
