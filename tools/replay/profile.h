// Model presets and shape files, and the hardware profile the virtual clock
// charges transfers and compute with.
//
// Shape file and profile file: one `key = value` per line, '#' comments.
//   shape keys:   layers, q_heads, kv_heads, head_dim, dtype (f32|f16|bf16)
//   profile keys: the fields of HardwareProfile below, by name.
#ifndef KVTIER_TOOLS_REPLAY_PROFILE_H_
#define KVTIER_TOOLS_REPLAY_PROFILE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvtier/model_shape.h"

namespace kvtier::replay {

// smollm2-135m, llama-3.1-8b, qwen2.5-7b, llama-3.1-70b (fp16, their real
// attention shapes).
absl::StatusOr<ModelShape> ModelPreset(absl::string_view name);
std::vector<std::string> ModelPresetNames();
absl::StatusOr<ModelShape> ParseShapeFile(absl::string_view text);
// The tools' --shape / --model: the shape file at `shape_file` when it is
// not empty, else the preset `preset`; *name becomes the file's path or the
// preset's name. Errors name the file.
absl::StatusOr<ModelShape> LoadShape(const std::string& shape_file, absl::string_view preset, std::string* name);

// What the virtual clock charges. Defaults: one data-centre GPU on PCIe 4.0
// x16 with a datacentre NVMe drive.
struct HardwareProfile {
  double device_gbps = 2000;       // device memory read bandwidth (attention over resident K/V + sketch)
  double h2d_gbps = 25;            // host -> device copies (recalls)
  double d2h_gbps = 25;            // device -> host copies (tokens leaving the device)
  double h2d_latency_us = 10;      // per recall transfer (one per KV head that recalls in a step)
  double nvme_read_gbps = 6;       // disk -> host (promotions)
  double nvme_write_gbps = 3;      // host -> disk (demotions)
  double nvme_latency_us = 80;     // per block read from disk
  double step_base_us = 20000;     // the model's own work per decode step (weights, MLPs), batch-independent
  double prefill_token_us = 100;   // the model's own work per prompt token of a prefill
  // Capacities, for kvtier-plan (kvtier-replay takes them from its flags).
  double device_kv_bytes = 40e9;   // GPU memory available for the KV cache
  double host_bytes = 256e9;
  double nvme_bytes = 2e12;
};

absl::StatusOr<HardwareProfile> ParseProfile(absl::string_view text, HardwareProfile base = {});
std::string ProfileToString(const HardwareProfile& p);
// A profile file over the defaults; errors name the file.
absl::StatusOr<HardwareProfile> LoadProfile(const std::string& path);

// "1.5e9", "2GiB", "512MB", "4096" -> bytes; InvalidArgument with the text.
absl::StatusOr<int64_t> ParseBytes(absl::string_view text);

}  // namespace kvtier::replay

#endif  // KVTIER_TOOLS_REPLAY_PROFILE_H_
