// Token embedding lookup and its backward (scatter-add into the table's gradient).
#pragma once
#include <cstdint>

namespace moerl::cpu {

// table [vocab, dim], ids [rows] (each in [0, vocab)) -> out [rows, dim].
void embedding_forward(const float* table, const int64_t* ids, int64_t rows, int64_t dim, float* out);
// dtable[ids[r]] += dout[r] for every row; rows are applied in order (deterministic).
void embedding_backward(const float* dout, const int64_t* ids, int64_t rows, int64_t dim, float* dtable);

}  // namespace moerl::cpu
