#include "runtime/gpu/gpu_data_parallel.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "kernels/cuda/adamw.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_adamw.hpp"
#include "runtime/gpu/gpu_model.hpp"
#include "runtime/gpu/nccl_group.hpp"
#include "runtime/optim/adamw_state.hpp"
#include "runtime/parallel/dp_trainer.hpp"

namespace moerl::gpu {
namespace {

using adamw_state::kExpAvg;
using adamw_state::kExpAvgSq;
using adamw_state::kStep;

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown exception";
  }
}

// One thread per replica, with device r current for its whole life (cudaSetDevice is per host thread). run()
// hands every thread its task and waits for all; a task that throws calls on_error at once (which aborts the
// NCCL group, so that the other replicas stop waiting for it) and run() rethrows the first error.
class RankThreads {
 public:
  RankThreads(int n, std::function<void(const std::string&)> on_error)
      : on_error_(std::move(on_error)), tasks_(static_cast<size_t>(n)) {
    for (int r = 0; r < n; ++r) threads_.emplace_back([this, r] { loop(r); });
  }
  ~RankThreads() {
    {
      const std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  RankThreads(const RankThreads&) = delete;
  RankThreads& operator=(const RankThreads&) = delete;

  void run(const std::function<void(int)>& fn) {
    std::vector<int> all;
    for (int r = 0; r < static_cast<int>(threads_.size()); ++r) all.push_back(r);
    run_on(all, fn);
  }
  void run_on(const std::vector<int>& ranks, const std::function<void(int)>& fn) {
    std::unique_lock lock(mutex_);
    errors_.clear();
    for (int r : ranks) tasks_[static_cast<size_t>(r)] = [&fn, r] { fn(r); };
    pending_ = static_cast<int>(ranks.size());
    wake_.notify_all();
    done_.wait(lock, [this] { return pending_ == 0; });
    if (!errors_.empty()) {
      const auto [rank, error] = errors_.front();
      throw Error("data-parallel replica " + std::to_string(rank) + " (cuda:" + std::to_string(rank) +
                  "): " + message_of(error));
    }
  }

 private:
  void loop(int rank) {
    const cudaError_t set = cudaSetDevice(rank);
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || tasks_[static_cast<size_t>(rank)] != nullptr; });
        if (!tasks_[static_cast<size_t>(rank)]) return;
        task = std::exchange(tasks_[static_cast<size_t>(rank)], nullptr);
      }
      std::exception_ptr error;
      try {
        if (set != cudaSuccess)
          throw Error(std::string("cudaSetDevice(") + std::to_string(rank) + ") failed: " + cudaGetErrorString(set));
        task();
      } catch (...) {
        error = std::current_exception();
      }
      if (error) {
        {
          const std::lock_guard lock(mutex_);
          errors_.emplace_back(rank, error);  // before the abort below: the cause is reported, not its echoes
        }
        on_error_("replica " + std::to_string(rank) + " failed: " + message_of(error));
      }
      const std::lock_guard lock(mutex_);
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::function<void(const std::string&)> on_error_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::function<void()>> tasks_;  // per rank; empty: nothing to do
  int pending_ = 0;
  bool stop_ = false;
  std::vector<std::pair<int, std::exception_ptr>> errors_;
  std::vector<std::thread> threads_;  // last: started after everything they use exists
};

// A part of one trainable parameter inside a replica's shard.
struct Slice {
  size_t param = 0;   // index into GpuModel::params()
  int64_t begin = 0;  // first element within the parameter
  int64_t n = 0;
  std::string name;   // "<parameter>[begin:end]", the slice's name in its GpuAdamW
};

struct Replica {
  std::unique_ptr<GpuModel> model;
  std::unique_ptr<NcclRank> nccl;
  std::unique_ptr<GpuAdamW> optimizer;
  std::vector<Slice> slices;  // in parameter name order
  LossReport local;           // of the last forward, on this replica's slice
  std::vector<ExpertLoad> loads;
  double weight = 1;  // n_r / N of the last training forward
  StepStats stats;
};

}  // namespace

struct GpuDataParallel::Impl {
  Impl(const ModelConfig& c, int n, std::chrono::milliseconds timeout)
      : config(c), replicas(static_cast<size_t>(n)), group(n, timeout),
        threads(n, [this](const std::string& why) { group.abort(why); }) {}
  ~Impl() {
    // Each replica's optimizer, model and communicator on its own thread; the communicators' teardown is
    // collective (or an abort when the group failed). Errors are not thrown from a destructor.
    try {
      threads.run([this](int r) {
        Replica& rep = replicas[static_cast<size_t>(r)];
        rep.optimizer.reset();
        rep.model.reset();
        rep.nccl.reset();
      });
    } catch (...) {
    }
  }

  // Runs fn on the given replicas' threads (all when empty); after a failure the group is unusable.
  void run(const std::function<void(int)>& fn, std::vector<int> ranks = {}) {
    require(!failed, [&] { return "data-parallel GPU group: unusable after an earlier failure: " + failure; });
    try {
      if (ranks.empty())
        threads.run(fn);
      else
        threads.run_on(ranks, fn);
    } catch (const std::exception& e) {
      failed = true;
      failure = e.what();
      throw;
    }
  }
  Replica& at(int r) { return replicas[static_cast<size_t>(r)]; }
  int size() const { return static_cast<int>(replicas.size()); }
  size_t shard() const { return replicas[0].model->flat_size() / replicas.size(); }  // floats per replica

  ModelConfig config;
  std::vector<Replica> replicas;
  NcclGroup group;
  AdamWConfig optimizer_config;
  bool have_optimizer = false;
  bool forward_on_one = false;  // the last forward ran on replica 0 alone
  bool can_backward = false;
  std::vector<ExpertLoad> loads;  // of the last forward, summed over replicas
  bool failed = false;
  std::string failure;
  RankThreads threads;  // last: destroyed first, after ~Impl's teardown ran on it
};

GpuDataParallel::GpuDataParallel(const ModelConfig& config, int replicas, std::chrono::milliseconds timeout) {
  require(replicas >= 1,
          [&] { return "data-parallel GPU group: " + std::to_string(replicas) + " replicas, expected at least one"; });
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess) devices = 0;
  require(devices >= replicas, [&] {
    return "device: cuda with parallelism.data: " + std::to_string(replicas) + " needs " + std::to_string(replicas) +
           " GPUs (one per replica), " + std::to_string(devices) + " visible" +
           (e == cudaSuccess ? "" : std::string(" (") + cudaGetErrorString(e) + ")");
  });
  config.validate("data-parallel GPU model config");
  impl_ = std::make_unique<Impl>(config, replicas, timeout);
  Impl& m = *impl_;
  m.run([&m](int r) {
    Replica& rep = m.at(r);
    rep.model = std::make_unique<GpuModel>(m.config, m.size());
    rep.nccl = std::make_unique<NcclRank>(m.group, r);
  });
  // Every replica's shard: the trainable tensors' parts in [r * shard, (r + 1) * shard) of the flat allocation.
  const size_t shard = m.shard();
  for (int r = 0; r < replicas; ++r) {
    Replica& rep = m.at(r);
    const float* base = rep.model->flat_values();
    const auto& params = rep.model->params();
    const size_t lo = static_cast<size_t>(r) * shard, hi = lo + shard;
    for (size_t i = 0; i < params.size(); ++i) {
      const DeviceParam& p = params[i];
      if (!p.trainable || p.numel == 0) continue;
      const size_t offset = static_cast<size_t>(p.value - base);
      const size_t a = std::max(lo, offset), b = std::min(hi, offset + static_cast<size_t>(p.numel));
      if (a >= b) continue;
      const auto begin = static_cast<int64_t>(a - offset), end = static_cast<int64_t>(b - offset);
      rep.slices.push_back({i, begin, end - begin,
                            p.name + "[" + std::to_string(begin) + ":" + std::to_string(end) + "]"});
    }
  }
}

GpuDataParallel::~GpuDataParallel() = default;

int GpuDataParallel::replicas() const { return impl_->size(); }
const ModelConfig& GpuDataParallel::config() const { return impl_->config; }

void GpuDataParallel::upload(const Params& host) {
  impl_->run([this, &host](int r) { impl_->at(r).model->upload(host); });
}

void GpuDataParallel::download(Params& host) {
  impl_->run([this, &host](int r) { impl_->at(r).model->download(host); }, {0});
}

void GpuDataParallel::start_stage(const AdamWConfig& config) {
  Impl& m = *impl_;
  const size_t shard = m.shard();
  m.have_optimizer = false;
  m.run([&m, &config, shard](int r) {
    Replica& rep = m.at(r);
    rep.optimizer.reset();  // the previous stage's moments go before the next ones are allocated
    GpuModel& model = *rep.model;
    std::vector<DeviceParam> parts;
    for (const Slice& s : rep.slices) {
      const DeviceParam& p = model.params()[s.param];
      DeviceParam part;
      part.name = s.name;
      // A part of a matrix stays of rank 2 ([1, n]): GpuAdamW decays tensors of rank >= 2 only.
      part.shape = p.shape.size() >= 2 ? Shape{1, s.n} : Shape{s.n};
      part.value = p.value + s.begin;
      part.grad = p.grad + s.begin;
      part.numel = s.n;
      parts.push_back(std::move(part));
    }
    NcclRank& nccl = *rep.nccl;
    float* values = model.flat_values();
    const cudaStream_t stream = model.stream();
    auto gather = [&model, &nccl, values, shard, r, stream] {
      // Every replica's updated shard into every replica's parameters, then the prepared (quantized) weights.
      nccl.allgather(values + static_cast<size_t>(r) * shard, values, shard, stream);
      model.linear().weights_changed();
    };
    auto global_norm = [&nccl, stream](double* sum_sq) { nccl.allreduce_sum(sum_sq, sum_sq, 1, stream); };
    rep.optimizer = std::make_unique<GpuAdamW>(std::move(parts), config, stream, gather, global_norm);
  });
  m.optimizer_config = config;
  m.have_optimizer = true;
}

void GpuDataParallel::zero_grad() {
  impl_->run([this](int r) { impl_->at(r).model->zero_grad(); });
}

LossReport GpuDataParallel::forward(const TokenBatch& batch, const ForwardOptions& options) {
  Impl& m = *impl_;
  const int R = m.size();
  m.can_backward = false;
  if (batch.batch < R) {
    require(!options.for_backward, [&] {
      return "data-parallel GPU training: a batch of " + std::to_string(batch.batch) + " sequences for " +
             std::to_string(R) +
             " replicas; every replica needs one (make the batch a multiple of "
             "parallelism.data)";
    });
    // Evaluation of a short batch: replica 0 alone, on all of it.
    LossReport report;
    m.run([&](int r) {
      report = m.at(r).model->forward(batch, options);
      m.at(r).loads = m.at(r).model->expert_loads();
    }, {0});
    m.loads = m.at(0).loads;
    m.forward_on_one = true;
    return report;
  }
  m.run([&](int r) {
    Replica& rep = m.at(r);
    rep.local = rep.model->forward(slice_batch(batch, r, R), options);
    rep.loads = rep.model->expert_loads();
  });
  m.forward_on_one = false;
  m.can_backward = options.for_backward;

  // Each replica's share of the global mean: n_r / N (equal shares when no token is counted anywhere).
  double tokens = 0;
  for (const Replica& rep : m.replicas) tokens += static_cast<double>(rep.local.tokens);
  LossReport report;
  for (Replica& rep : m.replicas) {
    rep.weight = tokens > 0 ? static_cast<double>(rep.local.tokens) / tokens : 1.0 / R;
    report.loss += rep.weight * rep.local.loss;
    report.mtp_loss += rep.weight * rep.local.mtp_loss;
    report.balance_loss += rep.weight * rep.local.balance_loss;
    report.total += rep.weight * rep.local.total;
  }
  report.tokens = static_cast<int64_t>(tokens);

  m.loads = m.at(0).loads;
  for (int r = 1; r < R; ++r) {
    const auto& other = m.at(r).loads;
    require(other.size() == m.loads.size(), "data-parallel GPU forward: replicas report different MoE layer counts");
    for (size_t l = 0; l < other.size(); ++l) {
      m.loads[l].tokens += other[l].tokens;
      for (size_t e = 0; e < other[l].tokens_per_expert.size(); ++e)
        m.loads[l].tokens_per_expert[e] += other[l].tokens_per_expert[e];
    }
  }
  return report;
}

void GpuDataParallel::backward() {
  Impl& m = *impl_;
  require(m.can_backward, "data-parallel GPU backward: no training forward (for_backward) on every replica before it");
  m.run([&m](int r) { m.at(r).model->backward(); });
  m.can_backward = false;
}

StepStats GpuDataParallel::optimizer_step(int64_t step) {
  Impl& m = *impl_;
  require(m.have_optimizer, "data-parallel GPU optimizer step: no optimizer before start_stage");
  const size_t shard = m.shard();
  m.run([&m, shard, step](int r) {
    Replica& rep = m.at(r);
    GpuModel& model = *rep.model;
    model.settle_grads();  // backward did, unless there was none since zero_grad
    float* grads = model.flat_grads();
    const cudaStream_t stream = model.stream();
    // This replica's gradients times n_r / N (FP32, as the CPU's ZeroAdamW), then summed over the replicas into
    // this replica's shard, in place.
    if (rep.weight != 1.0)
      cuda::scale(grads, static_cast<int64_t>(model.flat_size()), static_cast<float>(rep.weight), stream);
    rep.nccl->reduce_scatter_sum(grads, grads + static_cast<size_t>(r) * shard, shard, stream);
    rep.stats = rep.optimizer->step(step);  // global norm, clip, update of the shard, all-gather
  });
  return m.at(0).stats;
}

std::vector<ExpertLoad> GpuDataParallel::expert_loads() const { return impl_->loads; }

void GpuDataParallel::update_router_bias(float gamma) {
  Impl& m = *impl_;
  m.run([&m, gamma](int r) { m.at(r).model->update_router_bias(gamma, m.loads); });
}

const AdamWConfig& GpuDataParallel::optimizer_config() const {
  require(impl_->have_optimizer, "data-parallel GPU optimizer: no optimizer before start_stage");
  return impl_->optimizer_config;
}

std::map<std::string, Tensor> GpuDataParallel::optimizer_state() {
  Impl& m = *impl_;
  require(m.have_optimizer, "data-parallel GPU optimizer state: no optimizer before start_stage");
  std::vector<std::map<std::string, Tensor>> shards(m.replicas.size());
  m.run([&m, &shards](int r) { shards[static_cast<size_t>(r)] = m.at(r).optimizer->state(); });
  // Whole BF16 moments per trainable parameter, each part copied to its place.
  const auto& params = m.at(0).model->params();
  std::map<std::string, Tensor> out;
  for (const DeviceParam& p : params) {
    if (!p.trainable) continue;
    out.emplace(kExpAvg + p.name, Tensor(p.shape, DType::BF16));
    out.emplace(kExpAvgSq + p.name, Tensor(p.shape, DType::BF16));
  }
  for (int r = 0; r < m.size(); ++r)
    for (const Slice& s : m.at(r).slices) {
      const std::string& name = params[s.param].name;
      for (const char* key : {kExpAvg, kExpAvgSq}) {
        const Tensor& part = shards[static_cast<size_t>(r)].at(key + s.name);
        std::memcpy(out.at(key + name).bytes() + s.begin * 2, part.bytes(), static_cast<size_t>(s.n) * 2);
      }
    }
  out.emplace(kStep, shards[0].at(kStep).clone());
  return out;
}

void GpuDataParallel::load_optimizer_state(const SafeTensors& saved) {
  Impl& m = *impl_;
  require(m.have_optimizer, "data-parallel GPU optimizer state: no optimizer before start_stage");
  const std::string& src = saved.source;
  // AdamW::load_state's checks (runtime/optim/adamw_state.hpp) on the whole tensors; then each replica loads its
  // parts.
  const auto& params = m.at(0).model->params();
  std::set<std::string> known{kStep};
  for (const DeviceParam& p : params)
    if (p.trainable) adamw_state::moments(saved, p.name, p.shape, known);
  adamw_state::refuse_unknown(saved, known);
  adamw_state::step(saved);
  const Tensor& st = saved.tensors.at(kStep);

  std::vector<SafeTensors> parts(m.replicas.size());
  for (int r = 0; r < m.size(); ++r) {
    SafeTensors& part = parts[static_cast<size_t>(r)];
    part.source = src + " (replica " + std::to_string(r) + "'s shard)";
    part.tensors.emplace(kStep, st.clone());
    for (const Slice& s : m.at(r).slices) {
      const DeviceParam& p = params[s.param];
      const Shape shape = p.shape.size() >= 2 ? Shape{1, s.n} : Shape{s.n};
      for (const char* key : {kExpAvg, kExpAvgSq}) {
        Tensor t(shape, DType::BF16);
        std::memcpy(t.bytes(), saved.tensors.at(key + p.name).bytes() + s.begin * 2, static_cast<size_t>(s.n) * 2);
        part.tensors.emplace(key + s.name, std::move(t));
      }
    }
  }
  m.run([&m, &parts](int r) { m.at(r).optimizer->load_state(parts[static_cast<size_t>(r)]); });
}

size_t GpuDataParallel::moment_elements(int replica) const {
  require(impl_->have_optimizer, "data-parallel GPU optimizer: no optimizer before start_stage");
  require(replica >= 0 && replica < impl_->size(),
          [&] { return "data-parallel GPU group: no replica " + std::to_string(replica); });
  return impl_->at(replica).optimizer->moment_elements();
}

size_t GpuDataParallel::trainable_elements() const {
  size_t n = 0;
  for (const DeviceParam& p : impl_->replicas[0].model->params())
    if (p.trainable) n += static_cast<size_t>(p.numel);
  return n;
}

void GpuDataParallel::each_model(const std::function<void(int, GpuModel&)>& fn) {
  impl_->run([this, &fn](int r) { fn(r, *impl_->at(r).model); });
}

std::vector<float> GpuDataParallel::flat_values(int replica) {
  require(replica >= 0 && replica < impl_->size(),
          [&] { return "data-parallel GPU group: no replica " + std::to_string(replica); });
  std::vector<float> out;
  impl_->run([this, &out](int r) {
    GpuModel& model = *impl_->at(r).model;
    out.resize(model.flat_size());
    CUDA_CHECK(cudaMemcpyAsync(out.data(), model.flat_values(), out.size() * sizeof(float), cudaMemcpyDeviceToHost,
                               model.stream()));
    CUDA_CHECK(cudaStreamSynchronize(model.stream()));
  }, {replica});
  return out;
}

}  // namespace moerl::gpu
