// One RoPE rotation on the device, shared by kernels/cuda/rope.cu and the kernels that apply RoPE on the way
// (the attention's packing of q and the rope key, its dQ store, MLA's rope-key gradient sum), so that all give the
// same bits: (a·c − b·s, b·c + a·s) with each product and sum rounded separately (no fused multiply-add), as the
// CPU computes it; s = −sin rotates back (exact).
#pragma once
#include <cuda_runtime.h>

namespace moerl::cuda {

__device__ __forceinline__ void rope_rotate(float& a, float& b, float c, float s) {
  const float a2 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
  b = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  a = a2;
}

}  // namespace moerl::cuda
