// Softmax cross-entropy on the GPU (kernels/cuda/cross_entropy.cu): the function of moerl::cpu
// (kernels/cross_entropy.hpp) with the same arguments plus a stream.
//
// logits, labels and dlogits are device memory; `counted` is a HOST pointer (like the returned sum, a result
// for the caller; may be null). The call SYNCHRONIZES `stream`: it returns the loss sum as a host double.
// dlogits may be logits itself (the gradient overwrites the logits in place, saving a [rows, vocab] buffer).
// A label < 0 ignores its row (zero loss, zero dlogits); a label >= vocab throws moerl::Error naming the first
// such row (found on the device, reported after the synchronization; dlogits of that row are zeros).
//
// One block per row: each thread keeps an online (max, Σ exp(z − max)) over its columns, merged across the
// block in a fixed order; lse = max + log(sum) in FP32 (the CPU sums exp in double). Then
//   dlogits[v] = grad_scale · exp(z_v − max) / sum,   minus grad_scale at the label,
// and the row's loss lse − z_label (in double from the FP32 max and sum) goes to a per-row buffer that one
// block sums in a fixed order: the same bits on every run. Throws moerl::Error on bad arguments (negative
// sizes, null pointers, rows >= 2^31) and on a CUDA failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// logits [rows, vocab], labels [rows] -> the SUM of −log p(label) over counted rows; *counted = their number;
// dlogits [rows, vocab] (optional) = grad_scale · (softmax(logits) − onehot(label)), zeros for ignored rows.
double cross_entropy(const float* logits, const int64_t* labels, int64_t rows, int64_t vocab, float grad_scale,
                     float* dlogits, int64_t* counted, cudaStream_t stream = nullptr);

// The same loss, with the gradient rounded to BF16 (round to nearest even: cuda::to_bf16's bits of cross_entropy's
// FP32 gradient) into dlogits16 [rows, ld16] (bit patterns), for a BF16 output head whose backward rounds it so
// anyway (cuda::linear_backward_bf16_dy). dlogits16 may be the logits themselves with ld16 = 2·vocab: each row's
// gradient then fills the first half of that row's own FP32 storage, so no second [rows, vocab] buffer and no
// rounding pass. Needs cross_entropy_bf16_grad_supported (vocab and ld16 multiples of 4, ld16 >= vocab, both
// pointers 16-byte aligned); throws moerl::Error otherwise.
bool cross_entropy_bf16_grad_supported(const float* logits, int64_t vocab, const uint16_t* dlogits16, int64_t ld16);
double cross_entropy_bf16_grad(const float* logits, const int64_t* labels, int64_t rows, int64_t vocab,
                               float grad_scale, uint16_t* dlogits16, int64_t ld16, int64_t* counted,
                               cudaStream_t stream = nullptr);

// The same from BF16 logits16 [rows, vocab] (bit patterns, a BF16 head's output): the loss and BF16 gradient of
// their widened values, the bits cross_entropy_bf16_grad gives from those values in FP32. dlogits16 [rows, vocab]
// (optional) may be logits16 itself. Needs vocab a multiple of 4 and 16-byte aligned pointers; throws otherwise.
double cross_entropy_bf16_logits(const uint16_t* logits16, const int64_t* labels, int64_t rows, int64_t vocab,
                                 float grad_scale, uint16_t* dlogits16, int64_t* counted,
                                 cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
