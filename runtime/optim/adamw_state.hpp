// How an AdamW state lies in optimizer.safetensors — per trainable parameter NAME, optimizer.exp_avg.NAME and
// optimizer.exp_avg_sq.NAME (BF16, the parameter's shape), and optimizer.step (I64 [1], steps taken) — and the
// checks every AdamW that loads one makes before it copies anything (moerl::AdamW, the GPU's GpuAdamW and
// GpuDataParallel), so that a bad file is refused in the same words whichever loads it and leaves the optimizer
// as it was. Errors name saved.source.
#pragma once
#include <cstdint>
#include <set>
#include <string>

#include "runtime/safetensors.hpp"
#include "runtime/tensor.hpp"

namespace moerl::adamw_state {

inline constexpr const char* kExpAvg = "optimizer.exp_avg.";
inline constexpr const char* kExpAvgSq = "optimizer.exp_avg_sq.";
inline constexpr const char* kStep = "optimizer.step";

// The saved moment `key` (kExpAvg or kExpAvgSq + the parameter's name), which must be BF16 of `shape`.
const Tensor& moment(const SafeTensors& saved, const std::string& key, const Shape& shape);

// Both saved moments of the parameter `name` of `shape` (exp_avg, then exp_avg_sq, each checked as moment()), their
// names added to `known` for refuse_unknown.
struct Moments {
  const Tensor* exp_avg;
  const Tensor* exp_avg_sq;
};
Moments moments(const SafeTensors& saved, const std::string& name, const Shape& shape, std::set<std::string>& known);

// Refuses a saved optimizer.* tensor whose name is not in `known` (a state saved for another model).
void refuse_unknown(const SafeTensors& saved, const std::set<std::string>& known);

// The saved step count: one non-negative I64.
int64_t step(const SafeTensors& saved);

}  // namespace moerl::adamw_state
