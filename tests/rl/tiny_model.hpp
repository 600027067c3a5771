// A tiny model for the RL tests: the addition task's 16-id vocabulary, 2 layers (dense, then MoE when asked).
#pragma once
#include "runtime/model/config.hpp"
#include "runtime/rl/task.hpp"

namespace moerl::rl::testing {

inline ModelConfig tiny_config(bool with_moe) {
  ModelConfig c;
  c.vocab_size = kTaskVocab;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.moe_intermediate_size = 16;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.q_lora_rank = with_moe ? 16 : 0;  // exercise both query paths
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 8;
  c.max_position_embeddings = 64;
  c.first_k_dense_replace = with_moe ? 1 : 2;
  c.n_routed_experts = 4;
  c.num_experts_per_tok = 2;
  c.initializer_range = 0.2;  // large enough that logits differ clearly between positions
  return c;
}

}  // namespace moerl::rl::testing
