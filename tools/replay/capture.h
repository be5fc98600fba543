// Captured Q/K/V of a real model (docs/capture.md) as kvtier-replay's
// content for --content full: model layer l reads captured layer
// layers[l % layers.size()], position p reads row p % tokens.
#ifndef KVTIER_TOOLS_REPLAY_CAPTURE_H_
#define KVTIER_TOOLS_REPLAY_CAPTURE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvtier/model_shape.h"

namespace kvtier::replay {

class Capture {
 public:
  // Reads DIR/manifest.json and every layer's q/k/v file into memory,
  // converted to shape.dtype. Errors: a manifest that is not format
  // "kvtier-capture" version 1 (dtype f16, byte order little), q_heads,
  // kv_heads or head_dim different from `shape`'s, a file that is missing or
  // not exactly tokens * heads * head_dim * 2 bytes.
  static absl::StatusOr<Capture> Load(const std::string& dir, const ModelShape& shape);

  const std::string& dir() const { return dir_; }
  const std::string& model() const { return model_; }
  int64_t tokens() const { return tokens_; }
  const std::vector<int>& layers() const { return layers_; }
  // The captured layer (an index in layers()) that model layer `layer` reads.
  int SourceOf(int layer) const { return layer % static_cast<int>(layers_.size()); }
  // OK when the rows fit `shape` (heads, head_dim, dtype).
  absl::Status Check(const ModelShape& shape) const;

  // K and V rows ([n][kv_heads][head_dim], model dtype) of positions
  // [first, first + n) of model layer `layer`.
  void KeysValues(int layer, int64_t first, int64_t n, void* k, void* v) const;
  // Query ([q_heads][head_dim], model dtype) of the token at `pos`.
  void Query(int layer, int64_t pos, void* q) const;

 private:
  std::string dir_, model_;
  int q_heads_ = 0, kv_heads_ = 0, head_dim_ = 0;
  DType dtype_ = DType::kF16;
  int64_t tokens_ = 0;
  std::vector<int> layers_;
  // Per captured layer, rows in the model dtype.
  std::vector<std::vector<char>> q_, k_, v_;
};

}  // namespace kvtier::replay

#endif  // KVTIER_TOOLS_REPLAY_CAPTURE_H_
