// Softmax cross-entropy over the vocabulary, FP32 (log-sum-exp with the row max subtracted).
#pragma once
#include <cstdint>

namespace moerl::cpu {

// logits [rows, vocab], labels [rows] (a label < 0 is ignored). Returns the SUM of -log p(label) over the
// counted rows (in double) and the number of counted rows in *counted. When dlogits is non-null it receives
// grad_scale · (softmax(logits) - onehot(label)) for counted rows and zeros for ignored rows.
double cross_entropy(const float* logits, const int64_t* labels, int64_t rows, int64_t vocab, float grad_scale,
                     float* dlogits, int64_t* counted);

}  // namespace moerl::cpu
