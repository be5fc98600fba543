// bench_nvme — random block reads through NvmeTier against fio on the same
// hardware, in the same run.
//
// For every block size and queue depth: a tier file of --size bytes is
// written through NvmeTier (O_DIRECT, its buffers registered as io_uring fixed
// buffers); then, --reps times, alternately, the tier reads random blocks for
// --runtime seconds keeping QD reads in flight (each completion issues the
// next read), and fio reads random blocks of a file of the same size in the
// same directory with the same block size and queue depth (which of the two
// goes first alternates, so that drift in the device favours neither):
//   fio --direct=1 --ioengine=io_uring --fixedbufs --rw=randread --bs=B
//       --iodepth=QD --size=S --time_based --runtime=T --output-format=json
// The table gives the medians and the tier's share of fio's IOPS against the
// goal (90%). With O_DIRECT neither goes through the page cache.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "kvtier/offload/nvme_tier.h"

namespace kvtier {
namespace {

using Clock = std::chrono::steady_clock;

struct Flags {
  std::string dir = "/tmp/kvtier-bench-nvme";
  int64_t size = int64_t{1} << 30;
  std::vector<int64_t> blocks = {4 << 10, 64 << 10};
  std::vector<int> depths = {1, 32};
  int runtime_s = 1;
  int reps = 3;
  double goal = 0.90;
  std::string fio = "fio";
  bool fio_fixedbufs = true;
};

constexpr char kUsage[] = R"(bench_nvme: NvmeTier random block reads vs fio, same file size, block size and queue depth.

Usage: bench_nvme [flags]
  --dir=PATH          directory for both files (default /tmp/kvtier-bench-nvme; needs O_DIRECT,
                      so not tmpfs before Linux 6.6; no ':' in the path, fio splits on it)
  --size=BYTES        size of each file, with K/M/G suffixes (default 1G)
  --block=LIST        block sizes, comma-separated, multiples of 4K (default 4K,64K)
  --qd=LIST           queue depths, comma-separated (default 1,32)
  --runtime=SECONDS   length of each measurement (default 1)
  --reps=N            repetitions of each measurement; the table shows medians (default 3)
  --goal=FRACTION     the tier's IOPS as a share of fio's that counts as PASS (default 0.9)
  --fio=PATH          the fio binary (default: fio on PATH)
  --fio_fixedbufs=0|1 pass --fixedbufs to fio, as the tier uses fixed buffers (default 1)
  --help              this text

The default run (1 GiB; 2 block sizes x 2 queue depths x 3 reps x (1 s tier + 1 s fio)) takes about
45 s here, most of the rest writing the files; raise --runtime and --reps where the device is noisy.
)";

std::optional<int64_t> ParseBytes(absl::string_view s) {
  int64_t mult = 1;
  if (!s.empty()) {
    switch (s.back()) {
      case 'k': case 'K': mult = int64_t{1} << 10; break;
      case 'm': case 'M': mult = int64_t{1} << 20; break;
      case 'g': case 'G': mult = int64_t{1} << 30; break;
      default: break;
    }
    if (mult != 1) s.remove_suffix(1);
  }
  int64_t v;
  if (!absl::SimpleAtoi(s, &v) || v <= 0 || v > (int64_t{1} << 50) / mult) return std::nullopt;
  return v * mult;
}

// Parses argv into `f`; false with a message on stderr for a bad flag.
bool ParseFlags(int argc, char** argv, Flags& f, bool& help) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view a = argv[i];
    if (a == "--help" || a == "-h") {
      help = true;
      return true;
    }
    const size_t eq = a.find('=');
    if (a.substr(0, 2) != "--" || eq == absl::string_view::npos) {
      std::fprintf(stderr, "bench_nvme: expected --flag=value, got '%s' (see --help)\n", argv[i]);
      return false;
    }
    const absl::string_view name = a.substr(2, eq - 2), value = a.substr(eq + 1);
    bool ok = true;
    if (name == "dir") {
      f.dir = std::string(value);
      ok = !f.dir.empty();
    } else if (name == "size") {
      std::optional<int64_t> v = ParseBytes(value);
      ok = v.has_value();
      if (ok) f.size = *v;
    } else if (name == "block") {
      f.blocks.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        std::optional<int64_t> v = ParseBytes(part);
        ok = ok && v.has_value() && *v % 4096 == 0;
        if (ok) f.blocks.push_back(*v);
      }
    } else if (name == "qd") {
      f.depths.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int v;
        ok = ok && absl::SimpleAtoi(part, &v) && v >= 1 && v <= 4096;
        if (ok) f.depths.push_back(v);
      }
    } else if (name == "runtime") {
      ok = absl::SimpleAtoi(value, &f.runtime_s) && f.runtime_s >= 1;
    } else if (name == "reps") {
      ok = absl::SimpleAtoi(value, &f.reps) && f.reps >= 1;
    } else if (name == "goal") {
      ok = absl::SimpleAtod(value, &f.goal) && f.goal > 0;
    } else if (name == "fio") {
      f.fio = std::string(value);
    } else if (name == "fio_fixedbufs") {
      ok = value == "0" || value == "1";
      f.fio_fixedbufs = value == "1";
    } else {
      std::fprintf(stderr, "bench_nvme: unknown flag --%.*s (see --help)\n", static_cast<int>(name.size()),
                   name.data());
      return false;
    }
    if (!ok) {
      std::fprintf(stderr, "bench_nvme: bad value for --%.*s: '%.*s' (see --help)\n", static_cast<int>(name.size()),
                   name.data(), static_cast<int>(value.size()), value.data());
      return false;
    }
  }
  for (int64_t b : f.blocks) {
    if (b > f.size) {
      std::fprintf(stderr, "bench_nvme: block %lld is larger than --size %lld\n", static_cast<long long>(b),
                   static_cast<long long>(f.size));
      return false;
    }
  }
  return true;
}

// The fio binary: `name` itself if it has a '/', else the first on PATH.
std::optional<std::string> FindExecutable(const std::string& name) {
  if (name.find('/') != std::string::npos) {
    return access(name.c_str(), X_OK) == 0 ? std::optional<std::string>(name) : std::nullopt;
  }
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path != nullptr ? path : "", ':')) {
    if (dir.empty()) continue;
    std::string candidate = absl::StrFormat("%s/%s", dir, name);
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return std::nullopt;
}

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};

std::string Human(int64_t bytes) {
  if (bytes % (int64_t{1} << 30) == 0) return absl::StrFormat("%d GiB", bytes >> 30);
  if (bytes % (int64_t{1} << 20) == 0) return absl::StrFormat("%d MiB", bytes >> 20);
  if (bytes % (int64_t{1} << 10) == 0) return absl::StrFormat("%d KiB", bytes >> 10);
  return absl::StrFormat("%d B", bytes);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// QD transfers kept in flight through the tier: each `done` issues the next
// transfer of its slot until the deadline (writes: until every block is
// written). Slots own their buffers; no two slots ever use one block at once.
class Driver {
 public:
  Driver(NvmeTier& tier, int64_t blocks, int qd, char* buffers)
      : tier_(tier), blocks_(blocks), qd_(qd), buffers_(buffers), block_bytes_(tier.block_bytes()),
        current_(static_cast<size_t>(qd), -1) {}

  // Writes blocks 0 .. blocks-1, QD at a time. The last block goes first:
  // writes within the file's size run concurrently on ext4, extending ones
  // one at a time.
  absl::Status WriteAll() {
    write_ = true;
    next_block_ = blocks_ - 1;
    end_block_ = blocks_;
    if (absl::Status st = Run(std::nullopt); !st.ok()) return st;
    next_block_ = 0;
    end_block_ = blocks_ - 1;
    return Run(std::nullopt);
  }

  // Random reads for `seconds`; returns reads completed per second.
  absl::StatusOr<double> RandomReads(int seconds, uint64_t seed) {
    write_ = false;
    rng_.seed(seed);
    completed_ = 0;
    const Clock::time_point start = Clock::now();
    if (absl::Status st = Run(start + std::chrono::seconds(seconds)); !st.ok()) return st;
    const double elapsed = std::chrono::duration<double>(last_done_ - start).count();
    return static_cast<double>(completed_) / elapsed;
  }

 private:
  absl::Status Run(std::optional<Clock::time_point> deadline) {
    deadline_ = deadline;
    {
      std::lock_guard lock(mu_);
      active_ = qd_;
      error_ = absl::OkStatus();
    }
    for (int s = 0; s < qd_; ++s) Issue(s);
    std::unique_lock lock(mu_);
    finished_.wait(lock, [this] { return active_ == 0; });
    return error_;
  }

  // Starts the next transfer of `slot`, or retires the slot.
  void Issue(int slot) {
    int64_t block = -1;
    {
      std::lock_guard lock(mu_);
      current_[slot] = -1;
      if (error_.ok()) {
        if (write_) {
          if (next_block_ < end_block_) block = next_block_++;
        } else if (Clock::now() < *deadline_) {
          do {
            block = static_cast<int64_t>(rng_() % static_cast<uint64_t>(blocks_));
          } while (std::find(current_.begin(), current_.end(), block) != current_.end());
        }
      }
      if (block < 0) {
        if (--active_ == 0) finished_.notify_all();
        return;
      }
      current_[slot] = block;
    }
    char* buf = buffers_ + static_cast<int64_t>(slot) * block_bytes_;
    auto done = [this, slot](absl::Status st) {
      const Clock::time_point now = Clock::now();
      {
        std::lock_guard lock(mu_);
        if (!st.ok() && error_.ok()) error_ = st;
        if (st.ok()) ++completed_;
        last_done_ = now;
      }
      Issue(slot);
    };
    if (write_) {
      tier_.Write(static_cast<BlockId>(block), buf, std::move(done));
    } else {
      tier_.Read(static_cast<BlockId>(block), buf, std::move(done));
    }
  }

  NvmeTier& tier_;
  const int64_t blocks_;
  const int qd_;
  char* const buffers_;
  const int64_t block_bytes_;
  bool write_ = false;
  std::optional<Clock::time_point> deadline_;

  std::mutex mu_;
  std::condition_variable finished_;
  std::vector<int64_t> current_;  // block in flight per slot, -1 none
  std::mt19937_64 rng_;
  int64_t next_block_ = 0, end_block_ = 0;  // writes: the blocks left are [next_block_, end_block_)
  int64_t completed_ = 0;
  int active_ = 0;
  Clock::time_point last_done_;
  absl::Status error_;
};

// A file of `size` bytes of random data at `path`, written with O_DIRECT
// (nothing of it stays in the page cache, and no part is a hole).
absl::Status WriteFioFile(const std::string& path, int64_t size) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0600);
  if (fd < 0) return absl::UnavailableError(absl::StrFormat("open %s: %s", path, std::strerror(errno)));
  constexpr int64_t kChunk = 4 << 20;
  std::unique_ptr<char, FreeDeleter> buf(static_cast<char*>(std::aligned_alloc(4096, kChunk)));
  std::mt19937_64 rng(7);
  for (int64_t i = 0; i < kChunk; i += 8) {
    const uint64_t x = rng();
    std::memcpy(buf.get() + i, &x, 8);
  }
  absl::Status st;
  for (int64_t off = 0; off < size && st.ok(); off += kChunk) {
    const size_t n = static_cast<size_t>(std::min(kChunk, size - off));
    buf.get()[0] = static_cast<char>(off >> 22);  // no two chunks alike
    if (pwrite(fd, buf.get(), n, off) != static_cast<ssize_t>(n)) {
      st = absl::UnavailableError(absl::StrFormat("write %s at %d: %s", path, off, std::strerror(errno)));
    }
  }
  if (st.ok() && fsync(fd) != 0) st = absl::UnavailableError(absl::StrFormat("fsync %s: %s", path, std::strerror(errno)));
  close(fd);
  return st;
}

// The number after `"key"` (and its ':') in `json` from `from` on.
std::optional<double> NumberAfter(const std::string& json, size_t from, const std::string& key) {
  const size_t k = json.find("\"" + key + "\"", from);
  if (k == std::string::npos) return std::nullopt;
  const size_t colon = json.find(':', k);
  if (colon == std::string::npos) return std::nullopt;
  return std::strtod(json.c_str() + colon + 1, nullptr);
}

struct FioResult {
  double iops = 0, bw_bytes = 0;
};

absl::StatusOr<FioResult> RunFio(const Flags& f, const std::string& fio, const std::string& file, int64_t bs,
                                 int qd) {
  const std::string out = absl::StrFormat("%s/fio-%d.json", f.dir, static_cast<int>(getpid()));
  const std::string cmd = absl::StrFormat(
      "'%s' --name=bench_nvme --filename='%s' --direct=1 --ioengine=io_uring%s --rw=randread --bs=%d "
      "--iodepth=%d --size=%d --time_based --runtime=%d --norandommap --randrepeat=0 --numjobs=1 "
      "--output-format=json --output='%s' >/dev/null 2>'%s.err'",
      fio, file, f.fio_fixedbufs ? " --fixedbufs" : "", bs, qd, f.size, f.runtime_s, out, out);
  const int rc = std::system(cmd.c_str());
  std::ifstream in(out);
  std::stringstream json;
  json << in.rdbuf();
  std::ifstream err_in(out + ".err");
  std::stringstream err;
  err << err_in.rdbuf();
  std::remove(out.c_str());
  std::remove((out + ".err").c_str());
  if (rc != 0) {
    return absl::InternalError(absl::StrFormat("fio failed (status %d): %s\ncommand: %s", rc, err.str(), cmd));
  }
  const std::string text = json.str();
  const size_t read = text.find("\"read\"");
  std::optional<double> iops = read == std::string::npos ? std::nullopt : NumberAfter(text, read, "iops");
  std::optional<double> bw = read == std::string::npos ? std::nullopt : NumberAfter(text, read, "bw_bytes");
  if (!iops || !bw || *iops <= 0) {
    return absl::InternalError(absl::StrFormat("no read iops in fio's JSON output (%d bytes): %s",
                                               text.size(), text.substr(0, 400)));
  }
  return FioResult{*iops, *bw};
}

int Main(int argc, char** argv) {
  Flags f;
  bool help = false;
  if (!ParseFlags(argc, argv, f, help)) return 2;
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  const std::optional<std::string> fio = FindExecutable(f.fio);
  if (!fio) {
    std::fprintf(stderr,
                 "bench_nvme: fio not found (looked for '%s'%s); install it (tools/setup.sh installs fio) or pass "
                 "--fio=/path/to/fio\n",
                 f.fio.c_str(), f.fio.find('/') == std::string::npos ? " on PATH" : "");
    return 2;
  }
  if (f.dir.find(':') != std::string::npos) {
    std::fprintf(stderr, "bench_nvme: --dir must not contain ':' (fio splits file names on it): %s\n", f.dir.c_str());
    return 2;
  }
  std::error_code ec;
  std::filesystem::create_directories(f.dir, ec);
  if (ec) {
    std::fprintf(stderr, "bench_nvme: cannot create %s: %s\n", f.dir.c_str(), ec.message().c_str());
    return 2;
  }
  const std::string fio_file = absl::StrFormat("%s/bench_nvme-fio-%d.dat", f.dir, static_cast<int>(getpid()));
  std::printf("bench_nvme: %s files in %s, O_DIRECT, %s; %d reps of %d s each, medians\n", Human(f.size).c_str(),
              f.dir.c_str(), fio->c_str(), f.reps, f.runtime_s);
  std::fflush(stdout);
  // fio's file goes when this returns, whichever way.
  struct RemoveOnExit {
    std::string path;
    ~RemoveOnExit() { std::remove(path.c_str()); }
  } remove_fio_file{fio_file};
  if (absl::Status st = WriteFioFile(fio_file, f.size); !st.ok()) {
    std::fprintf(stderr, "bench_nvme: fio's file: %s\n", st.ToString().c_str());
    return 1;
  }

  struct Row {
    int64_t bs;
    int qd;
    double tier_iops, fio_iops;
  };
  std::vector<Row> rows;
  for (int64_t bs : f.blocks) {
    const int64_t blocks = f.size / bs;
    const int max_qd = *std::max_element(f.depths.begin(), f.depths.end());
    // One buffer per slot, registered with the tier: it outlives the tier.
    std::unique_ptr<char, FreeDeleter> buffers(
        static_cast<char*>(std::aligned_alloc(4096, static_cast<size_t>(max_qd * bs))));
    std::memset(buffers.get(), 0x3c, static_cast<size_t>(max_qd * bs));
    NvmeTier::Options o;
    o.directory = f.dir;
    o.capacity_bytes = blocks * bs;
    o.block_bytes = bs;
    o.queue_depth = max_qd;
    o.io_mode = NvmeTier::IoMode::kDirect;
    absl::StatusOr<std::unique_ptr<NvmeTier>> tier = NvmeTier::Create(o);
    if (!tier.ok()) {
      std::fprintf(stderr, "bench_nvme: %s\n", tier.status().ToString().c_str());
      return 1;
    }
    if (absl::Status st = (*tier)->RegisterBuffer(buffers.get(), max_qd * bs); !st.ok()) {
      std::fprintf(stderr, "bench_nvme: %s\n", st.ToString().c_str());
      return 1;
    }
    for (int64_t i = 0; i < blocks; ++i) {
      if (!(*tier)->Allocate().ok()) {
        std::fprintf(stderr, "bench_nvme: cannot allocate block %lld\n", static_cast<long long>(i));
        return 1;
      }
    }
    const Clock::time_point w0 = Clock::now();
    Driver writer(**tier, blocks, max_qd, buffers.get());
    if (absl::Status st = writer.WriteAll(); !st.ok()) {
      std::fprintf(stderr, "bench_nvme: writing the tier: %s\n", st.ToString().c_str());
      return 1;
    }
    std::printf("  wrote the %s tier file with %s blocks in %.1f s\n", Human(f.size).c_str(), Human(bs).c_str(),
                std::chrono::duration<double>(Clock::now() - w0).count());
    std::fflush(stdout);
    for (int qd : f.depths) {
      std::vector<double> tier_iops, fio_iops;
      for (int rep = 0; rep < f.reps; ++rep) {
        absl::StatusOr<double> t;
        absl::StatusOr<FioResult> r;
        for (int k = 0; k < 2; ++k) {
          if ((k + rep) % 2 == 0) {
            Driver reader(**tier, blocks, qd, buffers.get());
            t = reader.RandomReads(f.runtime_s, 1000 + rep);
          } else {
            r = RunFio(f, *fio, fio_file, bs, qd);
          }
        }
        if (!t.ok()) {
          std::fprintf(stderr, "bench_nvme: tier reads: %s\n", t.status().ToString().c_str());
          return 1;
        }
        if (!r.ok()) {
          std::fprintf(stderr, "bench_nvme: %s\n", r.status().ToString().c_str());
          return 1;
        }
        tier_iops.push_back(*t);
        fio_iops.push_back(r->iops);
      }
      rows.push_back({bs, qd, Median(tier_iops), Median(fio_iops)});
      std::printf("  %s QD %d: tier %s, fio %s IOPS\n", Human(bs).c_str(), qd,
                  absl::StrJoin(tier_iops, " ", [](std::string* out, double v) { absl::StrAppendFormat(out, "%.0f", v); })
                      .c_str(),
                  absl::StrJoin(fio_iops, " ", [](std::string* out, double v) { absl::StrAppendFormat(out, "%.0f", v); })
                      .c_str());
      std::fflush(stdout);
    }
  }

  std::printf("\n%-8s %4s %12s %12s %10s %10s %8s %6s  %s\n", "block", "QD", "tier IOPS", "fio IOPS", "tier MiB/s",
              "fio MiB/s", "tier/fio", "goal", "result");
  bool all_pass = true;
  for (const Row& r : rows) {
    const double ratio = r.tier_iops / r.fio_iops;
    const bool pass = ratio >= f.goal;
    all_pass &= pass;
    std::printf("%-8s %4d %12.0f %12.0f %10.1f %10.1f %7.1f%% %5s%%  %s\n", Human(r.bs).c_str(), r.qd, r.tier_iops,
                r.fio_iops, r.tier_iops * static_cast<double>(r.bs) / (1 << 20),
                r.fio_iops * static_cast<double>(r.bs) / (1 << 20), 100 * ratio,
                absl::StrFormat(">=%.0f", 100 * f.goal).c_str(), pass ? "PASS" : "MISS");
  }
  std::printf("%s\n", all_pass ? "all PASS" : "some MISS");
  return 0;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) { return kvtier::Main(argc, argv); }
