// Helpers of the actor tests: an actor system per test, requests that wait a bounded time, a tiny recipe on a
// synthetic corpus, a tiny saved model.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "actors/envelope.hpp"
#include "runtime/model/model.hpp"
#include "runtime/train/checkpoint.hpp"
#include "tests/support/grammar_corpus.hpp"

namespace moerl::actors::testing {

namespace fs = std::filesystem;

// Every request of a test waits at most this long, so a lost reply fails the test instead of hanging it.
inline constexpr auto kReplyTimeout = std::chrono::seconds(30);

inline caf::actor_system_config& test_config() {
  static caf::actor_system_config config = [] {
    caf::actor_system_config c;
    add_message_types(c);
    return c;
  }();
  return config;
}

// The reply to a request, or nullopt with the error stored in `*error` (a test failure when error is null).
template <class Reply, class Handle, class... Ts>
std::optional<Reply> ask(caf::scoped_actor& self, const Handle& to, caf::error* error, Ts&&... xs) {
  std::optional<Reply> out;
  self->request(to, kReplyTimeout, std::forward<Ts>(xs)...)
      .receive([&](Reply& r) { out = std::move(r); },
               [&](caf::error& e) {
                 if (error)
                   *error = e;
                 else
                   ADD_FAILURE() << describe(e);
               });
  return out;
}

// The ActorError message of a failed request ("" when it did not fail with one of ours).
inline std::string error_text(const caf::error& e) {
  const auto err = actor_error_of(e);
  return err ? err->actor + ": " + err->message : "";
}

// Per process: other build folders may run the same tests at the same time.
inline fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("moerl-actors-test-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Removes a test's folder when the test ends, however it ends.
struct RemoveAtExit {
  fs::path dir;
  ~RemoveAtExit() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

// tests/support/grammar_corpus.hpp's 60 documents, and 40 SFT examples.
inline void write_corpus(const fs::path& dir) {
  moerl::test::write_grammar_corpus(dir / "corpus.jsonl");
  std::ofstream g(dir / "sft.jsonl");
  for (int i = 0; i < 40; ++i)
    g << nlohmann::json{{"prompt", "the cat sees"}, {"response", i % 2 ? " the red ball." : " a letter."}}.dump() << "\n";
}

// A recipe file: a 2-layer MoE model with MTP, a pretraining stage of `pretrain_steps` and, when sft_steps > 0,
// an SFT stage; written as dir/`file`. Returns the file's path.
inline fs::path write_recipe(const fs::path& dir, int pretrain_steps, int sft_steps = 0, int checkpoint_every = 4,
                             const std::string& file = "recipe.yaml") {
  write_corpus(dir);
  std::ofstream f(dir / file);
  f << "name: tiny\nseed: 5\nprecision: fp32\nthreads: 2\nout: " << (dir / "run").string() << "\n"
    << "data:\n  corpus: " << (dir / "corpus.jsonl").string() << "\n  vocab_size: 300\n  validation_every: 10\n"
    << "model:\n  hidden_size: 32\n  intermediate_size: 64\n  moe_intermediate_size: 16\n  num_hidden_layers: 2\n"
    << "  num_attention_heads: 2\n  q_lora_rank: 0\n  kv_lora_rank: 16\n  qk_nope_head_dim: 8\n  qk_rope_head_dim: 8\n"
    << "  v_head_dim: 8\n  n_routed_experts: 4\n  num_experts_per_tok: 2\n  n_group: 1\n  topk_group: 1\n"
    << "  num_nextn_predict_layers: 1\n"
    << "stages:\n"
    << "  - name: pretrain\n    kind: pretrain\n    steps: " << pretrain_steps << "\n    batch: 4\n    seq: 32\n"
    << "    mtp_weight: 0.3\n    balance_alpha: 0.001\n    eval_every: 3\n    eval_batches: 2\n"
    << "    checkpoint_every: " << checkpoint_every << "\n"
    << "    optimizer: {lr: 0.01, warmup_steps: 2}\n";
  if (sft_steps > 0)
    f << "  - name: sft\n    kind: sft\n    data: " << (dir / "sft.jsonl").string() << "\n    steps: " << sft_steps
      << "\n    batch: 4\n    seq: 32\n    eval_every: 2\n    eval_batches: 2\n    checkpoint_every: 3\n"
      << "    optimizer: {lr: 0.01, warmup_steps: 1}\n";
  return dir / file;
}

// A saved model folder (config.json + model.safetensors) of a tiny MoE model with random weights.
inline fs::path write_model(const fs::path& dir) {
  ModelConfig c;
  c.vocab_size = 40; c.hidden_size = 32; c.intermediate_size = 64; c.moe_intermediate_size = 16;
  c.num_hidden_layers = 2; c.num_attention_heads = 2; c.q_lora_rank = 0; c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 8; c.v_head_dim = 8; c.n_routed_experts = 4;
  c.num_experts_per_tok = 2; c.n_group = 1; c.topk_group = 1; c.num_nextn_predict_layers = 0;
  c.max_position_embeddings = 64; c.bos_token_id = 0; c.eos_token_id = 1;
  Model model(c);
  model.init_random(11);
  save_checkpoint(dir / "model", model, nullptr, nullptr, nullptr);
  return dir / "model";
}

}  // namespace moerl::actors::testing
