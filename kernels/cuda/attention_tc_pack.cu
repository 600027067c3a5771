// Packing passes of the tensor-core attention (kernels/cuda/attention_tc.cu): FP32 operands -> BF16 scratch
// [batch, heads, spad, DP] (attention_tc_pack.hpp), so the attention kernels' tile loads are plain 16-byte cp.async
// copies without bounds checks. One thread per 8 columns of a packed row (two 16-byte loads, one 16-byte store).
// Also the public attention_pack_*_bf16 entry points, which let a caller keep the packed operands of the forward
// for the backward (and pack MLA's keys and values straight from the kv_b_proj output and the rope key).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/cuda/attention.hpp"
#include "kernels/cuda/attention_tc_mma.cuh"
#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/rope_rotate.cuh"
#include "kernels/cuda/stream_scratch.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace attention_tc_detail {
namespace {

constexpr int kPackThreads = 256;  // threads per block of the packing kernels (one per 8 columns of a row)
constexpr float kLog2ePack = 1.4426950408889634f;

// dst [batch, heads, spad, DP] BF16 <- src (PackSrc), zeros in columns >= D and rows >= seq. Thread t takes packed
// row r = t / (DP/8) = (b·heads + h)·spad + s, columns 8·(t % (DP/8)) ...
template <int D>
__global__ void __launch_bounds__(kPackThreads)
    attention_pack_kernel(PackSrc src, bf16* __restrict__ dst, int seq, int spad, int heads, int64_t chunks) {
  moerl::cuda::await_previous_grid();
  constexpr int DP = pad16(D), C = DP / 8;
  static_assert(D % 8 == 0, "a chunk of 8 columns is all inside or all outside the head dim");
  const int64_t t = int64_t{blockIdx.x} * kPackThreads + threadIdx.x;
  if (t >= chunks) return;  // no barrier or shuffle in this kernel
  const int64_t r = t / C, bh = r / spad, b = bh / heads, h = bh % heads;
  const int s = static_cast<int>(r % spad), c = static_cast<int>(t % C) * 8;
  float4 x0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), x1 = x0;
  if (s < seq && c < D) {
    const int64_t tok = b * seq + s;
    const float* row =
        c < src.d1 ? src.a + tok * src.a_tok + h * src.a_head + c : src.b + tok * src.b_tok + (c - src.d1);
    x0 = *reinterpret_cast<const float4*>(row);
    x1 = *reinterpret_cast<const float4*>(row + 4);
    if (src.rope_c0 >= 0 && c >= src.rope_c0) {  // pairs j .. j + 3 of position s
      const int64_t at = int64_t{s} * src.rope.half + (c - src.rope_c0) / 2;
      const float* cs = src.rope.cos + at;
      const float* sn = src.rope.sin + at;
      rope_rotate(x0.x, x0.y, __ldg(cs), __ldg(sn));
      rope_rotate(x0.z, x0.w, __ldg(cs + 1), __ldg(sn + 1));
      rope_rotate(x1.x, x1.y, __ldg(cs + 2), __ldg(sn + 2));
      rope_rotate(x1.z, x1.w, __ldg(cs + 3), __ldg(sn + 3));
    }
  }
  *reinterpret_cast<uint4*>(dst + r * DP + c) =
      make_uint4(pack_bf16(x0.x, x0.y), pack_bf16(x0.z, x0.w), pack_bf16(x1.x, x1.y), pack_bf16(x1.z, x1.w));
}

// The backward's packing of dO (as above), which also writes stats[2r] = lse·log2e and stats[2r + 1] = D = Σ_c dO·O
// (FP32, from the FP32 inputs; each thread's 8 products in order, then a shuffle tree over the row's DP/8 lanes) of
// packed row r; zeros on padding rows.
template <int DV>
__global__ void __launch_bounds__(kPackThreads)
    attention_pack_dout_kernel(const float* __restrict__ dout, const float* __restrict__ out,
                               const float* __restrict__ lse, bf16* __restrict__ dst, float* __restrict__ stats,
                               int seq, int spad, int heads, int64_t chunks) {
  moerl::cuda::await_previous_grid();
  constexpr int DP = pad16(DV), C = DP / 8;
  static_assert(DV % 8 == 0 && 32 % C == 0, "a row's chunks are whole and share one warp");
  const int64_t t = int64_t{blockIdx.x} * kPackThreads + threadIdx.x;
  const bool active = t < chunks;  // a row's C lanes are all active or all not (chunks is a multiple of C)
  const int64_t r = t / C, bh = r / spad, b = bh / heads, h = bh % heads;
  const int s = static_cast<int>(r % spad), c = static_cast<int>(t % C) * 8;
  float acc = 0.0f;
  if (active) {
    float4 x0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), x1 = x0;
    if (s < seq && c < DV) {
      const int64_t off = ((b * seq + s) * heads + h) * DV + c;
      x0 = *reinterpret_cast<const float4*>(dout + off);
      x1 = *reinterpret_cast<const float4*>(dout + off + 4);
      const float4 y0 = *reinterpret_cast<const float4*>(out + off);
      const float4 y1 = *reinterpret_cast<const float4*>(out + off + 4);
      acc = x0.x * y0.x;
      acc = fmaf(x0.y, y0.y, acc);
      acc = fmaf(x0.z, y0.z, acc);
      acc = fmaf(x0.w, y0.w, acc);
      acc = fmaf(x1.x, y1.x, acc);
      acc = fmaf(x1.y, y1.y, acc);
      acc = fmaf(x1.z, y1.z, acc);
      acc = fmaf(x1.w, y1.w, acc);
    }
    *reinterpret_cast<uint4*>(dst + r * DP + c) =
        make_uint4(pack_bf16(x0.x, x0.y), pack_bf16(x0.z, x0.w), pack_bf16(x1.x, x1.y), pack_bf16(x1.z, x1.w));
  }
  for (int offset = C / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
  if (active && c == 0) {
    stats[2 * r] = s < seq ? lse[bh * seq + s] * kLog2ePack : 0.0f;
    stats[2 * r + 1] = s < seq ? acc : 0.0f;
  }
}

unsigned pack_blocks(int64_t chunks) { return static_cast<unsigned>((chunks + kPackThreads - 1) / kPackThreads); }

template <int D>
void launch_pack(const PackSrc& src, bf16* dst, int64_t batch, int64_t seq, int64_t heads, int64_t spad,
                 cudaStream_t stream) {
  const int64_t chunks = batch * heads * spad * (pad16(D) / 8);
  launch_after_previous(attention_pack_kernel<D>, pack_blocks(chunks), kPackThreads, 0, stream, src, dst,
                        static_cast<int>(seq), static_cast<int>(spad), static_cast<int>(heads), chunks);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

PackedLayout::PackedLayout(int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv)
    : spad((seq + kSeqPad - 1) / kSeqPad * kSeqPad), rows(batch * heads * spad),
      bytes_q(cuda_detail::align256(static_cast<size_t>(rows) * pad16_host(dqk) * sizeof(bf16))),
      bytes_v(cuda_detail::align256(static_cast<size_t>(rows) * pad16_host(dv) * sizeof(bf16))) {}

void check_pack_src(const char* where, const PackSrc& src, int64_t d) {
  const std::string w(where);
  require(src.a != nullptr && aligned16(src.a), [&] { return w + ": null or misaligned (16 bytes) source"; });
  require(src.d1 % 8 == 0 && src.d1 > 0 && src.d1 <= d,
          [&] { return w + ": the first source's columns must be a multiple of 8"; });
  require(src.a_tok % 4 == 0 && src.a_head % 4 == 0,
          [&] { return w + ": source row strides must be multiples of 4 floats"; });
  if (src.d1 < d) {
    require(src.b != nullptr && aligned16(src.b), [&] { return w + ": null or misaligned (16 bytes) second source"; });
    require(src.b_tok % 4 == 0, [&] { return w + ": second source row stride must be a multiple of 4 floats"; });
  }
}

void pack_operand(const PackSrc& src, int64_t d, bf16* dst, int64_t batch, int64_t seq, int64_t heads, int64_t spad,
                  cudaStream_t stream) {
  switch (d) {
    case 16: return launch_pack<16>(src, dst, batch, seq, heads, spad, stream);
    case 24: return launch_pack<24>(src, dst, batch, seq, heads, spad, stream);
    case 64: return launch_pack<64>(src, dst, batch, seq, heads, spad, stream);
    case 96: return launch_pack<96>(src, dst, batch, seq, heads, spad, stream);
    default: throw Error("moerl::cuda attention: no packing kernel for head dim " + std::to_string(d));
  }
}

namespace {

// A pass's kernel switches: `kernel_var` unset, mma or wgmma; `wg_var` (if named) unset, 1 or 2 (empty strings when
// unset).
struct KernelChoice {
  std::string kernel, wg;
};

KernelChoice kernel_choice(const char* kernel_var, const char* wg_var) {
  const auto env = [](const char* name) {
    const char* e = name != nullptr ? std::getenv(name) : nullptr;
    return std::string(e ? e : "");
  };
  KernelChoice c{env(kernel_var), env(wg_var)};
  require(c.kernel.empty() || c.kernel == "mma" || c.kernel == "wgmma", [&] {
    return std::string("moerl::cuda attention: ") + kernel_var + " must be mma or wgmma, got " + c.kernel;
  });
  require(c.wg.empty() || c.wg == "1" || c.wg == "2",
          [&] { return std::string("moerl::cuda attention: ") + wg_var + " must be 1 or 2, got " + c.wg; });
  return c;
}

}  // namespace

int forward_wgmma_warpgroups(int64_t dqk, int64_t dv) {
  const KernelChoice c = kernel_choice("MOERL_ATTN_TC_FWD_KERNEL", "MOERL_ATTN_TC_FWD_WG");
  if (c.kernel == "mma" || dqk != 96 || dv != 64) return 0;
  return c.wg == "1" ? 1 : 2;
}

bool dkdv_wgmma_selected(int64_t dqk, int64_t dv) {
  const KernelChoice c = kernel_choice("MOERL_ATTN_TC_BWD_KERNEL", nullptr);
  return c.kernel != "mma" && dqk == 96 && dv == 64;
}

bool dq_wgmma_selected(int64_t dqk, int64_t dv) {
  const KernelChoice c = kernel_choice("MOERL_ATTN_TC_BWD_DQ_KERNEL", nullptr);
  return c.kernel != "mma" && dqk == 96 && dv == 64;
}

void pack_dout(const float* dout, const float* out, const float* lse, bf16* dst, float* stats, int64_t dv,
               int64_t batch, int64_t seq, int64_t heads, int64_t spad, cudaStream_t stream) {
  const auto launch = [&](auto kernel, int dp) {
    const int64_t chunks = batch * heads * spad * (dp / 8);
    launch_after_previous(kernel, pack_blocks(chunks), kPackThreads, 0, stream, dout, out, lse, dst, stats,
                          static_cast<int>(seq), static_cast<int>(spad), static_cast<int>(heads), chunks);
  };
  if (dv == 16) launch(attention_pack_dout_kernel<16>, 16);
  else if (dv == 64) launch(attention_pack_dout_kernel<64>, 64);
  else throw Error("moerl::cuda attention: no dout packing kernel for head dim " + std::to_string(dv));
}

}  // namespace attention_tc_detail

using namespace attention_tc_detail;

size_t attention_bf16_packed_bytes(int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv) {
  require(batch >= 0 && seq >= 0 && heads >= 0, "moerl::cuda::attention_bf16_packed_bytes: negative size");
  return PackedLayout(batch, seq, heads, dqk, dv).bytes();
}

void attention_pack_mla_bf16(const float* q, const float* kv, const float* ckv, int64_t kv_lora, void* packed,
                             int64_t batch, int64_t seq, int64_t heads, int64_t dn, int64_t dr, int64_t dv,
                             cudaStream_t stream, const RopeTables* rope) {
  const char* where = "moerl::cuda::attention_pack_mla_bf16";
  const int64_t dqk = dn + dr;
  require(attention_bf16_supported(dqk, dv), [&] { return std::string(where) + ": head dims not supported"; });
  require(batch >= 0 && seq >= 0 && heads >= 0 && kv_lora >= 0, [&] { return std::string(where) + ": negative size"; });
  if (batch == 0 || seq == 0 || heads == 0) return;
  require(packed != nullptr && aligned16(packed),
          [&] { return std::string(where) + ": null or misaligned packed buffer"; });
  const PackedLayout pl(batch, seq, heads, dqk, dv);
  PackSrc qs{q, heads * dqk, dqk, static_cast<int>(dqk), nullptr, 0};
  // k = [k_nope (first dn columns of a head's kv row) | k_rope (last dr columns of the token's ckv row)].
  PackSrc ks{kv, heads * (dn + dv), dn + dv, static_cast<int>(dn), ckv + kv_lora, kv_lora + dr};
  const PackSrc vs{kv + dn, heads * (dn + dv), dn + dv, static_cast<int>(dv), nullptr, 0};
  if (rope != nullptr) {  // q's and the key's rope columns rotated here (rope_forward's bits)
    require(rope->fits(dr), [&] { return std::string(where) + ": RoPE tables of dr / 2 pairs needed"; });
    qs.rope_c0 = ks.rope_c0 = static_cast<int>(dn);
    qs.rope = ks.rope = *rope;
  }
  check_pack_src(where, qs, dqk);
  check_pack_src(where, ks, dqk);
  check_pack_src(where, vs, dv);
  pack_operand(qs, dqk, pl.q(packed), batch, seq, heads, pl.spad, stream);
  pack_operand(ks, dqk, pl.k(packed), batch, seq, heads, pl.spad, stream);
  pack_operand(vs, dv, pl.v(packed), batch, seq, heads, pl.spad, stream);
}

bool attention_pack_mla_bf16_supported(int64_t kv_lora, int64_t dn, int64_t dr, int64_t dv) {
  return attention_bf16_supported(dn + dr, dv) && dn > 0 && dn % 8 == 0 && dv % 4 == 0 && kv_lora % 4 == 0 &&
         (dr == 0 || (kv_lora + dr) % 4 == 0);
}

}  // namespace moerl::cuda
