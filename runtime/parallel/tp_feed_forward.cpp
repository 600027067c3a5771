#include "runtime/parallel/tp_feed_forward.hpp"

#include <vector>

#include "kernels/swiglu.hpp"
#include "runtime/error.hpp"

namespace moerl {

struct TpDenseFeedForward::Impl {
  Param* gate = nullptr;  // [I/T, H]
  Param* up = nullptr;    // [I/T, H]
  Param* down = nullptr;  // [H, I/T]
  int64_t hidden = 0, inter = 0;  // inter: this rank's width I/T
  TensorSlice slice;
  // Saved by forward: x [T, H], g, u, h [T, I/T].
  Precision precision = Precision::FP32;
  int64_t tokens = 0;
  std::vector<float> x, g, u, h;
  std::vector<float> dh, dg, du, dx_up;  // backward scratch
};

TpDenseFeedForward::TpDenseFeedForward(Params& params, const std::string& prefix, int64_t hidden,
                                       int64_t intermediate, TensorSlice slice)
    : impl_(std::make_shared<Impl>()) {
  const std::string where = prefix + ": tensor-parallel feed-forward: ";
  require(hidden > 0 && intermediate > 0, where + "needs hidden_size > 0 and intermediate_size > 0, got " +
                                              std::to_string(hidden) + " and " + std::to_string(intermediate));
  require(slice.ranks >= 1 && slice.rank >= 0 && slice.rank < slice.ranks,
          where + "rank " + std::to_string(slice.rank) + " outside [0, " + std::to_string(slice.ranks) + ")");
  require(intermediate % slice.ranks == 0, where + "intermediate_size " + std::to_string(intermediate) +
                                               " cannot be split evenly over " + std::to_string(slice.ranks) +
                                               " ranks");
  require(slice.ranks == 1 || slice.all_reduce_sum, where + "tensor parallelism needs an all_reduce_sum");
  Impl& m = *impl_;
  m.hidden = hidden;
  m.inter = intermediate / slice.ranks;
  m.slice = std::move(slice);
  m.gate = &params.add(prefix + ".gate_proj.weight", {m.inter, hidden});
  m.up = &params.add(prefix + ".up_proj.weight", {m.inter, hidden});
  m.down = &params.add(prefix + ".down_proj.weight", {hidden, m.inter});
}

void TpDenseFeedForward::forward(const float* x, int64_t tokens, float* y, Precision precision) {
  Impl& m = *impl_;
  require(tokens >= 0, "TpDenseFeedForward::forward: negative token count");
  const int64_t H = m.hidden, I = m.inter;
  m.precision = precision;
  m.tokens = tokens;
  m.x.assign(x, x + tokens * H);
  m.g.resize(static_cast<size_t>(tokens * I));
  m.u.resize(static_cast<size_t>(tokens * I));
  m.h.resize(static_cast<size_t>(tokens * I));
  if (tokens == 0) return;
  cpu::linear_forward(precision, m.x.data(), m.gate->value.data<float>(), m.g.data(), tokens, I, H);
  cpu::linear_forward(precision, m.x.data(), m.up->value.data<float>(), m.u.data(), tokens, I, H);
  cpu::swiglu_forward(m.g.data(), m.u.data(), m.h.data(), tokens * I);
  cpu::linear_forward(precision, m.h.data(), m.down->value.data<float>(), y, tokens, H, I);
  if (m.slice.ranks > 1) m.slice.all_reduce_sum(y, tokens * H);  // row-parallel down_proj
}

void TpDenseFeedForward::backward(const float* dy, float* dx) {
  Impl& m = *impl_;
  const int64_t n = m.tokens, H = m.hidden, I = m.inter;
  if (n == 0) return;
  const Precision p = m.precision;
  m.dh.resize(static_cast<size_t>(n * I));
  m.dg.resize(static_cast<size_t>(n * I));
  m.du.resize(static_cast<size_t>(n * I));
  m.dx_up.resize(static_cast<size_t>(n * H));
  cpu::linear_backward(p, dy, m.h.data(), m.down->value.data<float>(), m.dh.data(), m.down->grad.data<float>(), n,
                       H, I);
  cpu::swiglu_backward(m.dh.data(), m.g.data(), m.u.data(), m.dg.data(), m.du.data(), n * I);
  cpu::linear_backward(p, m.dg.data(), m.x.data(), m.gate->value.data<float>(), dx, m.gate->grad.data<float>(), n, I,
                       H);
  cpu::linear_backward(p, m.du.data(), m.x.data(), m.up->value.data<float>(), m.dx_up.data(),
                       m.up->grad.data<float>(), n, I, H);
  for (int64_t i = 0; i < n * H; ++i) dx[i] += m.dx_up[i];
  if (m.slice.ranks > 1) m.slice.all_reduce_sum(dx, n * H);  // column-parallel gate/up: partial input gradients
}

}  // namespace moerl
