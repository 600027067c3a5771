// The dense SwiGLU feed-forward block, down(silu(gate(x)) * up(x)), split over tensor-parallel ranks
// (Megatron-style): gate_proj and up_proj column-parallel (this rank's I/T rows of each), down_proj
// row-parallel (its I/T columns), the partial outputs all-reduced. Same arithmetic as DenseFeedForward
// (runtime/model/feed_forward.hpp) on the slice; with one rank it is that block.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/linear.hpp"
#include "runtime/model/attention.hpp"  // TensorSlice
#include "runtime/model/params.hpp"

namespace moerl {

class TpDenseFeedForward {
 public:
  // Registers gate_proj, up_proj [intermediate/T, hidden] and down_proj [hidden, intermediate/T] under
  // prefix (the names of the whole block); rank r owns columns [r·I/T, (r+1)·I/T) of the intermediate
  // width. intermediate % T == 0.
  TpDenseFeedForward(Params& params, const std::string& prefix, int64_t hidden, int64_t intermediate,
                     TensorSlice slice);
  // x, y: [tokens, hidden], x the same on every rank; y the full output on every rank (y may alias x).
  void forward(const float* x, int64_t tokens, float* y, Precision precision);
  // dy the same on every rank -> dx overwritten with the full gradient (all-reduced); this rank's slices of
  // the weight gradients accumulated. dx must not alias dy.
  void backward(const float* dy, float* dx);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace moerl
