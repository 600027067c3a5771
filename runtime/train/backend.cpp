#include "runtime/train/backend.hpp"

#include "runtime/error.hpp"

namespace moerl {
namespace {

class CpuBackend final : public TrainingBackend {
 public:
  explicit CpuBackend(Model& model) : model_(model) {}

  std::string device() const override { return "cpu"; }
  const ModelConfig& config() const override { return model_.config(); }

  void start_stage(const AdamWConfig& optimizer) override {
    optimizer_.reset();  // the previous stage's moments go before the next ones are allocated
    optimizer_ = std::make_unique<AdamW>(model_.params(), optimizer);
  }
  void load_weights(const SafeTensors& weights) override { model_.load_weights(weights); }
  void load_optimizer_state(const SafeTensors& state) override { optimizer().load_state(state); }

  void zero_grad() override { model_.params().zero_grad(); }
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options) override {
    return model_.forward(batch, options);
  }
  void backward() override { model_.backward(); }
  StepStats optimizer_step(int64_t step) override { return optimizer().step(step); }
  std::vector<ExpertLoad> expert_loads() const override { return model_.expert_loads(); }
  void update_router_bias(float gamma) override { model_.update_router_bias(gamma); }

  const Model& host_model() override { return model_; }
  const AdamW& host_optimizer() override { return optimizer(); }

 private:
  AdamW& optimizer() {
    require(optimizer_ != nullptr, "training backend (cpu): no optimizer before start_stage");
    return *optimizer_;
  }
  Model& model_;
  std::unique_ptr<AdamW> optimizer_;
};

}  // namespace

std::unique_ptr<TrainingBackend> make_cpu_backend(Model& model) { return std::make_unique<CpuBackend>(model); }

}  // namespace moerl
