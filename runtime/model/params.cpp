#include "runtime/model/params.hpp"

#include "runtime/error.hpp"

namespace moerl {

Param& Params::add(const std::string& name, Shape shape, bool trainable) {
  require(!map_.count(name), "parameter " + name + " defined twice");
  Param p;
  p.value = Tensor(shape);
  p.grad = Tensor(std::move(shape));
  p.trainable = trainable;
  return map_.emplace(name, std::move(p)).first->second;
}

Param& Params::at(const std::string& name) {
  auto it = map_.find(name);
  require(it != map_.end(), "no parameter named " + name);
  return it->second;
}

const Param& Params::at(const std::string& name) const {
  auto it = map_.find(name);
  require(it != map_.end(), "no parameter named " + name);
  return it->second;
}

void Params::zero_grad() {
  for (auto& [name, p] : map_) p.grad.fill_zero();
}

}  // namespace moerl
