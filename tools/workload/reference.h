// Exact attention in double precision: the reference every approximation in
// kvtier is measured against. Thread-safe (no state).
#ifndef KVTIER_TOOLS_WORKLOAD_REFERENCE_H_
#define KVTIER_TOOLS_WORKLOAD_REFERENCE_H_

#include <cmath>
#include <cstdint>
#include <vector>

namespace kvtier::workload {

// out[d] = sum_i softmax_i(scale * q.k_i + bias_i) v_i over n keys. keys and
// values are [n] rows at the given row stride (in floats); bias may be null.
inline void ExactAttention(const float* q, const float* keys, const float* values, int64_t n, int d,
                           int64_t stride, double scale, const double* bias, double* out) {
  std::vector<double> logit(n);
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += static_cast<double>(q[j]) * keys[i * stride + j];
    logit[i] = scale * s + (bias ? bias[i] : 0.0);
    m = std::max(m, logit[i]);
  }
  double z = 0;
  for (int j = 0; j < d; ++j) out[j] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = std::exp(logit[i] - m);
    z += e;
    for (int j = 0; j < d; ++j) out[j] += e * values[i * stride + j];
  }
  for (int j = 0; j < d; ++j) out[j] /= z;
}

// ||a - b|| / ||b|| over n values.
inline double RelativeError(const float* a, const double* b, int n) {
  double num = 0, den = 0;
  for (int i = 0; i < n; ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace kvtier::workload

#endif  // KVTIER_TOOLS_WORKLOAD_REFERENCE_H_
