#include "runtime/optim/adamw_state.hpp"

#include "runtime/error.hpp"

namespace moerl::adamw_state {

const Tensor& moment(const SafeTensors& saved, const std::string& key, const Shape& shape) {
  auto it = saved.tensors.find(key);
  if (it == saved.tensors.end()) throw Error(saved.source + ": optimizer state has no " + key);
  const Tensor& t = it->second;
  if (t.dtype() != DType::BF16 || t.shape() != shape)
    throw Error(saved.source + ": " + key + " is " + std::string(dtype_name(t.dtype())) + " " +
                shape_string(t.shape()) + ", expected BF16 " + shape_string(shape));
  return t;
}

Moments moments(const SafeTensors& saved, const std::string& name, const Shape& shape, std::set<std::string>& known) {
  const Moments m{&moment(saved, kExpAvg + name, shape), &moment(saved, kExpAvgSq + name, shape)};
  known.insert(kExpAvg + name);
  known.insert(kExpAvgSq + name);
  return m;
}

void refuse_unknown(const SafeTensors& saved, const std::set<std::string>& known) {
  for (const auto& [key, t] : saved.tensors)
    if (key.starts_with("optimizer.") && !known.count(key))
      throw Error(saved.source + ": " + key + " belongs to no trainable parameter of this model");
}

int64_t step(const SafeTensors& saved) {
  auto it = saved.tensors.find(kStep);
  if (it == saved.tensors.end()) throw Error(saved.source + ": optimizer state has no " + std::string(kStep));
  const Tensor& st = it->second;
  if (st.dtype() != DType::I64 || st.shape() != Shape{1} || st.data<int64_t>()[0] < 0)
    throw Error(saved.source + ": " + std::string(kStep) + " must be one non-negative I64, got " +
                std::string(dtype_name(st.dtype())) + " " + shape_string(st.shape()));
  return st.data<int64_t>()[0];
}

}  // namespace moerl::adamw_state
