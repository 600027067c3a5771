#include "runtime/parallel/dp_zero.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/error.hpp"
#include "runtime/optim/adamw_shard.hpp"

namespace moerl {

namespace {
constexpr const char* kExpAvg = "optimizer.zero.exp_avg";
constexpr const char* kExpAvgSq = "optimizer.zero.exp_avg_sq";
constexpr const char* kShard = "optimizer.zero.shard";
constexpr const char* kStep = "optimizer.step";
}  // namespace

ZeroAdamW::ZeroAdamW(Params& params, AdamWConfig config, Collectives& data_group, ZeroOptions options)
    : params_(params),
      config_(config),
      dp_(data_group),
      options_(std::move(options)),
      shard_tensor_({3}, DType::I64),
      step_tensor_({1}, DType::I64) {
  validate(config_);
  require(!options_.tensor_group || options_.replicated_across_tp,
          "ZeRO optimizer: a tensor group needs replicated_across_tp");
  const bool tp_follower = options_.tensor_group && options_.tensor_group->rank() != 0;
  for (auto& [name, p] : params_.all()) {
    if (!p.trainable) continue;
    require(p.value.dtype() == DType::F32 && p.grad.dtype() == DType::F32 && p.grad.shape() == p.value.shape(),
            "ZeRO optimizer: parameter " + name + " needs an F32 value and an F32 gradient of the same shape");
    const bool copy = options_.tensor_group && options_.replicated_across_tp(name);
    slots_.push_back({&p, total_, static_cast<size_t>(p.value.numel()), !(copy && tp_follower)});
    total_ += static_cast<size_t>(p.value.numel());
  }
  counts_ = even_counts(total_, dp_.size());
  for (int r = 0; r < dp_.rank(); ++r) begin_ += counts_[r];
  end_ = begin_ + counts_[dp_.rank()];
  const int64_t n = static_cast<int64_t>(end_ - begin_);
  exp_avg_ = Tensor({n}, DType::BF16);
  exp_avg_sq_ = Tensor({n}, DType::BF16);
  int64_t* s = shard_tensor_.data<int64_t>();
  s[0] = static_cast<int64_t>(begin_);
  s[1] = static_cast<int64_t>(end_);
  s[2] = static_cast<int64_t>(total_);
  flat_.resize(total_);
  grad_.resize(end_ - begin_);
}

StepStats ZeroAdamW::step(int64_t step, float grad_weight) {
  StepStats stats;
  stats.lr = learning_rate(config_, step);

  // 1. This replica's weighted gradients, flattened; the sum of its shard over the replicas.
  for (const Slot& s : slots_) {
    const float* g = s.param->grad.data<float>();
    float* dst = flat_.data() + s.offset;
    if (grad_weight == 1.0f)
      std::copy_n(g, s.numel, dst);
    else
      for (size_t i = 0; i < s.numel; ++i) dst[i] = g[i] * grad_weight;
  }
  dp_.reduce_scatter_sum(flat_.data(), grad_.data(), counts_);

  // 2. The global norm: shard partial sums in element order, then over the groups.
  double sum_sq = 0;
  for (const Slot& s : slots_) {
    const size_t lo = std::max(begin_, s.offset), hi = std::min(end_, s.offset + s.numel);
    if (lo >= hi || !s.in_norm) continue;
    for (size_t i = lo; i < hi; ++i) {
      const double g = grad_[i - begin_];
      sum_sq += g * g;
    }
  }
  dp_.allreduce_sum(&sum_sq, 1);
  if (options_.tensor_group) options_.tensor_group->allreduce_sum(&sum_sq, 1);
  stats.grad_norm = std::sqrt(sum_sq);
  if (!std::isfinite(stats.grad_norm)) {
    stats.skipped = true;
    return stats;
  }
  if (config_.clip_grad_norm > 0 && stats.grad_norm > config_.clip_grad_norm) {
    const float scale = static_cast<float>(config_.clip_grad_norm / stats.grad_norm);
    for (float& g : grad_) g *= scale;
  }

  // 3. AdamW on the shard, segment by segment (each segment lies in one parameter, which sets the decay).
  const AdamWStepScalars scalars = adamw_step_scalars(config_, step, t_ + 1);
  uint16_t* m = exp_avg_.u16();
  uint16_t* v = exp_avg_sq_.u16();
  for (const Slot& s : slots_) {
    const size_t lo = std::max(begin_, s.offset), hi = std::min(end_, s.offset + s.numel);
    if (lo >= hi) continue;
    const size_t k = lo - begin_;
    adamw_update_span(scalars, adamw_decay(scalars, s.param->value.rank()),
                      s.param->value.data<float>() + (lo - s.offset), grad_.data() + k, m + k, v + k,
                      static_cast<int64_t>(hi - lo));
  }

  // 4. Every replica's updated shard to every replica.
  for (const Slot& s : slots_) {
    const size_t lo = std::max(begin_, s.offset), hi = std::min(end_, s.offset + s.numel);
    if (lo < hi) std::copy_n(s.param->value.data<float>() + (lo - s.offset), hi - lo, flat_.data() + lo);
  }
  dp_.allgather(flat_.data() + begin_, flat_.data(), counts_);
  for (const Slot& s : slots_) std::copy_n(flat_.data() + s.offset, s.numel, s.param->value.data<float>());

  t_ += 1;
  step_tensor_.data<int64_t>()[0] = t_;
  return stats;
}

std::map<std::string, const Tensor*> ZeroAdamW::state() const {
  return {{kExpAvg, &exp_avg_}, {kExpAvgSq, &exp_avg_sq_}, {kShard, &shard_tensor_}, {kStep, &step_tensor_}};
}

void ZeroAdamW::load_state(const SafeTensors& saved) {
  const std::string& src = saved.source;
  auto find = [&](const char* key, DType dtype, const Shape& shape) -> const Tensor& {
    auto it = saved.tensors.find(key);
    if (it == saved.tensors.end()) throw Error(src + ": optimizer state has no " + key);
    const Tensor& t = it->second;
    if (t.dtype() != dtype || t.shape() != shape)
      throw Error(src + ": " + key + " is " + std::string(dtype_name(t.dtype())) + " " + shape_string(t.shape()) +
                  ", expected " + std::string(dtype_name(dtype)) + " " + shape_string(shape));
    return t;
  };
  const Shape moments{static_cast<int64_t>(end_ - begin_)};
  const Tensor& m = find(kExpAvg, DType::BF16, moments);
  const Tensor& v = find(kExpAvgSq, DType::BF16, moments);
  const Tensor& shard = find(kShard, DType::I64, {3});
  const Tensor& st = find(kStep, DType::I64, {1});
  const int64_t* s = shard.data<int64_t>();
  if (s[0] != static_cast<int64_t>(begin_) || s[1] != static_cast<int64_t>(end_) ||
      s[2] != static_cast<int64_t>(total_))
    throw Error(src + ": " + kShard + " is [" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + ") of " +
                std::to_string(s[2]) + ", this replica owns [" + std::to_string(begin_) + ", " + std::to_string(end_) +
                ") of " + std::to_string(total_));
  if (st.data<int64_t>()[0] < 0) throw Error(src + ": " + kStep + " is negative");
  std::memcpy(exp_avg_.bytes(), m.bytes(), m.nbytes());
  std::memcpy(exp_avg_sq_.bytes(), v.bytes(), v.nbytes());
  t_ = st.data<int64_t>()[0];
  step_tensor_.data<int64_t>()[0] = t_;
}

}  // namespace moerl
