// The recipe's device field and the training backend it selects: cpu by default, cuda only through a backend
// that the caller hands in (the command line's runtime/gpu one), a clear error otherwise; the stage loop runs
// unchanged on any backend.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "runtime/error.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/backend.hpp"
#include "runtime/train/run_recipe.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("moerl-device-test-" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

const char* kRecipe = R"(name: t
model:
  hidden_size: 32
  num_hidden_layers: 2
stages:
  - name: pretrain
    kind: pretrain
    steps: 10
)";

fs::path write_recipe(const fs::path& dir, const std::string& text) {
  const fs::path file = dir / "recipe.yaml";
  std::ofstream(file) << text;
  return file;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// 40 documents of a small grammar: enough text for a 300-piece BPE and a falling loss within a few steps.
Recipe small_recipe(const fs::path& dir) {
  const char* words[] = {"the cat", "a dog", "sees", "likes", "the red ball", "a small house", "the river"};
  std::mt19937 rng(7);
  {
    std::ofstream f(dir / "corpus.jsonl");
    for (int d = 0; d < 40; ++d) {
      std::string text;
      for (int s = 0; s < 12; ++s)
        text += std::string(words[rng() % 2]) + " " + words[2 + rng() % 2] + " " + words[4 + rng() % 3] + ". ";
      f << nlohmann::json{{"text", text}}.dump() << "\n";
    }
  }
  Recipe r;
  r.file = dir / "recipe.yaml";
  r.name = "device";
  r.seed = 3;
  r.threads = 2;
  r.out = dir / "run";
  r.data.corpus = (dir / "corpus.jsonl").string();
  r.data.vocab_size = 300;
  r.data.validation_every = 10;
  ModelConfig& c = r.model;
  c.hidden_size = 32, c.intermediate_size = 64, c.moe_intermediate_size = 16, c.num_hidden_layers = 2;
  c.num_attention_heads = 2, c.kv_lora_rank = 16, c.qk_nope_head_dim = 8, c.qk_rope_head_dim = 8, c.v_head_dim = 8;
  c.n_routed_experts = 4, c.num_experts_per_tok = 2;
  StageSpec s;
  s.name = "pretrain";
  s.kind = "pretrain";
  s.steps = 6, s.batch = 2, s.seq = 16, s.eval_every = 3, s.eval_batches = 2, s.checkpoint_every = 3;
  s.optimizer.lr = 1e-2, s.optimizer.total_steps = s.steps;
  r.stages.push_back(s);
  return r;
}

std::vector<nlohmann::json> step_lines(const fs::path& metrics) {
  std::vector<nlohmann::json> out;
  std::ifstream f(metrics);
  for (std::string line; std::getline(f, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("step")) out.push_back(std::move(j));
  }
  return out;
}

// Another device, as far as the stage loop can tell: the CPU backend behind the interface, counting calls.
class CountingBackend final : public TrainingBackend {
 public:
  explicit CountingBackend(Model& host) : inner_(make_cpu_backend(host)) {}
  std::string device() const override { return "counting"; }
  const ModelConfig& config() const override { return inner_->config(); }
  void start_stage(const AdamWConfig& o) override { ++stages; inner_->start_stage(o); }
  void load_weights(const SafeTensors& w) override { inner_->load_weights(w); }
  void load_optimizer_state(const SafeTensors& s) override { inner_->load_optimizer_state(s); }
  void zero_grad() override { inner_->zero_grad(); }
  LossReport forward(const TokenBatch& b, const ForwardOptions& o) override {
    ++(o.for_backward ? train_forwards : eval_forwards);
    return inner_->forward(b, o);
  }
  void backward() override { inner_->backward(); }
  StepStats optimizer_step(int64_t step) override { ++updates; return inner_->optimizer_step(step); }
  std::vector<ExpertLoad> expert_loads() const override { return inner_->expert_loads(); }
  void update_router_bias(float gamma) override { inner_->update_router_bias(gamma); }
  const Model& host_model() override { ++checkpoints; return inner_->host_model(); }
  const AdamW& host_optimizer() override { return inner_->host_optimizer(); }

  static inline int stages = 0, train_forwards = 0, eval_forwards = 0, updates = 0, checkpoints = 0;

 private:
  std::unique_ptr<TrainingBackend> inner_;
};

TEST(TrainingDevice, RecipeDeviceDefaultsToCpuAndReadsCuda) {
  const fs::path dir = fresh_dir("recipe");
  EXPECT_EQ(load_recipe(write_recipe(dir, kRecipe)).device, Device::CPU);
  EXPECT_EQ(load_recipe(write_recipe(dir, kRecipe), {"device=cuda"}).device, Device::CUDA);
  EXPECT_STREQ(device_name(Device::CUDA), "cuda");
  EXPECT_STREQ(device_name(Device::CPU), "cpu");
}

TEST(TrainingDevice, UnknownDeviceIsRefusedNamingFileLineAndField) {
  const fs::path dir = fresh_dir("bad-device");
  const fs::path file = write_recipe(dir, std::string("device: gpu\n") + kRecipe);
  const std::string e = error_of([&] { load_recipe(file); });
  EXPECT_NE(e.find(file.string() + ":1: device: expected cpu or cuda; got \"gpu\""), std::string::npos) << e;
}

// On GPUs the driver runs data parallelism only (one replica per GPU, runtime/gpu/gpu_data_parallel.hpp); the
// other kinds stay CPU-only and are refused when the recipe is read, naming the field.
TEST(TrainingDevice, CudaRecipesTakeDataParallelismAndRefuseTheOtherKinds) {
  const fs::path dir = fresh_dir("cuda-parallelism");
  const fs::path file = write_recipe(dir, kRecipe);
  const Recipe dp = load_recipe(file, {"device=cuda", "parallelism.data=2"});
  EXPECT_EQ(dp.device, Device::CUDA);
  EXPECT_EQ(dp.parallelism.data, 2);
  for (const std::string kind : {"pipeline", "expert", "tensor"}) {
    const std::string e = error_of([&] { load_recipe(file, {"device=cuda", "parallelism." + kind + "=2"}); });
    EXPECT_NE(e.find("parallelism." + kind + ": device: cuda runs data parallelism only"), std::string::npos) << e;
  }
  // The CPU keeps every kind.
  EXPECT_EQ(load_recipe(file, {"parallelism.pipeline=2"}).parallelism.pipeline, 2);
}

TEST(TrainingDevice, ShippedGpuRecipesAreBench600mOnBrownAndDifferOnlyInPrecision) {
  const fs::path recipes = fs::path(MOERL_TEST_FIXTURES) / "../../recipes";
  const Recipe fp8 = load_recipe(recipes / "pretrain-brown-gpu-fp8.yaml");
  const Recipe bf16 = load_recipe(recipes / "pretrain-brown-gpu-bf16.yaml");
  EXPECT_EQ(fp8.precision, Precision::FP8);
  EXPECT_EQ(bf16.precision, Precision::BF16);
  for (const Recipe* r : {&fp8, &bf16}) {
    SCOPED_TRACE(r->file.string());
    EXPECT_EQ(r->device, Device::CUDA);
    const ModelConfig& m = r->model;
    // bench-600m (issue 4; bench/peers/hf_train_step.py's BENCH_600M).
    EXPECT_EQ(m.vocab_size, 32000);
    EXPECT_EQ(r->data.vocab_size, 32000);  // run_recipe gives the model the tokenizer's vocabulary
    EXPECT_EQ(m.hidden_size, 1024);
    EXPECT_EQ(m.intermediate_size, 2816);
    EXPECT_EQ(m.moe_intermediate_size, 704);
    EXPECT_EQ(m.num_hidden_layers, 8);
    EXPECT_EQ(m.first_k_dense_replace, 1);
    EXPECT_EQ(m.num_attention_heads, 16);
    EXPECT_EQ(m.q_lora_rank, 0);
    EXPECT_EQ(m.kv_lora_rank, 256);
    EXPECT_EQ(m.qk_nope_head_dim, 64);
    EXPECT_EQ(m.qk_rope_head_dim, 32);
    EXPECT_EQ(m.v_head_dim, 64);
    EXPECT_EQ(m.n_routed_experts, 32);
    EXPECT_EQ(m.num_experts_per_tok, 4);
    EXPECT_EQ(m.n_shared_experts, 1);
    EXPECT_EQ(m.n_group, 1);
    EXPECT_EQ(m.topk_group, 1);
    EXPECT_EQ(m.routed_scaling_factor, 1.0);
    EXPECT_TRUE(m.norm_topk_prob);
    EXPECT_EQ(m.num_nextn_predict_layers, 0);
    EXPECT_GE(m.max_position_embeddings, 2048);
    EXPECT_EQ(r->data.corpus, "brown");
    ASSERT_EQ(r->stages.size(), 1u);
    EXPECT_EQ(r->stages[0].batch, 8);
    EXPECT_EQ(r->stages[0].seq, 2048);
    EXPECT_EQ(r->stages[0].steps, 200);
  }
  // Everything but the name and the precision is the same: the curves differ by the precision alone.
  EXPECT_EQ(fp8.seed, bf16.seed);
  EXPECT_EQ(fp8.model.to_hf_json(), bf16.model.to_hf_json());
  EXPECT_EQ(fp8.data.validation_every, bf16.data.validation_every);
  const StageSpec &a = fp8.stages[0], &b = bf16.stages[0];
  EXPECT_EQ(a.optimizer.lr, b.optimizer.lr);
  EXPECT_EQ(a.optimizer.warmup_steps, b.optimizer.warmup_steps);
  EXPECT_EQ(a.optimizer.weight_decay, b.optimizer.weight_decay);
  EXPECT_EQ(a.optimizer.clip_grad_norm, b.optimizer.clip_grad_norm);
  EXPECT_EQ(a.optimizer.min_lr_ratio, b.optimizer.min_lr_ratio);
  EXPECT_EQ(a.bias_gamma, b.bias_gamma);
  EXPECT_EQ(a.balance_alpha, b.balance_alpha);
  EXPECT_EQ(a.eval_every, b.eval_every);
  EXPECT_EQ(a.eval_batches, b.eval_batches);
  EXPECT_NE(fp8.out, bf16.out);
}

TEST(TrainingDevice, CudaWithoutABackendIsAClearErrorBeforeAnyWork) {
  const fs::path dir = fresh_dir("no-backend");
  Recipe r = small_recipe(dir);
  r.device = Device::CUDA;
  const std::string e = error_of([&] { run_recipe(r); });
  EXPECT_NE(e.find(r.file.string() + ": device: cuda: this build has no CUDA backend"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(r.out)) << "the run folder was made before the device was checked";
}

TEST(TrainingDevice, AHandedInBackendDrivesTheStageLoopWithTheCpusLosses) {
  const fs::path a = fresh_dir("cpu"), b = fresh_dir("handed-in");
  run_recipe(small_recipe(a));
  Recipe r = small_recipe(b);
  r.device = Device::CUDA;
  CountingBackend::stages = CountingBackend::train_forwards = CountingBackend::eval_forwards = 0;
  CountingBackend::updates = CountingBackend::checkpoints = 0;
  const auto summary =
      run_recipe(r, [](Model& host) -> std::unique_ptr<TrainingBackend> { return std::make_unique<CountingBackend>(host); });
  EXPECT_EQ(summary.at("device"), "counting");
  EXPECT_EQ(CountingBackend::stages, 1);
  EXPECT_EQ(CountingBackend::train_forwards, 6);
  EXPECT_EQ(CountingBackend::updates, 6);
  EXPECT_EQ(CountingBackend::eval_forwards, 2 * 2);  // steps 3 and 6, 2 validation batches each
  EXPECT_EQ(CountingBackend::checkpoints, 2);        // steps 3 and 6
  // The same work through the interface: every loss and norm bit for bit, "device" added to each line.
  const auto la = step_lines(a / "run" / "metrics.jsonl"), lb = step_lines(b / "run" / "metrics.jsonl");
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  for (size_t i = 0; i < la.size(); ++i) {
    EXPECT_EQ(la[i]["loss"].get<double>(), lb[i]["loss"].get<double>()) << "step " << i + 1;
    EXPECT_EQ(la[i]["grad_norm"].get<double>(), lb[i]["grad_norm"].get<double>()) << "step " << i + 1;
    EXPECT_FALSE(la[i].contains("device"));
    EXPECT_EQ(lb[i].value("device", ""), "counting");
  }
  EXPECT_TRUE(fs::exists(b / "run" / "pretrain" / "optimizer.safetensors"));
}

}  // namespace
}  // namespace moerl
