// The feed-forward blocks on the GPU: runtime/model/feed_forward.cpp step for step, with the CUDA ops.
// Routed experts: the router and the permutation plan on the device, the plan's offsets copied to the host once
// per layer, then
//   - FP8 (model sizes, kernels/cuda/moe_fp8.hpp): the plan moved to rows aligned to 128 per expert (zero rows
//     between), every activation quantized once for all experts, one cuBLASLt call per expert and GEMM (or, with
//     MOERL_MOE_GEMM=grouped, one grouped launch per projection for all experts);
//   - otherwise: one linear call per expert and projection on the expert's contiguous rows,
// SwiGLU once over all rows, combine.
// FP8 dense blocks (and the shared experts) with T a multiple of 128 run as one FP8 "expert" of all T rows
// (GpuDense::as_fp8_expert); the shared expert then runs on a side stream beside the routed experts, joined
// before the combine / scatter-add that add into its output. The routed backward never stores its output gradient:
// each row (gating weight · dy of its token) is made inside the kernel that quantizes it.
#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cuda/moe_experts.hpp"
#include "kernels/cuda/moe_fp8.hpp"
#include "kernels/cuda/moe_permute.hpp"
#include "kernels/cuda/router.hpp"
#include "kernels/cuda/swiglu.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_layers.hpp"
#include "runtime/gpu/gpu_profile.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::gpu::detail {
namespace {

// MOERL_MOE_COMBINE_BWD=separate: the routed experts' output gradient written to dyp [rows, H] by the combine's
// backward and read back by its quantization (the path before moe_fp8_experts_backward_combined); for comparing
// the two on the device. Read once per process.
bool separate_combine_backward() {
  static const bool separate = env_switch("MOERL_MOE_COMBINE_BWD", "fused", "separate");
  return separate;
}

// MOERL_MOE_YP=fp32: the FP8 routed experts' output rows yp in FP32 instead of BF16 (for comparing the two on the
// device; kernels/cuda/moe_fp8.hpp). Read once per process.
bool fp32_yp() {
  static const bool fp32 = env_switch("MOERL_MOE_YP", "bf16", "fp32");
  return fp32;
}

// MOERL_MOE_DXP=fp32: the FP8 routed experts' input gradient rows dxp in FP32 instead of BF16 (for comparing on the
// device). Read once per process.
bool fp32_dxp() {
  static const bool fp32 = env_switch("MOERL_MOE_DXP", "bf16", "fp32");
  return fp32;
}

// MOERL_MOE_GU=fp32: the FP8 experts' (and FP8 dense blocks') g | u and dh in FP32 instead of BF16 (for comparing
// on the device; MoeFp8Experts::gate_up_bf16). Then no longer kernels/cpu's FP8 recipe to the bit, which rounds them.
// Read once per process.
bool fp32_gate_up() {
  static const bool fp32 = env_switch("MOERL_MOE_GU", "bf16", "fp32");
  return fp32;
}

// The FP8 recipe's GEMM outputs that feed SwiGLU (g, u) and its gradient (dh) are BF16 values, as DeepSeek-V3's FP8
// GEMMs output BF16 (runtime/model/feed_forward.cpp): paths that hold them in FP32 round them in place.
void round_if_fp8(Precision p, float* x, int64_t n, cudaStream_t stream) {
  if (p == Precision::FP8) cuda::round_to_bf16(x, n, stream);
}

// Sets w's g | u in BF16 at `storage` where the FP8 experts' kernels take it (and MOERL_MOE_GU is not fp32).
void use_bf16_gate_up(cuda::MoeFp8Experts& w, void* storage) {
  if (!fp32_gate_up() && cuda::moe_fp8_gate_up_bf16_supported(w)) w.gate_up_bf16 = static_cast<uint16_t*>(storage);
}

// The experts' input x and SwiGLU output h quantized along tokens by the forward (MoeFp8Experts::x_codes_t,
// h_codes_t) into the given buffers, so the backward's Wgrads do not quantize them again, unless
// MOERL_MOE_KEEP_XT=0 / MOERL_MOE_KEEP_H=0 (for comparing on the device; read once).
void keep_along_tokens(cuda::MoeFp8Experts& w, uint8_t* x_codes_t, float* x_scales_t, uint8_t* h_codes_t,
                       float* h_scales_t) {
  static const bool keep_xt = [] {
    const char* v = std::getenv("MOERL_MOE_KEEP_XT");
    return v == nullptr || *v != '0';
  }();
  static const bool keep_h = [] {
    const char* v = std::getenv("MOERL_MOE_KEEP_H");
    return v == nullptr || *v != '0';
  }();
  if (keep_xt) w.x_codes_t = x_codes_t, w.x_scales_t = x_scales_t;
  if (keep_h) w.h_codes_t = h_codes_t, w.h_scales_t = h_scales_t;
}

SwigluParams swiglu_params(ParamStore& params, const std::string& prefix) {
  return {&params.at(prefix + ".gate_proj.weight"), &params.at(prefix + ".up_proj.weight"),
          &params.at(prefix + ".down_proj.weight")};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// GpuDense

GpuDense::GpuDense(ParamStore& params, const std::string& prefix, int64_t hidden, int64_t inter)
    : w_(swiglu_params(params, prefix)), hidden_(hidden), inter_(inter) {
  require(w_.gate->shape == Shape({inter, hidden}) && w_.down->shape == Shape({hidden, inter}), [&] {
    return "GpuModel: " + prefix + ": feed-forward weights do not match hidden " + std::to_string(hidden) +
           " x intermediate " + std::to_string(inter);
  });
}

void GpuDense::bind(Slab& s, int64_t tokens) {
  tokens_ = tokens;
  // Also room for the FP8 expert's g | u in BF16, [T, 2 Ip] (fp8_expert()).
  g_ = s.take<float>(tokens * cuda::moe_fp8_gate_up_padded(inter_));
  u_ = s.take<float>(tokens * inter_);
  h_ = s.take<float>(tokens * inter_);
  x_codes_t_ = s.take<uint8_t>(tokens * hidden_);
  x_scales_t_ = s.take<float>(hidden_ * (tokens / cuda::kMoeRowAlign));
  h_codes_t_ = s.take<uint8_t>(tokens * inter_);
  h_scales_t_ = s.take<float>(inter_ * (tokens / cuda::kMoeRowAlign));
  rows_ = s.take<int64_t>(2);
  rows_host_.get()[0] = 0;
  rows_host_.get()[1] = tokens;
}

bool GpuDense::as_fp8_expert(Precision p) const {
  static const bool linear = env_switch("MOERL_FP8_DENSE", "experts", "linear");
  return !linear && p == Precision::FP8 && tokens_ > 0 && tokens_ % cuda::kMoeRowAlign == 0 &&
         cuda::moe_fp8_experts_supported(hidden_, inter_);
}

cuda::MoeFp8Experts GpuDense::fp8_expert() const {
  cuda::MoeFp8Experts w{w_.gate->value, w_.up->value, w_.down->value, w_.gate->grad, w_.up->grad,
                        w_.down->grad,  1,            hidden_,       inter_};
  keep_along_tokens(w, x_codes_t_, x_scales_t_, h_codes_t_, h_scales_t_);
  // gate and up adjacent, as ParamStore lays them out: their Wgrad is one GEMM (cuda::moe_fp8_wgrad_pair).
  // g | u side by side in BF16 over g_'s storage where the kernels take it; else g and u apart in FP32.
  w.gate_up_side_by_side = true;
  use_bf16_gate_up(w, g_);
  w.gate_up_side_by_side = w.gate_up_bf16 != nullptr;
  return w;
}

void GpuDense::forward(const float* x, float* y, const Run& r) {
  const int64_t T = tokens_, H = hidden_, I = inter_;
  x_ = x;
  precision_ = r.precision;
  fp8_expert_ = as_fp8_expert(r.precision);
  if (fp8_expert_) {
    // From pinned memory that stays {0, T}: nothing to wait for.
    CUDA_CHECK(cudaMemcpyAsync(rows_, rows_host_.get(), 2 * sizeof(int64_t), cudaMemcpyHostToDevice, r.stream));
    cuda::moe_fp8_experts_forward(*r.linear, fp8_expert(), x, rows_host_.get(), rows_, g_, u_, h_, y, r.stream);
    return;
  }
  cuda::linear_forward(*r.linear, r.precision, x, w_.gate->value, g_, T, I, H, r.stream);
  cuda::linear_forward(*r.linear, r.precision, x, w_.up->value, u_, T, I, H, r.stream);
  round_if_fp8(r.precision, g_, T * I, r.stream);
  round_if_fp8(r.precision, u_, T * I, r.stream);
  cuda::swiglu_forward(g_, u_, h_, T * I, r.stream);
  cuda::linear_forward(*r.linear, r.precision, h_, w_.down->value, y, T, H, I, r.stream);
}

void GpuDense::backward(const float* dy, float* dx, const Run& r) {
  const int64_t T = tokens_, H = hidden_, I = inter_;
  const Precision p = precision_;
  cuda::LinearContext& lin = *r.linear;
  if (fp8_expert_) {
    cuda::MoeFp8Experts w = fp8_expert();
    w.overwrite_grads = take_all_unset({w_.gate, w_.up, w_.down}, r.stream);
    cuda::moe_fp8_experts_backward(lin, w, dy, x_, g_, u_, h_, rows_host_.get(), rows_, dx, r.stream);
    return;
  }
  Temp<float> dh(T * I, r), dg(T * I, r), du(T * I, r), dx_up(T * H, r);
  cuda::linear_backward(lin, p, dy, h_, w_.down->value, dh.get(), w_.down->grad, T, H, I, r.stream, false,
                        take_unset(*w_.down));
  round_if_fp8(p, dh.get(), T * I, r.stream);
  cuda::swiglu_backward(dh.get(), g_, u_, dg.get(), du.get(), T * I, r.stream);
  cuda::linear_backward(lin, p, dg.get(), x_, w_.gate->value, dx, w_.gate->grad, T, I, H, r.stream, false,
                        take_unset(*w_.gate));
  cuda::linear_backward(lin, p, du.get(), x_, w_.up->value, dx_up.get(), w_.up->grad, T, I, H, r.stream, false,
                        take_unset(*w_.up));
  add_inplace(dx, dx_up.get(), T * H, r.stream);
}

// ---------------------------------------------------------------------------------------------------------------
// GpuMoe

GpuMoe::GpuMoe(const ModelConfig& c, ParamStore& params, const std::string& prefix)
    : hidden_(c.hidden_size), inter_(c.moe_intermediate_size), shared_inter_(c.n_shared_experts * c.moe_intermediate_size) {
  const int64_t E = c.n_routed_experts, H = hidden_, I = inter_;
  spec_.n_experts = E;
  spec_.top_k = c.num_experts_per_tok;
  spec_.n_group = c.n_group;
  spec_.topk_group = c.topk_group;
  spec_.norm_topk_prob = c.norm_topk_prob;
  spec_.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  require(E > 0 && E <= cuda::kRouterMaxExperts && E <= cuda::kPermuteMaxExperts, [&] {
    return "GpuModel: " + prefix + ": n_routed_experts = " + std::to_string(E) + ", the GPU router takes 1 .. " +
           std::to_string(cuda::kRouterMaxExperts);
  });
  router_ = &params.at(prefix + ".gate.weight");
  bias_ = &params.at(prefix + ".gate.e_score_correction_bias");
  // ParamStore's layout: expert e's gate and up follow expert 0's at 2 I H (up I H after gate), its down at H I.
  const DeviceParam& g0 = params.at(prefix + ".experts.0.gate_proj.weight");
  const DeviceParam& u0 = params.at(prefix + ".experts.0.up_proj.weight");
  const DeviceParam& d0 = params.at(prefix + ".experts.0.down_proj.weight");
  const int64_t gs = expert_gate_up_stride(I, H);
  for (int64_t e = 0; e < E; ++e) {
    const std::string pe = prefix + ".experts." + std::to_string(e);
    const DeviceParam& g = params.at(pe + ".gate_proj.weight");
    const DeviceParam& u = params.at(pe + ".up_proj.weight");
    const DeviceParam& d = params.at(pe + ".down_proj.weight");
    require(g.value == g0.value + e * gs && u.value == g.value + I * H && d.value == d0.value + e * H * I &&
                g.grad == g0.grad + e * gs && u.grad == g.grad + I * H && d.grad == d0.grad + e * H * I,
            [&] {
              return "GpuModel: " + pe +
                     ": expert weights are not laid out as ParamStore's (the GEMMs read them at fixed strides)";
            });
    expert_params_.insert(expert_params_.end(), {&g, &u, &d});
  }
  gate_w_ = g0.value;
  up_w_ = u0.value;
  down_w_ = d0.value;
  gate_g_ = g0.grad;
  up_g_ = u0.grad;
  down_g_ = d0.grad;
  if (shared_inter_ > 0) shared_.emplace_back(params, prefix + ".shared_experts", H, shared_inter_);
  side_ = std::make_unique<SideStream>();
  offsets_host_ = PinnedHost<int64_t>(static_cast<size_t>(E + 1));
  aligned_host_ = PinnedHost<int64_t>(static_cast<size_t>(E + 1));
  load_.tokens_per_expert.assign(static_cast<size_t>(E), 0);
}

void GpuMoe::bind(Slab& s, int64_t batch, int64_t seq) {
  const int64_t T = batch * seq, E = spec_.n_experts, K = spec_.top_k, R = T * K;
  // Aligned rows (FP8): each expert's block rounded up to a multiple of kMoeRowAlign adds at most that - 1 rows.
  const int64_t RA = R + E * (cuda::kMoeRowAlign - 1);
  batch_ = batch;
  seq_ = seq;
  scores_ = s.take<float>(T * E);
  dscores_ = s.take<float>(T * E);
  topk_idx_ = s.take<int32_t>(T * K);
  topk_weight_ = s.take<float>(T * K);
  offsets_ = s.take<int64_t>(E + 1);
  token_of_ = s.take<int64_t>(R);
  row_of_ = s.take<int64_t>(R);
  aligned_ = s.take<int64_t>(E + 1);
  token_of_aligned_ = s.take<int64_t>(RA);
  tile_order_ = s.take<int32_t>(RA / cuda::kMoeRowAlign);
  row_of_aligned_ = s.take<int64_t>(R);
  // g and u: [R, I] each (u after g), or for the FP8 experts with gate_up_side_by_side one [RA, 2 Ip] matrix
  // (Ip = I rounded up to 128, u at column Ip; experts_fp8_u()).
  gp_ = s.take<float>(RA * 2 * cuda::moe_fp8_gate_up_padded(inter_));
  up_ = gp_ + RA * inter_;
  hp_ = s.take<float>(RA * inter_);
  yp_ = s.take<float>(RA * hidden_);
  x_codes_t_ = s.take<uint8_t>(RA * hidden_);
  x_scales_t_ = s.take<float>(hidden_ * (RA / cuda::kMoeRowAlign));
  h_codes_t_ = s.take<uint8_t>(RA * inter_);
  h_scales_t_ = s.take<float>(inter_ * (RA / cuda::kMoeRowAlign));
  for (GpuDense& d : shared_) d.bind(s, T);
}

float GpuMoe::forward(const float* x, float* y, const Run& r, float balance_alpha, bool for_backward,
                      const float* residual) {
  const int64_t T = batch_ * seq_, H = hidden_, I = inter_, E = spec_.n_experts, K = spec_.top_k, R = T * K;
  const Precision p = r.precision;
  cuda::LinearContext& lin = *r.linear;
  x_ = x;
  precision_ = p;
  balance_alpha_ = balance_alpha;
  balance_grad_ = balance_alpha > 0 && for_backward;

  const std::string ph = "moe" + std::to_string(E) + ".";
  const bool overlap = overlap_shared(p);
  if (overlap) fork_shared(x, y, r, true);
  std::optional<PhaseTimer> timer(std::in_place, p, (ph + "routing+sync.fwd").c_str(), r.stream);
  // Sub-phases (profiling only): router GEMM, top-k, plan, then the wait. MOERL_ROUTER_PRESYNC=1 (diagnostics)
  // first waits for the work queued before the router, as its own sub-phase, and runs the router GEMM a second
  // time after another wait ("routing.gemm2"; the same inputs, so the same scores).
  static const bool presync = [] {
    const char* v = std::getenv("MOERL_ROUTER_PRESYNC");
    return v != nullptr && *v == '1';
  }();
  std::optional<PhaseTimer> sub;
  if (presync) {
    sub.emplace(p, (ph + "routing.presync").c_str(), r.stream);
    CUDA_CHECK(cudaStreamSynchronize(r.stream));
  }
  sub.emplace(p, (ph + "routing.gemm").c_str(), r.stream);
  // Router, in FP32 whatever the precision of the experts; the scores overwrite the logits.
  // (A SIMT FP32 kernel of our own for these logits, 128 tokens x 64 experts a block, left the MoE layer as it was:
  // 11.90 / 11.87 vs 11.89 / 12.00 ms with cuBLASLt's; the GEMM runs beside the shared expert's forward. torch's FP32
  // mm takes 0.139 ms alone. bench/results/2026-11-29-gpu-router-swiglu-fwd-h200-78383af+tried.txt. Queuing this GEMM
  // before the shared expert's forward, with x's row codes made once on the side stream for both experts, and the
  // shared backward queued after the combine's backward: each within noise, 11.75-11.81 ms;
  // ...-sweep-x-rows-router-h200-8fdba24.txt. The three router GEMMs as 3xTF32 on mma.sync, FP32-accurate, ran
  // 2-3x slower than cuBLASLt's FP32 ones: ...-router-tf32x3-h200-2643227+tf32x3.txt.)
  cuda::linear_forward(lin, Precision::FP32, x, router_->value, scores_, T, E, H, r.stream);
  if (presync) {
    sub.emplace(p, (ph + "routing.presync2").c_str(), r.stream);
    CUDA_CHECK(cudaStreamSynchronize(r.stream));
    sub.emplace(p, (ph + "routing.gemm2").c_str(), r.stream);
    cuda::linear_forward(lin, Precision::FP32, x, router_->value, scores_, T, E, H, r.stream);
  }
  sub.emplace(p, (ph + "routing.topk").c_str(), r.stream);
  cuda::router_forward(spec_, scores_, bias_->value, T, scores_, topk_idx_, topk_weight_, r.stream);
  sub.emplace(p, (ph + "routing.plan").c_str(), r.stream);
  cuda::moe_permute_plan(topk_idx_, T, K, E, offsets_, token_of_, row_of_, r.stream);
  sub.emplace(p, (ph + "routing.balance+sync").c_str(), r.stream);
  CUDA_CHECK(cudaMemcpyAsync(offsets_host_.get(), offsets_, static_cast<size_t>(E + 1) * sizeof(int64_t),
                             cudaMemcpyDeviceToHost, r.stream));
  // The one wait of this layer: router_balance_loss synchronizes the stream to return its loss, which also
  // lands the offsets; without the balance loss, wait for the offsets alone.
  float balance = 0.0f;
  if (balance_alpha > 0) {
    if (balance_grad_) CUDA_CHECK(cudaMemsetAsync(dscores_, 0, static_cast<size_t>(T * E) * sizeof(float), r.stream));
    balance = cuda::router_balance_loss(spec_, scores_, topk_idx_, batch_, seq_, balance_alpha,
                                        balance_grad_ ? dscores_ : nullptr, r.stream);
  } else {
    CUDA_CHECK(cudaStreamSynchronize(r.stream));
  }
  sub.reset();
  const int64_t* off = offsets_host_.get();
  require(off[0] == 0 && off[E] == R, [&] {
    return "GpuModel: the permutation plan's offsets are inconsistent (offsets[E] = " + std::to_string(off[E]) +
           ", expected " + std::to_string(R) + ")";
  });
  load_.tokens = T;
  for (int64_t e = 0; e < E; ++e) {
    require(off[e + 1] >= off[e],
            [&] { return "GpuModel: the permutation plan's offsets decrease at expert " + std::to_string(e); });
    load_.tokens_per_expert[static_cast<size_t>(e)] = off[e + 1] - off[e];
  }

  // Shared experts write y (or have been started beside, above); routed experts add to it.
  timer.emplace(p, (ph + "shared.fwd").c_str(), r.stream);
  if (!overlap) {
    if (!shared_.empty())
      shared_[0].forward(x, y, r);
    else
      CUDA_CHECK(cudaMemsetAsync(y, 0, static_cast<size_t>(T * H) * sizeof(float), r.stream));
  }
  timer.emplace(p, (ph + "routed.fwd").c_str(), r.stream);

  aligned_rows_ = -1;
  if (p == Precision::FP8 && cuda::moe_fp8_experts_supported(H, I)) {
    // Routed experts on aligned rows: the plan moved there, gather (zero rows zero), the experts, combine.
    std::optional<PhaseTimer> part(std::in_place, p, (ph + "routed.align").c_str(), r.stream);
    int64_t* aligned_host = aligned_host_.get();
    const int64_t RA = cuda::moe_aligned_offsets(off, E, aligned_host);
    CUDA_CHECK(cudaMemcpyAsync(aligned_, aligned_host, static_cast<size_t>(E + 1) * sizeof(int64_t),
                               cudaMemcpyHostToDevice, r.stream));
    cuda::moe_align_plan(offsets_, aligned_, E, token_of_, row_of_, R, RA, token_of_aligned_, row_of_aligned_,
                         r.stream);
    if (!plain_tile_order()) cuda::moe_row_tile_order(aligned_, E, RA, tile_order_, r.stream);
    aligned_rows_ = RA;
    part.emplace(p, (ph + "routed.experts").c_str(), r.stream);
    const cuda::MoeFp8Experts w = experts_fp8();  // h in FP32 only when its token codes are not kept
    float* const h = w.h_codes_t ? nullptr : hp_;
    if (fp32_yp())
      cuda::moe_fp8_experts_forward_gathered(lin, w, x, T, token_of_aligned_, aligned_host, aligned_, gp_,
                                             experts_fp8_u(w), h, yp_, r.stream);
    else
      cuda::moe_fp8_experts_forward_gathered(lin, w, x, T, token_of_aligned_, aligned_host, aligned_, gp_,
                                             experts_fp8_u(w), h, yp16(), r.stream);
    part.emplace(p, (ph + "routed.combine").c_str(), r.stream);
    if (overlap) join_shared(r.stream);
    if (fp32_yp())
      cuda::moe_combine_aligned(yp_, topk_weight_, row_of_aligned_, T, K, H, RA, y, r.stream, residual);
    else
      cuda::moe_combine_aligned(yp16(), topk_weight_, row_of_aligned_, T, K, H, RA, y, r.stream, residual);
    return balance;
  }

  // Routed experts: gather, gate and up per expert, SwiGLU over all rows, down per expert, combine.
  const int64_t gs = expert_gate_up_stride(I, H);
  Temp<float> xp(R * H, r);
  cuda::moe_gather(x, token_of_, R, H, xp.get(), r.stream);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - r0;
    if (n == 0) continue;
    cuda::linear_forward(lin, p, xp.get() + r0 * H, gate_w_ + e * gs, gp_ + r0 * I, n, I, H, r.stream);
    cuda::linear_forward(lin, p, xp.get() + r0 * H, up_w_ + e * gs, up_ + r0 * I, n, I, H, r.stream);
  }
  round_if_fp8(p, gp_, R * I, r.stream);
  round_if_fp8(p, up_, R * I, r.stream);
  cuda::swiglu_forward(gp_, up_, hp_, R * I, r.stream);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - r0;
    if (n == 0) continue;
    cuda::linear_forward(lin, p, hp_ + r0 * I, down_w_ + e * H * I, yp_ + r0 * H, n, H, I, r.stream);
  }
  cuda::moe_combine(yp_, topk_weight_, row_of_, T, K, H, y, r.stream);
  if (residual != nullptr) add_inplace(y, residual, T * H, r.stream);
  return balance;
}

void GpuMoe::combine_backward_aligned(const float* dy, int64_t rows, float* dyp, float* dweight,
                                      cudaStream_t stream) const {
  const int64_t T = batch_ * seq_, K = spec_.top_k;
  if (fp32_yp())
    cuda::moe_combine_backward_aligned(dy, yp_, topk_weight_, row_of_aligned_, T, K, hidden_, rows, dyp, dweight,
                                       stream);
  else
    cuda::moe_combine_backward_aligned(dy, yp16(), topk_weight_, row_of_aligned_, T, K, hidden_, rows, dyp, dweight,
                                       stream);
}

void GpuMoe::backward(const float* dy, float* dx, const Run& r) {
  const int64_t T = batch_ * seq_, H = hidden_, I = inter_, E = spec_.n_experts, K = spec_.top_k, R = T * K;
  const Precision p = precision_;
  cuda::LinearContext& lin = *r.linear;
  const int64_t* off = offsets_host_.get();
  const std::string ph = "moe" + std::to_string(E) + ".";
  // The routed experts run on aligned rows exactly when the forward's shared expert ran beside them.
  const bool overlap = aligned_rows_ >= 0 && overlap_shared(p);
  std::optional<PhaseTimer> timer(std::in_place, p, (ph + "shared.bwd").c_str(), r.stream);

  if (overlap)
    fork_shared(dy, dx, r, false);
  else if (!shared_.empty())
    shared_[0].backward(dy, dx, r);
  else
    CUDA_CHECK(cudaMemsetAsync(dx, 0, static_cast<size_t>(T * H) * sizeof(float), r.stream));
  timer.emplace(p, (ph + "routed.bwd").c_str(), r.stream);

  // Routed experts: dy -> per-row dy · w (and dL/dw), expert blocks backward, rows summed back into their tokens.
  Temp<float> dweight(T * K, r);
  // The router's backward (FP32): gating weights and balance loss -> scores -> logits -> x and gate.weight. With
  // the shared expert beside, it runs on the side stream too as soon as dweight is known (its temporaries are the
  // caller stream's, freed after the join).
  Temp<float> dlogits(T * E, r), dx_router(T * H, r);
  auto router_bwd = [&](const Run& rr) {
    cuda::router_backward(spec_, scores_, topk_idx_, dweight.get(), balance_grad_ ? dscores_ : nullptr, T,
                          dlogits.get(), rr.stream);
    cuda::linear_backward(lin, Precision::FP32, dlogits.get(), x_, router_->value, dx_router.get(), router_->grad, T,
                          E, H, rr.stream, false, take_unset(*router_));
  };
  bool router_done = false;
  auto router_beside = [&] {  // after dweight's kernel on r.stream
    CUDA_CHECK(cudaEventRecord(side_->fork, r.stream));
    CUDA_CHECK(cudaStreamWaitEvent(side_->stream, side_->fork, 0));
    Run side = r;
    side.stream = side_->stream;
    const PhaseTimer t(p, (ph + "router.bwd(side)").c_str(), side.stream);
    router_bwd(side);
    CUDA_CHECK(cudaEventRecord(side_->done, side_->stream));
    router_done = true;
  };
  if (aligned_rows_ >= 0) {
    const int64_t RA = aligned_rows_;
    Temp<float> dxp(RA * H, r);  // the experts' input gradient rows, BF16 (in the first half) unless MOERL_MOE_DXP=fp32
    uint16_t* const dxp16 = fp32_dxp() ? nullptr : reinterpret_cast<uint16_t*>(dxp.get());
    std::optional<PhaseTimer> sub(std::in_place, p, (ph + "routed.combine_bwd").c_str(), r.stream);
    // dyp [RA, H] (gating weight · dy of each row's token) made apart, or (by default) inside the kernel that
    // quantizes it, from the rows' weights.
    const bool separate = separate_combine_backward();
    Temp<float> dyp(separate ? RA * H : 0, r), row_weight(separate ? 0 : RA, r);
    if (separate) {
      cuda::moe_zero_rows(token_of_aligned_, RA, H, dyp.get(), r.stream);
      combine_backward_aligned(dy, RA, dyp.get(), dweight.get(), r.stream);
    } else {
      cuda::moe_aligned_row_weights(topk_weight_, row_of_aligned_, T * K, RA, row_weight.get(), r.stream);
      combine_backward_aligned(dy, RA, nullptr, dweight.get(), r.stream);
    }
    if (overlap) router_beside();
    sub.emplace(p, (ph + "routed.experts_bwd").c_str(), r.stream);
    cuda::MoeFp8Experts w = experts_fp8();
    w.overwrite_grads = take_all_unset(expert_params_, r.stream);
    const float* const h = w.h_codes_t ? nullptr : hp_;
    auto experts_backward = [&](auto* dxp_out) {  // float* or uint16_t* (BF16)
      if (separate)
        cuda::moe_fp8_experts_backward_gathered(lin, w, dyp.get(), x_, token_of_aligned_, gp_, experts_fp8_u(w), h,
                                                aligned_host_.get(), aligned_, dxp_out, r.stream);
      else
        cuda::moe_fp8_experts_backward_combined(lin, w, dy, row_weight.get(), x_, token_of_aligned_, gp_,
                                                experts_fp8_u(w), h, aligned_host_.get(), aligned_, dxp_out, r.stream);
    };
    if (dxp16 == nullptr)
      experts_backward(dxp.get());
    else
      experts_backward(dxp16);
    sub.emplace(p, (ph + "routed.scatter_bwd").c_str(), r.stream);
    if (overlap) join_shared(r.stream);
    const float* also = router_done ? dx_router.get() : nullptr;  // the router's dx, made beside and joined above
    if (dxp16 == nullptr)
      cuda::moe_scatter_add_aligned_then(dxp.get(), row_of_aligned_, T, K, H, RA, also, dx, r.stream);
    else
      cuda::moe_scatter_add_aligned_then(dxp16, row_of_aligned_, T, K, H, RA, also, dx, r.stream);
    if (router_done) return;
  } else {
    Temp<float> xp(R * H, r), dyp(R * H, r), dxp(R * H, r);
    const int64_t gs = expert_gate_up_stride(I, H);
    // Gradients written whole (each expert's own calls; zeros for the experts without rows) or added to.
    const bool fresh = take_all_unset(expert_params_, r.stream);
    if (fresh) cuda::zero_expert_grads(gate_g_, up_g_, down_g_, E, I, H, off, r.stream, gs);
    cuda::moe_gather(x_, token_of_, R, H, xp.get(), r.stream);
    cuda::moe_combine_backward(dy, yp_, topk_weight_, row_of_, T, K, H, dyp.get(), dweight.get(), r.stream);
    {
      Temp<float> dh(R * I, r), dg(R * I, r), du(R * I, r);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        cuda::linear_backward(lin, p, dyp.get() + r0 * H, hp_ + r0 * I, down_w_ + e * H * I, dh.get() + r0 * I,
                              down_g_ + e * H * I, n, H, I, r.stream, false, fresh);
      }
      round_if_fp8(p, dh.get(), R * I, r.stream);
      cuda::swiglu_backward(dh.get(), gp_, up_, dg.get(), du.get(), R * I, r.stream);
      Temp<float> dxp_up(R * H, r);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        const int64_t at = e * gs;  // expert e's gate and up
        cuda::linear_backward(lin, p, dg.get() + r0 * I, xp.get() + r0 * H, gate_w_ + at, dxp.get() + r0 * H,
                              gate_g_ + at, n, I, H, r.stream, false, fresh);
        cuda::linear_backward(lin, p, du.get() + r0 * I, xp.get() + r0 * H, up_w_ + at, dxp_up.get() + r0 * H,
                              up_g_ + at, n, I, H, r.stream, false, fresh);
      }
      add_inplace(dxp.get(), dxp_up.get(), R * H, r.stream);
    }
    cuda::moe_scatter_add(dxp.get(), row_of_, T, K, H, dx, r.stream);
  }

  timer.emplace(p, (ph + "router.bwd").c_str(), r.stream);
  router_bwd(r);
  add_inplace(dx, dx_router.get(), T * H, r.stream);
}

GpuMoe::SideStream::SideStream() {
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
}

GpuMoe::SideStream::~SideStream() {
  // A destructor must not throw; the stream's work is joined into the caller's stream before forward/backward
  // return, so this waits for nothing the caller has not already waited for.
  (void)cudaStreamSynchronize(stream);
  (void)cudaEventDestroy(done);
  (void)cudaEventDestroy(fork);
  (void)cudaStreamDestroy(stream);
}

bool GpuMoe::overlap_shared(Precision p) const {
  static const bool off = [] {
    const char* v = std::getenv("MOERL_MOE_SHARED_OVERLAP");
    return v != nullptr && *v == '0';
  }();
  return !off && !shared_.empty() && shared_[0].as_fp8_expert(p) && p == Precision::FP8 &&
         cuda::moe_fp8_experts_supported(hidden_, inter_);
}

void GpuMoe::fork_shared(const float* in, float* out, const Run& r, bool forward) {
  CUDA_CHECK(cudaEventRecord(side_->fork, r.stream));
  CUDA_CHECK(cudaStreamWaitEvent(side_->stream, side_->fork, 0));
  Run side = r;
  side.stream = side_->stream;
  const PhaseTimer t(r.precision, forward ? "shared.fwd(side)" : "shared.bwd(side)", side.stream);
  if (forward)
    shared_[0].forward(in, out, side);
  else
    shared_[0].backward(in, out, side);
  CUDA_CHECK(cudaEventRecord(side_->done, side_->stream));
}

void GpuMoe::join_shared(cudaStream_t stream) { CUDA_CHECK(cudaStreamWaitEvent(stream, side_->done, 0)); }

// MOERL_MOE_TILE_ORDER=plain: the gathered quantizations take the row tiles in order instead of by the tokens they
// read (cuda::moe_row_tile_order); for comparing the two on the device. Read once.
bool GpuMoe::plain_tile_order() {
  static const bool plain = env_switch("MOERL_MOE_TILE_ORDER", "tokens", "plain");
  return plain;
}

cuda::MoeFp8Experts GpuMoe::experts_fp8() const {
  cuda::MoeFp8Experts w{gate_w_, up_w_, down_w_, gate_g_, up_g_, down_g_, spec_.n_experts, hidden_, inter_};
  w.gate_up_stride = expert_gate_up_stride(inter_, hidden_);  // checked in the constructor
  keep_along_tokens(w, x_codes_t_, x_scales_t_, h_codes_t_, h_scales_t_);
  // Gate and up's Fprop as one GEMM into g | u side by side; MOERL_MOE_FPROP=separate: two GEMMs into g and u apart
  // (for comparing the two on the device). The lanes GEMM form only.
  static const bool separate = env_switch("MOERL_MOE_FPROP", "pair", "separate");
  w.gate_up_side_by_side = !separate && cuda::moe_fp8_gemm(w.gemm) == cuda::MoeFp8Gemm::Lanes;
  use_bf16_gate_up(w, gp_);  // g | u in BF16 over gp_'s storage (half of it)
  if (!plain_tile_order()) w.row_tile_order = tile_order_;
  return w;
}

float* GpuMoe::experts_fp8_u(const cuda::MoeFp8Experts& w) const {
  return w.gate_up_side_by_side ? gp_ + cuda::moe_fp8_gate_up_ld(w) / 2 : up_;
}

void GpuMoe::update_bias(float gamma, const ExpertLoad& expert_load, cudaStream_t stream) {
  const auto& load = expert_load.tokens_per_expert;
  const int64_t E = spec_.n_experts;
  require(static_cast<int64_t>(load.size()) == E, [&] {
    return "GpuMoe::update_bias: a load of " + std::to_string(load.size()) + " experts for " + std::to_string(E);
  });
  // Before any forward every load is 0, so nothing moves.
  int64_t total = 0;
  for (int64_t n : load) total += n;
  std::vector<float> delta(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    // sign(total / E - load_e), compared exactly in integers; the same float product as the CPU.
    const int64_t diff = total - E * load[static_cast<size_t>(e)];
    delta[static_cast<size_t>(e)] = gamma * static_cast<float>((diff > 0) - (diff < 0));
  }
  Run r;
  r.stream = stream;
  Temp<float> d(E, r);
  // From pageable memory: staged before the call returns, so `delta` may go out of scope.
  CUDA_CHECK(cudaMemcpyAsync(d.get(), delta.data(), static_cast<size_t>(E) * sizeof(float), cudaMemcpyHostToDevice,
                             stream));
  add_inplace(bias_->value, d.get(), E, stream);
}

}  // namespace moerl::gpu::detail
