// The GPU model's parameters: every tensor moerl::Model registers (same names, shapes, trainable flags), FP32
// values in one device allocation and FP32 gradients in another, each tensor 256-byte aligned. The routed
// experts of an MoE layer are laid out stacked — all experts' gate_proj, then all up_proj, then all down_proj,
// expert-major — so [E, I, H], [E, I, H] and [E, H, I] arrays start at expert 0's tensors.
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

// A parameter's name, shape and trainable flag, in the order of its place in the allocations.
struct ParamSpec {
  std::string name;
  Shape shape;
  bool trainable = true;
};

// Every parameter of moerl::Model(config), in allocation order (experts stacked as above).
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
  void zero_grad(cudaStream_t stream);

 private:
  std::vector<DeviceParam> params_;  // name order
  std::map<std::string, size_t> index_;
  DeviceAlloc values_, grads_;
};

}  // namespace moerl::gpu::detail
