// The model and optimizer a training stage drives, on one device. run_stage (trainer.hpp) is written once
// against this interface: the CPU backend (make_cpu_backend) wraps moerl::Model and moerl::AdamW; the CUDA
// backend (runtime/gpu/gpu_trainer.hpp: GpuModel and GpuAdamW) is handed in by the command line as a
// BackendFactory, so moerl_runtime never depends on CUDA.
//
// Every backend keeps the CPU's names, shapes and checkpoint formats: a checkpoint written on one device
// resumes on the other.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/safetensors.hpp"

namespace moerl {

class TrainingBackend {
 public:
  virtual ~TrainingBackend() = default;

  virtual std::string device() const = 0;  // "cpu", "cuda"
  virtual const ModelConfig& config() const = 0;

  // A fresh optimizer for the next stage: zero moments, no updates taken.
  virtual void start_stage(const AdamWConfig& optimizer) = 0;
  // Weights from a checkpoint (Model::load_weights' rules and errors); optimizer state (AdamW::load_state's),
  // after start_stage.
  virtual void load_weights(const SafeTensors& weights) = 0;
  virtual void load_optimizer_state(const SafeTensors& state) = 0;

  // One training step is zero_grad, forward, backward, optimizer_step (then expert_loads and
  // update_router_bias); validation is forward with options.for_backward = false. As Model and AdamW.
  virtual void zero_grad() = 0;
  virtual LossReport forward(const TokenBatch& batch, const ForwardOptions& options) = 0;
  virtual void backward() = 0;
  virtual StepStats optimizer_step(int64_t step) = 0;  // step: 0-based, for the learning-rate schedule
  virtual std::vector<ExpertLoad> expert_loads() const = 0;
  virtual void update_router_bias(float gamma) = 0;

  // Host views for checkpoints: the model with the current weights, the optimizer with the current moments
  // and update count (copied from the device where there is one). Valid until the next call that changes
  // weights or moments; host_optimizer needs start_stage.
  virtual const Model& host_model() = 0;
  virtual const AdamW& host_optimizer() = 0;
};

// The CPU backend, training `model` in place (the model must outlive the backend).
std::unique_ptr<TrainingBackend> make_cpu_backend(Model& model);

// Makes the backend of another device from a host model that holds the initial weights; the host model must
// outlive the backend, which uses it as its host copy for checkpoints.
using BackendFactory = std::function<std::unique_ptr<TrainingBackend>(Model& host)>;

}  // namespace moerl
