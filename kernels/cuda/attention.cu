// Causal attention core on the GPU: argument checks, head-dim dispatch and launches. The kernels and the
// thread layout are in attention_kernels.cuh.
//
// Launches (T = batch·seq tokens, 64-row tiles, 256 threads per block; grid z orders the tiles longest first):
//   forward          grid (heads, batch, tiles): one query tile per block, key tiles 0 .. diagonal.
//   backward  D      T·heads / 8 blocks: one warp per (token, head) row, D_i = dO_i · O_i into dq.
//             dK/dV  grid (heads, batch, tiles): one key tile per block, query tiles diagonal .. end.
//             dQ     grid (heads, batch, tiles): one query tile per block, key tiles 0 .. diagonal.
// Dynamic shared memory per block (KiB) for (dqk, dv) = (24, 16) / (96, 64) / (192, 128):
//   forward 36 / 84 / 148, dK/dV 58.5 / 118.5 / 198.5, dQ 41.5 / 101.5 / 181.5; the H200 allows 227 per block,
//   228 per SM (so (96, 64) runs 2 forward or dQ blocks per SM, 1 dK/dV block).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention.hpp"
#include "kernels/cuda/attention_kernels.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using namespace attention_detail;

template <int N> using Dim = std::integral_constant<int, N>;

// Calls f(Dim<DQ>, Dim<DV>) for the supported head dims; false for any other pair.
template <class F> bool dispatch(int64_t dqk, int64_t dv, F&& f) {
  const auto with_dv = [&](auto dq_dim) {
    switch (dv) {
      case 16: f(dq_dim, Dim<16>{}); return true;
      case 64: f(dq_dim, Dim<64>{}); return true;
      case 128: f(dq_dim, Dim<128>{}); return true;
      default: return false;
    }
  };
  switch (dqk) {
    case 24: return with_dv(Dim<24>{});
    case 96: return with_dv(Dim<96>{});
    case 192: return with_dv(Dim<192>{});
    default: return false;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Checks sizes, head dims and pointers; false when there is nothing to compute.
bool check_args(const std::string& where, int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv,
                float scale, std::initializer_list<const void*> tensors, const void* lse) {
  require(batch >= 0 && seq >= 0 && heads >= 0, [&] {
    return where + ": batch, seq and heads must be >= 0, got batch " + std::to_string(batch) + ", seq " +
           std::to_string(seq) + ", heads " + std::to_string(heads);
  });
  require(dispatch(dqk, dv, [](auto, auto) {}), [&] {
    return where + ": head dims dqk " + std::to_string(dqk) + ", dv " + std::to_string(dv) +
           " not supported (dqk must be 24, 96 or 192 and dv 16, 64 or 128)";
  });
  require(std::isfinite(scale), [&] { return where + ": scale must be finite, got " + std::to_string(scale); });
  if (batch == 0 || seq == 0 || heads == 0) return false;
  require(heads <= 65535 && batch <= 65535, [&] {
    return where + ": heads and batch must be <= 65535, got heads " + std::to_string(heads) + ", batch " +
           std::to_string(batch);
  });
  require(seq <= int64_t{65535} * kTile, [&] {
    return where + ": seq must be <= " + std::to_string(65535 * kTile) + " (grid z), got " + std::to_string(seq);
  });
  for (const void* p : tensors) {
    require(p != nullptr, [&] { return where + ": null tensor pointer"; });
    require(aligned16(p), [&] { return where + ": tensor pointers must be 16-byte aligned (float4 rows)"; });
  }
  require(lse != nullptr, [&] { return where + ": null lse pointer"; });
  return true;
}

// Raises the kernel's dynamic shared-memory limit to `floats` floats, after checking the device has it.
template <class Kernel> size_t prepare(Kernel* kernel, int floats, const std::string& where) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  int device = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  require(bytes <= static_cast<size_t>(optin), [&] {
    return where + ": needs " + std::to_string(bytes) + " bytes of shared memory per block, the device allows " +
           std::to_string(optin);
  });
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

int tiles_of(int64_t seq) { return static_cast<int>((seq + kTile - 1) / kTile); }

template <int DQ, int DV>
void launch_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                    int64_t seq, int64_t heads, float scale, cudaStream_t stream) {
  auto* kernel = attention_forward_kernel<DQ, DV>;
  const size_t smem = prepare(kernel, Smem<DQ, DV>::forward, "moerl::cuda::attention_forward");
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(batch), tiles_of(seq));
  kernel<<<grid, kThreads, smem, stream>>>(q, k, v, out, lse, static_cast<int>(seq), static_cast<int>(heads),
                                           scale * kLog2e);
  CUDA_CHECK_LAUNCH();
}

template <int DQ, int DV>
void launch_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                     const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                     int64_t heads, float scale, cudaStream_t stream) {
  const std::string where = "moerl::cuda::attention_backward";
  const int s = static_cast<int>(seq), h = static_cast<int>(heads);
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(batch), tiles_of(seq));

  const int64_t rows = batch * seq * heads, warps = kThreads / 32;
  const int64_t dot_blocks = (rows + warps - 1) / warps;
  require(dot_blocks <= INT32_MAX, [&] { return where + ": too many (token, head) rows for one launch"; });
  attention_dot_kernel<DV><<<static_cast<unsigned>(dot_blocks), kThreads, 0, stream>>>(dout, out, dq, rows, DQ);
  CUDA_CHECK_LAUNCH();

  auto* dkdv_kernel = attention_backward_dkdv_kernel<DQ, DV>;
  const size_t dkdv_smem = prepare(dkdv_kernel, Smem<DQ, DV>::dkdv, where);
  dkdv_kernel<<<grid, kThreads, dkdv_smem, stream>>>(dout, q, k, v, lse, dq, dk, dv_out, s, h, scale,
                                                     scale * kLog2e);
  CUDA_CHECK_LAUNCH();

  auto* dq_kernel = attention_backward_dq_kernel<DQ, DV>;
  const size_t dq_smem = prepare(dq_kernel, Smem<DQ, DV>::dq, where);
  dq_kernel<<<grid, kThreads, dq_smem, stream>>>(dout, q, k, v, lse, dq, s, h, scale, scale * kLog2e);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t seq, int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  if (!check_args("moerl::cuda::attention_forward", batch, seq, heads, dqk, dv, scale, {q, k, v, out}, lse)) return;
  dispatch(dqk, dv, [&](auto dq_dim, auto dv_dim) {
    launch_forward<decltype(dq_dim)::value, decltype(dv_dim)::value>(q, k, v, out, lse, batch, seq, heads, scale,
                                                                     stream);
  });
}

void attention_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                        const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                        int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  if (!check_args("moerl::cuda::attention_backward", batch, seq, heads, dqk, dv, scale,
                  {dout, q, k, v, out, dq, dk, dv_out}, lse))
    return;
  dispatch(dqk, dv, [&](auto dq_dim, auto dv_dim) {
    launch_backward<decltype(dq_dim)::value, decltype(dv_dim)::value>(dout, q, k, v, out, lse, dq, dk, dv_out,
                                                                      batch, seq, heads, scale, stream);
  });
}

}  // namespace moerl::cuda
