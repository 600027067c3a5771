// The routed experts' FP8 path on the GPU (kernels/cuda/moe_fp8.cu): the permutation plan with every expert's
// block of rows aligned to 128, so that one quantization of all rows serves every expert's GEMM.
//
// Why 128. The FP8 recipe quantizes activations in 1x128 tiles along features (Fprop x, Dgrad dy: per row, so the
// codes of an expert's rows are those of the same rows quantized together with every other expert's) and, for
// Wgrad, in 1x128 tiles along tokens, which must start at the expert's first row (the CPU quantizes each expert's
// rows on their own, zero-padding its last partial tile). With each expert's rows starting at a multiple of 128
// and followed by zero rows up to the next multiple, one transposed quantization of all rows gives every expert's
// tiles exactly, and every expert's operand is a slice of it (a pointer offset and a row stride, Operand::ld).
// Zero rows add nothing to any sum and quantize to code 0; the GEMMs' outputs in them are exactly 0.
//
// Layout ("aligned rows"): expert e owns rows aligned[e] .. aligned[e] + n_e - 1 (its n_e = offsets[e+1] -
// offsets[e] rows, in the plan's order) and zero rows up to aligned[e+1] = aligned[e] + round_up(n_e, 128).
// All pointers are device memory unless named _host; calls are asynchronous on `stream`. Throws moerl::Error on
// bad arguments or a failed launch.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/linear.hpp"

namespace moerl::cuda {

constexpr int64_t kMoeRowAlign = 128;

// aligned_host [E + 1] from offsets_host [E + 1] (both host memory): aligned[0] = 0,
// aligned[e + 1] = aligned[e] + round_up(offsets[e + 1] - offsets[e], 128). Returns aligned[E].
int64_t moe_aligned_offsets(const int64_t* offsets_host, int64_t n_experts, int64_t* aligned_host);

// The order in which the gathered quantizations of the routed experts' rows (their input x and output gradient
// w · dy, read through token_of: each token's row by each of its top-k experts) take the row tiles: each expert's
// tiles i = 0 .. m_e - 1 sorted by the middle of their place in the expert, (i + 1/2) / m_e, experts in order on
// ties. An expert's rows list its tokens in order, so its tile i covers about that quantile of the batch's tokens:
// tiles taken together read about the same tokens, whose rows L2 then holds for all their top-k reads, where the
// experts one after another read every token's row again from memory once per expert. order [aligned_rows / 128]
// (aligned_rows = aligned[E], aligned on the device): a permutation of 0 .. aligned_rows / 128 - 1, made on the
// device (a sort on the host, between the routing's wait and the next launches, left the GPU idle ~25-60 us a
// layer). On the H200 (MoE layer bench): w · dy's gathered pass 0.582 vs 0.641 ms, x's along tokens 0.321 vs
// 0.353 ms; not more, since these passes are bound by latency rather than bytes
// (bench/results/2026-11-30-gpu-tile-order-h200-602df90+order.txt).
void moe_row_tile_order(const int64_t* aligned, int64_t n_experts, int64_t aligned_rows, int32_t* order,
                        cudaStream_t stream = nullptr);

// The plan of moe_permute_plan (offsets [E + 1], token_of [R], row_of [T·K], R = T·K) moved to aligned rows:
// token_of_aligned [aligned_rows] (the token of each aligned row, -1 for zero rows), row_of_aligned [T·K] (the
// aligned row of each token-expert assignment). offsets and aligned [E + 1] on the device.
void moe_align_plan(const int64_t* offsets, const int64_t* aligned, int64_t n_experts, const int64_t* token_of,
                    const int64_t* row_of, int64_t rows, int64_t aligned_rows, int64_t* token_of_aligned,
                    int64_t* row_of_aligned, cudaStream_t stream = nullptr);

// row_weight [aligned_rows]: row_weight[row_of_aligned[i]] = weight[i] for every token-expert assignment i < T·K
// (the gating weight each aligned row's output is combined with); zero rows are not written.
void moe_aligned_row_weights(const float* weight, const int64_t* row_of_aligned, int64_t assignments,
                             int64_t aligned_rows, float* row_weight, cudaStream_t stream = nullptr);

// xp [rows, dim]: xp[r, :] = x[token_of[r], :], or zeros where token_of[r] < 0.
void moe_gather_or_zero(const float* x, const int64_t* token_of, int64_t rows, int64_t dim, float* xp,
                        cudaStream_t stream = nullptr);

// buf[r, :] = 0 for every r < rows with token_of[r] < 0 (the zero rows of an aligned buffer); other rows untouched.
void moe_zero_rows(const int64_t* token_of, int64_t rows, int64_t dim, float* buf, cudaStream_t stream = nullptr);

// codes [rows, cols] and scales [rows, tiles(cols)]: row r is token token_of[r]'s row of token_codes [tokens, cols]
// and token_scales [tokens, tiles(cols)] (fp8::cuda::quantize_1x128 of x [tokens, cols]), or where token_of[r] < 0
// the quantization of a zero row (codes 0, the all-zero tile's scale): quantize_1x128 of moe_gather_or_zero's rows,
// bit for bit (a row's 1x128 tiles depend on that row alone), for a sixth of the reads at top-6. cols a multiple of
// 16, token_codes and codes 16-byte aligned. With lt_aligned (the aligned offsets [n_experts + 1] on the device) the
// scales go in cuBLASLt's layout instead, as moe_grouped_vec128_scales would put them.
void moe_gather_rows_fp8(const uint8_t* token_codes, const float* token_scales, const int64_t* token_of,
                         int64_t rows, int64_t cols, uint8_t* codes, float* scales, cudaStream_t stream = nullptr,
                         const int64_t* lt_aligned = nullptr, int64_t n_experts = 0);

// Scales of a 1x128 quantization along features of all aligned rows, src [rows, tiles] (fp8::cuda::quantize_1x128's
// CPU layout, rows = aligned[E]) -> every expert's own cuBLASLt VEC128 layout, dst [rows · tiles]: expert e's scales
// start at aligned[e] · tiles, tile (r, kb) of its n = aligned[e+1] - aligned[e] rows at kb · n + r.
void moe_grouped_vec128_scales(const float* src, const int64_t* aligned, int64_t n_experts, int64_t rows,
                               int64_t tiles, float* dst, cudaStream_t stream = nullptr);

// moe_combine, moe_combine_backward and moe_scatter_add (kernels/cuda/moe_permute.hpp) with row_of pointing into
// `rows` aligned rows (row_of_aligned of moe_align_plan) instead of T·K; the same arithmetic. The zero rows are
// neither read (combine, scatter-add) nor written (combine backward: clear them with moe_zero_rows). The combine
// adds `also` [tokens, dim] (16-byte aligned, or null) last, as y = (y + Σ w · rows) + also: the decoder layer's
// residual, without a pass of its own.
void moe_combine_aligned(const float* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                         int64_t dim, int64_t rows, float* y, cudaStream_t stream = nullptr,
                         const float* also = nullptr);
void moe_combine_backward_aligned(const float* dy, const float* yp, const float* weight, const int64_t* row_of,
                                  int64_t tokens, int64_t k, int64_t dim, int64_t rows, float* dyp, float* dweight,
                                  cudaStream_t stream = nullptr);
// The same two with yp in BF16 (bit patterns: the FP8 experts' output rows, moe_fp8_experts_forward's yp), each
// value widened exactly; vectorized where dim % 4 == 0 and yp is 8-byte aligned.
void moe_combine_aligned(const uint16_t* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                         int64_t dim, int64_t rows, float* y, cudaStream_t stream = nullptr,
                         const float* also = nullptr);
void moe_combine_backward_aligned(const float* dy, const uint16_t* yp, const float* weight, const int64_t* row_of,
                                  int64_t tokens, int64_t k, int64_t dim, int64_t rows, float* dyp, float* dweight,
                                  cudaStream_t stream = nullptr);
// ... and the scatter-add of BF16 rows (the FP8 experts' dxp), each value widened exactly.
void moe_scatter_add_aligned(const uint16_t* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                             int64_t rows, float* dx, cudaStream_t stream = nullptr);
void moe_scatter_add_aligned_then(const uint16_t* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                                  int64_t rows, const float* also, float* dx, cudaStream_t stream = nullptr);
void moe_scatter_add_aligned(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                             int64_t rows, float* dx, cudaStream_t stream = nullptr);
// moe_scatter_add_aligned, then dx += also (also [tokens, dim], non-null) in the same pass: the bytes of the
// scatter-add followed by an elementwise add (each sum rounded once, in that order), one pass over dx fewer.
void moe_scatter_add_aligned_then(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                                  int64_t rows, const float* also, float* dx, cudaStream_t stream = nullptr);

// The routed experts in the FP8 recipe of kernels/cuda/linear.hpp on aligned rows: per expert e (rows aligned[e] ..
// aligned[e+1] - 1, skipped when empty) gate, up and down as cuda::linear_forward / linear_backward with
// Precision::FP8 on its rows would compute them (the same codes and scales, the CPU's up to the order of sums),
// but every activation quantized once for all experts and no padding copies. Weights stacked as ParamStore keeps
// them: gate and up [E, I, H], down [E, H, I] (and their gradients); H and I multiples of 16, at least 128. The
// weights' FP8 copies are the LinearContext's (prepared per expert weight and generation).
// How the experts' GEMMs run: Lanes, one cuBLASLt call per expert and GEMM on 4 side streams; Grouped, one launch per
// projection for all experts (kernels/cuda/fp8_grouped_gemm.hpp: no per-expert host work; its WGMMA kernel reaches
// 700-760 TFLOP/s on the MoE layer bench's Fprop/Dgrad shapes but 275 on Wgrad, where the lanes' cuBLASLt calls reach
// ~620, so the layer is slower: MoE layer fwd+bwd 18.2-18.4 vs 11.7-11.8 ms, train step 222-223k vs 254k tok/s on the
// H200, bench/results/2026-11-30-gpu-grouped-pingpong-h200-*.txt); Default, MOERL_MOE_GEMM=lanes or grouped (unset:
// lanes). (The forward alone on it, the backward on the lanes, lost too: bench-600m 272-274k vs 276-279k tokens/s, its
// kernel 5.9 ms a step against ~4.4 for the lanes' forward GEMMs,
// bench/results/2026-11-30-gpu-adamw-fp8-h200-9d1f97f.txt.)
// Both give the CPU recipe's results within the tests' tolerances (tests/gpu/moe_fp8_gpu.cpp runs both).
enum class MoeFp8Gemm : uint8_t { Default, Grouped, Lanes };

struct MoeFp8Experts {
  const float *gate = nullptr, *up = nullptr, *down = nullptr;
  float *gate_grad = nullptr, *up_grad = nullptr, *down_grad = nullptr;
  int64_t experts = 0, hidden = 0, inter = 0;  // E, H, I
  MoeFp8Gemm gemm = MoeFp8Gemm::Default;
  // Elements from expert e's gate (up, and their gradients) to expert e + 1's; 0: I · H (stacked apart). ParamStore
  // interleaves them, 2 · I · H with up = gate + I · H (and up_grad = gate_grad + I · H): expert e's [w_gate; w_up]
  // and its gradient [2 I, H] are then one matrix each, and the lanes run gate's and up's Wgrad as one GEMM with
  // M = 2 I (moe_fp8_wgrad_pair). down stays stacked apart, [E, H, I].
  int64_t gate_up_stride = 0;
  // Optional, both or neither: where the forward also writes the input rows' quantization along tokens (Wgrad's
  // xᵀ: codes [rows · H] packed per expert, scales [H, rows / 128]; the same pass that quantizes them along
  // features), for the backward to read instead of quantizing the input again. Sized for the aligned rows; the
  // backward must follow a forward of the same rows and input with these set.
  uint8_t* x_codes_t = nullptr;
  float* x_scales_t = nullptr;
  // Optional, both or neither: the same for h (Wgrad of down: codes [rows · I], scales [I, rows / 128]), made in
  // the forward's SwiGLU pass; h [rows, I] is then neither written by the forward nor read by the backward (h may
  // be null in both).
  uint8_t* h_codes_t = nullptr;
  float* h_scales_t = nullptr;
  // g and u as the two halves of one [rows, 2 Ip] matrix (Ip = I rounded up to 128: row r of g at g + r · 2 Ip, u =
  // g + Ip; the columns past each half's I are written with zeros): gate and up's Fprop is then one GEMM per expert
  // against [w_gate; w_up]. The Lanes form only; forward and backward must agree. Else g and u are [rows, I] each.
  bool gate_up_side_by_side = false;
  // Optional (with gate_up_side_by_side, where moe_fp8_gate_up_bf16_supported): g | u held in BF16 bit patterns,
  // [rows, 2 Ip], as DeepSeek-V3's FP8 GEMMs output BF16: gate and up's Fprop writes its FP32 sums rounded once here
  // and the SwiGLU passes read them widened (the g and u arguments are then unused, may be null); down's Dgrad writes
  // dh in BF16 likewise. Half the bytes of g, u and dh to write, keep and read. kernels/cpu's FP8 recipe rounds g, u
  // and dh to BF16 too (runtime/model/feed_forward.cpp). Forward and backward must agree.
  uint16_t* gate_up_bf16 = nullptr;
  // The backward writes gate_grad, up_grad and down_grad whole instead of adding to them (their old contents are not
  // read: Wgrad's beta = 0, and zeros for the experts without rows), for gradients not yet written since they were
  // last consumed (runtime/gpu's GpuModel::zero_grad marks them instead of clearing them).
  bool overwrite_grads = false;
  // Optional: moe_row_tile_order's permutation on the device, [aligned[E] / 128] for the aligned offsets of the call,
  // for the quantizations that gather rows (forward: x along tokens; backward: w · dy both ways, x along tokens
  // unless kept). Null: the tiles in order. The same bytes either way.
  const int32_t* row_tile_order = nullptr;
};

// Whether w may set gate_up_bf16: g and u side by side in the lanes form, with the fused SwiGLU backward and the
// pair's Dgrad (MOERL_MOE_SWIGLU_BWD and MOERL_MOE_DGRAD unset), I a multiple of 8.
bool moe_fp8_gate_up_bf16_supported(const MoeFp8Experts& w);

// Ip: the intermediate size I rounded up to a whole 128-wide tile (each half of gate and up side by side).
int64_t moe_fp8_gate_up_padded(int64_t inter);
// The row stride of g and u (elements): 2 Ip with gate_up_side_by_side, else I.
int64_t moe_fp8_gate_up_ld(const MoeFp8Experts& w);

// Elements from expert e's gate to expert e + 1's (w.gate_up_stride, or I · H where unset).
int64_t moe_fp8_gate_up_stride(const MoeFp8Experts& w);
// Whether the backward runs gate's and up's Wgrad as one GEMM per expert: gate and up interleaved (gate_up_stride
// 2 I H, or a single expert; up and up_grad I H after gate and gate_grad), the lanes form with the pair's Dgrad
// (gate_up_side_by_side with the fused SwiGLU backward), MOERL_MOE_WGRAD not `separate`.
bool moe_fp8_wgrad_pair(const MoeFp8Experts& w);

// The GEMM form `requested` resolves to (Default read from MOERL_MOE_GEMM once per process).
MoeFp8Gemm moe_fp8_gemm(MoeFp8Gemm requested);

// Whether moe_fp8_experts_* take these sizes (else use per-expert linear calls).
bool moe_fp8_experts_supported(int64_t hidden, int64_t inter);

// xp [rows, H] (aligned rows, zero rows zero) -> g, u, h [rows, I] (h = silu(g) · u; g and u's rows
// moe_fp8_gate_up_ld(w) apart) and yp [rows, H], all overwritten (zero rows give zeros). aligned_host and aligned:
// the same [E + 1] offsets on the host and device. yp in FP32, or in BF16 (bit patterns: down's Fprop writes its
// FP32 sums rounded once, as DeepSeek-V3's FP8 GEMMs output BF16; half the bytes for the GEMM to write and for the
// routed experts' combine and its backward to read).
void moe_fp8_experts_forward(LinearContext& ctx, const MoeFp8Experts& w, const float* xp,
                             const int64_t* aligned_host, const int64_t* aligned, float* g, float* u, float* h,
                             float* yp, cudaStream_t stream = nullptr);
void moe_fp8_experts_forward(LinearContext& ctx, const MoeFp8Experts& w, const float* xp,
                             const int64_t* aligned_host, const int64_t* aligned, float* g, float* u, float* h,
                             uint16_t* yp, cudaStream_t stream = nullptr);

// dyp [rows, H] (zero rows zero), the forward's xp, g, u, h -> dxp [rows, H] (overwritten) and the weight gradients
// (accumulated, +=).
void moe_fp8_experts_backward(LinearContext& ctx, const MoeFp8Experts& w, const float* dyp, const float* xp,
                              const float* g, const float* u, const float* h, const int64_t* aligned_host,
                              const int64_t* aligned, float* dxp, cudaStream_t stream = nullptr);

// The same, with the input rows gathered inside the kernels that quantize them instead of read from xp: row r is
// x[token_of[r], :] (x [tokens, H], 16-byte aligned, every token_of[r] < tokens), or zeros where token_of[r] < 0
// (moe_align_plan's token_of_aligned). The same bytes as moe_gather_or_zero followed by the xp versions, without
// writing or reading xp [rows, H] (forward: the Fprop quantization, each token's row quantized once and its codes
// copied to its rows (moe_gather_rows_fp8); the Wgrad one reads the rows; backward: the Wgrad one).
void moe_fp8_experts_forward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* x, int64_t tokens,
                                      const int64_t* token_of, const int64_t* aligned_host, const int64_t* aligned,
                                      float* g, float* u, float* h, float* yp, cudaStream_t stream = nullptr);
void moe_fp8_experts_forward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* x, int64_t tokens,
                                      const int64_t* token_of, const int64_t* aligned_host, const int64_t* aligned,
                                      float* g, float* u, float* h, uint16_t* yp, cudaStream_t stream = nullptr);
void moe_fp8_experts_backward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* dyp, const float* x,
                                       const int64_t* token_of, const float* g, const float* u, const float* h,
                                       const int64_t* aligned_host, const int64_t* aligned, float* dxp,
                                       cudaStream_t stream = nullptr);
// With dxp in BF16 (bit patterns): with g and u side by side in the lanes form gate and up's Dgrad GEMM rounds its
// FP32 sums once (DeepSeek's BF16 GEMM outputs; half the bytes for it to write and the scatter-add to read), the
// other forms round their FP32 result.
void moe_fp8_experts_backward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* dyp, const float* x,
                                       const int64_t* token_of, const float* g, const float* u, const float* h,
                                       const int64_t* aligned_host, const int64_t* aligned, uint16_t* dxp,
                                       cudaStream_t stream = nullptr);

// moe_fp8_experts_backward_gathered with dyp never stored: dyp row r = row_weight[r] · dy[token_of[r], :] (each
// product rounded once, as moe_combine_backward computes it), or zeros where token_of[r] < 0, made inside the kernel
// that quantizes it both ways. dy [tokens, H] 16-byte aligned; row_weight from moe_aligned_row_weights. The same
// bytes as moe_combine_backward_aligned's dyp followed by moe_fp8_experts_backward_gathered, without writing and
// reading dyp [rows, H] (a moe_combine_backward_aligned with null dyp still gives dweight).
void moe_fp8_experts_backward_combined(LinearContext& ctx, const MoeFp8Experts& w, const float* dy,
                                       const float* row_weight, const float* x, const int64_t* token_of,
                                       const float* g, const float* u, const float* h, const int64_t* aligned_host,
                                       const int64_t* aligned, float* dxp, cudaStream_t stream = nullptr);
void moe_fp8_experts_backward_combined(LinearContext& ctx, const MoeFp8Experts& w, const float* dy,
                                       const float* row_weight, const float* x, const int64_t* token_of,
                                       const float* g, const float* u, const float* h, const int64_t* aligned_host,
                                       const int64_t* aligned, uint16_t* dxp, cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
