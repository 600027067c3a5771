// Token embedding on the GPU (kernels/cuda/embedding.cu): the functions of moerl::cpu (kernels/embedding.hpp)
// with the same arguments plus a stream. All pointers (table, ids, out, dout, dtable) are device memory, outputs
// not overlapping inputs; calls are asynchronous on `stream`.
//
// ids must lie in [0, vocab): as on the CPU they are not checked (no vocab is passed), and an id outside the
// table reads or writes outside it.
//
// backward is deterministic and equals the CPU bit for bit: (id, row) pairs are sorted by id with a stable
// radix sort (CUB), then one thread block per distinct id adds that id's dout rows to its dtable row in row
// order — the CPU's order of additions, with no atomics. Uses stream-ordered scratch memory (about 24 bytes per
// row plus CUB's temporary storage).
// Throws moerl::Error on bad arguments (negative sizes, null pointers, rows >= 2^31) and on a CUDA failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// table [vocab, dim], ids [rows] -> out [rows, dim] (overwritten).
void embedding_forward(const float* table, const int64_t* ids, int64_t rows, int64_t dim, float* out,
                       cudaStream_t stream = nullptr);

// dtable[ids[r]] += dout[r] for every row, rows applied in order.
void embedding_backward(const float* dout, const int64_t* ids, int64_t rows, int64_t dim, float* dtable,
                        cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
