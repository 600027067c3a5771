// The CUDA training backend: run_stage (runtime/train/trainer.hpp) on a GpuModel and a GpuAdamW on the current
// device. The host Model the backend is made from supplies the initial weights and stays its host copy:
// checkpoints download the weights into it and the moments into a host AdamW, so the files are the CPU's,
// resumable on either device.
//   Recipe recipe = load_recipe(file);                       // device: cuda
//   run_recipe(recipe, gpu::make_gpu_backend);
#pragma once
#include <memory>

#include "runtime/recipe/recipe.hpp"
#include "runtime/train/backend.hpp"

namespace moerl::gpu {

// Uploads `host`'s parameters to a new GpuModel on the current device. `host` must outlive the backend.
// Throws moerl::Error when there is no CUDA device.
std::unique_ptr<TrainingBackend> make_gpu_backend(Model& host);

// Data parallelism over `replicas` GPUs of this process (gpu_data_parallel.hpp: one replica per device, ZeRO-1
// AdamW over NCCL), uploaded from `host` like make_gpu_backend, with the same checkpoints: host_model() is
// replica 0's weights (all replicas hold the same), host_optimizer() the shards' moments reassembled. Throws
// moerl::Error when fewer than `replicas` devices are visible.
std::unique_ptr<TrainingBackend> make_gpu_data_parallel_backend(Model& host, int replicas);

// The backend `recipe.device` names: for cuda make_gpu_backend, or make_gpu_data_parallel_backend with
// parallelism.data > 1; make_cpu_backend for cpu. The chooser a CUDA build's `moerl run` hands the actor
// runtime (actors::BackendChooser).
std::unique_ptr<TrainingBackend> backend_for_recipe(const Recipe& recipe, Model& host);

}  // namespace moerl::gpu
