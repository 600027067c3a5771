// Softmax cross-entropy on the GPU; the reference is kernels/cpu/cross_entropy.cpp, the contract
// kernels/cuda/cross_entropy.hpp.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/cuda/cross_entropy.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "kernels/cuda/pdl.cuh"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using ops_detail::block_sum;
using ops_detail::float_from_bf16;
using ops_detail::kMaxWarps;
using ops_detail::kWarp;
using ops_detail::load;
using ops_detail::store;

constexpr int kRowThreads = 256;
constexpr int kUnroll = 4;  // groups a thread loads before using them
constexpr int kSumThreads = 1024;
constexpr unsigned long long kNoBadRow = ~0ull;

// What the final reduction leaves for the host.
struct Totals {
  double loss;                  // Σ row losses of counted rows
  long long counted;            // rows with 0 <= label < vocab
  unsigned long long bad_row;   // first row with label >= vocab, kNoBadRow if none
};

// A running max and Σ exp(z − max) over some of a row's logits.
struct MaxSum {
  float m, s;
};

// e^d for d = z − max <= 0 (or −inf): 2^(d · log2 e) on the special-function unit, two instructions where expf
// takes nine (the kernel issues ~30 a logit; the bf16 head's 16384 x 32000 logits take two exponentials each). On
// the H200 bench-600m's in-place BF16 form 824 against 1007 us with expf, the fp8 step 311.8k-312.6k against
// 310.3k-311.1k tokens/s (bench/results/2026-11-30-gpu-ce-fast-exp-h200-c7a926e+ce.txt).
// Error: the product's rounding (|d · log2 e| < 2^7 at |d| < 88: at most 2^-18 absolute, 2.6e-6 relative after the
// power) and ex2.approx's 2^-22 relative; results below 2^-126 (d < −87.3) flush to 0 where expf gives subnormals.
__device__ __forceinline__ float exp_nonpositive(float d) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(__fmul_rn(d, 1.4426950408889634f)));
  return r;
}

// Rounded operations (no FMA contraction): merge(a, b) and merge(b, a) give the same bits.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};  // both empty (or all −inf): exp(−inf − −inf) would be NaN
  return {m, __fadd_rn(__fmul_rn(a.s, exp_nonpositive(a.m - m)), __fmul_rn(b.s, exp_nonpositive(b.m - m)))};
}

// Merge over the block, the same bits in every thread (warp butterflies, then the warps in order).
__device__ __forceinline__ MaxSum block_merge(MaxSum v, MaxSum* scratch) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2)
    v = merge(v, {__shfl_xor_sync(0xFFFFFFFFu, v.m, o), __shfl_xor_sync(0xFFFFFFFFu, v.s, o)});
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  MaxSum total = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) total = merge(total, scratch[w]);
  return total;
}

__device__ __forceinline__ uint32_t bf16_pair(float a, float b) {  // cuda::to_bf16's rounding, a in the low half
  return uint32_t{__bfloat16_as_ushort(__float2bfloat16_rn(a))} |
         (uint32_t{__bfloat16_as_ushort(__float2bfloat16_rn(b))} << 16);
}

// Logits group j of a row: 4 or 1 FP32 values, or (kIn16) 4 BF16 ones widened (an 8-byte load).
template <int V, bool kIn16>
__device__ __forceinline__ void load_logits(const void* row, int64_t j, float (&v)[V]) {
  if constexpr (kIn16) {
    static_assert(V == 4, "BF16 logits in groups of 4");
    const uint2 p = static_cast<const uint2*>(row)[j];
    v[0] = float_from_bf16(p.x & 0xFFFFu), v[1] = float_from_bf16(p.x >> 16), v[2] = float_from_bf16(p.y & 0xFFFFu),
    v[3] = float_from_bf16(p.y >> 16);
  } else {
    load<V>(static_cast<const float*>(row), j, v);
  }
}

// One block per row: the row's loss into row_loss[r] (0 for an ignored or bad row) and, when dlogits is
// non-null, its gradient: FP32 [rows, vocab], or with kBf16 rounded to BF16, [rows, ld16] (dlogits then points to
// uint16_t bit patterns; V = 4). The logits are FP32 [rows, vocab], or with kIn16 BF16 [rows, vocab] (kBf16 too):
// the function of their widened values. dlogits may be logits (no __restrict__): every logit is read before the
// block's barrier in block_merge or, in the gradient pass, by the thread that then overwrites it (FP32), or before
// the barrier of the pass's step that writes over it (BF16 over FP32 with ld16 = 2 vocab: group j's 8 bytes lie in
// the FP32 group j / 2, read in the same step or an earlier one; BF16 over BF16 with ld16 = vocab: group j itself).
template <int V, bool kBf16, bool kIn16>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_rows_kernel(const void* logits, const int64_t* __restrict__ labels, int64_t vocab,
                              float grad_scale, void* dlogits, int64_t ld16, double* __restrict__ row_loss,
                              Totals* __restrict__ totals) {
  moerl::cuda::await_previous_grid();
  static_assert(!kBf16 || V == 4, "BF16 gradients in groups of 4 (8-byte stores)");
  static_assert(!kIn16 || kBf16, "BF16 logits give BF16 gradients");
  __shared__ MaxSum scratch[kMaxWarps];
  const int64_t r = blockIdx.x, groups = vocab / V, label = labels[r];
  const void* z = kIn16 ? static_cast<const void*>(static_cast<const uint16_t*>(logits) + r * vocab)
                        : static_cast<const void*>(static_cast<const float*>(logits) + r * vocab);
  float* dz = dlogits && !kBf16 ? static_cast<float*>(dlogits) + r * vocab : nullptr;
  uint2* dz16 = dlogits && kBf16 ? reinterpret_cast<uint2*>(static_cast<uint16_t*>(dlogits) + r * ld16) : nullptr;
  if (label < 0 || label >= vocab) {  // uniform across the block
    if (label >= vocab && threadIdx.x == 0) atomicMin(&totals->bad_row, static_cast<unsigned long long>(r));
    if (threadIdx.x == 0) row_loss[r] = 0.0;
    if (dz) {
      const float zero[V] = {};
      for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) store<V>(dz, j, zero);
    }
    if (dz16)
      for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) dz16[j] = make_uint2(0u, 0u);
    return;
  }

  // A thread's groups j, j + blockDim, ... in that order in both passes, kUnroll loaded before any is used: the
  // bits of a plain loop, more loads in flight (on the H200, bench-600m's in-place BF16 form 1.22 against 1.29 ms,
  // bench/results/2026-11-30-gpu-ce-norm-h200-041b8bc.txt). Fewer blocks an SM (2 or 3, so that a row would still
  // be in L2 for the gradient pass) with 8 loads in flight gained at most 4%, 1.21 against 1.26 ms
  // (bench/results/2026-11-30-gpu-ce-residency-h200-3c32234+ce.txt): not kept. Nor the row held in registers (32 of
  // its 8-byte groups a thread, 128 registers, 2 blocks an SM; one read of the logits, the same bits): BF16 logits
  // in place 1022.5 us against ~1010, so the second read is not what bounds it; the arithmetic (two expf and a
  // 64-bit label test a logit) shares the time (bench/results/2026-11-30-gpu-ce-held-h200-cbcd01b+held.txt).
  const int64_t stride = blockDim.x;
  MaxSum st{-INFINITY, 0.0f};
  for (int64_t j0 = threadIdx.x; j0 < groups; j0 += kUnroll * stride) {
    float vs[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j0 + u * stride < groups) load_logits<V, kIn16>(z, j0 + u * stride, vs[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u * stride >= groups) break;
      const float (&v)[V] = vs[u];
      float cm = v[0];
#pragma unroll
      for (int k = 1; k < V; ++k) cm = fmaxf(cm, v[k]);
      if (cm > st.m) {
        st.s = __fmul_rn(st.s, exp_nonpositive(st.m - cm));  // 0 · exp(−inf) = 0 for the first values
        st.m = cm;
      }
      if (st.m != -INFINITY) {
        float e[V];
#pragma unroll
        for (int k = 0; k < V; ++k) e[k] = exp_nonpositive(v[k] - st.m);
        if constexpr (V == 4) {
          st.s += (e[0] + e[1]) + (e[2] + e[3]);  // pairwise: a thread's running sum takes vocab/1024 additions
        } else {
          st.s += e[0];
        }
      }
    }
  }
  // Before the barrier: in place, dz[label] follows it.
  const float z_label = threadIdx.x != 0 ? 0.0f
                        : kIn16      ? float_from_bf16(static_cast<const uint16_t*>(z)[label])
                                     : static_cast<const float*>(z)[label];
  const MaxSum row = block_merge(st, scratch);
  if (threadIdx.x == 0)
    row_loss[r] = static_cast<double>(row.m) + log(static_cast<double>(row.s)) - static_cast<double>(z_label);
  const float inv_sum = 1.0f / row.s;
  const int64_t label_group = label / V;
  const int label_lane = static_cast<int>(label % V);
  // The gradient of kUnroll groups from j0 on (those below `groups`), computed into vs.
  auto gradient = [&](int64_t j0, float (&vs)[kUnroll][V]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * stride;
      if (j >= groups) break;
      load_logits<V, kIn16>(z, j, vs[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k)
        vs[u][k] = __fmul_rn(grad_scale, __fmul_rn(exp_nonpositive(vs[u][k] - row.m), inv_sum));
      if (j0 + u * stride == label_group) {  // one group of the row
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (k == label_lane) vs[u][k] = __fsub_rn(vs[u][k], grad_scale);
      }
    }
  };
  if (dz16) {
    // In place, a step is the block's kUnroll · blockDim groups: all read before the barrier, written after it.
    for (int64_t s0 = 0; s0 < groups; s0 += kUnroll * stride) {
      const int64_t j0 = s0 + threadIdx.x;
      float vs[kUnroll][V] = {};
      gradient(j0, vs);
      __syncthreads();  // in place: this step's logits are read before any of them is written over
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * stride;
        if (j < groups) dz16[j] = make_uint2(bf16_pair(vs[u][0], vs[u][1]), bf16_pair(vs[u][2], vs[u][3]));
      }
    }
    return;
  }
  if (!dz) return;
  for (int64_t j0 = threadIdx.x; j0 < groups; j0 += kUnroll * stride) {
    float vs[kUnroll][V] = {};
    gradient(j0, vs);  // each thread writes only the groups it read itself
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j0 + u * stride < groups) store<V>(dz, j0 + u * stride, vs[u]);
  }
}

// One block: thread t sums rows t, t + 1024, ... in order, then a fixed-order block sum.
__global__ void __launch_bounds__(kSumThreads)
    cross_entropy_sum_kernel(const double* __restrict__ row_loss, const int64_t* __restrict__ labels, int64_t rows,
                             int64_t vocab, Totals* __restrict__ totals) {
  moerl::cuda::await_previous_grid();
  __shared__ double dscratch[kMaxWarps];
  __shared__ long long cscratch[kMaxWarps];
  double loss = 0;
  long long counted = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    loss += row_loss[r];
    counted += labels[r] >= 0 && labels[r] < vocab;
  }
  loss = block_sum(loss, dscratch);
  counted = block_sum(counted, cscratch);
  if (threadIdx.x == 0) {
    totals->loss = loss;
    totals->counted = counted;
  }
}

// cross_entropy with the gradient in FP32 (dlogits) or BF16 (dlogits16, ld16; callers check the layout), from FP32
// logits or (logits16) BF16 ones (then dlogits null).
double cross_entropy_with(const char* fn, const float* logits, const uint16_t* logits16, const int64_t* labels,
                          int64_t rows, int64_t vocab, float grad_scale, float* dlogits, uint16_t* dlogits16,
                          int64_t ld16, int64_t* counted, cudaStream_t stream) {
  require(rows >= 0 && vocab > 0, [&] {
    return std::string("cuda::") + fn + ": rows must be >= 0 and vocab > 0, got " + std::to_string(rows) + " x " +
           std::to_string(vocab);
  });
  require(rows <= INT32_MAX,
          [&] { return std::string("cuda::") + fn + ": " + std::to_string(rows) + " rows exceed one launch"; });
  if (rows == 0) {
    if (counted) *counted = 0;
    return 0.0;
  }
  require((logits || logits16) && labels, [&] { return std::string("cuda::") + fn + ": null logits or labels"; });

  const size_t loss_bytes = ops_detail::align256(sizeof(double) * rows);
  ops_detail::StreamScratch scratch(loss_bytes + sizeof(Totals), stream);
  double* row_loss = scratch.at<double>();
  Totals* totals = scratch.at<Totals>(loss_bytes);
  CUDA_CHECK(cudaMemsetAsync(totals, 0xFF, sizeof(Totals), stream));  // bad_row = kNoBadRow; the rest is written

  const bool vec = vocab % 4 == 0 && (logits16 || ops_detail::aligned(logits, 16)) &&
                   (!dlogits || ops_detail::aligned(dlogits, 16));
  const int64_t groups = vec ? vocab / 4 : vocab;
  const int64_t warps = (groups + kWarp - 1) / kWarp;
  const int threads = static_cast<int>(warps * kWarp > kRowThreads ? kRowThreads : warps * kWarp);
  if (logits16 != nullptr) {
    launch_after_previous(cross_entropy_rows_kernel<4, true, true>, static_cast<unsigned>(rows), threads, 0, stream,
                          logits16, labels, vocab, grad_scale, dlogits16, ld16, row_loss, totals);
  } else if (dlogits16 != nullptr) {
    launch_after_previous(cross_entropy_rows_kernel<4, true, false>, static_cast<unsigned>(rows), threads, 0, stream,
                          logits, labels, vocab, grad_scale, dlogits16, ld16, row_loss, totals);
  } else if (vec) {
    launch_after_previous(cross_entropy_rows_kernel<4, false, false>, static_cast<unsigned>(rows), threads, 0, stream,
                          logits, labels, vocab, grad_scale, dlogits, 0, row_loss, totals);
  } else {
    launch_after_previous(cross_entropy_rows_kernel<1, false, false>, static_cast<unsigned>(rows), threads, 0, stream,
                          logits, labels, vocab, grad_scale, dlogits, 0, row_loss, totals);
  }
  launch_after_previous(cross_entropy_sum_kernel, 1, kSumThreads, 0, stream, row_loss, labels, rows, vocab, totals);

  Totals host{};
  CUDA_CHECK(cudaMemcpyAsync(&host, totals, sizeof(Totals), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host.bad_row != kNoBadRow) {
    int64_t label = 0;
    CUDA_CHECK(cudaMemcpy(&label, labels + host.bad_row, sizeof(label), cudaMemcpyDeviceToHost));
    throw Error(std::string("cuda::") + fn + ": label " + std::to_string(label) + " of row " +
                std::to_string(host.bad_row) + " >= vocab " + std::to_string(vocab));
  }
  if (counted) *counted = host.counted;
  return host.loss;
}

}  // namespace

double cross_entropy(const float* logits, const int64_t* labels, int64_t rows, int64_t vocab, float grad_scale,
                     float* dlogits, int64_t* counted, cudaStream_t stream) {
  return cross_entropy_with("cross_entropy", logits, nullptr, labels, rows, vocab, grad_scale, dlogits, nullptr, 0,
                            counted, stream);
}

bool cross_entropy_bf16_grad_supported(const float* logits, int64_t vocab, const uint16_t* dlogits16, int64_t ld16) {
  return vocab % 4 == 0 && ld16 >= vocab && ld16 % 4 == 0 && ops_detail::aligned(logits, 16) &&
         ops_detail::aligned(dlogits16, 16);
}

double cross_entropy_bf16_grad(const float* logits, const int64_t* labels, int64_t rows, int64_t vocab,
                               float grad_scale, uint16_t* dlogits16, int64_t ld16, int64_t* counted,
                               cudaStream_t stream) {
  require(dlogits16 != nullptr && cross_entropy_bf16_grad_supported(logits, vocab, dlogits16, ld16), [&] {
    return "cuda::cross_entropy_bf16_grad: needs vocab a multiple of 4, a row stride ld16 >= vocab and a multiple of "
           "4, 16-byte aligned logits and dlogits16, got vocab " +
           std::to_string(vocab) + ", ld16 " + std::to_string(ld16);
  });
  const bool in_place = static_cast<const void*>(dlogits16) == static_cast<const void*>(logits);
  require(!in_place || ld16 == 2 * vocab, [&] {
    return "cuda::cross_entropy_bf16_grad: in place needs ld16 = 2 vocab (each row's "
           "gradient over its own logits), got " +
           std::to_string(ld16);
  });
  return cross_entropy_with("cross_entropy_bf16_grad", logits, nullptr, labels, rows, vocab, grad_scale, nullptr,
                            dlogits16, ld16, counted, stream);
}

double cross_entropy_bf16_logits(const uint16_t* logits16, const int64_t* labels, int64_t rows, int64_t vocab,
                                 float grad_scale, uint16_t* dlogits16, int64_t* counted, cudaStream_t stream) {
  require(vocab % 4 == 0 && ops_detail::aligned(logits16, 16) && ops_detail::aligned(dlogits16, 16), [&] {
    return "cuda::cross_entropy_bf16_logits: needs vocab a multiple of 4 and 16-byte aligned logits16 and dlogits16, "
           "got vocab " +
           std::to_string(vocab);
  });
  return cross_entropy_with("cross_entropy_bf16_logits", nullptr, logits16, labels, rows, vocab, grad_scale, nullptr,
                            dlogits16, vocab, counted, stream);
}

}  // namespace moerl::cuda
