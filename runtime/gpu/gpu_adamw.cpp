#include "runtime/gpu/gpu_adamw.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <utility>

#include "kernels/cuda/adamw.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_profile.hpp"
#include "runtime/optim/adamw_state.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::gpu {
namespace {

using adamw_state::kExpAvg;
using adamw_state::kExpAvgSq;
using adamw_state::kStep;
// Each span's moments start on a 256-byte boundary, so the update kernel takes its 4-wide path.
constexpr size_t kMomentAlign = 128;  // BF16 elements

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

template <class T> void device_alloc(T** p, size_t bytes) {
  void* raw = nullptr;
  CUDA_CHECK(cudaMalloc(&raw, bytes));
  *p = static_cast<T*>(raw);
}

}  // namespace

GpuAdamW::GpuAdamW(std::vector<DeviceParam> params, AdamWConfig config, cudaStream_t stream,
                   std::function<void()> after_update, std::function<void(double*)> reduce_norm)
    : config_(config), stream_(stream), after_update_(std::move(after_update)), reduce_norm_(std::move(reduce_norm)) {
  validate(config_);
  std::set<std::string> names;
  std::vector<const DeviceParam*> trainable;  // name order: the order of state()
  for (const DeviceParam& p : params) {
    require(names.insert(p.name).second, [&] { return "GpuAdamW: parameter " + p.name + " is listed twice"; });
    if (!p.trainable) continue;
    require(p.numel == shape_numel(p.shape) && p.numel >= 0, [&] {
      return "GpuAdamW: parameter " + p.name + " has " + std::to_string(p.numel) + " elements, its shape " +
             shape_string(p.shape) + " holds " + std::to_string(shape_numel(p.shape));
    });
    require(p.numel == 0 || (p.value && p.grad),
            [&] { return "GpuAdamW: parameter " + p.name + " needs a device value and gradient"; });
    trainable.push_back(&p);
    slots_.push_back({p.name, p.shape, p.numel, nullptr, nullptr});
  }
  // Spans follow the device addresses, not the names: a GpuModel lays out a layer's experts by address (each
  // expert's gate_proj and up_proj, then every down_proj), which name order interleaves. The update is elementwise
  // and the norm a sum, so the order of the spans changes nothing but the norm's last bits (see the header).
  std::vector<size_t> by_address(trainable.size());
  for (size_t i = 0; i < by_address.size(); ++i) by_address[i] = i;
  std::stable_sort(by_address.begin(), by_address.end(), [&](size_t a, size_t b) {
    return std::less<const float*>()(trainable[a]->value, trainable[b]->value);
  });
  std::vector<size_t> span_of(trainable.size());
  for (size_t i : by_address) {
    const DeviceParam& p = *trainable[i];
    const bool decay = p.shape.size() >= 2;
    Span* last = spans_.empty() ? nullptr : &spans_.back();
    if (last && p.numel > 0 && last->n > 0 && last->decay == decay && last->w + last->n == p.value &&
        last->g + last->n == p.grad) {
      last->n += p.numel;
    } else {
      spans_.push_back({p.value, p.grad, nullptr, nullptr, p.numel, decay});
    }
    span_of[i] = spans_.size() - 1;
  }
  std::vector<size_t> span_offset(spans_.size());
  for (size_t s = 0; s < spans_.size(); ++s) {
    span_offset[s] = moment_elements_;
    moment_elements_ += round_up(static_cast<size_t>(spans_[s].n), kMomentAlign);
  }
  const size_t bytes = std::max<size_t>(moment_elements_, 1) * sizeof(uint16_t);
  try {
    device_alloc(&m_, bytes);
    device_alloc(&v_, bytes);
    device_alloc(&norm_sq_, sizeof(double));
    device_alloc(&factor_, sizeof(float));
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&norm_host_), sizeof(double)));
    CUDA_CHECK(cudaEventCreateWithFlags(&norm_ready_, cudaEventDisableTiming));
    CUDA_CHECK(cudaMemsetAsync(m_, 0, bytes, stream_));
    CUDA_CHECK(cudaMemsetAsync(v_, 0, bytes, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
  } catch (...) {
    cudaFree(m_), cudaFree(v_), cudaFree(norm_sq_), cudaFree(factor_), cudaFreeHost(norm_host_);
    if (norm_ready_) cudaEventDestroy(norm_ready_);
    throw;
  }
  for (size_t s = 0; s < spans_.size(); ++s) spans_[s].m = m_ + span_offset[s], spans_[s].v = v_ + span_offset[s];
  // One launch per kernel for all spans, where every span is aligned for 4-wide access (a GpuModel's parameters
  // are; a data-parallel shard's may start anywhere). The same bits either way (kernels/cuda/adamw.hpp).
  static const bool per_span = env_switch("MOERL_ADAMW_LAUNCH", "batched", "per-span");
  if (!per_span && std::all_of(spans_.begin(), spans_.end(), cuda::AdamWSpans::fits))
    batched_ = std::make_unique<cuda::AdamWSpans>(spans_);
  // A parameter's moments sit at its value's offset within its span.
  for (size_t i = 0; i < trainable.size(); ++i) {
    const Span& sp = spans_[span_of[i]];
    const ptrdiff_t offset = trainable[i]->numel == 0 ? 0 : trainable[i]->value - sp.w;
    slots_[i].m = sp.m + offset;
    slots_[i].v = sp.v + offset;
  }
}

GpuAdamW::~GpuAdamW() {
  // Pending updates may still read the moments: wait for them. Errors are not thrown from a destructor.
  (void)cudaStreamSynchronize(stream_);
  cudaFree(m_);
  cudaFree(v_);
  cudaFree(norm_sq_);
  cudaFree(factor_);
  cudaFreeHost(norm_host_);
  cudaEventDestroy(norm_ready_);
}

StepStats GpuAdamW::step(int64_t step) {
  if (before_step_) before_step_();
  const detail::PhaseTimer timer("adamw.step", stream_);
  StepStats stats;
  stats.lr = learning_rate(config_, step);
  CUDA_CHECK(cudaMemsetAsync(norm_sq_, 0, sizeof(double), stream_));
  if (batched_)
    batched_->grad_norm_squared(norm_sq_, stream_);
  else
    for (const Span& s : spans_) cuda::grad_norm_squared(s.g, s.n, norm_sq_, stream_);
  if (reduce_norm_) reduce_norm_(norm_sq_);
  const int64_t t = t_ + 1;
  if (!batched_) return step_after_norm(stats, t);
  if (fp8_copies_) {  // the copies appear with the first forward (and change if the model forgets its weights)
    std::vector<cuda::Fp8WeightCopy> copies = fp8_copies_();
    if (copies != fp8_planned_) plan_fp8(copies);
  }
  // moerl::clip_grad_norm's factor (only when finite and above the limit; NaN, a skipped step, when not finite),
  // applied inside the update: the gradients are left as the backward wrote them.
  cuda::clip_factor(norm_sq_, config_.clip_grad_norm, factor_, stream_);
  CUDA_CHECK(cudaMemcpyAsync(norm_host_, norm_sq_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaEventRecord(norm_ready_, stream_));
  const AdamWConfig& c = config_;
  const cuda::AdamWUpdate u{stats.lr, c.beta1, c.beta2, c.eps, c.weight_decay, t, 1.0f, factor_};
  if (fused_) {
    rest_->adamw_step(u, stream_);
    fused_->update(u, stream_);
  } else {
    batched_->adamw_step(u, stream_);
  }
  CUDA_CHECK(cudaEventSynchronize(norm_ready_));
  stats.grad_norm = std::sqrt(*norm_host_);
  if (!std::isfinite(stats.grad_norm)) {  // the update kernels read NaN and changed nothing
    stats.skipped = true;
    return stats;
  }
  t_ = t;
  if (fused_)
    fp8_written_(fp8_fused_);
  else if (after_update_)
    after_update_();
  return stats;
}

StepStats GpuAdamW::step_after_norm(StepStats stats, int64_t t) {
  // Spans updated one launch each (not all aligned): the host reads the norm, then queues the updates.
  double sum = 0;
  CUDA_CHECK(cudaMemcpyAsync(&sum, norm_sq_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  stats.grad_norm = std::sqrt(sum);
  float factor = 1.0f;
  if (config_.clip_grad_norm > 0 && std::isfinite(stats.grad_norm) && stats.grad_norm > config_.clip_grad_norm)
    factor = static_cast<float>(config_.clip_grad_norm / stats.grad_norm);
  if (!std::isfinite(stats.grad_norm)) {
    stats.skipped = true;
    return stats;
  }
  for (const Span& s : spans_)
    cuda::adamw_step(s.w, s.g, s.m, s.v, s.n, stats.lr, config_.beta1, config_.beta2, config_.eps,
                     s.decay ? config_.weight_decay : 0.0, t, stream_, factor);
  t_ = t;
  if (after_update_) after_update_();
  return stats;
}

bool GpuAdamW::fuse_fp8_default() {
  static const bool apart = env_switch("MOERL_ADAMW_FP8", "fused", "apart");
  return !apart;
}

void GpuAdamW::plan_fp8(const std::vector<cuda::Fp8WeightCopy>& copies) {
  fp8_planned_ = copies;
  fused_.reset();
  rest_.reset();
  fp8_fused_.clear();
  // Copies by address; one sharing an element with another (the same weight prepared in two forms) is left out,
  // as is one not lying whole in a span with decay.
  auto end_of = [](const cuda::Fp8WeightCopy& c) { return c.w + c.out.elements(); };
  std::vector<cuda::Fp8WeightCopy> sorted = copies;
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return std::less<const float*>()(a.w, b.w); });
  std::vector<std::pair<const Span*, cuda::AdamWFp8Copy>> taken;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const cuda::Fp8WeightCopy& c = sorted[i];
    if ((i > 0 && end_of(sorted[i - 1]) > c.w) || (i + 1 < sorted.size() && end_of(c) > sorted[i + 1].w)) continue;
    const auto sp = std::find_if(spans_.begin(), spans_.end(),
                                 [&](const Span& s) { return s.decay && s.w <= c.w && end_of(c) <= s.w + s.n; });
    if (sp == spans_.end()) continue;
    const ptrdiff_t at = c.w - sp->w;
    const cuda::AdamWFp8Copy f{sp->w + at, sp->g + at, sp->m + at, sp->v + at, c.out};
    if (!cuda::AdamWFp8Copies::fits(f)) continue;
    taken.emplace_back(&*sp, f);
    fp8_fused_.push_back(c);
  }
  if (taken.empty()) return;
  // Every other element: each span's pieces between its fused copies (taken is in address order).
  std::vector<Span> rest;
  for (const Span& s : spans_) {
    int64_t from = 0;
    for (const auto& [sp, f] : taken) {
      if (sp != &s) continue;
      const int64_t at = f.w - s.w;
      if (at > from) rest.push_back({s.w + from, s.g + from, s.m + from, s.v + from, at - from, s.decay});
      from = at + f.out.elements();
    }
    if (s.n > from) rest.push_back({s.w + from, s.g + from, s.m + from, s.v + from, s.n - from, s.decay});
  }
  if (!std::all_of(rest.begin(), rest.end(), cuda::AdamWSpans::fits)) {
    fp8_fused_.clear();
    return;
  }
  std::vector<cuda::AdamWFp8Copy> fused;
  for (const auto& [sp, f] : taken) fused.push_back(f);
  fused_ = std::make_unique<cuda::AdamWFp8Copies>(fused);
  rest_ = std::make_unique<cuda::AdamWSpans>(rest);
}

std::map<std::string, Tensor> GpuAdamW::state() const {
  std::map<std::string, Tensor> out;
  for (const Slot& s : slots_) {
    Tensor m(s.shape, DType::BF16), v(s.shape, DType::BF16);
    CUDA_CHECK(cudaMemcpyAsync(m.bytes(), s.m, m.nbytes(), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaMemcpyAsync(v.bytes(), s.v, v.nbytes(), cudaMemcpyDeviceToHost, stream_));
    out.emplace(kExpAvg + s.name, std::move(m));
    out.emplace(kExpAvgSq + s.name, std::move(v));
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  Tensor step({1}, DType::I64);
  step.data<int64_t>()[0] = t_;
  out.emplace(kStep, std::move(step));
  return out;
}

void GpuAdamW::load_state(const SafeTensors& saved) {
  // AdamW::load_state's checks (runtime/optim/adamw_state.hpp): everything before anything is copied.
  std::vector<adamw_state::Moments> sources;
  std::set<std::string> known{kStep};
  for (const Slot& s : slots_) sources.push_back(adamw_state::moments(saved, s.name, s.shape, known));
  adamw_state::refuse_unknown(saved, known);
  const int64_t step = adamw_state::step(saved);

  for (size_t i = 0; i < slots_.size(); ++i) {
    const size_t bytes = static_cast<size_t>(slots_[i].numel) * sizeof(uint16_t);
    CUDA_CHECK(cudaMemcpyAsync(slots_[i].m, sources[i].exp_avg->bytes(), bytes, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(slots_[i].v, sources[i].exp_avg_sq->bytes(), bytes, cudaMemcpyHostToDevice, stream_));
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // `saved` may go as soon as this returns
  t_ = step;
}

}  // namespace moerl::gpu
