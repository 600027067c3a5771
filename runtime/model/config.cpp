#include "runtime/model/config.hpp"

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"

namespace moerl {
namespace {

// Reads field `key` into `out` when present (and not null); a value of the wrong type is an error naming it.
template <class T>
void read(const nlohmann::json& j, const char* key, T& out, const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  try {
    if constexpr (std::is_same_v<T, bool>) {
      require(it->is_boolean(), "expected true or false");
    } else if constexpr (std::is_integral_v<T>) {
      require(it->is_number_integer(), "expected an integer");
    } else {
      require(it->is_number(), "expected a number");
    }
    out = it->get<T>();
  } catch (const std::exception& e) {
    throw Error(source + ": field \"" + key + "\": " + e.what() + ", got " + it->dump());
  }
}

}  // namespace

ModelConfig ModelConfig::bench_600m() {
  ModelConfig c;
  c.vocab_size = 32000;
  c.hidden_size = 1024;
  c.intermediate_size = 2816;
  c.moe_intermediate_size = 704;
  c.num_hidden_layers = 8;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 16;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 256;
  c.qk_nope_head_dim = 64;
  c.qk_rope_head_dim = 32;
  c.v_head_dim = 64;
  c.n_routed_experts = 32;
  c.num_experts_per_tok = 4;
  c.n_shared_experts = 1;
  c.n_group = 1;
  c.topk_group = 1;
  c.routed_scaling_factor = 1.0;
  c.norm_topk_prob = true;
  c.num_nextn_predict_layers = 0;
  c.max_position_embeddings = 4096;
  return c;
}

ModelConfig ModelConfig::from_hf_json(const nlohmann::json& j, const std::string& source) {
  require(j.is_object(), source + ": expected a JSON object (an HF config.json)");
  if (auto mt = j.find("model_type"); mt != j.end())
    require(mt->is_string() && (*mt == "deepseek_v3" || *mt == "deepseek_v2"),
            source + ": field \"model_type\": expected \"deepseek_v3\", got " + mt->dump());
  ModelConfig c;
  read(j, "vocab_size", c.vocab_size, source);
  read(j, "hidden_size", c.hidden_size, source);
  read(j, "intermediate_size", c.intermediate_size, source);
  read(j, "moe_intermediate_size", c.moe_intermediate_size, source);
  read(j, "num_hidden_layers", c.num_hidden_layers, source);
  read(j, "num_attention_heads", c.num_attention_heads, source);
  read(j, "q_lora_rank", c.q_lora_rank, source);  // null in the file: no query compression (stays 0)
  if (j.contains("q_lora_rank") && j["q_lora_rank"].is_null()) c.q_lora_rank = 0;
  read(j, "kv_lora_rank", c.kv_lora_rank, source);
  read(j, "qk_nope_head_dim", c.qk_nope_head_dim, source);
  read(j, "qk_rope_head_dim", c.qk_rope_head_dim, source);
  read(j, "v_head_dim", c.v_head_dim, source);
  read(j, "rope_interleave", c.rope_interleave, source);
  read(j, "rope_theta", c.rope_theta, source);
  read(j, "rms_norm_eps", c.rms_norm_eps, source);
  read(j, "max_position_embeddings", c.max_position_embeddings, source);
  read(j, "first_k_dense_replace", c.first_k_dense_replace, source);
  read(j, "n_routed_experts", c.n_routed_experts, source);
  read(j, "n_shared_experts", c.n_shared_experts, source);
  read(j, "num_experts_per_tok", c.num_experts_per_tok, source);
  read(j, "n_group", c.n_group, source);
  read(j, "topk_group", c.topk_group, source);
  read(j, "norm_topk_prob", c.norm_topk_prob, source);
  read(j, "routed_scaling_factor", c.routed_scaling_factor, source);
  read(j, "num_nextn_predict_layers", c.num_nextn_predict_layers, source);
  read(j, "tie_word_embeddings", c.tie_word_embeddings, source);
  read(j, "bos_token_id", c.bos_token_id, source);
  read(j, "eos_token_id", c.eos_token_id, source);
  read(j, "initializer_range", c.initializer_range, source);

  // RoPE: transformers 5 nests it under rope_parameters, older files use rope_theta + rope_scaling.
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    require(it->is_object(), source + ": field \"" + key + "\": expected an object, got " + it->dump());
    read(*it, "rope_theta", c.rope_theta, source + ": " + key);
    std::string type = "default";
    for (const char* t : {"rope_type", "type"})
      if (it->contains(t) && (*it)[t].is_string()) type = (*it)[t].get<std::string>();
    require(type == "default", source + ": field \"" + key + ".rope_type\": only \"default\" RoPE is supported, got \"" +
                                   type + "\" (YaRN long-context scaling is not implemented)");
  }
  for (const char* key : {"scoring_func", "topk_method", "hidden_act"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    const char* expected = key == std::string("scoring_func") ? "sigmoid"
                           : key == std::string("topk_method") ? "noaux_tc" : "silu";
    require(*it == expected, source + ": field \"" + key + "\": expected \"" + expected + "\", got " + it->dump());
  }
  c.validate(source);
  return c;
}

void ModelConfig::validate(const std::string& source) const {
  auto positive = [&](int64_t v, const char* field) {
    require(v > 0, source + ": field \"" + field + "\": expected a positive integer, got " + std::to_string(v));
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(kv_lora_rank, "kv_lora_rank");
  positive(qk_nope_head_dim, "qk_nope_head_dim");
  positive(v_head_dim, "v_head_dim");
  require(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0,
          source + ": field \"qk_rope_head_dim\": expected a positive even integer, got " + std::to_string(qk_rope_head_dim));
  require(q_lora_rank >= 0, source + ": field \"q_lora_rank\": expected null or a positive integer");
  require(first_k_dense_replace >= 0, source + ": field \"first_k_dense_replace\": expected >= 0");
  if (first_k_dense_replace > 0) positive(intermediate_size, "intermediate_size");
  require(num_nextn_predict_layers == 0 || num_nextn_predict_layers == 1,
          source + ": field \"num_nextn_predict_layers\": expected 0 or 1, got " + std::to_string(num_nextn_predict_layers));
  if (first_k_dense_replace < num_hidden_layers) {
    positive(n_routed_experts, "n_routed_experts");
    positive(moe_intermediate_size, "moe_intermediate_size");
    positive(n_group, "n_group");
    require(n_shared_experts >= 0, source + ": field \"n_shared_experts\": expected >= 0");
    require(n_routed_experts % n_group == 0, source + ": field \"n_group\": " + std::to_string(n_group) +
                                                 " does not divide n_routed_experts = " + std::to_string(n_routed_experts));
    require(topk_group >= 1 && topk_group <= n_group,
            source + ": field \"topk_group\": expected 1..n_group (" + std::to_string(n_group) + "), got " +
                std::to_string(topk_group));
    require(n_routed_experts / n_group >= 2 || n_group == 1,
            source + ": field \"n_group\": each group needs at least 2 experts (groups are ranked by their top-2 scores)");
    require(num_experts_per_tok >= 1 && num_experts_per_tok <= topk_group * (n_routed_experts / n_group),
            source + ": field \"num_experts_per_tok\": expected 1..topk_group*experts_per_group, got " +
                std::to_string(num_experts_per_tok));
  }
}

nlohmann::json ModelConfig::to_hf_json() const {
  nlohmann::json j = {
      {"architectures", {"DeepseekV3ForCausalLM"}},
      {"model_type", "deepseek_v3"},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_attention_heads},
      {"q_lora_rank", q_lora_rank > 0 ? nlohmann::json(q_lora_rank) : nlohmann::json(nullptr)},
      {"kv_lora_rank", kv_lora_rank},
      {"qk_nope_head_dim", qk_nope_head_dim},
      {"qk_rope_head_dim", qk_rope_head_dim},
      {"qk_head_dim", qk_head_dim()},
      {"head_dim", qk_rope_head_dim},
      {"v_head_dim", v_head_dim},
      {"rope_interleave", rope_interleave},
      {"rope_theta", rope_theta},
      {"rope_parameters", {{"rope_theta", rope_theta}, {"rope_type", "default"}}},
      {"rms_norm_eps", rms_norm_eps},
      {"max_position_embeddings", max_position_embeddings},
      {"first_k_dense_replace", first_k_dense_replace},
      {"n_routed_experts", n_routed_experts},
      {"n_shared_experts", n_shared_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"n_group", n_group},
      {"topk_group", topk_group},
      {"norm_topk_prob", norm_topk_prob},
      {"routed_scaling_factor", routed_scaling_factor},
      {"num_nextn_predict_layers", num_nextn_predict_layers},
      {"tie_word_embeddings", tie_word_embeddings},
      {"bos_token_id", bos_token_id},
      {"eos_token_id", eos_token_id},
      {"initializer_range", initializer_range},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"torch_dtype", "float32"},
      {"use_cache", true},
  };
  return j;
}

}  // namespace moerl
