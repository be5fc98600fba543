#include "kvtier/log.h"

#include <cstdio>
#include <mutex>
#include <string>
#include <utility>

namespace kvtier {
namespace {

std::mutex& SinkMutex() {
  static std::mutex mu;
  return mu;
}

LogSink& Sink() {
  static LogSink sink;
  return sink;
}

const char* Name(LogSeverity s) {
  switch (s) {
    case LogSeverity::kInfo: return "info";
    case LogSeverity::kWarning: return "warning";
    case LogSeverity::kError: return "error";
  }
  return "?";
}

}  // namespace

LogSink SetLogSink(LogSink sink) {
  std::lock_guard lock(SinkMutex());
  return std::exchange(Sink(), std::move(sink));
}

void Log(LogSeverity severity, std::string_view message) {
  std::lock_guard lock(SinkMutex());
  if (Sink()) {
    Sink()(severity, message);
    return;
  }
  std::fprintf(stderr, "kvtier: %s: %.*s\n", Name(severity), static_cast<int>(message.size()), message.data());
}

}  // namespace kvtier
