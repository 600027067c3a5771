// The GPU model's blocks, each the device twin of a CPU block: GpuNorm (model.cpp's Norm), GpuMla
// (runtime/model/attention), GpuDense and GpuMoe (runtime/model/feed_forward). Every block
//   - registers nothing itself: it looks its weights up by their published names in the ParamStore;
//   - bind(): takes the activations it saves for backward from a Slab sized for one (batch, seq), so steps of
//     the same shape reuse the same buffers; temporaries come from the stream-ordered pool (Temp);
//   - forward() keeps pointers to its inputs (owned by the caller, alive until backward); backward() overwrites
//     dx and accumulates (+=) weight gradients, like the CPU.
// All work is asynchronous on Run::stream; only GpuMoe::forward waits for the device (see there).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/moe_fp8.hpp"
#include "kernels/cuda/rmsnorm.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/router.hpp"
#include "runtime/gpu/gpu_common.hpp"
#include "runtime/gpu/gpu_params.hpp"
#include "runtime/model/config.hpp"
#include "runtime/model/feed_forward.hpp"

namespace moerl::gpu::detail {

// RMSNorm over rows of weight->numel; rstd [rows] saved.
struct GpuNorm {
  const DeviceParam* weight = nullptr;
  float eps = 1e-6f;
  float* rstd = nullptr;

  void bind(Slab& s, int64_t rows) { rstd = s.take<float>(rows); }
  // y_ld: y's row stride (0: packed), e.g. a half of a concatenation.
  void forward(const float* x, int64_t rows, float* y, const Run& r, int64_t y_ld = 0) const {
    cuda::rmsnorm_forward(x, weight->value, y, rstd, rows, weight->numel, eps, r.stream, 0, y_ld);
  }
  // A residual connection into the norm: sum = x + residual (sum may be x), y = norm(sum).
  void forward_residual(const float* x, const float* residual, float* sum, int64_t rows, float* y,
                        const Run& r) const {
    cuda::rmsnorm_forward_residual(x, residual, sum, weight->value, y, rstd, rows, weight->numel, eps, r.stream);
  }
  // dx overwritten (plus residual, when given: the gradient of the connection around the norm's block), weight
  // gradient accumulated; x is the forward's input; dy_ld: dy's row stride (0: packed).
  void backward(const float* dy, const float* x, int64_t rows, float* dx, const Run& r,
                const float* residual = nullptr, int64_t dy_ld = 0) const {
    cuda::rmsnorm_backward(dy, x, weight->value, rstd, dx, weight->grad, rows, weight->numel, r.stream, residual, 0, 0,
                           dy_ld, take_unset(*weight));
  }
};

// Multi-head latent attention; see runtime/model/attention.hpp for the formulas.
class GpuMla {
 public:
  // prefix: e.g. "model.layers.0.self_attn." (with the dot).
  GpuMla(const ModelConfig& config, ParamStore& params, const std::string& prefix);
  void bind(Slab& s, int64_t batch, int64_t seq);
  // x, y: [batch*seq, hidden]; x must stay unchanged until backward. for_backward: in the FP8 recipe the forward
  // keeps the Wgrad operands of x and of the attention output (cuda::SavedInput) for the backward.
  void forward(const float* x, float* y, const Run& r, bool for_backward = true);
  // dy -> dx (overwritten; must not alias dy).
  void backward(const float* dy, float* dx, const Run& r);

 private:
  std::string prefix_;
  int64_t hidden_, heads_, q_lora_, kv_lora_, dn_, dr_, dv_, dq_;
  bool interleave_;
  float theta_, eps_, scale_;
  const DeviceParam* q_a_ = nullptr;
  const DeviceParam* q_a_norm_ = nullptr;
  const DeviceParam* q_b_ = nullptr;
  const DeviceParam* q_proj_ = nullptr;
  const DeviceParam* kv_a_ = nullptr;
  const DeviceParam* kv_a_norm_ = nullptr;
  const DeviceParam* kv_b_ = nullptr;
  const DeviceParam* o_ = nullptr;

  // Bound for one shape. Saved: q_a_out [T, q_lora] (before its norm), ckv [T, kv_lora + dr] = [c | k_rope]
  // (kv_a_proj's output: c, the latent before its norm, and k_rope, rotated in place where RoPE is not fused),
  // q [T, H, dq] after RoPE (before it where fused_rope), k [T, H, dq] = [k_nope | rotated k_rope],
  // v [T, H, dv] (FP32 recipe; the bf16 and fp8 recipes keep the packed BF16 q, k, v instead, in the same region),
  // attn [T, H, dv], lse [batch, H, seq]. The norms' outputs are recomputed in backward, as on the CPU.
  int64_t batch_ = 0, seq_ = 0;
  float *q_a_out_ = nullptr, *ckv_ = nullptr, *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *attn_ = nullptr,
        *lse_ = nullptr;
  // The tensor-core kernels' packed BF16 q, k, v (sharing k's and v's region), when packed_mla_; used_packed_: the
  // last forward packed them (its backward reads them).
  void* packed_ = nullptr;
  bool packed_mla_ = false, used_packed_ = false;
  // Whether RoPE is applied by the packing and the backward's stores (gpu_attention.cpp): on the packed path with
  // interleaved pairs (q_ then holds q unrotated), unless MOERL_ATTN_ROPE=separate (comparing the two on the device).
  bool fused_rope() const;
  cuda::RopeTables rope_;  // the tables of the last forward when fused_rope(): its backward rotates back with them
  const float* x_ = nullptr;
  Precision precision_ = Precision::FP32;
  bool saved_ = false;
  cuda::SavedInput x_saved_, attn_saved_;  // xᵀ and attn_ᵀ quantized by the forward (q / kv_a and o_proj Wgrads)
};

struct SwigluParams {
  const DeviceParam* gate = nullptr;
  const DeviceParam* up = nullptr;
  const DeviceParam* down = nullptr;
};

// The dense SwiGLU feed-forward (and the shared experts): down(silu(gate(x)) · up(x)).
class GpuDense {
 public:
  // prefix: e.g. "model.layers.0.mlp" (without the dot).
  GpuDense(ParamStore& params, const std::string& prefix, int64_t hidden, int64_t inter);
  void bind(Slab& s, int64_t tokens);
  void forward(const float* x, float* y, const Run& r);
  void backward(const float* dy, float* dx, const Run& r);
  // Whether a forward in precision p runs as one FP8 "expert" of all T rows (kernels/cuda/moe_fp8.hpp): the routed
  // experts' fused passes (SwiGLU + quantization, dual quantization, dg/du never in FP32, gate and up Dgrad summed in
  // the GEMM) instead of three linear calls. FP8, T a multiple of 128, sizes the FP8 experts take;
  // MOERL_FP8_DENSE=linear turns it off. Such a forward and its backward touch no LinearContext workspace (only the
  // FP8 experts' lanes), so they may run on a stream beside the routed experts'.
  bool as_fp8_expert(Precision p) const;

 private:
  cuda::MoeFp8Experts fp8_expert() const;

  SwigluParams w_;
  int64_t hidden_, inter_, tokens_ = 0;
  float *g_ = nullptr, *u_ = nullptr, *h_ = nullptr;  // [T, I] each
  // The FP8 expert's x and h quantized along tokens by its forward for the backward's Wgrads (MoeFp8Experts).
  uint8_t *x_codes_t_ = nullptr, *h_codes_t_ = nullptr;  // [T, H], [T, I]
  float *x_scales_t_ = nullptr, *h_scales_t_ = nullptr;  // [H, T / 128], [I, T / 128]
  int64_t* rows_ = nullptr;                           // [2] = {0, T} on the device (the one expert's rows)
  PinnedHost<int64_t> rows_host_{2};                  // the same on the host
  const float* x_ = nullptr;
  Precision precision_ = Precision::FP32;
  bool fp8_expert_ = false;  // the last forward's choice
};

// The MoE feed-forward: shared experts plus routed experts behind DeepSeek-V3's router.
class GpuMoe {
 public:
  // prefix: e.g. "model.layers.1.mlp" (without the dot).
  GpuMoe(const ModelConfig& config, ParamStore& params, const std::string& prefix);
  void bind(Slab& s, int64_t batch, int64_t seq);
  // x, y: [T, hidden]. Returns the balance loss (0 when alpha <= 0); when for_backward it also keeps the loss's
  // gradient with respect to the scores. Waits for the device once: the experts' row offsets (and the balance
  // loss) are needed on the host to size the per-expert GEMMs. residual [T, hidden] (or null) is added to y last,
  // y = experts + residual, inside the routed experts' combine where they take aligned rows.
  float forward(const float* x, float* y, const Run& r, float balance_alpha, bool for_backward,
                const float* residual = nullptr);
  void backward(const float* dy, float* dx, const Run& r);

  const ExpertLoad& load() const { return load_; }
  // bias_e += gamma · sign(mean load − load_e), from `load` (the last forward's, or one summed over data-parallel
  // replicas), as MoeFeedForward::update_bias. Throws moerl::Error when `load` has another expert count.
  void update_bias(float gamma, const ExpertLoad& load, cudaStream_t stream);

 private:
  cuda::RouterSpec spec_;
  int64_t hidden_, inter_, shared_inter_;
  const DeviceParam* router_ = nullptr;
  std::vector<const DeviceParam*> expert_params_;  // every routed expert's gate, up and down
  const DeviceParam* bias_ = nullptr;
  // Expert e's weights are gate_[e·I·H], up_[e·I·H], down_[e·H·I] (stacked by ParamStore); same for the grads.
  const float *gate_w_ = nullptr, *up_w_ = nullptr, *down_w_ = nullptr;
  float *gate_g_ = nullptr, *up_g_ = nullptr, *down_g_ = nullptr;
  std::vector<GpuDense> shared_;  // one (n_shared · I wide) or none

  // Bound for one shape (T tokens, R = T·K rows). Saved: scores [T, E], dscores [T, E] (the balance loss's
  // gradient), topk_idx [T, K], topk_weight [T, K], the permutation plan (offsets [E+1], token_of, row_of [R]),
  // gp, up, hp [R, I], yp [R, H]. xp [R, H] is gathered again in backward instead of kept.
  int64_t batch_ = 0, seq_ = 0;
  float *scores_ = nullptr, *dscores_ = nullptr, *topk_weight_ = nullptr;
  int32_t* topk_idx_ = nullptr;
  int64_t *offsets_ = nullptr, *token_of_ = nullptr, *row_of_ = nullptr;
  float *gp_ = nullptr, *up_ = nullptr, *hp_ = nullptr, *yp_ = nullptr;
  PinnedHost<int64_t> offsets_host_;  // [E + 1], the last forward's
  // FP8's aligned rows (kernels/cuda/moe_fp8.hpp), bound for R + E·127 rows: the offsets [E + 1] (host and device),
  // token_of_aligned [rows], row_of_aligned [R]; gp, up, hp, yp then hold the aligned rows, yp in BF16 (yp16(),
  // moe_fp8_experts_forward's output; FP32 with MOERL_MOE_YP=fp32). aligned_rows_ is -1 when the last forward took
  // the per-expert path.
  PinnedHost<int64_t> aligned_host_;
  int64_t* aligned_ = nullptr;
  int64_t *token_of_aligned_ = nullptr, *row_of_aligned_ = nullptr;
  int64_t aligned_rows_ = -1;
  // The row tiles' order for the gathered quantizations (cuda::moe_row_tile_order, MoeFp8Experts::row_tile_order):
  // [rows / 128] on the device, remade by each forward.
  int32_t* tile_order_ = nullptr;
  static bool plain_tile_order();
  uint16_t* yp16() const { return reinterpret_cast<uint16_t*>(yp_); }
  // moe_combine_backward_aligned over the aligned rows' yp (BF16, or FP32 with MOERL_MOE_YP=fp32).
  void combine_backward_aligned(const float* dy, int64_t rows, float* dyp, float* dweight, cudaStream_t stream) const;
  // x's quantization along tokens, written by the FP8 forward for its backward (MoeFp8Experts::x_codes_t;
  // MOERL_MOE_KEEP_XT=0: quantized again in backward): codes [rows · H], scales [H, rows / 128].
  uint8_t* x_codes_t_ = nullptr;
  float* x_scales_t_ = nullptr;
  // The same for h (MoeFp8Experts::h_codes_t; MOERL_MOE_KEEP_H=0: h stored in FP32 and quantized in backward).
  uint8_t* h_codes_t_ = nullptr;
  float* h_scales_t_ = nullptr;
  cuda::MoeFp8Experts experts_fp8() const;
  float* experts_fp8_u(const cuda::MoeFp8Experts& w) const;  // u for w's layout of g and u (g is gp_)
  const float* x_ = nullptr;
  Precision precision_ = Precision::FP32;
  float balance_alpha_ = 0;
  bool balance_grad_ = false;
  ExpertLoad load_;

  // The shared expert beside the routed ones (FP8, the shared expert an FP8 expert, the routed experts on aligned
  // rows; MOERL_MOE_SHARED_OVERLAP=0 turns it off): forked from the caller's stream at the start of forward and
  // backward, joined before the combine (forward) or scatter-add (backward) that adds into what it wrote.
  struct SideStream {
    SideStream();
    ~SideStream();
    SideStream(const SideStream&) = delete;
    SideStream& operator=(const SideStream&) = delete;
    cudaStream_t stream = nullptr;
    cudaEvent_t fork = nullptr, done = nullptr;
  };
  std::unique_ptr<SideStream> side_;
  bool overlap_shared(Precision p) const;
  // Starts the shared expert's forward (dy null) or backward on side_ after the work queued on r.stream.
  void fork_shared(const float* in, float* out, const Run& r, bool forward);
  void join_shared(cudaStream_t stream);
};

// One pre-norm decoder layer: h = x + attn(norm1(x)); out = h + ffn(norm2(h)).
class GpuDecoderLayer {
 public:
  GpuDecoderLayer(const ModelConfig& config, ParamStore& params, int64_t layer);
  void bind(Slab& s, int64_t batch, int64_t seq);
  // in, out: [T, hidden], distinct; `in` must stay unchanged until backward. Returns the balance loss.
  float forward(const float* in, float* out, const Run& r, float balance_alpha, bool for_backward);
  // dout -> din (overwritten; distinct from dout).
  void backward(const float* dout, float* din, const Run& r);
  GpuMoe* moe() { return moe_.get(); }
  const GpuMoe* moe() const { return moe_.get(); }

 private:
  GpuNorm norm1_, norm2_;
  GpuMla attn_;
  std::unique_ptr<GpuDense> dense_;
  std::unique_ptr<GpuMoe> moe_;
  int64_t dim_, tokens_ = 0;
  const float* x_ = nullptr;                               // the layer's input (the caller's buffer)
  float *xn1_ = nullptr, *h_ = nullptr, *xn2_ = nullptr;  // saved, [T, hidden] each
};

}  // namespace moerl::gpu::detail
