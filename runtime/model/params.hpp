// The model's parameters by their published DeepSeek-V3 names ("model.layers.3.mlp.experts.7.up_proj.weight"),
// each an FP32 master value with its FP32 gradient. Blocks keep pointers to their Params entries:
// std::map never moves its nodes, so the pointers stay valid.
#pragma once
#include <map>
#include <string>

#include "runtime/tensor.hpp"

namespace moerl {

struct Param {
  Tensor value;       // FP32 master weight
  Tensor grad;        // FP32, same shape; accumulated by backward, zeroed by zero_grad()
  bool trainable = true;  // false for buffers such as the router's e_score_correction_bias
};

class Params {
 public:
  // Adds a zero-filled parameter (and its gradient). Throws if the name exists.
  Param& add(const std::string& name, Shape shape, bool trainable = true);
  // Throws moerl::Error naming the parameter if absent.
  Param& at(const std::string& name);
  const Param& at(const std::string& name) const;
  bool contains(const std::string& name) const { return map_.count(name) != 0; }
  void zero_grad();
  std::map<std::string, Param>& all() { return map_; }
  const std::map<std::string, Param>& all() const { return map_; }

 private:
  std::map<std::string, Param> map_;
};

}  // namespace moerl
