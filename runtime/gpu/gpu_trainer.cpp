#include "runtime/gpu/gpu_trainer.hpp"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_adamw.hpp"
#include "runtime/gpu/gpu_data_parallel.hpp"
#include "runtime/gpu/gpu_model.hpp"

namespace moerl::gpu {
namespace {

class GpuBackend final : public TrainingBackend {
 public:
  explicit GpuBackend(Model& host) : host_(host), model_(host.config()) { model_.upload(host.params()); }

  std::string device() const override { return "cuda"; }
  const ModelConfig& config() const override { return model_.config(); }

  void start_stage(const AdamWConfig& optimizer) override {
    optimizer_.reset();  // the previous stage's moments go before the next ones are allocated
    host_optimizer_.reset();
    optimizer_ = std::make_unique<GpuAdamW>(model_, optimizer);
  }
  void load_weights(const SafeTensors& weights) override {
    host_.load_weights(weights);  // the CPU's checks and messages
    model_.upload(host_.params());
  }
  void load_optimizer_state(const SafeTensors& state) override { optimizer().load_state(state); }

  void zero_grad() override { model_.zero_grad(); }
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options) override {
    return model_.forward(batch, options);
  }
  void backward() override { model_.backward(); }
  StepStats optimizer_step(int64_t step) override { return optimizer().step(step); }
  std::vector<ExpertLoad> expert_loads() const override { return model_.expert_loads(); }
  void update_router_bias(float gamma) override { model_.update_router_bias(gamma); }

  const Model& host_model() override {
    model_.download(host_.params());
    return host_;
  }
  const AdamW& host_optimizer() override {
    GpuAdamW& gpu = optimizer();
    // A host AdamW over the host model's parameters, given the device moments through load_state (which
    // checks that both hold the same tensors).
    if (!host_optimizer_) host_optimizer_ = std::make_unique<AdamW>(host_.params(), gpu.config());
    SafeTensors state;
    state.source = "the GPU optimizer's state";
    state.tensors = gpu.state();
    host_optimizer_->load_state(state);
    return *host_optimizer_;
  }

 private:
  GpuAdamW& optimizer() {
    require(optimizer_ != nullptr, "training backend (cuda): no optimizer before start_stage");
    return *optimizer_;
  }
  Model& host_;
  GpuModel model_;
  std::unique_ptr<GpuAdamW> optimizer_;
  std::unique_ptr<AdamW> host_optimizer_;  // made on the first checkpoint of a stage
};

// The same surface over GpuDataParallel: every call goes to all replicas.
class GpuDataParallelBackend final : public TrainingBackend {
 public:
  GpuDataParallelBackend(Model& host, int replicas) : host_(host), dp_(host.config(), replicas) {
    dp_.upload(host.params());
  }

  std::string device() const override { return "cuda"; }
  const ModelConfig& config() const override { return dp_.config(); }

  void start_stage(const AdamWConfig& optimizer) override {
    host_optimizer_.reset();
    dp_.start_stage(optimizer);
  }
  void load_weights(const SafeTensors& weights) override {
    host_.load_weights(weights);  // the CPU's checks and messages
    dp_.upload(host_.params());
  }
  void load_optimizer_state(const SafeTensors& state) override { dp_.load_optimizer_state(state); }

  void zero_grad() override { dp_.zero_grad(); }
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options) override {
    return dp_.forward(batch, options);
  }
  void backward() override { dp_.backward(); }
  StepStats optimizer_step(int64_t step) override { return dp_.optimizer_step(step); }
  std::vector<ExpertLoad> expert_loads() const override { return dp_.expert_loads(); }
  void update_router_bias(float gamma) override { dp_.update_router_bias(gamma); }

  const Model& host_model() override {
    dp_.download(host_.params());
    return host_;
  }
  const AdamW& host_optimizer() override {
    if (!host_optimizer_) host_optimizer_ = std::make_unique<AdamW>(host_.params(), dp_.optimizer_config());
    SafeTensors state;
    state.source = "the data-parallel GPU optimizer's state";
    state.tensors = dp_.optimizer_state();
    host_optimizer_->load_state(state);
    return *host_optimizer_;
  }

 private:
  Model& host_;
  GpuDataParallel dp_;
  std::unique_ptr<AdamW> host_optimizer_;
};

}  // namespace

std::unique_ptr<TrainingBackend> make_gpu_data_parallel_backend(Model& host, int replicas) {
  auto backend = std::make_unique<GpuDataParallelBackend>(host, replicas);  // checks the device count
  for (int d = 0; d < replicas; ++d) {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, d));
    std::fprintf(stderr, "device: cuda:%d %s, %.0f GiB (data-parallel replica %d of %d)\n", d, prop.name,
                 static_cast<double>(prop.totalGlobalMem) / (1ull << 30), d, replicas);
  }
  return backend;
}

std::unique_ptr<TrainingBackend> make_gpu_backend(Model& host) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  require(e == cudaSuccess && count > 0, [&] {
    return std::string("device: cuda: no CUDA device (") + (e == cudaSuccess ? "none found" : cudaGetErrorString(e)) +
           ")";
  });
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::fprintf(stderr, "device: cuda:%d %s, %.0f GiB\n", dev, prop.name,
               static_cast<double>(prop.totalGlobalMem) / (1ull << 30));
  return std::make_unique<GpuBackend>(host);
}

std::unique_ptr<TrainingBackend> backend_for_recipe(const Recipe& recipe, Model& host) {
  if (recipe.device != Device::CUDA) return make_cpu_backend(host);
  if (recipe.parallelism.data > 1)
    return make_gpu_data_parallel_backend(host, static_cast<int>(recipe.parallelism.data));
  return make_gpu_backend(host);
}

}  // namespace moerl::gpu
