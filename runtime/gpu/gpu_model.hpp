// The DeepSeek-V3 model on one GPU: moerl::Model (runtime/model/model.hpp) with the same forward, backward,
// losses, router-bias update and expert loads, built from the CUDA ops in kernels/cuda/. Parameters, gradients
// and activations live on the device; token batches and reports on the host.
//
// Precision (ForwardOptions::precision), as DeepSeek-V3 §3.3:
//   - attention projections, dense FFN, shared and routed experts: cuda::linear_* in the chosen precision
//     (fp32 / bf16 / fp8: Fprop, Dgrad and Wgrad all in FP8 for fp8);
//   - router, norms, RoPE, attention core, embedding, cross-entropy: FP32;
//   - output head: FP32 in the fp32 recipe, BF16 operands with FP32 accumulation in bf16 and fp8 (DeepSeek
//     keeps the head in BF16; the CPU reference keeps it in FP32, which the GPU-vs-CPU tolerances allow for).
// Parameters are FP32 masters in one device allocation, gradients in another, each tensor 256-byte aligned;
// a layer's routed experts are stacked ([E, I, H] gate, [E, I, H] up, [E, H, I] down) so a grouped GEMM can
// take them whole. Activations are kept in device buffers sized on the first forward of a shape and reused;
// temporaries come from the device's stream-ordered pool, whose release threshold is raised so that a
// steady-state step allocates nothing from the driver.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/linear.hpp"
#include "runtime/model/config.hpp"
#include "runtime/model/feed_forward.hpp"
#include "runtime/model/model.hpp"
#include "runtime/model/params.hpp"

namespace moerl::gpu {

// One parameter on the device, by its published name.
struct DeviceParam {
  std::string name;
  Shape shape;
  float* value = nullptr;  // FP32 master
  float* grad = nullptr;   // FP32, accumulated by backward, zeroed by zero_grad
  int64_t numel = 0;
  bool trainable = true;   // false for e_score_correction_bias
  // zero_grad marks the gradient unset instead of clearing it: its contents are stale until the first producer of
  // the backward writes it whole (the Wgrad GEMMs' beta = 0) or clears it (producers that only add); what no
  // producer touched is cleared at the end of the backward (gpu::detail::ParamStore::settle_grads). Bookkeeping of
  // the gradient buffer, so mutable: the layers hold const parameters.
  mutable bool grad_unset = false;
};

class GpuModel {
 public:
  // Allocates the parameters (zero) and gradients on the current device; makes its own stream. `shards`: the
  // flat value and gradient allocations are padded to a multiple of shards x 256 bytes, so that a data-parallel
  // group of that many replicas can reduce-scatter and all-gather them in equal 256-byte-aligned shards.
  explicit GpuModel(ModelConfig config, int shards = 1);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  // Copies every parameter from host Params with the model's names and shapes (a CPU Model's params(), after
  // init_random or load_weights). Throws moerl::Error naming a missing or misshapen tensor.
  void upload(const Params& host);
  // Copies the device values (and gradients when `grads`) into host Params of the same names and shapes.
  void download(Params& host, bool grads = false) const;

  // As Model::forward / Model::backward; the batch's ids and labels are host arrays. backward accumulates.
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options);
  void backward();
  // Gradients read as zero after zero_grad; it marks them (DeviceParam::grad_unset) rather than clearing them, so
  // that backward's producers write them whole, and backward (or settle_grads) clears what none wrote.
  void zero_grad();
  void settle_grads();

  // [batch*seq, vocab] logits of the last forward (needs keep_logits), copied to the host.
  std::vector<float> logits() const;
  void update_router_bias(float gamma);
  // The same rule from given loads (expert_loads() order), e.g. summed over data-parallel replicas.
  void update_router_bias(float gamma, const std::vector<ExpertLoad>& loads);
  std::vector<ExpertLoad> expert_loads() const;

  const ModelConfig& config() const { return config_; }
  const std::vector<DeviceParam>& params() const;  // in name order, as Params::all()
  // Every parameter's value (gradient) lies in one flat FP32 allocation of flat_size() elements, params() pointing
  // into it; the padding between and after the tensors is zero.
  float* flat_values() const;
  float* flat_grads() const;
  size_t flat_size() const;
  cuda::LinearContext& linear();                    // weights_changed() after every weight update
  cudaStream_t stream() const;
  // Peak device memory in use since construction or the last reset (bytes): parameters, gradients,
  // activations, prepared weights and the pool's high-water mark.
  size_t peak_memory_bytes() const;
  void reset_peak_memory();
  // Tests: fill the saved activations (at every forward) and every temporary with NaN before use, so a read of
  // anything not written in this step shows up in the results. Costs a memset per buffer; off by default.
  void set_debug_poison(bool on);

 private:
  struct Impl;
  ModelConfig config_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moerl::gpu
