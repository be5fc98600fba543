// kvtier-demo: the runtime end to end on generated K/V of a real model shape.
//
// Creates a runtime for SmolLM2-135M, prefills a prompt of synthetic K/V
// (kvtier/tools/workload/synthetic_kv.h) into every layer, decodes some steps,
// and prints what the runtime holds per region and tier, how many tokens were
// served exactly or from the sketch, and how far the attention outputs are
// from exact attention over every token.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "kvtier/backend.h"
#include "kvtier/runtime.h"
#include "cli.h"
#include "workload/reference.h"
#include "workload/synthetic_kv.h"
#include "workload/tensor.h"

ABSL_FLAG(int64_t, context, 3072, "prompt tokens prefilled into every layer");
ABSL_FLAG(int, decode, 32, "decode steps after the prompt");
ABSL_FLAG(double, budget, 0.10, "device budget, a fraction of the full cache at context + decode tokens");
ABSL_FLAG(std::string, sketch, std::string(kvtier::SketchKindName(kvtier::Options{}.sketch_kind)),
          "sketch kind: count-sketch | centroid | none (default: the library's)");
ABSL_FLAG(std::string, policy, "", "vague-token policy: drop | estimate | shrink (default: the runtime's; drop for none)");
ABSL_FLAG(int, recall, -1, "vague tokens recalled per KV head after each attend (-1: the plan's default, 0: none)");
ABSL_FLAG(std::string, proxy, std::string(kvtier::RecallProxyName(kvtier::Options{}.recall_proxy)),
          "what ranks vague tokens for recall: sketch | block-bounds | none (default: the library's)");
ABSL_FLAG(int64_t, wait_us, 0, "how long an attend waits for recalls in flight (microseconds)");
ABSL_FLAG(int64_t, host_bytes, 0, "cap on the host tier in bytes (0: none)");
ABSL_FLAG(std::string, nvme_dir, "", "directory of a disk tier below the host tier (needs --host_bytes)");
ABSL_FLAG(int64_t, nvme_bytes, int64_t{1} << 30, "cap on the disk tier in bytes");
ABSL_FLAG(int, window, 16, "last prompt queries whose attention seeds the heavy-hitter scores");
ABSL_FLAG(std::string, dtype, "f16", "K/V/Q dtype: f32 | f16 | bf16");
ABSL_FLAG(uint64_t, seed, 1, "seed of the generated K/V");
ABSL_FLAG(std::string, backend, "cpu",
          "where the runtime runs: cpu | cuda | auto (CUDA when a device is present); on CUDA the demo's K/V/Q "
          "cross to device memory as a serving stack's tensors would be");

namespace kvtier {
namespace {

using workload::Tensor;

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

int Run() {
  Options o;
  DType dtype;
  if (!cli::ParseName<DType>(absl::GetFlag(FLAGS_dtype), {{"f32", DType::kF32}, {"f16", DType::kF16}, {"bf16", DType::kBF16}},
                        dtype)) {
    std::fprintf(stderr, "kvtier-demo: unknown --dtype %s (f32, f16 or bf16)\n", absl::GetFlag(FLAGS_dtype).c_str());
    return 2;
  }
  o.shape = ModelShape::SmolLM2_135M(dtype);
  if (!cli::ParseName(absl::GetFlag(FLAGS_sketch), SketchKindName, 3, o.sketch_kind)) {
    std::fprintf(stderr, "kvtier-demo: unknown --sketch %s (count-sketch, centroid or none)\n",
                 absl::GetFlag(FLAGS_sketch).c_str());
    return 2;
  }
  if (o.sketch_kind == SketchKind::kNone) o.vague_policy = VaguePolicy::kDrop;
  if (!absl::GetFlag(FLAGS_policy).empty() &&
      !cli::ParseName(absl::GetFlag(FLAGS_policy), VaguePolicyName, 3, o.vague_policy)) {
    std::fprintf(stderr, "kvtier-demo: unknown --policy %s (drop, estimate or shrink)\n",
                 absl::GetFlag(FLAGS_policy).c_str());
    return 2;
  }
  const int64_t context = absl::GetFlag(FLAGS_context);
  const int decode = absl::GetFlag(FLAGS_decode);
  const int window = absl::GetFlag(FLAGS_window);
  if (context < 1 || decode < 1 || window < 0 || window > context) {
    std::fprintf(stderr, "kvtier-demo: need --context >= 1, --decode >= 1, 0 <= --window <= --context\n");
    return 2;
  }
  if (!cli::ParseName(absl::GetFlag(FLAGS_proxy), RecallProxyName, 3, o.recall_proxy)) {
    std::fprintf(stderr, "kvtier-demo: unknown --proxy %s (sketch, block-bounds or none)\n",
                 absl::GetFlag(FLAGS_proxy).c_str());
    return 2;
  }
  o.recall_tokens = absl::GetFlag(FLAGS_recall);
  o.recall_wait_us = absl::GetFlag(FLAGS_wait_us);
  o.host_tier_bytes = absl::GetFlag(FLAGS_host_bytes);
  o.nvme_dir = absl::GetFlag(FLAGS_nvme_dir);
  if (!o.nvme_dir.empty()) o.nvme_bytes = absl::GetFlag(FLAGS_nvme_bytes);
  o.max_context = context + decode;
  o.device_budget_fraction = absl::GetFlag(FLAGS_budget);

  if (!cli::ParseName(absl::GetFlag(FLAGS_backend), BackendKindName, 3, o.backend)) {
    std::fprintf(stderr, "kvtier-demo: unknown --backend %s (auto, cpu or cuda)\n", absl::GetFlag(FLAGS_backend).c_str());
    return 2;
  }
  absl::StatusOr<std::unique_ptr<Backend>> made = CreateBackend(o.backend);
  if (!made.ok()) {
    std::fprintf(stderr, "kvtier-demo: backend %s: %s\n", absl::GetFlag(FLAGS_backend).c_str(),
                 made.status().ToString().c_str());
    return 1;
  }
  Backend& backend = **made;
  // The runtime takes tensors in its backend's memory: host memory passes as
  // it is, else it crosses into device buffers (and outputs come back).
  const bool host_tensors = backend.caps().device_memory_host_accessible;
  std::vector<void*> device_buffers;
  auto device_buffer = [&](int64_t bytes) -> void* {
    if (host_tensors) return nullptr;
    absl::StatusOr<void*> p = backend.AllocateDevice(bytes);
    if (!p.ok()) return nullptr;
    device_buffers.push_back(*p);
    return *p;
  };
  auto to_device = [&](void* dev, const void* host, int64_t bytes) -> const void* {
    if (host_tensors) return host;
    return backend.Copy(dev, host, bytes, CopyKind::kHostToDevice).ok() ? dev : nullptr;
  };
  absl::StatusOr<std::unique_ptr<Runtime>> created = Runtime::Create(o, std::move(*made));
  if (!created.ok()) {
    std::fprintf(stderr, "kvtier-demo: %s\n", created.status().ToString().c_str());
    return 1;
  }
  Runtime& rt = **created;
  const ModelShape& sh = o.shape;
  const int L = sh.layers, H = sh.kv_heads, G = sh.group(), d = sh.head_dim;
  std::printf("kvtier-demo: %s on the %.*s backend, %lld prompt tokens + %d decode steps\n", sh.ToString().c_str(),
              static_cast<int>(rt.backend_name().size()), rt.backend_name().data(), static_cast<long long>(context),
              decode);
  std::printf("plan: %s\n", rt.plan().Explain().c_str());
  std::printf("sketch %s, policy %s, recall %d tokens per KV head per step ranked by %s\n",
              std::string(SketchKindName(o.sketch_kind)).c_str(), std::string(VaguePolicyName(o.vague_policy)).c_str(),
              rt.plan().recall_tokens, std::string(RecallProxyName(o.recall_proxy)).c_str());

  workload::SyntheticKvOptions wo;
  wo.seed = absl::GetFlag(FLAGS_seed);
  const workload::SyntheticKv gen(sh, wo);
  const SequenceId seq = 1;
  if (absl::Status st = rt.AddSequence(seq); !st.ok()) {
    std::fprintf(stderr, "kvtier-demo: %s\n", st.ToString().c_str());
    return 1;
  }

  // The exact K/V (rounded to the dtype) of every layer, for the reference.
  const int64_t total = context + decode;
  const int64_t es = static_cast<int64_t>(DTypeSize(dtype));
  void* dev_k = device_buffer(context * H * d * es);
  void* dev_v = device_buffer(context * H * d * es);
  void* dev_q = device_buffer(sh.q_heads * d * es);
  void* dev_out = device_buffer(sh.q_heads * d * 4);
  if (!host_tensors && (dev_k == nullptr || dev_v == nullptr || dev_q == nullptr || dev_out == nullptr)) {
    std::fprintf(stderr, "kvtier-demo: cannot allocate the device buffers of the demo's tensors\n");
    return 1;
  }
  auto free_buffers = absl::MakeCleanup([&] {
    for (void* p : device_buffers) backend.FreeDevice(p);
  });
  std::vector<std::vector<float>> keys(L), values(L);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> q(sh.q_heads * d);
  for (int l = 0; l < L; ++l) {
    keys[l].resize(total * H * d);
    values[l].resize(total * H * d);
    gen.KeysValues(l, 0, context, keys[l].data(), values[l].data());
    for (int64_t i = 0; i < context * H * d; ++i) {
      keys[l][i] = workload::RoundTo(dtype, keys[l][i]);
      values[l][i] = workload::RoundTo(dtype, values[l][i]);
    }
    // Heavy-hitter scores: the attention of the last `window` prompt queries.
    std::vector<float> scores(context * H, 0.0f);
    for (int64_t w = context - window; w < context; ++w) {
      gen.Query(l, w, q.data());
      for (int qh = 0; qh < sh.q_heads; ++qh) {
        const int h = qh / G;
        std::vector<double> logit(w + 1);
        double m = -INFINITY, z = 0;
        for (int64_t i = 0; i <= w; ++i) {
          double s = 0;
          for (int j = 0; j < d; ++j) s += q[qh * d + j] * keys[l][(i * H + h) * d + j];
          logit[i] = s * scale;
          m = std::max(m, logit[i]);
        }
        for (int64_t i = 0; i <= w; ++i) z += (logit[i] = std::exp(logit[i] - m));
        for (int64_t i = 0; i <= w; ++i) scores[i * H + h] += static_cast<float>(logit[i] / z);
      }
    }
    Tensor k(dtype, 0), v(dtype, 0);
    k.Assign(keys[l].data(), context * H * d);
    v.Assign(values[l].data(), context * H * d);
    AppendOptions ao;
    ao.scores = scores.data();
    const void* kd = to_device(dev_k, k.data(), context * H * d * es);
    const void* vd = to_device(dev_v, v.data(), context * H * d * es);
    if (kd == nullptr || vd == nullptr) {
      std::fprintf(stderr, "kvtier-demo: copy of layer %d's K/V to the device failed\n", l);
      return 1;
    }
    if (absl::Status st = rt.Append(seq, l, kd, vd, context, ao); !st.ok()) {
      std::fprintf(stderr, "kvtier-demo: prefill of layer %d: %s\n", l, st.ToString().c_str());
      return 1;
    }
  }
  std::printf("prefill: %d layers x %lld tokens in %.2f s\n", L, static_cast<long long>(context), Seconds(t0));

  // Decode.
  double err_sum = 0, attend_s = 0;
  int64_t err_n = 0;
  AttendCounts served;
  Tensor qt(dtype, sh.q_heads * d), kt(dtype, H * d), vt(dtype, H * d);
  std::vector<float> out(sh.q_heads * d);
  std::vector<double> ref(d);
  t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < decode; ++step) {
    const int64_t pos = context + step;
    for (int l = 0; l < L; ++l) {
      float* kp = keys[l].data() + pos * H * d;
      float* vp = values[l].data() + pos * H * d;
      gen.KeysValues(l, pos, 1, kp, vp);
      for (int i = 0; i < H * d; ++i) {
        kp[i] = workload::RoundTo(dtype, kp[i]);
        vp[i] = workload::RoundTo(dtype, vp[i]);
      }
      kt.Assign(kp, H * d);
      vt.Assign(vp, H * d);
      const void* kd = to_device(dev_k, kt.data(), H * d * es);
      const void* vd = to_device(dev_v, vt.data(), H * d * es);
      if (kd == nullptr || vd == nullptr) {
        std::fprintf(stderr, "kvtier-demo: copy of a token's K/V to the device failed\n");
        return 1;
      }
      if (absl::Status st = rt.Append(seq, l, kd, vd, 1); !st.ok()) {
        std::fprintf(stderr, "kvtier-demo: append: %s\n", st.ToString().c_str());
        return 1;
      }
      gen.Query(l, pos, q.data());
      qt.Assign(q.data(), sh.q_heads * d);
      const std::vector<float> qr = qt.ToFloat();
      AttendOptions opts;
      opts.out_dtype = DType::kF32;
      const auto ta = std::chrono::steady_clock::now();
      const void* qd = to_device(dev_q, qt.data(), sh.q_heads * d * es);
      absl::StatusOr<AttendCounts> c = qd == nullptr ? absl::InternalError("copy of q to the device failed")
                                                     : rt.Attend(seq, l, qd, host_tensors ? out.data() : dev_out, opts);
      if (c.ok() && !host_tensors) {
        if (absl::Status st = backend.Copy(out.data(), dev_out, sh.q_heads * d * 4, CopyKind::kDeviceToHost); !st.ok())
          c = st;
      }
      attend_s += Seconds(ta);
      if (!c.ok()) {
        std::fprintf(stderr, "kvtier-demo: attend: %s\n", c.status().ToString().c_str());
        return 1;
      }
      served += *c;
      for (int qh = 0; qh < sh.q_heads; ++qh) {
        const int h = qh / G;
        workload::ExactAttention(qr.data() + qh * d, keys[l].data() + h * d, values[l].data() + h * d, pos + 1, d,
                                 static_cast<int64_t>(H) * d, scale, nullptr, ref.data());
        err_sum += workload::RelativeError(out.data() + qh * d, ref.data(), d);
        ++err_n;
      }
    }
  }
  const double decode_s = Seconds(t0);
  if (absl::Status st = rt.CheckInvariants(); !st.ok()) {
    std::fprintf(stderr, "kvtier-demo: %s\n", st.ToString().c_str());
    return 1;
  }

  const RuntimeStats st = rt.Stats();
  const RegionCounts& r = st.regions;
  std::printf("\nregions (token-heads over %d layers x %d KV heads):\n", L, H);
  std::printf("  %-10s %10lld   device, exact\n", "sink", static_cast<long long>(r.sink));
  std::printf("  %-10s %10lld   device, exact\n", "recent", static_cast<long long>(r.recent));
  std::printf("  %-10s %10lld   device, exact (heavy hitters)\n", "candidate", static_cast<long long>(r.candidate));
  std::printf("  %-10s %10lld   device, exact (recalled)\n", "recalled", static_cast<long long>(r.recalled));
  std::printf("  %-10s %10lld   device sketch + host tier\n", "vague", static_cast<long long>(r.vague));
  const DeviceBytes& b = st.device_reserved;
  std::printf("\ndevice bytes reserved (budget %lld):\n", static_cast<long long>(st.device_budget_bytes));
  std::printf("  sink %lld, recent %lld, candidate %lld, staging %lld, sketch %lld, metadata %lld = %lld\n",
              static_cast<long long>(b.sink), static_cast<long long>(b.recent), static_cast<long long>(b.candidate),
              static_cast<long long>(b.staging), static_cast<long long>(b.sketch), static_cast<long long>(b.metadata),
              static_cast<long long>(b.total()));
  const StoreStats& ss = st.store;
  std::printf("host tier: %lld bytes in %lld blocks of %lld (pinned %lld, NUMA node %d)\n",
              static_cast<long long>(st.host_tier.bytes_in_use), static_cast<long long>(st.host_tier.blocks_in_use),
              static_cast<long long>(st.host_tier.block_bytes), static_cast<long long>(st.host_tier.pinned_bytes),
              st.host_tier.numa_node);
  if (!o.nvme_dir.empty()) {
    std::printf("disk tier: %lld bytes in %lld blocks; %lld demotions, %lld promotions\n",
                static_cast<long long>(st.disk_tier.bytes_in_use), static_cast<long long>(st.disk_tier.blocks_in_use),
                static_cast<long long>(ss.demotions), static_cast<long long>(ss.promotions));
  }
  std::printf("bytes moved: device->host %lld, host->device %lld, host->disk %lld, disk->host %lld\n",
              static_cast<long long>(ss.bytes_device_to_host), static_cast<long long>(ss.bytes_host_to_device),
              static_cast<long long>(ss.bytes_host_to_disk), static_cast<long long>(ss.bytes_disk_to_host));
  const double all = static_cast<double>(served.exact + served.from_sketch + served.dropped);
  std::printf("\nserved over %d decode steps x %d layers (token-heads): exact %lld (%.1f%%), from sketch %lld (%.1f%%), "
              "dropped %lld (%.1f%%)\n",
              decode, L, static_cast<long long>(served.exact), 100.0 * served.exact / all,
              static_cast<long long>(served.from_sketch), 100.0 * served.from_sketch / all,
              static_cast<long long>(served.dropped), 100.0 * served.dropped / all);
  const RecallStats& rc = st.recall;
  std::printf("recall (token-heads): requested %lld, exact hits %lld, sketch fallbacks %lld, late %lld, wasted %lld, "
              "failed %lld\n",
              static_cast<long long>(rc.requested), static_cast<long long>(rc.exact_hits),
              static_cast<long long>(rc.sketch_fallbacks), static_cast<long long>(rc.late_arrivals),
              static_cast<long long>(rc.wasted_prefetches), static_cast<long long>(rc.failed));
  std::printf("attention output vs exact attention over all tokens: mean relative error %.4f\n", err_sum / err_n);
  std::printf("decode: %.2f s (%.3f ms per layer attend in the runtime)\n", decode_s, 1e3 * attend_s / (decode * L));
  return 0;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "runs the kvtier runtime end to end on generated K/V of SmolLM2-135M and prints what it holds and served.\n"
      "Usage: kvtier-demo [--context N] [--decode N] [--budget F] [--sketch KIND] [--policy P] [--recall N]\n"
      "                   [--proxy P] [--wait_us N] [--host_bytes N] [--nvme_dir DIR --nvme_bytes N]\n"
      "                   [--backend cpu|cuda|auto]");
  kvtier::cli::ListOwnFlagsInHelp();
  absl::ParseCommandLine(argc, argv);
  return kvtier::Run();
}
