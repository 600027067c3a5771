// AdamW with the DeepSeek-V3 precision recipe: FP32 master weights, first and second moments stored in
// BF16 (rounded to nearest even after every update), bias correction, decoupled weight decay on matrices
// only (not on 1-D tensors: norms, biases), global-norm gradient clipping, linear warmup then cosine decay.
// Every result is independent of the number of threads.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "runtime/model/params.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/tensor.hpp"

namespace moerl {

struct AdamWConfig {
  double lr = 3e-4;            // peak learning rate, reached at the end of warmup
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;  // DeepSeek-V3's betas
  double weight_decay = 0.1;   // decoupled: p -= lr * weight_decay * p, on tensors of rank >= 2
  double clip_grad_norm = 1.0; // global L2 norm limit over trainable gradients; 0 = off
  int64_t warmup_steps = 0;    // linear warmup over this many steps
  int64_t total_steps = 1000;  // cosine decay ends here
  double min_lr_ratio = 0.1;   // the learning rate at total_steps and after, as a fraction of lr
};

// Throws moerl::Error naming the first field outside its range (betas in [0, 1), eps > 0, ...).
void validate(const AdamWConfig& config);

// The learning rate of 0-based `step`: lr * (step + 1) / warmup_steps during warmup (so step 0 already
// moves and step warmup_steps - 1 uses lr), then cosine from lr at step warmup_steps down to
// lr * min_lr_ratio at total_steps, constant after.
double learning_rate(const AdamWConfig& config, int64_t step);

// Σ g_i² of n floats in double, in a fixed order (blocks of 2^14 with 8 interleaved accumulators, then the
// blocks in order) whatever the thread count: the gradient norm every optimizer of a run computes alike.
double sum_squares(const float* g, int64_t n);

// The global L2 norm of the trainable gradients, summed in double in a fixed order (parameters by name,
// fixed-size blocks within one): the same bits for any number of threads.
double grad_norm(const Params& params);
// Scales the trainable gradients in place so their global norm is at most `max_norm` (> 0); returns the
// norm before clipping. Gradients with a non-finite norm are left alone.
double clip_grad_norm(Params& params, double max_norm);

struct StepStats {
  double grad_norm = 0;  // before clipping
  double lr = 0;         // learning_rate(config, step)
  bool skipped = false;  // the gradient norm was NaN or Inf: weights, moments and step count left unchanged
};

class AdamW {
 public:
  // Allocates zero moments for every parameter that is trainable now. `params` must outlive the optimizer.
  AdamW(Params& params, AdamWConfig config);

  // Clips the gradients (in place) to clip_grad_norm, then applies one AdamW update at
  // learning_rate(config, step), where `step` is the 0-based training step. Bias correction counts the
  // updates this optimizer has applied (steps_taken() + 1), which a restored state carries over.
  StepStats step(int64_t step);

  int64_t steps_taken() const { return t_; }
  const AdamWConfig& config() const { return config_; }

  // For checkpoints: "optimizer.exp_avg.<param>" and "optimizer.exp_avg_sq.<param>" (BF16, the parameter's
  // shape) for every trainable parameter, and "optimizer.step" (I64 [1]: steps_taken()). Pointers into this
  // optimizer, valid until its next step or load.
  std::map<std::string, const Tensor*> state() const;
  // Restores what state() wrote (other tensors in `saved`, such as model weights, are ignored). Throws
  // moerl::Error naming the file and tensor when a moment is missing, has another shape or dtype, or
  // belongs to no trainable parameter. Continuing after a restore is bit-identical to never stopping.
  void load_state(const SafeTensors& saved);

 private:
  struct Slot {
    const std::string* name;
    Param* param;
    Tensor exp_avg;     // BF16, m
    Tensor exp_avg_sq;  // BF16, v
  };
  Params& params_;
  AdamWConfig config_;
  std::vector<Slot> slots_;  // trainable parameters in name order
  int64_t t_ = 0;
  Tensor step_tensor_;       // I64 [1], mirrors t_ for state()
};

}  // namespace moerl
