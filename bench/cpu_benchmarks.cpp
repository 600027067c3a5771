// `moerl bench cpu`: the CPU reference kernels and a training step of a small model, on this machine's cores.
#include <random>
#include <vector>

#include "bench/report.hpp"
#include "kernels/fp8.hpp"
#include "kernels/linear.hpp"
#include "runtime/model/model.hpp"

namespace moerl::bench {

void run_cpu_benchmarks(Report& report) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Quantization, 1x128 tiles: 4096 x 4096 FP32 in, E4M3 codes + scales out.
  {
    const int64_t rows = 4096, cols = 4096;
    std::vector<float> x(static_cast<size_t>(rows * cols));
    for (auto& v : x) v = normal(rng);
    std::vector<uint8_t> codes(x.size());
    std::vector<float> scales(static_cast<size_t>(rows * fp8::tiles(cols)));
    const double s = median_seconds(5, [&] { fp8::cpu::quantize_1x128(x.data(), rows, cols, codes.data(), scales.data()); });
    const double bytes = static_cast<double>(x.size()) * 5 + static_cast<double>(scales.size()) * 4;
    report.add("cpu", "quant_1x128_gbps", bytes / s / 1e9, "GB/s", "median", {{"shape", {rows, cols}}});
  }
  // Linear layer forward, 1024^3, in each precision.
  {
    const int64_t n = 1024;
    std::vector<float> x(static_cast<size_t>(n * n)), w(x.size()), y(x.size());
    for (auto& v : x) v = normal(rng);
    for (auto& v : w) v = normal(rng);
    for (Precision p : {Precision::FP32, Precision::BF16, Precision::FP8}) {
      const double s = median_seconds(5, [&] { cpu::linear_forward(p, x.data(), w.data(), y.data(), n, n, n); });
      report.add("cpu", "linear_" + std::string(precision_name(p)) + "_1024_gflops", 2.0 * n * n * n / s / 1e9, "GFLOP/s");
    }
  }
  // A training step (forward + backward) of a small MoE model, batch 8 x 128 tokens.
  {
    ModelConfig c;
    c.vocab_size = 2000; c.hidden_size = 128; c.intermediate_size = 384; c.moe_intermediate_size = 96;
    c.num_hidden_layers = 4; c.num_attention_heads = 4; c.q_lora_rank = 0; c.kv_lora_rank = 64;
    c.qk_nope_head_dim = 32; c.qk_rope_head_dim = 16; c.v_head_dim = 32; c.n_routed_experts = 8;
    c.num_experts_per_tok = 2; c.n_group = 1; c.topk_group = 1; c.num_nextn_predict_layers = 1;
    Model model(c);
    model.init_random(1);
    const int64_t B = 8, S = 128;
    std::vector<int64_t> ids(static_cast<size_t>(B * S)), labels(ids.size());
    std::uniform_int_distribution<int64_t> tok(0, c.vocab_size - 1);
    for (size_t i = 0; i < ids.size(); ++i) { ids[i] = tok(rng); labels[i] = tok(rng); }
    for (Precision p : {Precision::FP32, Precision::BF16, Precision::FP8}) {
      ForwardOptions o;
      o.precision = p;
      o.mtp_weight = 0.3f;
      const double s = median_seconds(3, [&] {
        model.params().zero_grad();
        model.forward(TokenBatch{ids.data(), labels.data(), B, S}, o);
        model.backward();
      });
      report.add("cpu", "train_step_" + std::string(precision_name(p)) + "_tokens_per_s", static_cast<double>(B * S) / s,
                 "tokens/s", "median", {{"config", "hidden 128, 4 layers, 8 experts top-2, MTP, batch 8x128"}});
    }
  }
}

}  // namespace moerl::bench
