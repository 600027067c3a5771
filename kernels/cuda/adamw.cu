// AdamW step and gradient-norm clipping on the GPU; the reference is moerl::AdamW (runtime/optim/adamw.cpp),
// the contract kernels/cuda/adamw.hpp.
#include <cuda_runtime.h>

#include <cmath>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/adamw.hpp"
#include "kernels/cuda/adamw_update.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using adamw_detail::adamw_update;
using adamw_detail::Scalars;

using ops_detail::align256;
using ops_detail::block_sum;
using ops_detail::kMaxWarps;
using ops_detail::load;
using ops_detail::store;

constexpr int kThreads = 256;
// Elements per partial sum of grad_norm_squared: fixed, so the order of additions depends on n alone.
constexpr int64_t kNormChunk = int64_t{1} << 15;
constexpr int kNormFinishThreads = 1024;
static_assert(kNormChunk % 4 == 0, "chunks start on float4 boundaries");

// V BF16 codes of group j; V = 4 reads 8 bytes (element 0 in the low half of the first word).
template <int V> __device__ __forceinline__ void load_u16(const uint16_t* p, int64_t j, uint16_t (&v)[V]) {
  if constexpr (V == 4) {
    const uint2 q = reinterpret_cast<const uint2*>(p)[j];
    v[0] = static_cast<uint16_t>(q.x), v[1] = static_cast<uint16_t>(q.x >> 16);
    v[2] = static_cast<uint16_t>(q.y), v[3] = static_cast<uint16_t>(q.y >> 16);
  } else {
    v[0] = p[j];
  }
}
template <int V> __device__ __forceinline__ void store_u16(uint16_t* p, int64_t j, const uint16_t (&v)[V]) {
  if constexpr (V == 4) {
    reinterpret_cast<uint2*>(p)[j] = make_uint2(v[0] | (static_cast<uint32_t>(v[1]) << 16),
                                                v[2] | (static_cast<uint32_t>(v[3]) << 16));
  } else {
    p[j] = v[0];
  }
}

// adamw_update over group j (elements V·j .. V·j + V - 1) of w, g, m, v.
template <int V>
__device__ __forceinline__ void adamw_group(float* w, const float* g, uint16_t* m, uint16_t* v, int64_t j,
                                            const Scalars& s) {
  float wv[V], gv[V];
  uint16_t mv[V], vv[V];
  load<V>(w, j, wv);
  load<V>(g, j, gv);
  load_u16<V>(m, j, mv);
  load_u16<V>(v, j, vv);
#pragma unroll
  for (int k = 0; k < V; ++k) adamw_update(wv[k], gv[k], mv[k], vv[k], s);
  store<V>(w, j, wv);
  store_u16<V>(m, j, mv);
  store_u16<V>(v, j, vv);
}

template <int V>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* __restrict__ w, const float* __restrict__ g, uint16_t* __restrict__ m,
                 uint16_t* __restrict__ v, int64_t groups, Scalars s) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < groups;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x)
    adamw_group<V>(w, g, m, v, j, s);
}

// Σ g² over chunk[0 .. len) as one block computes it (every thread returns the block's sum; see sum_squares_kernel).
template <int V>
__device__ __forceinline__ double chunk_sum_squares(const float* __restrict__ chunk, int64_t len) {
  constexpr int kUnroll = 4;
  __shared__ double scratch[kMaxWarps];
  const int64_t groups = len / V, stride = blockDim.x;
  double acc = 0;
  int64_t j = threadIdx.x;
  for (; j + (kUnroll - 1) * stride < groups; j += kUnroll * stride) {
    float x[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load<V>(chunk, j + u * stride, x[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < V; ++k) acc += static_cast<double>(x[u][k]) * x[u][k];
  }
  for (; j < groups; j += stride) {
    float x[V];
    load<V>(chunk, j, x);
#pragma unroll
    for (int k = 0; k < V; ++k) acc += static_cast<double>(x[k]) * x[k];
  }
  for (int64_t i = len / V * V + threadIdx.x; i < len; i += blockDim.x) acc += static_cast<double>(chunk[i]) * chunk[i];
  return block_sum(acc, scratch);
}

// Block b: partial[b] = Σ g² over elements [b·kNormChunk, min(n, (b+1)·kNormChunk)), in double (each square
// exact), thread sums then a fixed-order block sum. V = 4: float4 over the chunk's whole groups. A thread's groups
// j, j + blockDim, ... are added in that order (the bits of a plain loop), loaded kUnroll at a time: bench-600m's 42
// spans 0.72 against 0.89 ms a step on the H200 (bench/results/2026-11-30-gpu-ce-norm-h200-041b8bc.txt).
template <int V>
__global__ void __launch_bounds__(kThreads)
    sum_squares_kernel(const float* __restrict__ g, int64_t n, double* __restrict__ partial) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kNormChunk;
  const double acc = chunk_sum_squares<V>(g + begin, n - begin < kNormChunk ? n - begin : kNormChunk);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// *sum += Σ partial[0 .. count), thread t taking partials t, t + blockDim, ... in order, then a fixed-order block
// sum (scratch: the block's; free again when this returns).
__device__ __forceinline__ void add_partials(const double* __restrict__ partial, int64_t count, double* sum,
                                             double* scratch) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *sum += acc;
  __syncthreads();
}

__global__ void __launch_bounds__(kNormFinishThreads)
    sum_partials_kernel(const double* __restrict__ partial, int64_t count, double* __restrict__ sum) {
  __shared__ double scratch[kMaxWarps];
  add_partials(partial, count, sum, scratch);
}

template <int V>
__global__ void __launch_bounds__(kThreads) scale_kernel(float* __restrict__ g, int64_t groups, float factor) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < groups;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x[V];
    load<V>(g, j, x);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = __fmul_rn(x[k], factor);
    store<V>(g, j, x);
  }
}

// AdamWSpans' table: chunk c is elements [k·kNormChunk, ...) of span `span` (table[c] = {span, k}), the spans'
// chunks in span order, so span s has chunks first_chunk[s] .. first_chunk[s + 1] - 1.
struct SpanChunk {
  int32_t span;
  int32_t k;
};

// Block c: partial[c] = the chunk's Σ g² (sum_squares_kernel's bits for that chunk of its span).
__global__ void __launch_bounds__(kThreads)
    spans_sum_squares_kernel(const AdamWSpan* __restrict__ spans, const SpanChunk* __restrict__ table,
                             double* __restrict__ partial) {
  const SpanChunk c = table[blockIdx.x];
  const AdamWSpan sp = spans[c.span];
  const int64_t begin = static_cast<int64_t>(c.k) * kNormChunk;
  const double acc = chunk_sum_squares<4>(sp.g + begin, sp.n - begin < kNormChunk ? sp.n - begin : kNormChunk);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// For each span in order, sum_partials_kernel over its chunks' partials: *sum += their fixed-order sum.
__global__ void __launch_bounds__(kNormFinishThreads)
    spans_sum_partials_kernel(const double* __restrict__ partial, const int64_t* __restrict__ first_chunk,
                              int64_t spans, double* __restrict__ sum) {
  __shared__ double scratch[kMaxWarps];
  for (int64_t s = 0; s < spans; ++s)
    add_partials(partial + first_chunk[s], first_chunk[s + 1] - first_chunk[s], sum, scratch);
}

// Block c: adamw_update over the chunk's elements of its span, 4 at a time, then the span's last n % 4 one by one
// (in its last chunk); with `decay`'s constants for spans with weight decay, `no_decay`'s for the others.
__global__ void __launch_bounds__(kThreads)
    spans_adamw_kernel(const AdamWSpan* __restrict__ spans, const SpanChunk* __restrict__ table, Scalars no_decay,
                       Scalars decay, const float* __restrict__ device_grad_scale) {
  const SpanChunk c = table[blockIdx.x];
  const AdamWSpan sp = spans[c.span];
  Scalars s = sp.decay ? decay : no_decay;
  if (!adamw_detail::take_device_grad_scale(device_grad_scale, s)) return;
  const int64_t begin = static_cast<int64_t>(c.k) * kNormChunk;
  const int64_t end = sp.n - begin < kNormChunk ? sp.n : begin + kNormChunk, whole = sp.n / 4 * 4;
  for (int64_t j = begin / 4 + threadIdx.x; j < (end < whole ? end : whole) / 4; j += blockDim.x)
    adamw_group<4>(sp.w, sp.g, sp.m, sp.v, j, s);
  for (int64_t i = (begin > whole ? begin : whole) + threadIdx.x; i < end; i += blockDim.x)
    adamw_update(sp.w[i], sp.g[i], sp.m[i], sp.v[i], s);
}

// clip_factor's one thread.
__global__ void clip_factor_kernel(const double* __restrict__ norm_sq, double max_norm, float* __restrict__ factor) {
  const double norm = sqrt(*norm_sq);
  if (!isfinite(norm))
    *factor = __int_as_float(0x7FC00000);  // NaN: skip
  else
    *factor = max_norm > 0 && norm > max_norm ? static_cast<float>(max_norm / norm) : 1.0f;
}

void check_n(const char* fn, int64_t n, bool pointers_set) {
  require(n >= 0, [&] { return std::string("cuda::") + fn + ": n must be >= 0, got " + std::to_string(n); });
  require(n == 0 || pointers_set, [&] { return std::string("cuda::") + fn + ": null pointer argument"; });
}

}  // namespace

namespace adamw_detail {
namespace {

void check_scalar(bool ok, const char* name, double value, const char* expected) {
  require(ok, [&] {
    return std::string("cuda::adamw_step: ") + name + " = " + std::to_string(value) + ", expected " + expected;
  });
}

}  // namespace

// Declared in adamw_update.cuh.
Scalars scalars_of(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t t,
                   float grad_scale) {
  check_scalar(std::isfinite(grad_scale) && grad_scale > 0, "grad_scale", grad_scale, "finite and > 0");
  check_scalar(std::isfinite(lr) && lr >= 0, "lr", lr, ">= 0");
  check_scalar(beta1 >= 0 && beta1 < 1, "beta1", beta1, "in [0, 1)");
  check_scalar(beta2 >= 0 && beta2 < 1, "beta2", beta2, "in [0, 1)");
  check_scalar(std::isfinite(eps) && eps > 0, "eps", eps, "> 0");
  check_scalar(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay", weight_decay, ">= 0");
  check_scalar(t >= 1, "t", static_cast<double>(t), ">= 1 (the 1-based update count)");
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(t));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(t));
  return Scalars{static_cast<float>(beta1),          static_cast<float>(1.0 - beta1),
                 static_cast<float>(beta2),          static_cast<float>(1.0 - beta2),
                 static_cast<float>(lr / bias1),     static_cast<float>(std::sqrt(bias2)),
                 static_cast<float>(eps),            static_cast<float>(1.0 - lr * weight_decay),
                 grad_scale};
}

}  // namespace adamw_detail

void adamw_step(float* w, const float* g, uint16_t* m, uint16_t* v, int64_t n, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t t, cudaStream_t stream, float grad_scale) {
  check_n("adamw_step", n, w && g && m && v);
  const Scalars s = adamw_detail::scalars_of(lr, beta1, beta2, eps, weight_decay, t, grad_scale);
  if (n == 0) return;
  const bool vec = ops_detail::aligned(w, 16) && ops_detail::aligned(g, 16) && ops_detail::aligned(m, 8) && ops_detail::aligned(v, 8);
  const int64_t head = vec ? n / 4 * 4 : 0;
  if (head > 0) {
    adamw_kernel<4><<<ops_detail::grid_stride_blocks(head / 4, kThreads), kThreads, 0, stream>>>(w, g, m, v, head / 4, s);
    CUDA_CHECK_LAUNCH();
  }
  if (head < n) {
    adamw_kernel<1><<<ops_detail::grid_stride_blocks(n - head, kThreads), kThreads, 0, stream>>>(
        w + head, g + head, m + head, v + head, n - head, s);
    CUDA_CHECK_LAUNCH();
  }
}

void clip_factor(const double* norm_sq, double max_norm, float* factor, cudaStream_t stream) {
  require(norm_sq != nullptr && factor != nullptr, "cuda::clip_factor: null pointer");
  require(max_norm >= 0, [&] { return "cuda::clip_factor: max_norm must be >= 0, got " + std::to_string(max_norm); });
  clip_factor_kernel<<<1, 1, 0, stream>>>(norm_sq, max_norm, factor);
  CUDA_CHECK_LAUNCH();
}

void grad_norm_squared(const float* g, int64_t n, double* sum, cudaStream_t stream) {
  check_n("grad_norm_squared", n, g != nullptr);
  require(sum != nullptr, "cuda::grad_norm_squared: null sum");
  if (n == 0) return;
  const int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
  require(chunks <= INT32_MAX,
          [&] { return "cuda::grad_norm_squared: " + std::to_string(n) + " elements exceed one launch"; });
  ops_detail::StreamScratch scratch(sizeof(double) * static_cast<size_t>(chunks), stream);
  double* partial = scratch.at<double>();
  if (ops_detail::aligned(g, 16)) {
    sum_squares_kernel<4><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(g, n, partial);
  } else {
    sum_squares_kernel<1><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(g, n, partial);
  }
  CUDA_CHECK_LAUNCH();
  sum_partials_kernel<<<1, kNormFinishThreads, 0, stream>>>(partial, chunks, sum);
  CUDA_CHECK_LAUNCH();
}

void scale(float* g, int64_t n, float factor, cudaStream_t stream) {
  check_n("scale", n, g != nullptr);
  if (n == 0) return;
  const int64_t head = ops_detail::aligned(g, 16) ? n / 4 * 4 : 0;
  if (head > 0) {
    scale_kernel<4><<<ops_detail::grid_stride_blocks(head / 4, kThreads), kThreads, 0, stream>>>(g, head / 4, factor);
    CUDA_CHECK_LAUNCH();
  }
  if (head < n) {
    scale_kernel<1><<<ops_detail::grid_stride_blocks(n - head, kThreads), kThreads, 0, stream>>>(g + head, n - head, factor);
    CUDA_CHECK_LAUNCH();
  }
}

namespace {

// Where AdamWSpans' device block keeps its tables, one after another on 256-byte boundaries: the spans, the chunk
// table, each span's first chunk (spans + 1 entries) and the chunks' partial sums.
struct SpanTables {
  AdamWSpan* spans;
  SpanChunk* table;
  int64_t* first_chunk;
  double* partial;
  size_t bytes;  // the whole block
};

SpanTables span_tables(void* device, size_t spans, int64_t chunks) {  // device null: only `bytes` is meant
  const uintptr_t base = reinterpret_cast<uintptr_t>(device);
  const size_t a = align256(spans * sizeof(AdamWSpan)), b = align256(static_cast<size_t>(chunks) * sizeof(SpanChunk)),
               c = align256((spans + 1) * sizeof(int64_t)), d = align256(static_cast<size_t>(chunks) * sizeof(double));
  return SpanTables{reinterpret_cast<AdamWSpan*>(base), reinterpret_cast<SpanChunk*>(base + a),
                    reinterpret_cast<int64_t*>(base + a + b), reinterpret_cast<double*>(base + a + b + c),
                    a + b + c + d};
}

}  // namespace

bool AdamWSpans::fits(const AdamWSpan& span) {
  return span.n == 0 || (ops_detail::aligned(span.w, 16) && ops_detail::aligned(span.g, 16) &&
                         ops_detail::aligned(span.m, 8) && ops_detail::aligned(span.v, 8));
}

AdamWSpans::AdamWSpans(const std::vector<AdamWSpan>& spans) : spans_(spans.size()) {
  std::vector<SpanChunk> table;
  std::vector<int64_t> first_chunk{0};
  for (size_t i = 0; i < spans.size(); ++i) {
    const AdamWSpan& sp = spans[i];
    require(sp.n >= 0 && (sp.n == 0 || (sp.w && sp.g && sp.m && sp.v)), [&] {
      return "cuda::AdamWSpans: span " + std::to_string(i) + " has a null pointer or n < 0 (n = " +
             std::to_string(sp.n) + ")";
    });
    require(fits(sp),
            [&] { return "cuda::AdamWSpans: span " + std::to_string(i) + " is not aligned (w, g 16 bytes; m, v 8)"; });
    const int64_t chunks = (sp.n + kNormChunk - 1) / kNormChunk;
    for (int64_t k = 0; k < chunks; ++k) table.push_back({static_cast<int32_t>(i), static_cast<int32_t>(k)});
    first_chunk.push_back(first_chunk.back() + chunks);
  }
  chunks_ = static_cast<int64_t>(table.size());
  require(chunks_ <= INT32_MAX, "cuda::AdamWSpans: too many chunks for one launch");
  CUDA_CHECK(cudaMalloc(&device_, span_tables(nullptr, spans_, chunks_).bytes));
  const SpanTables d = span_tables(device_, spans_, chunks_);
  CUDA_CHECK(cudaMemcpy(d.spans, spans.data(), spans.size() * sizeof(AdamWSpan), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d.table, table.data(), table.size() * sizeof(SpanChunk), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d.first_chunk, first_chunk.data(), first_chunk.size() * sizeof(int64_t),
                        cudaMemcpyHostToDevice));
}

AdamWSpans::~AdamWSpans() { cudaFree(device_); }

void AdamWSpans::grad_norm_squared(double* sum, cudaStream_t stream) const {
  require(sum != nullptr, "cuda::AdamWSpans::grad_norm_squared: null sum");
  if (chunks_ == 0) return;
  const SpanTables d = span_tables(device_, spans_, chunks_);
  spans_sum_squares_kernel<<<static_cast<unsigned>(chunks_), kThreads, 0, stream>>>(d.spans, d.table, d.partial);
  CUDA_CHECK_LAUNCH();
  spans_sum_partials_kernel<<<1, kNormFinishThreads, 0, stream>>>(d.partial, d.first_chunk,
                                                                  static_cast<int64_t>(spans_), sum);
  CUDA_CHECK_LAUNCH();
}

void AdamWSpans::adamw_step(const AdamWUpdate& u, cudaStream_t stream) const {
  const Scalars no_decay = adamw_detail::scalars_of(u.lr, u.beta1, u.beta2, u.eps, 0.0, u.t, u.grad_scale);
  const Scalars decay = adamw_detail::scalars_of(u.lr, u.beta1, u.beta2, u.eps, u.weight_decay, u.t, u.grad_scale);
  if (chunks_ == 0) return;
  const SpanTables d = span_tables(device_, spans_, chunks_);
  spans_adamw_kernel<<<static_cast<unsigned>(chunks_), kThreads, 0, stream>>>(d.spans, d.table, no_decay, decay,
                                                                              u.device_grad_scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moerl::cuda
