// A program outside the kvtier tree, built against the installed package.
#include <cstdio>
#include <vector>

#include "kvtier/runtime.h"

int main() {
  kvtier::Options o;
  o.shape = {.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .dtype = kvtier::DType::kF32};
  o.max_context = 64;
  o.device_budget_fraction = 1.0;
  auto rt = kvtier::Runtime::Create(o);
  if (!rt.ok()) {
    std::printf("create: %s\n", rt.status().ToString().c_str());
    return 1;
  }
  std::vector<float> k(4 * 2 * 64, 0.5f), v(4 * 2 * 64, 1.0f), q(4 * 64, 0.1f), out(4 * 64);
  if (!(*rt)->AddSequence(7).ok() || !(*rt)->Append(7, 0, k.data(), v.data(), 4).ok()) return 1;
  auto c = (*rt)->Attend(7, 0, q.data(), out.data());
  if (!c.ok()) return 1;
  // Every value is 1, so every output is 1.
  for (float x : out) {
    if (x != 1.0f) return 1;
  }
  std::printf("exact %lld\n", static_cast<long long>(c->exact));
  return 0;
}
