// The GPU model's parameters: every tensor moerl::Model registers (same names, shapes, trainable flags), FP32
// values in one device allocation and FP32 gradients in another, each tensor 256-byte aligned. The routed
// experts of an MoE layer are laid out expert-major: each expert's gate_proj then its up_proj ([E, 2, I, H] from
// expert 0's gate_proj: gate and up interleaved, kernels/cuda/moe_fp8.hpp's gate_up_stride 2 I H), then every
// expert's down_proj ([E, H, I] from expert 0's).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "runtime/gpu/gpu_common.hpp"
#include "runtime/gpu/gpu_model.hpp"
#include "runtime/model/config.hpp"

namespace moerl::gpu::detail {

// Elements from routed expert e's gate_proj to expert e + 1's (and between their gradients) in ParamStore's
// layout: gate [I, H] then up [I, H], expert after expert.
constexpr int64_t expert_gate_up_stride(int64_t inter, int64_t hidden) { return 2 * inter * hidden; }

// A parameter's name, shape and trainable flag, in the order of its place in the allocations.
struct ParamSpec {
  std::string name;
  Shape shape;
  bool trainable = true;
};

// Every parameter of moerl::Model(config), in allocation order (experts laid out as above).
std::vector<ParamSpec> model_param_specs(const ModelConfig& config);

class ParamStore {
 public:
  // Allocates values and gradients (both zero) for model_param_specs(config), each allocation padded with zeros
  // to a multiple of `shards` x 256 bytes (a data-parallel group of `shards` replicas splits it evenly).
  explicit ParamStore(const ModelConfig& config, int shards = 1);

  // Throws moerl::Error naming the parameter if absent.
  DeviceParam& at(const std::string& name);
  const DeviceParam& at(const std::string& name) const;
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const std::vector<DeviceParam>& all() const { return params_; }  // name order

  float* values() const { return reinterpret_cast<float*>(values_.get()); }
  float* grads() const { return reinterpret_cast<float*>(grads_.get()); }
  size_t bytes() const { return values_.bytes(); }  // of each allocation
  size_t device_bytes() const { return values_.bytes() + grads_.bytes(); }

  // Host <-> device copies on `stream`, synchronized before returning (host tensors may go away after).
  void upload(const Params& host, cudaStream_t stream);
  void download(Params& host, bool grads, cudaStream_t stream) const;
  // Marks every gradient unset (DeviceParam::grad_unset); MOERL_GRAD_ZERO=memset clears them instead (for
  // comparing on the device). On the H200 (bench-600m, rounds interleaved) within noise of clearing them: fp8 step
  // 225.2k vs 224.2k and 218.1k vs 218.6k tokens/s, bf16 170.2k vs 170.1k and 167.5k vs 164.0k
  // (bench/results/2026-11-30-gpu-sweep-grad-zero-h200-f606f18.txt); the Brown curves bit for bit.
  void zero_grad(cudaStream_t stream);
  // Clears the gradients still unset (one memset per run of adjacent ones): after it every gradient holds its sum.
  void settle_grads(cudaStream_t stream) const;

 private:
  std::vector<DeviceParam> params_;  // name order
  std::map<std::string, size_t> index_;
  DeviceAlloc values_, grads_;
};

// A producer's view of an unset gradient (DeviceParam::grad_unset): take_unset says whether p's gradient must be
// written whole (true) or added to, and counts it as written from then on; zero_if_unset clears it first for
// producers that only add (scatter-adds, reductions).
inline bool take_unset(const DeviceParam& p) {
  const bool unset = p.grad_unset;
  p.grad_unset = false;
  return unset;
}
void zero_if_unset(const DeviceParam& p, cudaStream_t stream);
// take_unset over tensors one call writes together (an expert block's gate, up and down): true when all are unset
// (to be written whole); otherwise the unset ones are cleared and false (to be added to).
bool take_all_unset(const std::vector<const DeviceParam*>& params, cudaStream_t stream);

}  // namespace moerl::gpu::detail
