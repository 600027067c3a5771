// The model's shape, with the field names of HF transformers' DeepseekV3Config (config.json).
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace moerl {

struct ModelConfig {
  int64_t vocab_size = 512;
  int64_t hidden_size = 64;
  int64_t intermediate_size = 128;        // dense FFN (the first first_k_dense_replace layers)
  int64_t moe_intermediate_size = 32;     // each routed and shared expert
  int64_t num_hidden_layers = 2;
  int64_t num_attention_heads = 4;
  // Multi-head latent attention.
  int64_t q_lora_rank = 0;                // 0: no query compression (q_proj), else q_a_proj -> norm -> q_b_proj
  int64_t kv_lora_rank = 16;
  int64_t qk_nope_head_dim = 16;
  int64_t qk_rope_head_dim = 8;
  int64_t v_head_dim = 16;
  bool rope_interleave = true;            // DeepSeek's checkpoints store rope dims interleaved (x0, x1), (x2, x3), ...
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 2048;
  // Mixture of experts.
  int64_t first_k_dense_replace = 1;
  int64_t n_routed_experts = 8;
  int64_t n_shared_experts = 1;
  int64_t num_experts_per_tok = 2;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  // Multi-token prediction depth (DeepSeek-V3: 1). HF transformers ignores these weights.
  int64_t num_nextn_predict_layers = 0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  double initializer_range = 0.02;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense_replace && n_routed_experts > 0; }

  // "bench-600m" (issue 4; bench/peers/hf_train_step.py has the same): vocab 32000, hidden 1024, 8 layers (the
  // first dense, intermediate 2816), 16 heads, kv_lora 256, no q_lora, qk 64 + 32, v 64, 32 routed experts top-4 +
  // 1 shared (moe_intermediate 704), one group, routed_scaling_factor 1, no MTP; positions up to 4096.
  static ModelConfig bench_600m();
  // Reads an HF config.json object; `source` (a file name) prefixes every error, which names the field.
  static ModelConfig from_hf_json(const nlohmann::json& j, const std::string& source);
  // The HF config.json for this model (model_type deepseek_v3, architectures DeepseekV3ForCausalLM).
  nlohmann::json to_hf_json() const;
  // Throws moerl::Error naming the field when the shape is inconsistent (e.g. topk_group > n_group).
  void validate(const std::string& source) const;
};

}  // namespace moerl
