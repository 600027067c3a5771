// AdamW's per-element update (runtime/optim/adamw.hpp) as an entry point on any contiguous span of one
// parameter, for optimizers that own only part of the moments (ZeRO-1, runtime/parallel/dp_zero.hpp).
// The arithmetic is AdamW::step's, operation for operation: a span updated here holds the same bits as the
// same elements updated by AdamW::step with the same gradients (tested).
#pragma once
#include <cstdint>

#include "runtime/optim/adamw.hpp"

namespace moerl {

// The scalars of one update, computed once per step.
struct AdamWStepScalars {
  double lr = 0;               // learning_rate(config, step)
  float beta1 = 0, beta2 = 0, one_minus_beta1 = 0, one_minus_beta2 = 0;
  float step_size = 0;         // lr / (1 - beta1^t)
  float sqrt_bias2 = 0;        // sqrt(1 - beta2^t)
  float eps = 0;
  float matrix_decay = 1;      // 1 - lr * weight_decay, for tensors of rank >= 2
};

// For 0-based training step `step` and the 1-based update count `t` (bias correction).
AdamWStepScalars adamw_step_scalars(const AdamWConfig& config, int64_t step, int64_t t);

// The decay factor of a tensor of rank `rank`: matrices shrink, 1-D tensors (norms, biases) do not.
inline float adamw_decay(const AdamWStepScalars& s, int rank) { return rank >= 2 ? s.matrix_decay : 1.0f; }

// p[n] (FP32 master), g[n] (FP32, already clipped), m[n], v[n] (BF16 codes): one AdamW update in place with
// the given decay factor. Parallel over elements; the result does not depend on the number of threads.
void adamw_update_span(const AdamWStepScalars& s, float decay, float* p, const float* g, uint16_t* m, uint16_t* v,
                       int64_t n);

}  // namespace moerl
