#include "runtime/gpu/gpu_params.hpp"

#include <algorithm>

#include "runtime/error.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::gpu::detail {
namespace {

// The registrations of runtime/model/{model,attention,feed_forward}.cpp, written out in allocation order.
class SpecList {
 public:
  void add(const std::string& name, Shape shape, bool trainable = true) {
    specs.push_back({name, std::move(shape), trainable});
  }
  void swiglu(const std::string& prefix, int64_t hidden, int64_t inter) {
    add(prefix + ".gate_proj.weight", {inter, hidden});
    add(prefix + ".up_proj.weight", {inter, hidden});
    add(prefix + ".down_proj.weight", {hidden, inter});
  }
  void attention(const ModelConfig& c, const std::string& p) {
    const int64_t H = c.num_attention_heads, D = c.hidden_size, dq = c.qk_head_dim();
    if (c.q_lora_rank > 0) {
      add(p + "q_a_proj.weight", {c.q_lora_rank, D});
      add(p + "q_a_layernorm.weight", {c.q_lora_rank});
      add(p + "q_b_proj.weight", {H * dq, c.q_lora_rank});
    } else {
      add(p + "q_proj.weight", {H * dq, D});
    }
    add(p + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, D});
    add(p + "kv_a_layernorm.weight", {c.kv_lora_rank});
    add(p + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank});
    add(p + "o_proj.weight", {D, H * c.v_head_dim});
  }
  void moe(const ModelConfig& c, const std::string& p) {
    const int64_t E = c.n_routed_experts, D = c.hidden_size, I = c.moe_intermediate_size;
    add(p + ".gate.weight", {E, D});
    add(p + ".gate.e_score_correction_bias", {E}, /*trainable=*/false);
    // Expert by expert its gate_proj and up_proj ([w_gate; w_up] one [2 I, D] matrix, and its gradient: their Wgrad
    // is one GEMM), then every down_proj stacked.
    for (int64_t e = 0; e < E; ++e) {
      add(p + ".experts." + std::to_string(e) + ".gate_proj.weight", {I, D});
      add(p + ".experts." + std::to_string(e) + ".up_proj.weight", {I, D});
    }
    for (int64_t e = 0; e < E; ++e) add(p + ".experts." + std::to_string(e) + ".down_proj.weight", {D, I});
    if (c.n_shared_experts > 0) swiglu(p + ".shared_experts", D, c.n_shared_experts * I);
  }
  void decoder_layer(const ModelConfig& c, int64_t layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    add(p + "input_layernorm.weight", {c.hidden_size});
    add(p + "post_attention_layernorm.weight", {c.hidden_size});
    attention(c, p + "self_attn.");
    if (c.is_moe_layer(layer))
      moe(c, p + "mlp");
    else
      swiglu(p + "mlp", c.hidden_size, c.intermediate_size);
  }

  std::vector<ParamSpec> specs;
};

}  // namespace

std::vector<ParamSpec> model_param_specs(const ModelConfig& c) {
  SpecList s;
  const int64_t D = c.hidden_size;
  s.add("model.embed_tokens.weight", {c.vocab_size, D});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) s.decoder_layer(c, l);
  s.add("model.norm.weight", {D});
  if (!c.tie_word_embeddings) s.add("lm_head.weight", {c.vocab_size, D});
  if (c.num_nextn_predict_layers > 0) {
    const std::string p = "model.layers." + std::to_string(c.num_hidden_layers) + ".";
    s.decoder_layer(c, c.num_hidden_layers);
    s.add(p + "enorm.weight", {D});
    s.add(p + "hnorm.weight", {D});
    s.add(p + "shared_head.norm.weight", {D});
    s.add(p + "eh_proj.weight", {D, 2 * D});
  }
  return std::move(s.specs);
}

ParamStore::ParamStore(const ModelConfig& config, int shards) {
  require(shards >= 1, [&] { return "GpuModel: " + std::to_string(shards) + " shards: expected at least one"; });
  const std::vector<ParamSpec> specs = model_param_specs(config);
  std::vector<size_t> offsets;
  size_t bytes = 0;
  for (const ParamSpec& s : specs) {
    offsets.push_back(bytes);
    bytes += align256(static_cast<size_t>(shape_numel(s.shape)) * sizeof(float));
  }
  const size_t unit = static_cast<size_t>(shards) * 256;
  bytes = (bytes + unit - 1) / unit * unit;
  values_ = DeviceAlloc(bytes);
  grads_ = DeviceAlloc(bytes);
  CUDA_CHECK(cudaMemset(values_.get(), 0, bytes));
  CUDA_CHECK(cudaMemset(grads_.get(), 0, bytes));
  // cudaMemset may return before it is done, on the legacy default stream, which the model's non-blocking stream
  // does not wait for: finish it here, so a later upload cannot be overwritten by these zeros.
  CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<size_t> order(specs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return specs[a].name < specs[b].name; });
  for (size_t i : order) {
    const ParamSpec& s = specs[i];
    require(!index_.count(s.name), [&] { return "GpuModel: parameter " + s.name + " registered twice"; });
    DeviceParam p;
    p.name = s.name;
    p.shape = s.shape;
    p.numel = shape_numel(s.shape);
    p.value = reinterpret_cast<float*>(values_.get() + offsets[i]);
    p.grad = reinterpret_cast<float*>(grads_.get() + offsets[i]);
    p.trainable = s.trainable;
    index_[s.name] = params_.size();
    params_.push_back(std::move(p));
  }
}

DeviceParam& ParamStore::at(const std::string& name) {
  auto it = index_.find(name);
  require(it != index_.end(), [&] { return "GpuModel: no parameter named " + name; });
  return params_[it->second];
}

const DeviceParam& ParamStore::at(const std::string& name) const {
  auto it = index_.find(name);
  require(it != index_.end(), [&] { return "GpuModel: no parameter named " + name; });
  return params_[it->second];
}

void ParamStore::upload(const Params& host, cudaStream_t stream) {
  for (const auto& [name, hp] : host.all())
    require(contains(name),
            [&] { return "GpuModel::upload: host tensor " + name + " is not a parameter of the GPU model"; });
  for (const DeviceParam& p : params_) {
    require(host.contains(p.name),
            [&] { return "GpuModel::upload: missing tensor " + p.name + " (shape " + shape_string(p.shape) + ")"; });
    const Param& hp = host.at(p.name);
    require(hp.value.shape() == p.shape && hp.value.dtype() == DType::F32, [&] {
      return "GpuModel::upload: tensor " + p.name + " is " + std::string(dtype_name(hp.value.dtype())) + " " +
             shape_string(hp.value.shape()) + ", expected F32 " + shape_string(p.shape);
    });
    CUDA_CHECK(cudaMemcpyAsync(p.value, hp.value.data<float>(), static_cast<size_t>(p.numel) * sizeof(float),
                               cudaMemcpyHostToDevice, stream));
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

void ParamStore::download(Params& host, bool grads, cudaStream_t stream) const {
  for (const DeviceParam& p : params_) {
    require(host.contains(p.name), [&] { return "GpuModel::download: the host Params have no tensor " + p.name; });
    Param& hp = host.at(p.name);
    require(hp.value.shape() == p.shape && hp.value.dtype() == DType::F32, [&] {
      return "GpuModel::download: host tensor " + p.name + " is " + shape_string(hp.value.shape()) + ", expected F32 " +
             shape_string(p.shape);
    });
    CUDA_CHECK(cudaMemcpyAsync(hp.value.data<float>(), p.value, static_cast<size_t>(p.numel) * sizeof(float),
                               cudaMemcpyDeviceToHost, stream));
    if (grads) {
      require(hp.grad.shape() == p.shape && hp.grad.dtype() == DType::F32, [&] {
        return "GpuModel::download: host gradient of " + p.name + " is not F32 " + shape_string(p.shape);
      });
      CUDA_CHECK(cudaMemcpyAsync(hp.grad.data<float>(), p.grad, static_cast<size_t>(p.numel) * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream));
    }
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

void ParamStore::zero_grad(cudaStream_t stream) {
  static const bool memset = env_switch("MOERL_GRAD_ZERO", "mark", "memset");
  if (memset) {
    CUDA_CHECK(cudaMemsetAsync(grads_.get(), 0, grads_.bytes(), stream));
    for (const DeviceParam& p : params_) p.grad_unset = false;
    return;
  }
  for (const DeviceParam& p : params_) p.grad_unset = true;
}

void ParamStore::settle_grads(cudaStream_t stream) const {
  std::vector<const DeviceParam*> unset;
  for (const DeviceParam& p : params_)
    if (p.grad_unset && p.numel > 0) unset.push_back(&p);
  std::sort(unset.begin(), unset.end(), [](const DeviceParam* a, const DeviceParam* b) { return a->grad < b->grad; });
  for (size_t i = 0; i < unset.size();) {
    // A run of tensors adjacent in the allocation (each starts where the previous one's 256-byte block ends).
    char* const begin = reinterpret_cast<char*>(unset[i]->grad);
    char* end = begin;
    for (; i < unset.size() && reinterpret_cast<char*>(unset[i]->grad) == end; ++i) {
      end += align256(static_cast<size_t>(unset[i]->numel) * sizeof(float));
      unset[i]->grad_unset = false;
    }
    CUDA_CHECK(cudaMemsetAsync(begin, 0, static_cast<size_t>(end - begin), stream));
  }
  for (const DeviceParam& p : params_) p.grad_unset = false;  // the empty ones
}

bool take_all_unset(const std::vector<const DeviceParam*>& params, cudaStream_t stream) {
  const bool all = std::all_of(params.begin(), params.end(), [](const DeviceParam* p) { return p->grad_unset; });
  for (const DeviceParam* p : params) {
    if (all)
      p->grad_unset = false;
    else
      zero_if_unset(*p, stream);
  }
  return all;
}

void zero_if_unset(const DeviceParam& p, cudaStream_t stream) {
  if (take_unset(p) && p.numel > 0)
    CUDA_CHECK(cudaMemsetAsync(p.grad, 0, static_cast<size_t>(p.numel) * sizeof(float), stream));
}

}  // namespace moerl::gpu::detail
