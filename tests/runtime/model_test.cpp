// The assembled model: multi-token prediction gradients, precision recipes, checkpoint loading and its errors.
#include "runtime/model/model.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <cmath>
#include <random>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 64; c.hidden_size = 32; c.intermediate_size = 48; c.moe_intermediate_size = 16;
  c.num_hidden_layers = 2; c.first_k_dense_replace = 1; c.num_attention_heads = 2; c.q_lora_rank = 16;
  c.kv_lora_rank = 8; c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 4; c.v_head_dim = 8;
  c.n_routed_experts = 4; c.n_shared_experts = 1; c.num_experts_per_tok = 2; c.n_group = 2; c.topk_group = 2;
  c.routed_scaling_factor = 1.5; c.num_nextn_predict_layers = 1; c.initializer_range = 0.2;
  return c;
}

struct Tokens {
  std::vector<int64_t> ids, labels;
  int64_t batch, seq;
  TokenBatch view() const { return {ids.data(), labels.data(), batch, seq}; }
};

Tokens random_tokens(int64_t vocab, int64_t batch, int64_t seq, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tokens t{{}, {}, batch, seq};
  for (int64_t i = 0; i < batch * (seq + 1); ++i) t.ids.push_back(static_cast<int64_t>(rng() % vocab));
  std::vector<int64_t> stream = t.ids;
  t.ids.clear();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s) {
      t.ids.push_back(stream[b * (seq + 1) + s]);
      t.labels.push_back(stream[b * (seq + 1) + s + 1]);
    }
  return t;
}

TEST(Model, MultiTokenPredictionGradientsMatchFiniteDifferences) {
  Model model(small_config());
  model.init_random(3);
  const Tokens t = random_tokens(64, 2, 10, 5);
  ForwardOptions o;
  o.mtp_weight = 0.5f;
  model.params().zero_grad();
  const LossReport r = model.forward(t.view(), o);
  EXPECT_GT(r.mtp_loss, 0);
  model.backward();
  auto loss = [&] { return model.forward(t.view(), o).total; };
  // The MTP module's own weights, the shared embedding and head, and a main-model weight the MTP loss reaches
  // through hnorm(h). Step 2e-3 on weights of scale 0.2: FP32 rounding noise of a loss near 4 is ~4e-7,
  // i.e. ~1e-4 after dividing by 2h; curvature terms are ~1e-5. Routing is discrete: a perturbation that
  // flips an expert choice shows as one large outlier; the small step keeps such flips rare (none with
  // these seeds; with h = 1e-2 one embedding element did flip).
  for (const char* name : {"model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight", "model.layers.2.hnorm.weight",
                           "model.layers.2.shared_head.norm.weight", "model.layers.2.self_attn.kv_b_proj.weight",
                           "model.layers.2.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
                           "model.layers.1.self_attn.o_proj.weight"}) {
    Param& p = model.params().at(name);
    const std::vector<float> analytic(p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
    const auto rep = test::gradcheck(loss, p.value.data<float>(), p.value.numel(), analytic.data(),
                                     {.step = 2e-3, .atol = 4e-4, .rtol = 2e-2, .max_checks = 24});
    EXPECT_EQ(rep.failures, 0) << rep.describe(name);
  }
}

TEST(Model, MtpWeightZeroLeavesTheMtpModuleUntouched) {
  Model model(small_config());
  model.init_random(3);
  const Tokens t = random_tokens(64, 2, 8, 6);
  model.params().zero_grad();
  const LossReport r = model.forward(t.view(), ForwardOptions{});
  model.backward();
  EXPECT_EQ(r.total, r.loss);
  const Tensor& g = model.params().at("model.layers.2.eh_proj.weight").grad;
  for (int64_t i = 0; i < g.numel(); ++i) ASSERT_EQ(g.data<float>()[i], 0.0f);
}

TEST(ModelPart, AHeadlessPartReadsNoLabelsAndAForeignTokenIsNamed) {
  const ModelConfig c = small_config();
  Params params;
  ModelPart part(c, params, PartSpec{0, 1, true, false});  // embedding + layer 0, no head
  const Tokens t = random_tokens(64, 2, 8, 6);
  std::vector<float> out(static_cast<size_t>(2 * 8 * c.hidden_size), std::nanf(""));
  const TokenBatch no_labels{t.ids.data(), nullptr, 2, 8};
  part.forward(no_labels, nullptr, out.data(), ForwardOptions{}, loss_denominators(t.view()));
  for (float v : out) ASSERT_TRUE(std::isfinite(v));
  std::vector<int64_t> bad = t.ids;
  bad[5] = 64;
  try {
    part.forward(TokenBatch{bad.data(), nullptr, 2, 8}, nullptr, out.data(), ForwardOptions{},
                 loss_denominators(t.view()));
    ADD_FAILURE() << "a token outside the vocabulary was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("input_ids[5] = 64 is outside the vocabulary [0, 64)"), std::string::npos)
        << e.what();
  }
}

TEST(Model, Bf16AndFp8StayCloseToFp32) {
  Model model(small_config());
  model.init_random(9);
  const Tokens t = random_tokens(64, 2, 16, 7);
  auto loss_in = [&](Precision p) {
    ForwardOptions o;
    o.precision = p;
    return model.forward(t.view(), o).loss;
  };
  const double fp32 = loss_in(Precision::FP32);
  // BF16 keeps 8 mantissa bits (relative rounding 2^-9), E4M3 keeps 3 (2^-4) with per-tile scales; on a loss
  // near ln(64) ≈ 4.2 the errors average out to well under these bounds.
  EXPECT_NEAR(loss_in(Precision::BF16), fp32, 5e-3 * fp32);
  EXPECT_NEAR(loss_in(Precision::FP8), fp32, 3e-2 * fp32);
  EXPECT_NE(loss_in(Precision::FP8), fp32);  // the FP8 path really quantizes
}

fs::path temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("moerl-model-test-" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(Checkpoint, SavedModelLoadsBackWithIdenticalLogitsAndPublishedNames) {
  Model model(small_config());
  model.init_random(11);
  const fs::path dir = temp_dir("roundtrip") / "ckpt";
  save_checkpoint(dir, model, nullptr, nullptr, nullptr);
  const SafeTensors st = read_safetensors(dir / "model.safetensors");
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                           "model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                           "model.layers.2.eh_proj.weight", "model.layers.2.embed_tokens.weight",
                           "model.layers.2.shared_head.head.weight"})
    EXPECT_TRUE(st.tensors.count(name)) << name;
  const LoadedModel loaded = load_model_dir(dir);
  const Tokens t = random_tokens(64, 1, 12, 1);
  ForwardOptions o;
  o.keep_logits = true;
  model.forward(t.view(), o);
  loaded.model->forward(t.view(), o);
  for (int64_t i = 0; i < 12 * 64; ++i) ASSERT_EQ(model.logits()[i], loaded.model->logits()[i]);
}

std::string load_error(const std::map<std::string, const Tensor*>& tensors) {
  const fs::path dir = temp_dir("bad");
  Model model(small_config());
  std::ofstream(dir / "config.json") << model.config().to_hf_json().dump();
  write_safetensors(dir / "model.safetensors", tensors);
  try {
    load_model_dir(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Checkpoint, MissingWrongShapedOrUnknownTensorsAreNamed) {
  Model model(small_config());
  std::map<std::string, const Tensor*> all;
  for (const auto& [name, p] : model.params().all()) all[name] = &p.value;

  auto missing = all;
  missing.erase("model.layers.1.mlp.experts.2.up_proj.weight");
  EXPECT_NE(load_error(missing).find("missing tensor model.layers.1.mlp.experts.2.up_proj.weight"), std::string::npos);

  Tensor wrong({3, 3});
  auto reshaped = all;
  reshaped["model.norm.weight"] = &wrong;
  EXPECT_NE(load_error(reshaped).find("tensor model.norm.weight has shape [3, 3], the config expects [32]"),
            std::string::npos);

  auto extra = all;
  extra["model.layers.7.mlp.up_proj.weight"] = &wrong;
  EXPECT_NE(load_error(extra).find("unexpected tensor model.layers.7.mlp.up_proj.weight"), std::string::npos);
}

TEST(Checkpoint, BadConfigFieldIsNamed) {
  const fs::path dir = temp_dir("badconfig");
  nlohmann::json j = small_config().to_hf_json();
  j["n_group"] = "two";
  std::ofstream(dir / "config.json") << j.dump();
  try {
    load_model_dir(dir);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("field \"n_group\": expected an integer"), std::string::npos) << e.what();
  }
}

TEST(ModelConfig, Bench600mIsValidAndRoundTripsThroughTheHfConfig) {
  // The benchmark model of `moerl bench gpu` and of the HF peer (bench/peers/hf_train_step.py): a config HF
  // transformers reads back as the same model, with issue 4's defining sizes.
  const ModelConfig c = ModelConfig::bench_600m();
  EXPECT_NO_THROW(c.validate("bench-600m"));
  const ModelConfig back = ModelConfig::from_hf_json(c.to_hf_json(), "bench-600m");
  EXPECT_EQ(back.to_hf_json(), c.to_hf_json());
  EXPECT_EQ(c.hidden_size, 1024);
  EXPECT_EQ(c.n_routed_experts, 32);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.num_hidden_layers, 8);
}

}  // namespace
}  // namespace moerl
