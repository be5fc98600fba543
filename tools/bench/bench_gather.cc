// bench_gather — recall gathers from the host tier against memcpy of the same
// bytes, measured in the same run.
//
// A BlockStore over a host tier of --blocks blocks (K/V rows of --row bytes,
// 16 tokens a block, far more memory than the caches hold) serves recall
// requests of --tokens tokens into a staging buffer, as the runtime does: one
// Gather with one part per block touched, copied on the store's transfer
// thread. The gather is timed as the runtime uses it, pipelined: every
// request of a repetition is submitted, then all are waited for (recalls of
// many heads are in flight at once); the latency of one request alone (the
// thread hop included) is printed too. Two request shapes:
//   blocks   whole blocks (16 consecutive tokens each) into consecutive slots,
//            as recalling by block does: each block is two copies (K, V);
//   tokens   tokens at random, each its own K row and V row.
// Against each, in alternating repetitions on the same CPU:
//   memcpy   one memcpy of the same number of bytes from memory the caches do
//            not hold (the physical reference: the goal is gather >= 80%);
//   rowcopy  a plain loop of memcpy over the same rows on the calling thread
//            (what the gather does, without the store and the thread hop).
// Medians of --reps repetitions, each --iters requests. Usage:
//   bench_gather [--blocks=N] [--row=BYTES] [--tokens=N] [--iters=N] [--reps=N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "kvtier/backend.h"
#include "kvtier/offload/block_store.h"
#include "kvtier/offload/host_tier.h"

namespace kvtier {
namespace {

struct Flags {
  int64_t blocks = 8192;  // 64 MiB of 8 KiB blocks: far beyond the caches
  int64_t row = 256;      // head_dim 128 fp16
  int64_t tokens = 4096;
  int iters = 200;
  int reps = 7;
};

bool Parse(int argc, char** argv, Flags& f) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name, auto& out) {
      const std::string prefix = std::string("--") + name + "=";
      if (a.rfind(prefix, 0) != 0) return false;
      int64_t v;
      if (!absl::SimpleAtoi(a.substr(prefix.size()), &v) || v <= 0) {
        std::fprintf(stderr, "bench_gather: bad value in %s\n", a.c_str());
        std::exit(2);
      }
      out = static_cast<std::decay_t<decltype(out)>>(v);
      return true;
    };
    if (a == "--help" || a == "-h") {
      std::printf(
          "bench_gather: recall gathers from the host tier against memcpy of the same bytes.\n"
          "  --blocks=N   host-tier blocks (default 8192)\n"
          "  --row=B      bytes of one K (or V) row; a block holds 16 tokens (default 256)\n"
          "  --tokens=N   tokens per request, a multiple of 16 (default 4096)\n"
          "  --iters=N    requests per repetition (default 200)\n"
          "  --reps=N     repetitions; medians are reported (default 7)\n");
      std::exit(0);
    }
    if (!value("blocks", f.blocks) && !value("row", f.row) && !value("tokens", f.tokens) &&
        !value("iters", f.iters) && !value("reps", f.reps)) {
      std::fprintf(stderr, "bench_gather: unknown flag %s (see --help)\n", a.c_str());
      return false;
    }
  }
  if (f.tokens % 16 != 0 || f.tokens > 16 * f.blocks) {
    std::fprintf(stderr, "bench_gather: --tokens must be a multiple of 16 and at most 16 x --blocks\n");
    return false;
  }
  if ((32 * f.row) % 4096 != 0) {
    std::fprintf(stderr, "bench_gather: 16 tokens x 2 rows of %lld bytes is not a multiple of 4096\n",
                 static_cast<long long>(f.row));
    return false;
  }
  return true;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int argc, char** argv) {
  Flags f;
  if (!Parse(argc, argv, f)) return 2;
  const int64_t block_bytes = 32 * f.row;  // 16 tokens, K then V
  auto backend = CreateBackend(BackendKind::kCpu);
  auto host = HostTier::Create(**backend, {.block_bytes = block_bytes});
  auto store = BlockStore::Create(**host, nullptr, **backend, {});
  if (!backend.ok() || !host.ok() || !store.ok()) {
    std::fprintf(stderr, "bench_gather: setup failed\n");
    return 1;
  }
  std::vector<BlockStore::Ref> refs;
  std::vector<char> fill(block_bytes);
  for (int64_t b = 0; b < f.blocks; ++b) {
    auto r = (*store)->CreateBlock();
    if (!r.ok()) {
      std::fprintf(stderr, "bench_gather: %s\n", r.status().ToString().c_str());
      return 1;
    }
    std::memset(fill.data(), static_cast<int>(b), fill.size());
    if (!(*store)->Write(*r, 0, fill.data(), block_bytes).ok()) return 1;
    (*store)->Seal(*r);
    refs.push_back(*r);
  }
  const int64_t bytes = f.tokens * 2 * f.row;  // per request
  std::vector<char> staging(bytes);
  // The memcpy reference reads from a region as large as the tier, in turn.
  std::vector<char> cold(f.blocks * block_bytes, 1);
  std::mt19937_64 rng(1);
  using Clock = std::chrono::steady_clock;
  std::printf("bench_gather: requests of %lld tokens (K and V rows of %lld bytes) from %lld host blocks of %lld "
              "bytes (%lld MiB), %d requests x %d repetitions, medians\n",
              static_cast<long long>(f.tokens), static_cast<long long>(f.row), static_cast<long long>(f.blocks),
              static_cast<long long>(block_bytes), static_cast<long long>(f.blocks * block_bytes >> 20), f.iters,
              f.reps);
  std::printf("%-8s %-34s %10s %12s\n", "request", "", "GB/s", "us/request");
  bool pass = true;
  for (const bool whole_blocks : {true, false}) {
    // Requests: (block, token) pairs grouped by block, like a recall.
    std::vector<std::vector<GatherPart>> requests(f.iters);
    std::vector<std::vector<std::pair<const char*, char*>>> rows(f.iters);
    for (int i = 0; i < f.iters; ++i) {
      std::vector<std::pair<int64_t, int>> picks;
      if (whole_blocks) {
        for (int64_t b = 0; b < f.tokens / 16; ++b) {
          const int64_t block = rng() % f.blocks;
          for (int t = 0; t < 16; ++t) picks.emplace_back(block, t);
        }
      } else {
        for (int64_t t = 0; t < f.tokens; ++t) picks.emplace_back(rng() % f.blocks, static_cast<int>(rng() % 16));
        std::sort(picks.begin(), picks.end());
      }
      for (int64_t t = 0; t < f.tokens; ++t) {
        const auto [b, tok] = picks[t];
        // Keys of the request's tokens side by side, then their values.
        char* k_dst = staging.data() + t * f.row;
        char* v_dst = staging.data() + (f.tokens + t) * f.row;
        if (requests[i].empty() || requests[i].back().block != refs[b] || whole_blocks && tok == 0) {
          requests[i].push_back({refs[b], {}});
        }
        requests[i].back().rows.push_back({tok * f.row, k_dst, f.row});
        const char* data = (*host)->Data(static_cast<BlockId>(refs[b]));  // a fresh store: ref b is host block b
        rows[i].emplace_back(data + tok * f.row, k_dst);
        rows[i].emplace_back(data + (16 + tok) * f.row, v_dst);
      }
      // V rows after all K rows of a part keeps each run contiguous.
      for (GatherPart& part : requests[i]) {
        const size_t n = part.rows.size();
        for (size_t r = 0; r < n; ++r) {
          const GatherRow k = part.rows[r];
          const int64_t t = (static_cast<char*>(k.dst) - staging.data()) / f.row;
          part.rows.push_back({k.offset + 16 * f.row, staging.data() + (f.tokens + t) * f.row, f.row});
        }
      }
    }
    std::vector<double> gather_s, latency_s, memcpy_s, rowcopy_s;
    for (int rep = 0; rep < f.reps; ++rep) {
      auto t0 = Clock::now();
      std::vector<std::shared_ptr<Transfer>> inflight;
      for (int i = 0; i < f.iters; ++i) inflight.push_back((*store)->Gather(requests[i]));
      for (const auto& t : inflight) {
        t->Wait();
        if (!t->status().ok()) return 1;
      }
      gather_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      t0 = Clock::now();
      std::shared_ptr<Transfer> one = (*store)->Gather(requests[rep % f.iters]);
      one->Wait();
      latency_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      t0 = Clock::now();
      const int64_t slices = static_cast<int64_t>(cold.size()) / bytes;
      for (int i = 0; i < f.iters; ++i) std::memcpy(staging.data(), cold.data() + (i % slices) * bytes, bytes);
      memcpy_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      t0 = Clock::now();
      for (int i = 0; i < f.iters; ++i) {
        for (const auto& [src, dst] : rows[i]) std::memcpy(dst, src, f.row);
      }
      rowcopy_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    const double total = static_cast<double>(bytes) * f.iters;
    const double g = total / Median(gather_s) / 1e9, m = total / Median(memcpy_s) / 1e9,
                 r = total / Median(rowcopy_s) / 1e9;
    const char* shape = whole_blocks ? "blocks" : "tokens";
    std::printf("%-8s %-34s %10.2f %12.1f\n", shape, "host-tier gather (BlockStore)", g,
                Median(gather_s) / f.iters * 1e6);
    std::printf("%-8s %-34s %10s %12.1f\n", shape, "  one request alone (latency)", "",
                Median(latency_s) * 1e6);
    std::printf("%-8s %-34s %10.2f %12.1f\n", shape, "memcpy of the same bytes", m, Median(memcpy_s) / f.iters * 1e6);
    std::printf("%-8s %-34s %10.2f %12.1f\n", shape, "memcpy loop over the same rows", r,
                Median(rowcopy_s) / f.iters * 1e6);
    std::printf("%-8s gather / memcpy = %.0f%% (goal >= 80%%: %s); gather / row loop = %.0f%%\n", shape,
                100 * g / m, g >= 0.8 * m ? "PASS" : "MISS", 100 * g / r);
    if (whole_blocks) pass = g >= 0.8 * m;
  }
  std::printf("goal (whole-block recall >= 80%% of memcpy): %s\n", pass ? "PASS" : "MISS");
  return 0;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) { return kvtier::Main(argc, argv); }
