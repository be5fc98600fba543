// tools/cli.h — what the command-line tools (kvtier-demo, kvtier-replay,
// kvtier-plan) share: flags spelled with dashes, enum names, output files.
#ifndef KVTIER_TOOLS_CLI_H_
#define KVTIER_TOOLS_CLI_H_

#include <fstream>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"

namespace kvtier::cli {

// --help lists the flags defined in the tools' own sources (tools/kvtier_*.cc).
// Abseil's default looks for a source named like the binary, and the
// binaries' dashes (kvtier-replay) never match the files' underscores.
inline void ListOwnFlagsInHelp() {
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view file) { return absl::StrContains(file, "tools/kvtier_"); };
  config.contains_helpshort_flags = config.contains_help_flags;
  absl::SetFlagsUsageConfig(config);
}

// vLLM-style --dashed-flags: rewrites each "--a-b=c" to "--a_b=c" in place
// (the value after '=' is left alone), so absl flags accept both spellings.
inline void AcceptDashedFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--", 0) != 0) continue;
    const size_t end = std::min(a.find('='), a.size());
    for (size_t c = 2; c < end; ++c) {
      if (a[c] == '-') argv[i][c] = '_';
    }
  }
}

// `s` as one of `names`; false (out untouched) when it is none of them.
template <typename T>
bool ParseName(const std::string& s, std::initializer_list<std::pair<const char*, T>> names, T& out) {
  for (const auto& [name, value] : names) {
    if (s == name) {
      out = value;
      return true;
    }
  }
  return false;
}

// `s` as one of the library's names name(E(0)) .. name(E(count - 1))
// (kvtier::SketchKindName, VaguePolicyName, RecallProxyName).
template <typename E>
bool ParseName(const std::string& s, std::string_view (*name)(E), int count, E& out) {
  for (int i = 0; i < count; ++i) {
    if (s == name(static_cast<E>(i))) {
      out = static_cast<E>(i);
      return true;
    }
  }
  return false;
}

inline bool WriteFile(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  return static_cast<bool>(f);
}

}  // namespace kvtier::cli

#endif  // KVTIER_TOOLS_CLI_H_
