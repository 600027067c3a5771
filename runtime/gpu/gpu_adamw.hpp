// moerl::AdamW (runtime/optim/adamw.hpp) on device parameters: the same DeepSeek-V3 recipe and the same bits.
// FP32 masters, BF16 moments rounded to nearest even, bias correction, decoupled weight decay on tensors of
// rank >= 2 only, global-norm clipping, a step skipped (weights, moments and update count unchanged) when the
// norm is not finite, learning_rate()'s warmup + cosine schedule. kernels/cuda/adamw.hpp says why the
// per-element update is the CPU's bit for bit. The global norm is a sum of exact double squares in another
// order than the CPU's, so it may differ in its last bits; the clip factor, rounded to FP32, is the same but
// for about one chance in 10^7 (max_norm / norm within that difference of an FP32 rounding boundary).
//
// Parameters that lie back to back in device memory (value and gradient both adjacent, the same decay rule)
// are updated and measured as one span, and all spans in one launch per kernel (cuda::AdamWSpans): four or five
// launches a step for the norm, the clip factor and the update, however many spans. With a GpuModel, the update of
// each FP8 weight also writes the model's prepared FP8 copy of it (cuda::AdamWFp8Copies), so the next forward does
// not read the weight again.
// state() and load_state() use AdamW's tensor names, dtypes and shapes, so optimizer.safetensors files move
// between the CPU and the GPU.
// Tried and not kept (2026-12-01): the norm's chunk sums made per decoder layer as its backward ends, on a stream
// of their own beside the rest of the backward (the same bits): bench-600m fp8 319.9k vs 320.8k tokens/s, 3 rounds
// interleaved; the 2.4 GB pass competes with the backward's own traffic (bench/results/2026-12-01-gpu-norm-beside-*).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/adamw.hpp"
#include "runtime/gpu/gpu_model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/tensor.hpp"

namespace moerl::gpu {

class GpuAdamW {
 public:
  // Zero moments for every trainable parameter of `params` (in name order, as GpuModel::params()); work is
  // ordered on `stream`; `after_update` runs after every applied update (a GpuModel's prepared weights must be
  // rebuilt). `reduce_norm`, when given, runs once per step with the device double holding this optimizer's
  // Σ g² (queued on `stream`, not yet read) and must leave the global sum there before returning: a ZeRO-1
  // shard's optimizer sums the shards' partial sums over its data-parallel group (gpu_data_parallel.hpp).
  // The parameters' device memory must outlive the optimizer. Throws moerl::Error on a bad config, a duplicated
  // name, or a trainable parameter without a gradient.
  GpuAdamW(std::vector<DeviceParam> params, AdamWConfig config, cudaStream_t stream,
           std::function<void()> after_update = {}, std::function<void(double*)> reduce_norm = {});
  // The optimizer of a GpuModel: its trainable parameters, on its stream, calling linear().weights_changed()
  // after each update and model.settle_grads() before each step (gradients marked by zero_grad and not written
  // since read as zero). Inline, so code that only uses the constructor above links without the GPU model.
  // fuse_fp8: the update also writes the model's prepared FP8 weights (cuda::AdamWFp8Copies: their 128x128-block
  // codes from the new values in registers), where the next forward would otherwise quantize them again from the
  // masters, a read of every FP8 weight (the same bytes either way). Default: MOERL_ADAMW_FP8 = fused (or apart).
  GpuAdamW(GpuModel& model, AdamWConfig config, bool fuse_fp8 = fuse_fp8_default())
      : GpuAdamW(model.params(), config, model.stream(), [&model] { model.linear().weights_changed(); }) {
    before_step_ = [&model] { model.settle_grads(); };
    if (fuse_fp8) {
      fp8_copies_ = [&model] { return model.linear().fp8_weight_copies(); };
      fp8_written_ = [&model](const std::vector<cuda::Fp8WeightCopy>& written) {
        model.linear().weights_changed(written, model.stream());
      };
    }
  }
  // MOERL_ADAMW_FP8: fused (the default) or apart, read once.
  static bool fuse_fp8_default();
  ~GpuAdamW();
  GpuAdamW(const GpuAdamW&) = delete;
  GpuAdamW& operator=(const GpuAdamW&) = delete;

  // As AdamW::step: one update at learning_rate(config, step) from the clipped gradients (step is the 0-based
  // training step; bias correction counts steps_taken() + 1). Unlike AdamW::step the gradients are not scaled in
  // place: the clip factor is applied inside the update kernel (the same FP32 product), which saves a pass over
  // them; they keep the backward's values. Waits once, for the norm (the update already queued behind it where the
  // spans are batched: the clip factor is then computed on the device, the same float).
  StepStats step(int64_t step);

  int64_t steps_taken() const { return t_; }
  const AdamWConfig& config() const { return config_; }
  // Groups of back-to-back parameters, each one launch per kernel (diagnostics and tests).
  size_t span_count() const { return spans_.size(); }
  // Prepared FP8 weights (cuda::Fp8WeightCopy) the last update wrote itself (diagnostics and tests).
  size_t fp8_copies_written() const { return fp8_fused_.size(); }
  // BF16 elements of each moment (the parameters' elements, each span padded to 128).
  size_t moment_elements() const { return moment_elements_; }
  // Device bytes of the moments and the norm accumulator.
  size_t device_bytes() const { return moment_elements_ * 2 * sizeof(uint16_t) + sizeof(double); }

  // Host copies of AdamW::state(): "optimizer.exp_avg.<param>", "optimizer.exp_avg_sq.<param>" (BF16, the
  // parameter's shape) and "optimizer.step" (I64 [1]).
  std::map<std::string, Tensor> state() const;
  // Restores what state() (or AdamW::state()) wrote, with AdamW::load_state's checks and messages; a bad file
  // leaves the optimizer as it was.
  void load_state(const SafeTensors& saved);

 private:
  struct Slot {  // one trainable parameter's moments
    std::string name;
    Shape shape;
    int64_t numel = 0;
    uint16_t* m = nullptr;
    uint16_t* v = nullptr;
  };
  // A span: adjacent trainable parameters with one decay rule (decay: rank >= 2).
  using Span = cuda::AdamWSpan;
  AdamWConfig config_;
  cudaStream_t stream_;
  std::function<void()> after_update_;
  std::function<void()> before_step_;
  std::function<void(double*)> reduce_norm_;
  std::vector<Slot> slots_;  // trainable parameters in the given (name) order
  std::vector<Span> spans_;
  // Every span's norm and update in one launch per kernel (when all are aligned; MOERL_ADAMW_LAUNCH=per-span: one
  // launch per span and kernel, for comparing on the device).
  std::unique_ptr<cuda::AdamWSpans> batched_;
  // The fused FP8 weights (GpuAdamW(GpuModel&) with fuse_fp8): fp8_copies_ lists the model's prepared copies (they
  // appear with the first forward), plan_fp8 picks those lying whole in a span with decay and not sharing elements
  // with another copy (a weight prepared in two forms), fused_ updates and quantizes them, rest_ updates every other
  // element, fp8_written_ tells the model which copies are current.
  std::function<std::vector<cuda::Fp8WeightCopy>()> fp8_copies_;
  std::function<void(const std::vector<cuda::Fp8WeightCopy>&)> fp8_written_;
  std::vector<cuda::Fp8WeightCopy> fp8_planned_;  // what fp8_copies_ gave when the plan was made
  std::vector<cuda::Fp8WeightCopy> fp8_fused_;    // the copies fused_ writes
  std::unique_ptr<cuda::AdamWFp8Copies> fused_;
  std::unique_ptr<cuda::AdamWSpans> rest_;
  void plan_fp8(const std::vector<cuda::Fp8WeightCopy>& copies);  // with batched_ only (step() calls it so)
  // step() for spans updated one launch each: the host reads the norm, then queues the updates at t.
  StepStats step_after_norm(StepStats stats, int64_t t);
  uint16_t* m_ = nullptr;    // all first moments, BF16 codes
  uint16_t* v_ = nullptr;    // all second moments
  size_t moment_elements_ = 0;
  double* norm_sq_ = nullptr;  // one device double: Σ g² of the step
  // With batched_: clipping's factor on the device (cuda::clip_factor), so the update is queued right behind the
  // norm; the norm comes back into pinned memory and the host waits for that copy alone (norm_ready_), not for the
  // update (with a wait before the update, the GPU idled ~0.1 ms a step: the copy, the host's wake-up, the launch).
  float* factor_ = nullptr;
  double* norm_host_ = nullptr;
  cudaEvent_t norm_ready_ = nullptr;
  int64_t t_ = 0;
};

}  // namespace moerl::gpu
