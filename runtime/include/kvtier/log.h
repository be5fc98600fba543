// kvtier/log.h — where kvtier's warnings and errors go.
//
// kvtier logs rarely: a degraded mode it falls into (memory it could not pin,
// O_DIRECT refused, a tier failing) once per cause, with its context. By
// default lines go to stderr prefixed "kvtier: "; SetLogSink redirects them.
// Thread-safe.
#ifndef KVTIER_LOG_H_
#define KVTIER_LOG_H_

#include <functional>
#include <string_view>

namespace kvtier {

enum class LogSeverity { kInfo, kWarning, kError };

using LogSink = std::function<void(LogSeverity severity, std::string_view message)>;

// Replaces the sink; an empty function restores stderr. Returns the old sink.
LogSink SetLogSink(LogSink sink);

void Log(LogSeverity severity, std::string_view message);

}  // namespace kvtier

#endif  // KVTIER_LOG_H_
