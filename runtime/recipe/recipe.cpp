#include "runtime/recipe/recipe.hpp"

#include <fstream>
#include <set>

#include "runtime/recipe/yaml_section.hpp"

namespace moerl {
namespace {

// Applies "a.b.0.c=value" to the YAML tree; intermediate mappings are created, list indices must exist.
void apply_override(YAML::Node root, const std::string& text) {
  const auto eq = text.find('=');
  require(eq != std::string::npos && eq > 0, "--set " + text + ": expected key=value");
  const std::string path = text.substr(0, eq), value = text.substr(eq + 1);
  std::vector<std::string> keys;
  for (size_t start = 0;;) {
    const auto dot = path.find('.', start);
    keys.push_back(path.substr(start, dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < keys.size(); ++i) {
    YAML::Node cur = chain.back();
    if (cur.IsSequence()) {
      size_t idx = 0;
      try { idx = std::stoul(keys[i]); } catch (...) { throw Error("--set " + text + ": \"" + keys[i] + "\" is not a list index"); }
      require(idx < cur.size(), "--set " + text + ": index " + keys[i] + " is beyond the list");
      chain.push_back(cur[idx]);
    } else {
      chain.push_back(cur[keys[i]]);
    }
  }
  // A scalar is stored as a node of its own, which no line of the file holds: errors about it then say "(--set)"
  // instead of naming line 1 of the value's text (yaml_section.cpp).
  YAML::Node loaded = YAML::Load(value);
  if (loaded.IsScalar()) loaded = YAML::Node(loaded.Scalar());
  YAML::Node parent = chain.back();
  if (parent.IsSequence()) {
    const size_t idx = std::stoul(keys.back());
    require(idx < parent.size(), "--set " + text + ": index beyond the list");
    parent[idx] = loaded;
  } else {
    parent[keys.back()] = loaded;
  }
}

ModelConfig read_model(YamlSection s) {
  ModelConfig c;
  auto i64 = [&](const char* key, int64_t& v) { v = s.get<int64_t>(key, v); };
  auto f64 = [&](const char* key, double& v) { v = s.get<double>(key, v); };
  auto flag = [&](const char* key, bool& v) { v = s.get<bool>(key, v); };
  i64("vocab_size", c.vocab_size);
  i64("hidden_size", c.hidden_size);
  i64("intermediate_size", c.intermediate_size);
  i64("moe_intermediate_size", c.moe_intermediate_size);
  i64("num_hidden_layers", c.num_hidden_layers);
  i64("num_attention_heads", c.num_attention_heads);
  i64("q_lora_rank", c.q_lora_rank);
  i64("kv_lora_rank", c.kv_lora_rank);
  i64("qk_nope_head_dim", c.qk_nope_head_dim);
  i64("qk_rope_head_dim", c.qk_rope_head_dim);
  i64("v_head_dim", c.v_head_dim);
  flag("rope_interleave", c.rope_interleave);
  f64("rope_theta", c.rope_theta);
  f64("rms_norm_eps", c.rms_norm_eps);
  i64("max_position_embeddings", c.max_position_embeddings);
  i64("first_k_dense_replace", c.first_k_dense_replace);
  i64("n_routed_experts", c.n_routed_experts);
  i64("n_shared_experts", c.n_shared_experts);
  i64("num_experts_per_tok", c.num_experts_per_tok);
  i64("n_group", c.n_group);
  i64("topk_group", c.topk_group);
  flag("norm_topk_prob", c.norm_topk_prob);
  f64("routed_scaling_factor", c.routed_scaling_factor);
  i64("num_nextn_predict_layers", c.num_nextn_predict_layers);
  flag("tie_word_embeddings", c.tie_word_embeddings);
  f64("initializer_range", c.initializer_range);
  s.refuse_unknown();
  return c;
}

AdamWConfig read_optimizer(YamlSection s, int64_t steps) {
  AdamWConfig o;
  o.lr = s.get<double>("lr", o.lr);
  o.beta1 = s.get<double>("beta1", o.beta1);
  o.beta2 = s.get<double>("beta2", o.beta2);
  o.eps = s.get<double>("eps", o.eps);
  o.weight_decay = s.get<double>("weight_decay", o.weight_decay);
  o.clip_grad_norm = s.get<double>("clip_grad_norm", o.clip_grad_norm);
  o.warmup_steps = s.get<int64_t>("warmup_steps", o.warmup_steps);
  o.min_lr_ratio = s.get<double>("min_lr_ratio", o.min_lr_ratio);
  o.total_steps = steps;
  if (o.lr <= 0) s.fail("lr", "expected a positive learning rate");
  if (o.warmup_steps < 0 || o.warmup_steps > steps) s.fail("warmup_steps", "expected 0..steps");
  if (!(o.beta1 >= 0 && o.beta1 < 1)) s.fail("beta1", "expected a value in [0, 1)");
  if (!(o.beta2 >= 0 && o.beta2 < 1)) s.fail("beta2", "expected a value in [0, 1)");
  if (o.clip_grad_norm < 0) s.fail("clip_grad_norm", "expected >= 0 (0 turns clipping off)");
  s.refuse_unknown();
  return o;
}

StageSpec read_stage(YamlSection s, const std::filesystem::path& base, const std::vector<StageSpec>& earlier) {
  StageSpec st;
  st.name = s.required<std::string>("name");
  st.kind = s.required<std::string>("kind");
  static const std::set<std::string> kinds{"pretrain", "sft",         "task_sft", "preferences",
                                           "reward_model", "dpo", "rlhf",     "eval_task"};
  if (!kinds.count(st.kind))
    s.fail("kind", "expected one of pretrain, sft, task_sft, preferences, reward_model, dpo, rlhf, eval_task; got \"" +
                       st.kind + "\"");
  if (is_rl_stage_kind(st.kind)) {
    std::set<std::string> names, reward_models;
    for (const auto& e : earlier) {
      names.insert(e.name);
      if (e.kind == "reward_model") reward_models.insert(e.name);
    }
    st.rl = read_rl_stage(s, st.kind, names, reward_models);
    if ((st.kind == "rlhf" || st.kind == "eval_task" || st.kind == "task_sft" || st.kind == "preferences") &&
        s.has("data"))
      s.fail("data", "an " + st.kind + " stage draws its prompts from the task; data: is for sft, reward_model, dpo");
  }
  if (st.kind == "pretrain" && s.has("data"))
    s.fail("data", "a pretrain stage reads the recipe's corpus (the top-level data: corpus/dir); data: is for sft, "
                   "reward_model, dpo");
  if (s.has("data")) st.data = base / s.get<std::string>("data", "");
  if (st.kind == "sft" && st.data.empty()) s.fail("data", "an sft stage needs a JSONL file of prompt/response lines");
  st.steps = s.get<int64_t>("steps", st.steps);
  st.batch = s.get<int64_t>("batch", st.batch);
  st.seq = s.get<int64_t>("seq", st.seq);
  if (st.steps < 1) s.fail("steps", "expected a positive integer");
  if (st.batch < 1) s.fail("batch", "expected a positive integer");
  if (st.seq < 2) s.fail("seq", "expected an integer >= 2");
  if (s.has("seq") && st.kind != "pretrain" && st.kind != "sft")  // the only stages that cut sequences to a length
    s.fail("seq", "a " + st.kind + " stage sizes each batch from its examples (prompt + response); seq: sets the "
                  "sequence length of pretrain and sft stages");
  st.optimizer = read_optimizer(s.section("optimizer"), st.steps);
  st.mtp_weight = s.get<float>("mtp_weight", st.mtp_weight);
  st.balance_alpha = s.get<float>("balance_alpha", st.balance_alpha);
  st.bias_gamma = s.get<float>("bias_gamma", st.bias_gamma);
  st.eval_every = s.get<int64_t>("eval_every", st.eval_every);
  st.eval_batches = s.get<int64_t>("eval_batches", st.eval_batches);
  st.checkpoint_every = s.get<int64_t>("checkpoint_every", st.checkpoint_every);
  if (st.mtp_weight < 0) s.fail("mtp_weight", "expected >= 0");
  if (st.balance_alpha < 0) s.fail("balance_alpha", "expected >= 0");
  if (st.eval_every < 1) s.fail("eval_every", "expected a positive integer");
  if (st.checkpoint_every < 1) s.fail("checkpoint_every", "expected a positive integer");
  s.refuse_unknown();
  return st;
}

// `parallelism:`: checked against the model and every stage (the combinations runtime/parallel implements).
ParallelSpec read_parallelism(YamlSection s, const Recipe& r) {
  ParallelSpec p;
  auto positive = [&](const char* key, int64_t& v) {
    v = s.get<int64_t>(key, v);
    if (v < 1) s.fail(key, "expected a positive integer, got " + std::to_string(v));
  };
  positive("pipeline", p.pipeline);
  positive("expert", p.expert);
  positive("data", p.data);
  positive("tensor", p.tensor);
  positive("micro_batches", p.micro_batches);
  s.refuse_unknown();
  const ModelConfig& m = r.model;
  if (p.pipeline > m.num_hidden_layers)
    s.fail("pipeline", std::to_string(p.pipeline) + " stages for " + std::to_string(m.num_hidden_layers) +
                           " layers (model.num_hidden_layers): every stage needs a layer");
  if (p.expert > 1 && (m.n_routed_experts == 0 || m.n_routed_experts % p.expert != 0))
    s.fail("expert", std::to_string(p.expert) + " shards must divide model.n_routed_experts (" +
                         std::to_string(m.n_routed_experts) + ")");
  if (p.tensor > 1) {
    if (m.num_attention_heads % p.tensor != 0)
      s.fail("tensor", std::to_string(p.tensor) + " ranks must divide model.num_attention_heads (" +
                           std::to_string(m.num_attention_heads) + ")");
    if (m.intermediate_size % p.tensor != 0)
      s.fail("tensor", std::to_string(p.tensor) + " ranks must divide model.intermediate_size (" +
                           std::to_string(m.intermediate_size) + ")");
    if (m.num_nextn_predict_layers > 0)
      s.fail("tensor", "tensor parallelism does not support multi-token prediction yet "
                       "(model.num_nextn_predict_layers must be 0)");
  }
  if ((p.pipeline > 1 || p.expert > 1) && (p.data > 1 || p.tensor > 1))
    s.fail(p.data > 1 ? "data" : "tensor", "pipeline/expert parallelism combined with data/tensor parallelism "
                                           "is not implemented yet: use pipeline x expert or data x tensor");
  if (p.micro_batches > 1 && p.pipeline == 1) s.fail("micro_batches", "micro-batches need pipeline >= 2");
  // On GPUs: data parallelism only, one replica per GPU of this process (runtime/gpu/gpu_data_parallel.hpp).
  if (r.device != Device::CPU && (p.pipeline > 1 || p.expert > 1 || p.tensor > 1))
    s.fail(p.pipeline > 1 ? "pipeline" : p.expert > 1 ? "expert" : "tensor",
           "device: cuda runs data parallelism only (parallelism.data: one replica per GPU); pipeline, expert and "
           "tensor parallelism run on the CPU (device: cpu)");
  for (const StageSpec& st : r.stages) {
    if (st.batch % p.data != 0)
      s.fail("data", std::to_string(p.data) + " replicas must divide stage " + st.name + "'s batch (" +
                         std::to_string(st.batch) + ")");
    if (p.micro_batches > st.batch)
      s.fail("micro_batches", std::to_string(p.micro_batches) + " micro-batches exceed stage " + st.name +
                                  "'s batch (" + std::to_string(st.batch) + " sequences)");
  }
  return p;
}

}  // namespace

const char* device_name(Device device) { return device == Device::CUDA ? "cuda" : "cpu"; }

Recipe load_recipe(const std::filesystem::path& file, const std::vector<std::string>& overrides) {
  const std::string name = file.string();
  require(std::filesystem::is_regular_file(file), name + ": recipe file not found");
  YAML::Node root;
  try {
    root = YAML::LoadFile(name);
  } catch (const YAML::Exception& e) {
    throw Error(name + ":" + std::to_string(e.mark.line + 1) + ": not valid YAML: " + e.msg);
  }
  require(root.IsMap(), name + ": expected a mapping of recipe fields at the top level");
  for (const auto& o : overrides) apply_override(root, o);

  YamlSection s(root, name, "");
  Recipe r;
  r.file = file;
  r.name = s.get<std::string>("name", file.stem().string());
  r.seed = s.get<uint64_t>("seed", r.seed);
  const std::string precision = s.get<std::string>("precision", "fp32");
  if (!parse_precision(precision, &r.precision)) s.fail("precision", "expected fp32, bf16 or fp8; got \"" + precision + "\"");
  const std::string device = s.get<std::string>("device", "cpu");
  if (device == "cuda") r.device = Device::CUDA;
  else if (device != "cpu") s.fail("device", "expected cpu or cuda; got \"" + device + "\"");
  r.threads = s.get<int>("threads", r.threads);
  r.out = s.get<std::string>("out", "runs/" + r.name);
  r.model = read_model(s.section("model"));
  YamlSection d = s.section("data");
  r.data.corpus = d.get<std::string>("corpus", r.data.corpus);
  r.data.dir = d.get<std::string>("dir", r.data.dir.string());
  r.data.vocab_size = d.get<int64_t>("vocab_size", r.data.vocab_size);
  r.data.validation_every = d.get<int64_t>("validation_every", r.data.validation_every);
  if (r.data.vocab_size < 260) d.fail("vocab_size", "expected >= 260 (256 byte-fallback pieces + special tokens)");
  if (r.data.validation_every < 2) d.fail("validation_every", "expected an integer >= 2");
  d.refuse_unknown();
  r.model.vocab_size = r.data.vocab_size;
  const auto base = file.parent_path();
  std::set<std::string> names;
  for (auto& st : s.list("stages")) {
    r.stages.push_back(read_stage(st, base, r.stages));
    if (!names.insert(r.stages.back().name).second) st.fail("name", "stage name used twice");
    const StageSpec& added = r.stages.back();
    if ((added.kind == "pretrain" || added.kind == "sft") && added.seq > r.model.max_position_embeddings)  // seq's users
      st.fail("seq", std::to_string(added.seq) + " tokens is longer than the model's positions "
                     "(model.max_position_embeddings " + std::to_string(r.model.max_position_embeddings) + ")");
  }
  if (r.stages.empty()) s.fail("stages", "a recipe needs at least one stage");
  r.model.validate(name + ": model");  // before the parallelism, which is checked against the model's shape
  r.parallelism = read_parallelism(s.section("parallelism"), r);
  s.refuse_unknown();
  return r;
}

}  // namespace moerl
