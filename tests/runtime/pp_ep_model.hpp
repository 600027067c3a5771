// The model of the pipeline x expert tests (in one process and across processes): 4 layers (layer 0 dense, 1-3
// MoE), an MoE MTP layer, 8 experts in 4 groups (2 kept), 2 per token, 1 shared.
#pragma once
#include "runtime/model/config.hpp"

namespace moerl::test {

inline ModelConfig pp_ep_model_config() {
  ModelConfig c;
  c.vocab_size = 64; c.hidden_size = 32; c.intermediate_size = 48; c.moe_intermediate_size = 16;
  c.num_hidden_layers = 4; c.first_k_dense_replace = 1; c.num_attention_heads = 2; c.q_lora_rank = 16;
  c.kv_lora_rank = 8; c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 4; c.v_head_dim = 8;
  c.n_routed_experts = 8; c.n_shared_experts = 1; c.num_experts_per_tok = 2; c.n_group = 4; c.topk_group = 2;
  c.routed_scaling_factor = 1.5; c.num_nextn_predict_layers = 1; c.initializer_range = 0.2;
  return c;
}

}  // namespace moerl::test
