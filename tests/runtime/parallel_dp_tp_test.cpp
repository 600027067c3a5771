#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/parallel/collectives.hpp"
#include "runtime/parallel/dp_trainer.hpp"
#include "runtime/parallel/tp_model.hpp"
#include "tests/support/on_threads.hpp"

namespace moerl {
namespace {

using test::on_threads;

using std::chrono::milliseconds;
constexpr uint64_t kSeed = 7;
constexpr int kSteps = 4;

// Three layers: layer 0 dense, layers 1-2 MoE (4 experts, top-2, one shared expert); 4 heads.
ModelConfig small_config(int64_t q_lora) {
  ModelConfig c;
  c.vocab_size = 96;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.moe_intermediate_size = 16;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.q_lora_rank = q_lora;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 8;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.initializer_range = 0.1;  // far from uniform logits, so the steps move the loss visibly
  return c;
}

AdamWConfig adam(double clip = 0.5) {
  AdamWConfig a;
  a.lr = 3e-3;
  a.weight_decay = 0.1;
  a.clip_grad_norm = clip;
  a.warmup_steps = 1;
  a.total_steps = kSteps;
  return a;
}

// 4 sequences of 8 tokens following t' = (5t + 11) mod V (learnable). With `uneven`, the first three labels
// of sequence 0 are ignored, so the two halves of the batch count different numbers of tokens.
struct Data {
  std::vector<int64_t> ids, labels;
  TokenBatch batch;
  Data(int64_t vocab, bool uneven) {
    const int64_t B = 4, S = 8;
    for (int64_t b = 0; b < B; ++b) {
      int64_t t = (7 * b + 3) % vocab;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t next = (5 * t + 11) % vocab;
        ids.push_back(t);
        labels.push_back(uneven && b == 0 && i < 3 ? kIgnoreLabel : next);
        t = next;
      }
    }
    batch = {ids.data(), labels.data(), B, S};
  }
};

struct Scenario {
  int64_t q_lora = 16;
  bool uneven = true;        // ignored labels in one replica's half only
  float balance_alpha = 0;   // the balance loss is weighted exactly only with even token counts
  float bias_gamma = 1e-3f;  // router bias balancing from the (global) expert load
  double clip = 0.5;
};

ForwardOptions forward_options(const Scenario& s) {
  ForwardOptions o;
  o.balance_alpha = s.balance_alpha;
  return o;
}

struct RunResult {
  std::vector<double> losses;       // per step, over the whole batch
  std::vector<double> grad_norms;   // per step, before clipping
  std::unique_ptr<Model> model;     // the final weights, whole (under TP: merged from the replica's ranks)
  std::unique_ptr<TensorParallelModel> tp_model;
};

// The single model: Model + AdamW on the whole batch, as runtime/train/trainer.cpp steps it.
RunResult single_run(const Scenario& s) {
  const ModelConfig c = small_config(s.q_lora);
  Data data(c.vocab_size, s.uneven);
  RunResult out;
  out.model = std::make_unique<Model>(c);
  Model& m = *out.model;
  m.init_random(kSeed);
  AdamW opt(m.params(), adam(s.clip));
  for (int step = 0; step < kSteps; ++step) {
    m.params().zero_grad();
    const LossReport r = m.forward(data.batch, forward_options(s));
    m.backward();
    out.grad_norms.push_back(opt.step(step).grad_norm);
    if (s.bias_gamma > 0) m.update_router_bias(s.bias_gamma);
    out.losses.push_back(r.loss);
  }
  return out;
}

// DP × TP training: replica d trains on its slice of the batch; with tp > 1 it is a TensorParallelModel of
// tp ranks. Every rank's losses are returned (rank d * tp + t); the first rank of each replica also holds the
// replica's final weights, whole.
std::vector<RunResult> grid_run(const Scenario& s, int dp, int tp, bool gloo) {
  const ModelConfig c = small_config(s.q_lora);
  Data data(c.vocab_size, s.uneven);
  // In-process groups, or Gloo contexts (connected by each rank itself) over one in-memory store.
  std::vector<std::unique_ptr<InProcessGroup>> tp_groups, dp_groups;
  for (int d = 0; d < dp; ++d) tp_groups.push_back(std::make_unique<InProcessGroup>(tp, milliseconds(20000)));
  for (int t = 0; t < tp; ++t) dp_groups.push_back(std::make_unique<InProcessGroup>(dp, milliseconds(20000)));
  GlooRendezvous rendezvous = GlooRendezvous::in_memory();
  std::vector<std::unique_ptr<Collectives>> gloo_tp(static_cast<size_t>(dp * tp)), gloo_dp(gloo_tp.size());

  std::vector<RunResult> results(static_cast<size_t>(dp * tp));
  on_threads(dp * tp, [&](int id) {
    const int d = id / tp, t = id % tp;
    Collectives* tensor_group = &tp_groups[d]->member(t);
    Collectives* data_group = &dp_groups[t]->member(d);
    if (gloo) {
      GlooOptions o;
      o.timeout = milliseconds(20000);
      o.prefix = "tp" + std::to_string(d);
      gloo_tp[id] = connect_gloo(rendezvous, t, tp, o);
      o.prefix = "dp" + std::to_string(t);
      gloo_dp[id] = connect_gloo(rendezvous, d, dp, o);
      tensor_group = gloo_tp[id].get();
      data_group = gloo_dp[id].get();
    }
    RunResult& out = results[static_cast<size_t>(id)];
    out.model = std::make_unique<Model>(c);
    out.model->init_random(kSeed);  // every rank starts from the single model's weights
    ModelReplica whole(*out.model);
    Replica* replica = &whole;
    if (tp > 1) {
      out.tp_model = std::make_unique<TensorParallelModel>(c, *tensor_group);
      out.tp_model->load_from(out.model->params());
      replica = out.tp_model.get();
    }
    DataParallelTrainer trainer(*replica, *data_group, adam(s.clip));
    for (int step = 0; step < kSteps; ++step) {
      const DpStepReport r = trainer.step(slice_batch(data.batch, d, dp), forward_options(s), step, s.bias_gamma);
      out.losses.push_back(r.loss.loss);
      out.grad_norms.push_back(r.optimizer.grad_norm);
    }
  });
  if (tp > 1)
    for (int d = 0; d < dp; ++d)
      for (int t = 0; t < tp; ++t)
        results[d * tp + t].tp_model->store_into(results[d * tp].model->params());
  return results;
}

// The largest |a - b| over every parameter, relative to the largest |a|.
double max_weight_difference(const Model& a, const Model& b) {
  double diff = 0, scale = 0;
  for (const auto& [name, p] : a.params().all()) {
    const float* x = p.value.data<float>();
    const float* y = b.params().at(name).value.data<float>();
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      diff = std::max(diff, std::fabs(static_cast<double>(x[i]) - y[i]));
      scale = std::max(scale, std::fabs(static_cast<double>(x[i])));
    }
  }
  return diff / scale;
}

// Checks a grid run against the single model: every rank reports the same losses; each step's loss within
// 1e-5 relative of the single model's (the bound for fp32). The parallel runs add the same FP32
// numbers in other orders (halves of the batch, partial sums of head and column slices), which moves a loss by
// a few 1e-7 relative; Adam's normalised update keeps those differences from growing much over four steps.
void expect_same_training(const RunResult& single, const std::vector<RunResult>& ranks, const std::string& what) {
  for (size_t r = 0; r < ranks.size(); ++r) {
    EXPECT_EQ(ranks[r].losses, ranks[0].losses) << what << ": rank " << r << " reports other losses than rank 0";
    EXPECT_EQ(ranks[r].grad_norms, ranks[0].grad_norms) << what << ": rank " << r << " saw another gradient norm";
  }
  for (int step = 0; step < kSteps; ++step) {
    const double want = single.losses[step], got = ranks[0].losses[step];
    EXPECT_LE(std::fabs(got - want), 1e-5 * std::fabs(want))
        << what << ", step " << step << ": loss " << got << " vs single model " << want;
    // The gradient norm: at step 0 (same weights) only the summation order differs, ~1e-7; later it also
    // inherits the weights' differences, measured up to 1.2e-5 relative.
    const double norm_tolerance = step == 0 ? 1e-6 : 1e-4;
    const double norm_difference = std::fabs(ranks[0].grad_norms[step] / single.grad_norms[step] - 1);
    EXPECT_LE(norm_difference, norm_tolerance) << what << ", step " << step << ": gradient norm";
    std::printf("[ %s ] step %d: loss %.9f, single %.9f, relative difference %.2e (gradient norm %.2e)\n",
                what.c_str(), step, got, want, std::fabs(got - want) / std::fabs(want), norm_difference);
  }
  // The losses must move, or the comparison above would say little.
  EXPECT_LT(single.losses.back(), single.losses.front() - 0.05);
}

TEST(DataParallel, OneReplicaWithoutClippingIsBitIdenticalToAdamW) {
  Scenario s;
  s.clip = 0;  // the gradient norm is summed in another order; without clipping it does not enter the update
  const RunResult single = single_run(s);
  std::vector<RunResult> one = grid_run(s, 1, 1, false);
  EXPECT_EQ(one[0].losses, single.losses);
  EXPECT_EQ(max_weight_difference(*single.model, *one[0].model), 0.0);
}

TEST(DataParallel, TwoReplicasWithZeroOneMatchTheSingleModelOnUnevenTokenCounts) {
  Scenario s;  // sequence 0 has 3 ignored labels: replica 0 counts 29 tokens, replica 1 32
  const RunResult single = single_run(s);
  std::vector<RunResult> ranks = grid_run(s, 2, 1, false);
  expect_same_training(single, ranks, "DP=2");
  // Both replicas end with the same weights, bit for bit (the all-gathered shards), close to the single run's.
  EXPECT_EQ(max_weight_difference(*ranks[0].model, *ranks[1].model), 0.0);
  const double d = max_weight_difference(*single.model, *ranks[0].model);
  std::printf("[ DP=2 ] final weights: max difference %.2e relative to the largest weight\n", d);
  EXPECT_LT(d, 1e-3);  // Adam moves each weight by about lr = 1e-2 per step; rounding noise stays far below
}

// Two replicas trained from steps [from, to): weights (all parameters) and optimizer states in, out.
struct Snapshot {
  std::vector<std::unique_ptr<Model>> models;  // one per replica
  std::vector<SafeTensors> states;             // ZeroAdamW::state() per replica; empty: fresh optimizers
};

SafeTensors copy_state(const ZeroAdamW& opt, const std::string& source) {
  SafeTensors st;
  st.source = source;
  for (const auto& [name, t] : opt.state()) st.tensors.emplace(name, t->clone());
  return st;
}

Snapshot train_two_replicas(const Scenario& s, int from, int to, const Snapshot& start) {
  const ModelConfig c = small_config(s.q_lora);
  Data data(c.vocab_size, s.uneven);
  InProcessGroup group(2, milliseconds(20000));
  Snapshot out;
  out.models.resize(2);
  out.states.resize(2);
  on_threads(2, [&](int d) {
    auto model = std::make_unique<Model>(c);
    if (start.models.empty()) {
      model->init_random(kSeed);
    } else {
      for (auto& [name, p] : model->params().all())
        std::copy_n(start.models[d]->params().at(name).value.data<float>(), p.value.numel(), p.value.data<float>());
    }
    ModelReplica replica(*model);
    DataParallelTrainer trainer(replica, group.member(d), adam(s.clip));
    if (!start.states.empty()) trainer.optimizer().load_state(start.states[d]);
    for (int step = from; step < to; ++step)
      trainer.step(slice_batch(data.batch, d, 2), forward_options(s), step, s.bias_gamma);
    out.states[d] = copy_state(trainer.optimizer(), "replica " + std::to_string(d));
    out.models[d] = std::move(model);
  });
  return out;
}

TEST(DataParallel, ShardedOptimizerStatesRestoreAndContinueBitIdentically) {
  Scenario s;
  const Snapshot straight = train_two_replicas(s, 0, kSteps, {});
  const Snapshot half = train_two_replicas(s, 0, 2, {});
  const Snapshot resumed = train_two_replicas(s, 2, kSteps, half);
  for (int d = 0; d < 2; ++d) {
    EXPECT_EQ(max_weight_difference(*straight.models[d], *resumed.models[d]), 0.0) << "replica " << d;
    for (const auto& [name, t] : straight.states[d].tensors)
      EXPECT_EQ(std::memcmp(t.bytes(), resumed.states[d].at(name).bytes(), t.nbytes()), 0) << name;
  }
  // Each replica holds half of the moments: the shards tile the flattened parameters.
  const int64_t* shard0 = straight.states[0].at("optimizer.zero.shard").data<int64_t>();
  const int64_t* shard1 = straight.states[1].at("optimizer.zero.shard").data<int64_t>();
  EXPECT_EQ(shard0[0], 0);
  EXPECT_EQ(shard0[1], shard1[0]);
  EXPECT_EQ(shard1[1], shard1[2]);
  EXPECT_LE(std::abs((shard0[1] - shard0[0]) - (shard1[1] - shard1[0])), 1);

  // Replica 1's state does not fit replica 0's shard.
  const ModelConfig c = small_config(s.q_lora);
  Model model(c);
  InProcessGroup group(2);
  ZeroAdamW opt(model.params(), adam(), group.member(0));
  try {
    opt.load_state(straight.states[1]);
    FAIL() << "replica 1's moments were loaded into replica 0";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("replica 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("optimizer.zero"), std::string::npos) << e.what();
  }
}

TEST(TensorParallel, TwoRanksMatchTheSingleModelWithQueryCompressionAndBalanceLoss) {
  Scenario s;
  s.uneven = false;
  s.balance_alpha = 0.01f;  // one replica: the balance loss is exact under TP (the MoE layers are replicated)
  expect_same_training(single_run(s), grid_run(s, 1, 2, false), "TP=2, q_lora 16");
}

TEST(TensorParallel, TwoRanksMatchTheSingleModelWithoutQueryCompression) {
  Scenario s;
  s.q_lora = 0;  // q_proj column-parallel straight from x: its input gradient is all-reduced instead
  expect_same_training(single_run(s), grid_run(s, 1, 2, false), "TP=2, q_proj");
}

TEST(DataAndTensorParallel, TwoByTwoRanksMatchTheSingleModel) {
  Scenario s;
  const RunResult single = single_run(s);
  std::vector<RunResult> ranks = grid_run(s, 2, 2, false);
  expect_same_training(single, ranks, "DP=2 x TP=2");
  // Both replicas end with the same weights, bit for bit, close to the single run's (see the DP=2 test).
  EXPECT_EQ(max_weight_difference(*ranks[0].model, *ranks[2].model), 0.0);
  const double d = max_weight_difference(*single.model, *ranks[0].model);
  std::printf("[ DP=2 x TP=2 ] final weights: max difference %.2e relative to the largest weight\n", d);
  EXPECT_LT(d, 1e-3);
}

TEST(DataAndTensorParallel, GlooBetweenThreadsGivesTheInProcessLossesBitForBit) {
  Scenario s;
  const std::vector<RunResult> in_process = grid_run(s, 2, 2, false);
  const std::vector<RunResult> gloo = grid_run(s, 2, 2, true);
  for (size_t r = 0; r < gloo.size(); ++r) EXPECT_EQ(gloo[r].losses, in_process[r].losses) << "rank " << r;
  for (size_t r : {0, 2}) EXPECT_EQ(max_weight_difference(*gloo[r].model, *in_process[r].model), 0.0) << "rank " << r;
}

TEST(TensorParallel, SlicedGradientsMatchTheWholeModelsAndCopiesAgreeBitForBit) {
  for (int64_t q_lora : {int64_t{0}, int64_t{16}}) {
    const ModelConfig c = small_config(q_lora);
    Data data(c.vocab_size, true);
    ForwardOptions o;
    o.balance_alpha = 0.01f;
    Model whole(c);
    whole.init_random(kSeed);
    whole.params().zero_grad();
    const LossReport want = whole.forward(data.batch, o);
    whole.backward();

    InProcessGroup group(2, milliseconds(20000));
    std::vector<std::unique_ptr<TensorParallelModel>> ranks(2);
    std::vector<LossReport> got(2);
    on_threads(2, [&](int r) {
      ranks[r] = std::make_unique<TensorParallelModel>(c, group.member(r));
      ranks[r]->load_from(whole.params());
      ranks[r]->params().zero_grad();
      got[r] = ranks[r]->forward(data.batch, o);
      ranks[r]->backward();
    });
    // 1e-6 relative: the same FP32 loss with the heads' and columns' partial sums added in another order.
    EXPECT_NEAR(got[0].total, want.total, 1e-6 * want.total);
    EXPECT_EQ(got[0].total, got[1].total);
    for (auto& [name, p] : ranks[0]->params().all()) {
      const ShardSpec spec = ranks[0]->shard(name);
      const Tensor& full = whole.params().at(name).grad;
      double scale = 0;
      for (float g : full.span<float>()) scale = std::max(scale, std::fabs(static_cast<double>(g)));
      for (int r = 0; r < 2; ++r) {
        const Param& mine = ranks[r]->params().at(name);
        const ShardSpec sr = ranks[r]->shard(name);
        if (spec.axis < 0) {
          EXPECT_TRUE(std::equal(mine.grad.span<float>().begin(), mine.grad.span<float>().end(),
                                 ranks[0]->params().at(name).grad.span<float>().begin()))
              << name << ": the copies' gradients differ between ranks";
        }
        // Gradient of element (i, j) of this rank's tensor vs the whole model's element it slices.
        const int64_t rows = mine.grad.rank() == 2 ? mine.grad.dim(0) : mine.grad.numel();
        const int64_t cols = mine.grad.rank() == 2 ? mine.grad.dim(1) : 1;
        const int64_t full_cols = full.rank() == 2 ? full.dim(1) : 1;
        double worst = 0;
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j) {
            const int64_t fi = sr.axis == 0 ? sr.begin + i : i, fj = sr.axis == 1 ? sr.begin + j : j;
            const double a = mine.grad.data<float>()[i * cols + j], b = full.data<float>()[fi * full_cols + fj];
            worst = std::max(worst, std::fabs(a - b));
          }
        // 1e-5 of the tensor's largest gradient: FP32 rounding of reordered sums, a few ulps at most per entry.
        EXPECT_LE(worst, 1e-5 * scale) << "q_lora " << q_lora << ", rank " << r << ", " << name;
      }
    }
  }
}

TEST(TensorParallel, RefusesHeadsOrColumnsThatDoNotSplitEvenly) {
  InProcessGroup three(3);
  try {
    TensorParallelModel m(small_config(16), three.member(0));
    FAIL() << "4 heads over 3 ranks were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("num_attention_heads"), std::string::npos) << e.what();
  }
  ModelConfig c = small_config(16);
  c.num_attention_heads = 6;
  c.intermediate_size = 64;
  try {
    TensorParallelModel m(c, three.member(0));
    FAIL() << "intermediate_size 64 over 3 ranks was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("intermediate_size"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moerl
