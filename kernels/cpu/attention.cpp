#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/linear.hpp"

namespace moerl::cpu {

namespace {

// Query rows per block. A block [i0, i1) of queries sees keys [0, i1) only (causal), so the score block is
// [kRowBlock, i1] and the GEMMs skip most of the masked upper triangle.
constexpr int64_t kRowBlock = 64;

// Multiply-adds below which one thread does all (batch, head) slices: forking costs more than tiny problems.
constexpr int64_t kParallelMin = 1 << 18;

bool worth_parallel(int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv) {
  return batch * heads > 1 && batch * heads * seq * seq * (dqk + dv) >= kParallelMin;
}

// One (sequence, head) slice: base pointers and the row stride (heads * head dim) of each tensor.
struct Slice {
  int64_t q_off, v_off;     // element offset of row 0 of this slice in q/k and v/out
  int64_t ldq, ldv;         // heads * dqk, heads * dv
};

Slice slice_of(int64_t b, int64_t h, int64_t seq, int64_t heads, int64_t dqk, int64_t dv) {
  return {b * seq * heads * dqk + h * dqk, b * seq * heads * dv + h * dv, heads * dqk, heads * dv};
}

}  // namespace

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t seq, int64_t heads, int64_t dqk, int64_t dv, float scale) {
  const int64_t tasks = batch * heads;
#pragma omp parallel for schedule(dynamic, 1) if (worth_parallel(batch, seq, heads, dqk, dv))
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / heads, h = task % heads;
    const Slice sl = slice_of(b, h, seq, heads, dqk, dv);
    const float* qh = q + sl.q_off;
    const float* kh = k + sl.q_off;
    const float* vh = v + sl.v_off;
    float* oh = out + sl.v_off;
    float* lse_h = lse + (b * heads + h) * seq;
    std::vector<float> s(static_cast<size_t>(std::min(seq, kRowBlock) * seq));  // scores, then probabilities
    for (int64_t i0 = 0; i0 < seq; i0 += kRowBlock) {
      const int64_t i1 = std::min(seq, i0 + kRowBlock), rows = i1 - i0;
      // s[r, j] = scale · q_{i0+r} · k_j, j < i1; leading dimension i1.
      sgemm(false, true, rows, i1, dqk, scale, qh + i0 * sl.ldq, sl.ldq, kh, sl.ldq, 0.0f, s.data(), i1);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* sr = s.data() + r * i1;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= i; ++j) m = std::max(m, sr[j]);
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          sr[j] = std::exp(sr[j] - m);
          sum += sr[j];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j <= i; ++j) sr[j] *= inv;
        for (int64_t j = i + 1; j < i1; ++j) sr[j] = 0.0f;
        lse_h[i] = m + static_cast<float>(std::log(sum));
      }
      sgemm(false, false, rows, dv, i1, 1.0f, s.data(), i1, vh, sl.ldv, 0.0f, oh + i0 * sl.ldv, sl.ldv);
    }
  }
}

// With P = softmax(S), S = scale · Q·Kᵀ, O = P·V:
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS_ij = P_ij · (dP_ij − D_i) with D_i = Σ_d dO_id · O_id,
//   dQ = scale · dS·K,  dK = scale · dSᵀ·Q.
void attention_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                        const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                        int64_t heads, int64_t dqk, int64_t dv, float scale) {
  const int64_t tasks = batch * heads;
#pragma omp parallel for schedule(dynamic, 1) if (worth_parallel(batch, seq, heads, dqk, dv))
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / heads, h = task % heads;
    const Slice sl = slice_of(b, h, seq, heads, dqk, dv);
    const float* qh = q + sl.q_off;
    const float* kh = k + sl.q_off;
    const float* vh = v + sl.v_off;
    const float* oh = out + sl.v_off;
    const float* doh = dout + sl.v_off;
    float* dqh = dq + sl.q_off;
    float* dkh = dk + sl.q_off;
    float* dvh = dv_out + sl.v_off;
    const float* lse_h = lse + (b * heads + h) * seq;
    // dK and dV of this slice accumulate over query blocks (in block order: deterministic).
    for (int64_t j = 0; j < seq; ++j) {
      std::fill_n(dkh + j * sl.ldq, dqk, 0.0f);
      std::fill_n(dvh + j * sl.ldv, dv, 0.0f);
    }
    const size_t block = static_cast<size_t>(std::min(seq, kRowBlock) * seq);
    std::vector<float> p(block), dp(block);
    for (int64_t i0 = 0; i0 < seq; i0 += kRowBlock) {
      const int64_t i1 = std::min(seq, i0 + kRowBlock), rows = i1 - i0;
      sgemm(false, true, rows, i1, dqk, scale, qh + i0 * sl.ldq, sl.ldq, kh, sl.ldq, 0.0f, p.data(), i1);
      sgemm(false, true, rows, i1, dv, 1.0f, doh + i0 * sl.ldv, sl.ldv, vh, sl.ldv, 0.0f, dp.data(), i1);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* pr = p.data() + r * i1;
        float* dpr = dp.data() + r * i1;
        double d = 0;
        for (int64_t c = 0; c < dv; ++c) d += static_cast<double>(doh[i * sl.ldv + c]) * oh[i * sl.ldv + c];
        const float df = static_cast<float>(d);
        for (int64_t j = 0; j <= i; ++j) {
          pr[j] = std::exp(pr[j] - lse_h[i]);
          dpr[j] = pr[j] * (dpr[j] - df);  // dS
        }
        for (int64_t j = i + 1; j < i1; ++j) pr[j] = dpr[j] = 0.0f;
      }
      sgemm(true, false, i1, dv, rows, 1.0f, p.data(), i1, doh + i0 * sl.ldv, sl.ldv, 1.0f, dvh, sl.ldv);
      sgemm(false, false, rows, dqk, i1, scale, dp.data(), i1, kh, sl.ldq, 0.0f, dqh + i0 * sl.ldq, sl.ldq);
      sgemm(true, false, i1, dqk, rows, scale, dp.data(), i1, qh + i0 * sl.ldq, sl.ldq, 1.0f, dkh, sl.ldq);
    }
  }
}

}  // namespace moerl::cpu
